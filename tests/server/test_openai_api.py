"""The server as OpenAI's own Python client sees it: completions, chat (plain and streamed, with usage),
n, stop strings, logprobs, embeddings and /v1/models. Greedy text equals kiln.LLM's offline output."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
import torch

from kiln.engine import LLM, SamplingParams
from tests.server.conftest import API_KEY

PROMPTS = ["def main():", "import os\n", "class Tree:"]
MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}]


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(api_key=API_KEY)


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, timeout=60, max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, verbose=False)


@pytest.fixture(scope="module")
def model_name(model_dir):
    return model_dir.name


def greedy(max_tokens=16, **kwargs):
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)


def test_models_lists_the_served_model(client, model_name):
    (card,) = client.models.list().data
    assert card.id == model_name and card.owned_by == "kiln"
    assert card.model_extra["max_model_len"] == 1024
    assert client.models.retrieve(model_name).id == model_name


def test_greedy_completions_equal_offline_generation(client, llm, model_name):
    expected = llm.generate(PROMPTS, greedy())
    for prompt, output in zip(PROMPTS, expected, strict=True):
        response = client.completions.create(model=model_name, prompt=prompt, max_tokens=16, temperature=0)
        (choice,) = response.choices
        assert choice.text == output.outputs[0].text
        assert choice.finish_reason == output.outputs[0].finish_reason
        assert response.usage.prompt_tokens == len(output.prompt_token_ids)
        assert response.usage.completion_tokens == len(output.outputs[0].token_ids)
    # A batch of prompts: one choice per prompt, in order.
    batch = client.completions.create(model=model_name, prompt=PROMPTS, max_tokens=16, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [o.outputs[0].text for o in expected]
    assert batch.usage.completion_tokens == sum(len(o.outputs[0].token_ids) for o in expected)


def test_streamed_completion_equals_offline_generation(client, llm, model_name):
    (expected,) = llm.generate(PROMPTS[0], greedy(24, ignore_eos=True))
    chunks = list(
        client.completions.create(
            model=model_name,
            prompt=PROMPTS[0],
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(c.text for chunk in chunks for c in chunk.choices)
    assert text == expected.outputs[0].text
    finishes = [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert len(chunks) > 3  # streamed token by token, not in one piece


def test_token_id_prompt_with_echo(client, llm, model_name):
    ids = llm.tokenizer.encode(PROMPTS[1])
    (expected,) = llm.generate([ids], greedy(8))
    response = client.completions.create(model=model_name, prompt=ids, max_tokens=8, temperature=0, echo=True)
    assert response.choices[0].text == llm.tokenizer.decode(ids) + expected.outputs[0].text


def test_stop_string_ends_the_text_before_it(client, llm, model_name):
    (long,) = llm.generate(PROMPTS[0], greedy(32, ignore_eos=True))
    text = long.outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    (expected,) = llm.generate(PROMPTS[0], greedy(32, ignore_eos=True, stop=[stop]))
    response = client.completions.create(
        model=model_name,
        prompt=PROMPTS[0],
        max_tokens=32,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    (choice,) = response.choices
    assert choice.text == expected.outputs[0].text == text[: text.index(stop)]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == stop


def test_n_samples_for_completions_and_chat(client, model_name):
    response = client.completions.create(
        model=model_name, prompt=PROMPTS[:2], n=2, max_tokens=12, temperature=1.0, seed=7
    )
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.choices[0].text != response.choices[1].text  # the samples of a prompt differ
    again = client.completions.create(
        model=model_name, prompt=PROMPTS[:2], n=2, max_tokens=12, temperature=1.0, seed=7
    )
    assert [c.text for c in again.choices] == [c.text for c in response.choices]  # seeded: reproducible
    chat = client.chat.completions.create(
        model=model_name, messages=MESSAGES, n=2, max_tokens=12, temperature=1.0, seed=3
    )
    assert [c.index for c in chat.choices] == [0, 1]
    assert all(c.message.role == "assistant" for c in chat.choices)


def test_completion_logprobs_match_offline(client, llm, model_name):
    (expected,) = llm.generate(PROMPTS[2], greedy(8, logprobs=3))
    response = client.completions.create(
        model=model_name, prompt=PROMPTS[2], max_tokens=8, temperature=0, logprobs=3
    )
    logprobs = response.choices[0].logprobs
    completion = expected.outputs[0]
    assert len(logprobs.tokens) == len(completion.token_ids) == len(logprobs.top_logprobs)
    for token_id, position, value, top in zip(
        completion.token_ids, completion.logprobs, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert value == pytest.approx(position[token_id].logprob, abs=1e-4)
        # Keyed by text, so byte-fragment tokens that all decode to U+FFFD share one entry.
        assert 1 <= len(top) <= 4 and max(top.values()) == pytest.approx(value, abs=1e-4)  # greedy: the top
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)


def test_echo_with_logprobs_scores_the_prompt(client, model_name):
    response = client.completions.create(
        model=model_name, prompt=PROMPTS[0], max_tokens=2, temperature=0, logprobs=1, echo=True
    )
    logprobs = response.choices[0].logprobs
    num_prompt = response.usage.prompt_tokens
    assert len(logprobs.tokens) == num_prompt + response.usage.completion_tokens
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(value <= 0 for value in logprobs.token_logprobs[1:])
    assert "".join(logprobs.tokens[:num_prompt]) == PROMPTS[0]


def test_chat_equals_offline_chat(client, llm, model_name):
    (expected,) = llm.chat(MESSAGES, greedy())
    response = client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=16, temperature=0
    )
    (choice,) = response.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_streamed_chat_with_usage(client, llm, model_name):
    (expected,) = llm.chat(MESSAGES, greedy(20, ignore_eos=True))
    stream = client.chat.completions.create(
        model=model_name,
        messages=MESSAGES,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices)
    assert content == expected.outputs[0].text
    finishing = [c for chunk in chunks for c in chunk.choices if c.finish_reason]
    assert [c.finish_reason for c in finishing] == ["length"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == 20
    assert usage_chunk.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert len({chunk.id for chunk in chunks}) == 1


def test_chat_logprobs(client, llm, model_name):
    (expected,) = llm.chat(MESSAGES, greedy(6, logprobs=2))
    response = client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    content = response.choices[0].logprobs.content
    completion = expected.outputs[0]
    assert len(content) == len(completion.token_ids)
    for entry, token_id, position in zip(content, completion.token_ids, completion.logprobs, strict=True):
        assert entry.logprob == pytest.approx(position[token_id].logprob, abs=1e-4)
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.bytes == list(entry.token.encode())


def test_embeddings_equal_offline(client, llm, model_name):
    texts = ["def f(x): return x", "import json", "a much longer piece of text about sorting lists in Python"]
    expected = llm.embed(texts)
    # Unasked, the client requests base64 and decodes it itself; asked for base64, it hands the string on.
    for encoding_format in ("float", openai.omit, "base64"):
        response = client.embeddings.create(model=model_name, input=texts, encoding_format=encoding_format)
        assert [d.index for d in response.data] == [0, 1, 2]
        vectors = [
            np.frombuffer(base64.b64decode(d.embedding), "<f4")
            if isinstance(d.embedding, str)
            else d.embedding
            for d in response.data
        ]
        assert isinstance(response.data[0].embedding, str) == (encoding_format == "base64")
        torch.testing.assert_close(
            torch.tensor(np.array(vectors), dtype=torch.float32), expected, atol=1e-5, rtol=1e-5
        )
    assert response.usage.prompt_tokens == sum(len(llm.tokenizer.encode(t)) for t in texts)
    (single,) = client.embeddings.create(model=model_name, input=llm.tokenizer.encode(texts[1])).data
    torch.testing.assert_close(torch.tensor(single.embedding), expected[1], atol=1e-5, rtol=1e-5)


def test_tokenize_and_detokenize(server, llm):
    text = "def main():\n    return 1"
    response = httpx.post(server.url + "/tokenize", json={"prompt": text}, headers=server.headers)
    assert response.status_code == 200
    body = response.json()
    assert body["tokens"] == llm.tokenizer.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 1024
    back = httpx.post(server.url + "/detokenize", json={"tokens": body["tokens"]}, headers=server.headers)
    assert back.json() == {"prompt": text}
    chat = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES}, headers=server.headers).json()
    assert chat["tokens"] == llm.tokenizer.apply_chat_template(MESSAGES, tokenize=True)


def test_api_key_guards_v1_but_not_health(server, model_name):
    assert httpx.get(server.url + "/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.get(server.url + "/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=model_name, prompt="x", max_tokens=1)
    assert httpx.get(server.url + "/v1/models", headers=server.headers).status_code == 200


def test_web_ui_and_metrics_are_served(server, client, model_name):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "kiln playground" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert httpx.get(server.url + asset).status_code == 200
    client.completions.create(model=model_name, prompt="x = ", max_tokens=4, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "kiln:num_requests_running",
        "kiln:num_requests_waiting",
        "kiln:kv_cache_usage_perc",
        "kiln:prompt_tokens_total",
        "kiln:generation_tokens_total",
        "kiln:time_to_first_token_seconds_bucket",
        "kiln:inter_token_latency_seconds_bucket",
        "kiln:e2e_request_latency_seconds_bucket",
    ):
        assert name in text, name
    assert server.metric("kiln:generation_tokens_total") > 0
    assert server.metric("kiln:e2e_request_latency_seconds_count") > 0
