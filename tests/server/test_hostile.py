

def test_the_web_ui_asks_for_the_key_when_a_request_answers_401(server):
    script = httpx.get(server.url + "/static/app.js").text
    assert "response.status !== 401" in script and "window.prompt(" in script
    assert 'fetch("/v1' not in script  # every API call goes through authorizedFetch
