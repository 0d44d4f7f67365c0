"""Schema fuzz: schemathesis drives a real `kiln serve` with cases generated from the server's own
/openapi.json: the schema's examples, the boundary values of every field (its coverage phase: one past each
bound, wrong types, missing fields, ...) and random valid and invalid bodies, with a fixed seed and a
bounded number per operation. Every answer is checked: no 5xx, only documented status codes and content
types, bodies and stream events that match the documented schemas, no valid input accepted as invalid or
the reverse, auth enforced where declared, errors that are OpenAI error objects, and no stream that ends
in a server error. Afterwards the engine still answers a greedy request with the same text.

This module is also the schemathesis hooks module (SCHEMATHESIS_HOOKS) that registers the two kiln checks.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import httpx
import pytest
import schemathesis

from tests.server.conftest import API_KEY, REPO

MAX_EXAMPLES = 200  # per operation and phase; about a minute in all on a 2-core machine
SEED = 20240610
GREEDY = {"prompt": "def main():", "max_tokens": 8, "temperature": 0}
ERROR_FIELDS = {"message", "type", "param", "code"}


@schemathesis.check
def openai_error_object(ctx, response, case) -> bool | None:
    """A 4xx/5xx body is {"error": {message, type, param, code}} with a non-empty message."""
    if response.status_code < 400:
        return None
    error = response.json().get("error")
    assert isinstance(error, dict) and set(error) == ERROR_FIELDS, f"not an OpenAI error: {response.text}"
    assert isinstance(error["message"], str) and error["message"], f"error without a message: {response.text}"
    return True


@schemathesis.check
def no_server_error_in_stream(ctx, response, case) -> bool | None:
    """A stream that began with 200 must not end in a server_error event (an engine fault in disguise)."""
    if not response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        return None
    for line in response.text.splitlines():
        if line.startswith("data: {") and '"error"' in line:
            error = json.loads(line.removeprefix("data: ")).get("error") or {}
            assert error.get("type") != "server_error", f"the stream failed: {line}"
    return True


@pytest.fixture(scope="module")
def server(start_server):
    # A short context keeps each generated completion (up to n=128 samples) to a few engine steps.
    return start_server("--max-model-len", "64", "--max-queue", "4", api_key=API_KEY)


def greedy_text(server) -> str:
    response = httpx.post(server.url + "/v1/completions", json=GREEDY, headers=server.headers, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def run_schemathesis(server, config_dir, *args: str) -> subprocess.CompletedProcess[str]:
    # No crash cache: it would replay earlier runs' failures and leave .schemathesis/ in the repository.
    config = config_dir / "schemathesis.toml"
    config.write_text("[cache]\nenabled = false\n")
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run"]
    command += [server.url + "/openapi.json"]
    command += ["--header", f"Authorization: Bearer {API_KEY}", "--seed", str(SEED), "--workers", "1"]
    command += ["--phases", "examples,coverage,fuzzing", "--no-shrink", "--request-timeout", "120", *args]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.server.test_fuzz", "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_schema_fuzz_finds_no_5xx_and_the_engine_is_unchanged(server, capsys, tmp_path):
    before = greedy_text(server)
    # Every check, kiln's two included, but positive_data_acceptance: a valid body may still get a 400
    # the schema cannot state (a prompt longer than the context, a model name this server does not serve).
    result = run_schemathesis(
        server,
        tmp_path,
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--max-examples",
        str(MAX_EXAMPLES),
    )
    generated = re.search(r"(\d+) generated", result.stdout)
    with capsys.disabled():
        print(f"\nschemathesis: {generated.group(0) if generated else 'no'} cases over /openapi.json")
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    assert generated is not None and int(generated.group(1)) > 1000, result.stdout[-5000:]
    assert re.search(r"Tested: 9\b", result.stdout), result.stdout[-5000:]  # every route was fuzzed
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert greedy_text(server) == before
    assert "Traceback" not in server.log()


def test_the_schema_documents_what_the_server_answers(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    operations = {(method, path): op for path, ops in schema["paths"].items() for method, op in ops.items()}
    for (method, path), operation in operations.items():
        assert "422" not in operation["responses"], (method, path)  # kiln answers 400, never 422
        guarded = path.startswith(("/v1/", "/tokenize", "/detokenize"))
        assert ("401" in operation["responses"]) == guarded, (method, path)
        assert (operation.get("security") == [{"bearer": []}]) == guarded, (method, path)
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = operations["post", path]["responses"]
        assert set(responses) == {"200", "400", "401", "404", "413", "503"}
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
        assert responses["400"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"
        }
    assert set(operations["get", "/metrics"]["responses"]["200"]["content"]) == {"text/plain"}
    fields = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    top_k = next(branch for branch in fields["top_k"]["anyOf"] if branch.get("type") == "integer")
    assert (top_k["minimum"], top_k["maximum"]) == (-1, 2**31 - 1)
    seed = next(branch for branch in fields["seed"]["anyOf"] if branch.get("type") == "integer")
    assert (seed["minimum"], seed["maximum"]) == (-(2**63), 2**63 - 1)
    assert "oneOf" in schema["components"]["schemas"]["TokenizeRequest"]  # prompt xor messages


def test_docs_work_offline(server):
    page = httpx.get(server.url + "/docs")
    assert page.status_code == 200
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    assert assets and all(url.startswith("/docs/assets/") for url in assets), assets  # no CDN
    for url in assets:
        assert httpx.get(server.url + url).status_code == 200, url
    assert "/openapi.json" in page.text
