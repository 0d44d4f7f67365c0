"""Hostile inputs, by hand: out-of-range, non-finite and wrongly typed numbers for every sampling field,
nested and mixed prompt lists, bodies over the limit, lone surrogates, NUL and control characters, long
stop lists, unknown and unsupported fields. Each gets a 4xx OpenAI error naming the field (or a 200 where
the input is legitimately fine), never a 5xx, and the server stays healthy with unchanged greedy text."""

from __future__ import annotations

import json

import httpx
import pytest

from kiln.server.config import ServerConfig
from tests.server.conftest import API_KEY

COMPLETIONS, CHAT, EMBEDDINGS = "/v1/completions", "/v1/chat/completions", "/v1/embeddings"
GREEDY = {"prompt": "def main():", "max_tokens": 8, "temperature": 0}
HUGE_INTS = [2**63, 2**64, -(2**63) - 1, 10**30]
WRONG_TYPES = [True, False, "1", [1], {"a": 1}]
NON_FINITE = [float("nan"), float("inf"), float("-inf"), 1e308, -1e308]
INT_FIELDS = ["n", "best_of", "max_tokens", "min_tokens", "logprobs", "top_k", "seed"]
FLOAT_FIELDS = [
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
]
BOOL_FIELDS = ["stream", "echo", "ignore_eos", "skip_special_tokens"]
USER = [{"role": "user", "content": "hi"}]


def completion(**fields) -> dict:
    return {"prompt": "x", "max_tokens": 2, **fields}


def chat(**fields) -> dict:
    return {"messages": USER, "max_tokens": 2, **fields}


# (path, body, status, param the error names; None for a 200)
CASES = [
    *[
        (COMPLETIONS, completion(**{f: v}), 400, f)
        for f in INT_FIELDS
        for v in HUGE_INTS + WRONG_TYPES + [1.5]
    ],
    *[
        (COMPLETIONS, completion(**{f: v}), 400, f)
        for f in FLOAT_FIELDS
        for v in NON_FINITE + WRONG_TYPES[:4]
    ],
    *[(COMPLETIONS, completion(**{f: v}), 400, f) for f in BOOL_FIELDS for v in [1, 0, "true", 1.0]],
    *[
        (CHAT, chat(**{f: v}), 400, f)
        for f in ["top_k", "seed", "n", "max_completion_tokens"]
        for v in HUGE_INTS
    ],
    (CHAT, chat(logprobs=1), 400, "logprobs"),
    (CHAT, chat(top_logprobs=21, logprobs=True), 400, "top_logprobs"),
    (CHAT, chat(stream=True, top_k=2**64), 400, "top_k"),
    (COMPLETIONS, completion(top_k=-2), 400, "top_k"),
    (COMPLETIONS, completion(n=129), 400, "n"),
    (COMPLETIONS, completion(logprobs=21), 400, "logprobs"),
    (COMPLETIONS, completion(top_p=1e-300), 400, "top_p"),
    (COMPLETIONS, completion(repetition_penalty=1e-300), 400, "repetition_penalty"),
    # legitimately fine: a temperature too small to divide by is greedy; -1 switches top_k off
    (COMPLETIONS, completion(temperature=5e-324), 200, None),
    (COMPLETIONS, completion(temperature=1e-6, top_k=-1, top_p=1e-8, seed=-1), 200, None),
    (COMPLETIONS, completion(seed=2**63 - 1, min_p=1.0, repetition_penalty=100.0), 200, None),
    (COMPLETIONS, completion(seed=-(2**63), presence_penalty=-2.0, frequency_penalty=2), 200, None),
    # prompt lists: nested, mixed, empty, out of range
    *[
        (COMPLETIONS, completion(prompt=prompt), 400, "prompt")
        for prompt in (
            [[[1]]],
            ["a", [1]],
            [1, "a"],
            [[1], "a"],
            [[]],
            [""],
            [-1],
            [2**63],
            [True],
            [1.0],
            {"a": 1},
            None,
        )
    ],
    (COMPLETIONS, completion(prompt=[[1, 2], [3]]), 200, None),
    (COMPLETIONS, completion(prompt=["a", "b"], n=2, best_of=2), 200, None),
    (EMBEDDINGS, {"input": [[1, 2, 3]] * 3}, 200, None),
    (EMBEDDINGS, {"input": [[]]}, 400, "input"),
    (EMBEDDINGS, {"input": ["a", 1]}, 400, "input"),
    ("/detokenize", {"tokens": [2**63]}, 400, "tokens.0"),
    ("/detokenize", {"tokens": [1, True]}, 400, "tokens.1"),
    ("/tokenize", {"prompt": "x", "messages": USER}, 400, None),
    # lone surrogates, anywhere
    (COMPLETIONS, completion(prompt="\ud800"), 400, "prompt"),
    (COMPLETIONS, completion(prompt=["ok", "a\udfffb"]), 400, "prompt.1"),
    (COMPLETIONS, completion(stop=["a", "\ud800"]), 400, "stop.1"),
    (COMPLETIONS, completion(model="\udc00"), 400, "model"),
    (COMPLETIONS, completion(user="\ud800"), 400, "user"),
    (COMPLETIONS, completion(unknown={"deep": ["\ud800"]}), 400, "unknown.deep.0"),
    (COMPLETIONS, {**completion(), "k\ud800": 1}, 400, "k\\ud800"),
    (CHAT, chat(messages=[{"role": "user", "content": "\ud800"}]), 400, "messages.0.content"),
    (
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]),
        400,
        "messages.0.content.0.text",
    ),
    (CHAT, chat(messages=[{"role": "user", "content": "hi", "name": "\ud800"}]), 400, "messages.0.name"),
    (CHAT, chat(chat_template_kwargs={"x": "\ud800"}), 400, "chat_template_kwargs.x"),
    (EMBEDDINGS, {"input": "\ud800"}, 400, "input"),
    ("/tokenize", {"prompt": "\ud800"}, 400, "prompt"),
    (COMPLETIONS, completion(prompt="\ud83d\ude00 paired surrogates are one emoji"), 200, None),
    # NUL and control characters are text like any other
    (COMPLETIONS, completion(prompt="a\x00b\x01\x1b[31m\x7f", stop=["\x00"]), 200, None),
    (CHAT, chat(messages=[{"role": "user", "content": "\x00\x08\r\n\t"}]), 200, None),
    (COMPLETIONS, completion(model="\x00"), 404, "model"),
    # stop lists
    (COMPLETIONS, completion(stop=[f"stop{i}" for i in range(100)]), 200, None),
    (COMPLETIONS, completion(stop=[f"stop{i}" for i in range(257)]), 400, "stop"),
    (COMPLETIONS, completion(stop_token_ids=list(range(1025))), 400, "stop_token_ids"),
    (COMPLETIONS, completion(stop_token_ids=[2**63]), 400, "stop_token_ids.0"),
    # unknown fields are ignored; unsupported ones are refused by name, harmless values let through
    (COMPLETIONS, completion(frobnicate=[1, {"a": None}], service_tier="auto"), 200, None),
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    (CHAT, chat(tool_choice="auto"), 400, "tool_choice"),
    (CHAT, chat(tool_choice={"type": "function", "function": {"name": "f"}}), 400, "tool_choice"),
    (CHAT, chat(tool_choice="none", response_format={"type": "text"}), 200, None),
    (CHAT, chat(response_format={"type": "json_object"}), 400, "response_format"),
    (CHAT, chat(functions=[{"name": "f"}]), 400, "functions"),
    (COMPLETIONS, completion(best_of=2), 400, "best_of"),
    (COMPLETIONS, completion(best_of=1), 200, None),
    (COMPLETIONS, completion(suffix="y"), 400, "suffix"),
]


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--max-queue", "8", api_key=API_KEY)


