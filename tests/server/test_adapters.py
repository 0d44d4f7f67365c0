"""`kiln serve --adapter NAME=DIR`: the request's `model` picks the adapter, /v1/models lists them, an
unknown model is a 404 error object, and 24 concurrent requests over two LoRAs, a prompt-tuning adapter
and the base each return what that adapter gives alone offline (greedy)."""

import asyncio

import httpx
import pytest
import torch

import kiln
from kiln.finetune import attach_adapter
from kiln.finetune.evaluation import greedy_completion
from tests.finetune.adapters import three_adapters

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    return three_adapters(model_dir, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def server(start_server, adapters):
    flags = [arg for name, path in adapters.items() for arg in ("--adapter", f"{name}={path}")]
    # The torch path for the base matmuls: loading the C++ ops can outlast the start-up timeout on a busy
    # machine, and tests/finetune/test_serving.py runs the same mix through them.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KILN_CPU_OPS", "0")
        return start_server(*flags, "--served-model-name", "base", "--kv-cache-memory", "32MB")


def test_models_lists_the_base_and_its_adapters(server, adapters):
    body = httpx.get(server.url + "/v1/models", timeout=10).json()
    assert [card["id"] for card in body["data"]] == ["base", *adapters]
    assert all(card["parent"] == "base" for card in body["data"][1:])
    card = httpx.get(server.url + "/v1/models/soft", timeout=10).json()
    assert card["id"] == "soft" and card["root"] == str(adapters["soft"])


def test_unknown_model_is_a_404_error_object(server):
    response = httpx.post(
        server.url + "/v1/completions", json={"model": "nope", "prompt": "hi", "max_tokens": 2}, timeout=10
    )
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'nope' does not exist" in error["message"] and "'lora-a'" in error["message"]


def test_concurrent_requests_over_adapters_equal_each_adapter_alone(server, adapters, model_dir):
    names = ["base", *adapters]
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 400, (int(n),), generator=generator).tolist() for n in range(5, 29)]

    async def one(client, i):
        body = {"model": names[i % 4], "prompt": prompts[i], "max_tokens": MAX_TOKENS}
        body |= {"temperature": 0, "ignore_eos": True, "logprobs": 0}
        response = await client.post(server.url + "/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]

    async def all_requests():
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(*(one(client, i) for i in range(24)))

    choices = asyncio.run(all_requests())
    tokenizer = kiln.load_tokenizer(model_dir)
    alone = {"base": kiln.load_model(model_dir)}
    alone |= {name: attach_adapter(kiln.load_model(model_dir), path) for name, path in adapters.items()}
    outputs = set()
    for i, choice in enumerate(choices):
        expected = greedy_completion(
            alone[names[i % 4]], prompts[i], stop_ids=set(), max_new_tokens=MAX_TOKENS
        )
        tokens = choice["logprobs"]["tokens"]
        assert len(tokens) == MAX_TOKENS
        assert choice["text"] == tokenizer.decode(expected), (i, names[i % 4])
        outputs.add(choice["text"])
    assert len(outputs) > 12  # the adapters really answer differently
