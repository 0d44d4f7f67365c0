"""Bad input gets an OpenAI-style error object with a 4xx status (never a 500) and the server keeps
serving; a full queue answers 503 with Retry-After at once instead of hanging."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from kiln.errors import KilnError
from kiln.server.errors import install_error_handlers

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]

# (path, JSON body, status, param the error names)
BAD_REQUESTS = [
    (COMPLETIONS, [1, 2], 400, None),
    (COMPLETIONS, {"max_tokens": 4}, 400, "prompt"),
    (COMPLETIONS, {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    (COMPLETIONS, {"prompt": 5}, 400, "prompt"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "n": 1.5}, 400, "n"),
    (COMPLETIONS, {"prompt": "x", "n": 0}, 400, "n"),
    (COMPLETIONS, {"prompt": "x", "temperature": 2.5}, 400, "temperature"),
    (COMPLETIONS, {"prompt": "x", "temperature": -0.1}, 400, "temperature"),
    (COMPLETIONS, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    (COMPLETIONS, {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    (COMPLETIONS, {"prompt": "x", "stop": [""]}, 400, "stop"),
    (COMPLETIONS, {"prompt": "x", "stream": "yes please"}, 400, "stream"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 4, "min_tokens": 9}, 400, "min_tokens"),
    (COMPLETIONS, {"prompt": "def main():", "max_tokens": 1020}, 400, "prompt"),
    (COMPLETIONS, {"prompt": ""}, 400, "prompt"),
    (COMPLETIONS, {"prompt": []}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [99999]}, 400, "prompt"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    (CHAT, {"messages": [{"content": "hi"}]}, 400, "messages.0.role"),
    (CHAT, {"messages": USER, "max_tokens": 5000}, 400, "messages"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, 400, None),
    (CHAT, {"messages": USER, "model": "nope"}, 404, "model"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    (CHAT, {"messages": USER, "response_format": {"type": "json_object"}}, 400, "response_format"),
    (COMPLETIONS, {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    (CHAT, {"messages": USER, "tool_choice": "required"}, 400, "tool_choice"),
    ("/v1/embeddings", {"input": "x", "dimensions": 3}, 400, "dimensions"),
    ("/v1/embeddings", {"input": []}, 400, "input"),
    ("/v1/embeddings", {"input": "x" * 5000}, 400, "input"),
    ("/tokenize", {}, 400, None),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens.0"),
]


@pytest.fixture(scope="module")
def server(start_server):
    # One running and one queued request fill it (see the 503 test); the other tests send one at a time.
    return start_server("--max-num-seqs", "1", "--max-queue", "1")


def assert_error_object(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    error = assert_error_object(httpx.post(server.url + path, json=body, timeout=30), status)
    assert error["param"] == param


def test_context_length_error_says_what_to_do(server):
    response = httpx.post(server.url + COMPLETIONS, json={"prompt": "def main():", "max_tokens": 1020})
    error = assert_error_object(response, 400)
    assert error["code"] == "context_length_exceeded"
    assert "maximum context length is 1024 tokens" in error["message"] and "1020" in error["message"]


def test_malformed_json_and_oversized_bodies(server):
    headers = {"Content-Type": "application/json"}
    malformed = httpx.post(server.url + COMPLETIONS, content=b'{"prompt": "x",', headers=headers)
    assert "not valid JSON" in assert_error_object(malformed, 400)["message"]
    huge = {"prompt": "x" * 5_000_000}
    assert_error_object(httpx.post(server.url + COMPLETIONS, json=huge, timeout=30), 413)

    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'{"prompt": "'
        for _ in range(50):
            yield b"y" * 100_000
        yield b'"}'

    chunked = httpx.post(server.url + COMPLETIONS, content=chunks(), headers=headers, timeout=30)
    assert_error_object(chunked, 413)


def test_unknown_routes_and_methods(server):
    assert assert_error_object(httpx.get(server.url + "/v1/nope"), 404)["code"] == "not_found"
    assert_error_object(httpx.get(server.url + COMPLETIONS), 405)


def test_the_server_keeps_serving_after_bad_input(server):
    for path, body, _, _ in BAD_REQUESTS[:5]:
        httpx.post(server.url + path, json=body)
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    response = httpx.post(server.url + COMPLETIONS, json={"prompt": "x = ", "max_tokens": 3}, timeout=30)
    assert response.status_code == 200 and response.json()["choices"][0]["text"] is not None
    assert "Traceback" not in server.log() and " 500 " not in server.log()


def test_full_queue_answers_503_with_retry_after(server):
    long = {"prompt": "def", "max_tokens": 800, "ignore_eos": True, "stream": True}

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            # Two requests fill the engine's one place and the queue's one place.
            streams = [client.stream("POST", COMPLETIONS, json=long) for _ in range(2)]
            responses = [await stream.__aenter__() for stream in streams]
            for response in responses:
                assert response.status_code == 200
            refused = await client.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 2})
            refused_chat = await client.post(CHAT, json={"messages": USER, "max_tokens": 2})
            for stream in streams:
                await stream.__aexit__(None, None, None)  # disconnect: both are aborted
            await asyncio.sleep(0.5)
            accepted = await client.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 2})
            return refused, refused_chat, accepted

    refused, refused_chat, accepted = asyncio.run(main())
    for response in (refused, refused_chat):
        assert assert_error_object(response, 503)["code"] == "server_overloaded"
        assert response.headers["Retry-After"] == "1"
    assert accepted.status_code == 200
    assert server.metric("kiln:requests_rejected_total") == 2


def test_a_kiln_error_that_names_its_field_answers_400_naming_it():
    # The engine's vocabulary checks raise KilnError with `param` set; the server names it.
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/named")
    async def named() -> None:
        error = KilnError("top_k must be at most the vocabulary size, 400")
        error.param = "top_k"
        raise error

    @app.get("/plain")
    async def plain() -> None:
        raise KilnError("min_tokens must be in [0, max_tokens]")

    client = TestClient(app)
    error = assert_error_object(client.get("/named"), 400)
    assert error["param"] == "top_k" and "vocabulary" in error["message"]
    assert assert_error_object(client.get("/plain"), 400)["param"] is None