def post(server, path: str, body, **kwargs) -> httpx.Response:
    # json.dumps, not httpx's json=: it keeps NaN/Infinity and escapes lone surrogates as \ud800.
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {**server.headers, "Content-Type": "application/json"}
    return httpx.post(server.url + path, content=content, headers=headers, timeout=60, **kwargs)


def greedy_text(server) -> str:
    response = post(server, COMPLETIONS, GREEDY)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def baseline(server) -> str:
    return greedy_text(server)


def assert_answer(response: httpx.Response, status: int, param: str | None) -> None:
    assert response.status_code == status, response.text
    if status >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text
        assert error["param"] == param, response.text


@pytest.mark.parametrize(("path", "body", "status", "param"), CASES, ids=lambda value: repr(value)[:60])
def test_hostile_input_gets_a_4xx_naming_the_field(server, baseline, path, body, status, param):
    assert_answer(post(server, path, body), status, param)


def test_the_issue_reproduction_top_k_overflow(server, baseline):
    response = post(server, COMPLETIONS, {"model": None, "prompt": "hi", "max_tokens": 4, "top_k": 2**63})
    assert_answer(response, 400, "top_k")
    assert greedy_text(server) == baseline


def test_bodies_over_the_limit_get_413(server, baseline):
    limit = ServerConfig().max_body_bytes
    padding = limit + 1 - len(json.dumps({"prompt": ""}))
    just_over = json.dumps({"prompt": "y" * padding}).encode()
    assert len(just_over) == limit + 1
    for body in (just_over, json.dumps({"prompt": "y" * 10_000_000}).encode()):
        assert_answer(post(server, COMPLETIONS, body), 413, None)


def test_two_authorization_headers_are_refused(server):
    bearer = f"Bearer {API_KEY}"
    headers = [("Authorization", bearer), ("Authorization", bearer), ("Content-Type", "application/json")]
    response = httpx.post(server.url + COMPLETIONS, content=json.dumps(GREEDY), headers=headers)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_the_server_is_healthy_and_unchanged_after_the_table(server, baseline):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert greedy_text(server) == baseline
    assert "Traceback" not in server.log() and " 500 " not in server.log()


# ------------------------------------------------- token ids past the vocabulary: the engine's check


@pytest.fixture(scope="module")
def vocab_server(start_server, model_dir):
    # Its own server: before the engine checked stop token ids, these requests killed its engine thread.
    server = start_server(api_key=API_KEY)
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    return server, vocab_size


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_stop_token_ids_past_the_vocabulary_get_400(vocab_server, path):
    server, vocab_size = vocab_server
    before = greedy_text(server)
    base = completion() if path == COMPLETIONS else chat()
    for stop_token_ids in ([vocab_size], [512], [999999]):
        response = post(server, path, {**base, "min_tokens": 1, "stop_token_ids": stop_token_ids})
        assert_answer(response, 400, "stop_token_ids")
    assert greedy_text(server) == before
