"""Engine faults as the server sees them: a request the engine fails on its own ends with an error (a
500 naming its request id, a 400 when its input was the cause, an error object in a stream) while the
others finish token-identical to a clean run; a fault in the model forward stops the engine, /health
answers 503, and `kiln serve` exits non-zero so that a supervisor restarts it.

Run as a module (`python -m tests.server.test_faults serve ...`), this file is `kiln serve` with a model
forward that always raises; the exit-code test starts it that way."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from kiln.engine import LLM, SamplingParams
from kiln.engine.async_engine import AsyncEngine
from kiln.engine.outputs import CompletionOutput, RequestOutput
from kiln.server.app import build_app
from kiln.server.config import ServerConfig
from kiln.server.state import ServerState

PROMPTS = ["def main():", "import os\n", "class Tree:", "x = [", "for i in", "# sort", "while True:", "y ="]
GREEDY = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}
INJECTED = "injected fault: the sampler raised"
POISON_SEED = 666


@pytest.fixture
def state(model_dir):
    engine = AsyncEngine.from_dir(model_dir)
    yield ServerState(engine, ServerConfig(), model_dir=model_dir)
    asyncio.run(engine.shutdown())


def fail_prompts(state: ServerState, failures: dict[str, bool]) -> None:
    """Make the engine fail the requests of some prompts ({prompt: caused by the input?}) the way Engine
    reports a fault confined to one request: the request dropped (its blocks freed) and a final output
    with finish_reason "error" and the error's message."""
    engine, step = state.engine, state.engine.step
    bad = {tuple(engine.tokenizer.encode(prompt)): from_input for prompt, from_input in failures.items()}

    def faulty_step() -> list[RequestOutput]:
        outputs = []
        for output in step():
            from_input = bad.get(tuple(output.prompt_token_ids))
            if from_input is None:
                outputs.append(output)
            elif engine.abort_request(output.request_id):  # later outputs of a failed one are dropped
                failed = CompletionOutput(index=0, text="", token_ids=[], finish_reason="error")
                outputs.append(
                    RequestOutput(
                        request_id=output.request_id,
                        prompt=None,
                        prompt_token_ids=output.prompt_token_ids,
                        outputs=[failed],
                        finished=True,
                        metrics=output.metrics,
                        error=INJECTED,
                        error_from_input=from_input,
                    )
                )
        return outputs

    engine.step = faulty_step


async def stream_text(client: httpx.AsyncClient, prompt: str) -> tuple[str, list[dict]]:
    response = await client.post("/v1/completions", json={"prompt": prompt, "stream": True, **GREEDY})
    assert response.status_code == 200
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    text = "".join(choice["text"] for chunk in chunks for choice in chunk.get("choices", []))
    return text, [chunk["error"] for chunk in chunks if "error" in chunk]


def test_a_failed_request_leaves_the_others_token_identical(state, model_dir):
    expected = LLM(model_dir, verbose=False).generate(PROMPTS, SamplingParams(**GREEDY))
    fail_prompts(state, {"bad stream": False, "bad whole": False, "bad input": True})
    app = build_app(state)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://kiln", timeout=60) as client:
            streams = [stream_text(client, prompt) for prompt in [*PROMPTS, "bad stream"]]
            whole = client.post("/v1/completions", json={"prompt": "bad whole", **GREEDY})
            caused = client.post("/v1/completions", json={"prompt": "bad input", **GREEDY})
            *results, whole, caused = await asyncio.gather(*streams, whole, caused)
            after = await stream_text(client, PROMPTS[0])
            return results, whole, caused, after, await client.get("/health")

    results, whole, caused, after, health = asyncio.run(main())
    for (text, errors), output in zip(results[:-1], expected, strict=True):
        assert text == output.outputs[0].text and not errors
    (stream_error,) = results[-1][1]
    assert stream_error["type"] == "server_error" and INJECTED in stream_error["message"]
    assert whole.status_code == 500
    error = whole.json()["error"]
    assert INJECTED in error["message"] and "request id cmpl-" in error["message"]
    assert caused.status_code == 400 and caused.json()["error"]["message"] == INJECTED
    assert after == (expected[0].outputs[0].text, []) and health.status_code == 200
    assert state.engine.kv_usage == 0 and state.async_engine.is_running


class PoisonedSampler:
    """The engine's real sampler, raising on any batch that holds a row of seed POISON_SEED: the engine's
    own isolation (Engine.step) must then fail that request alone."""

    def __init__(self, sampler, poisoned_generators: set[int]) -> None:
        self.sampler, self.poisoned = sampler, poisoned_generators

    def __call__(self, logits, batch):
        if any(id(generator) in self.poisoned for generator in batch.generators if generator is not None):
            raise RuntimeError("injected sampler fault")
        return self.sampler(logits, batch)


def test_a_sampler_fault_in_one_request_fails_it_alone_through_the_real_engine(state, model_dir):
    expected = LLM(model_dir, verbose=False).generate(PROMPTS, SamplingParams(**GREEDY))
    engine = state.engine
    poisoned: set[int] = set()
    make_request = engine.request_factory.make_request

    def recording_make_request(prompt, params=None, request_id=None):
        request = make_request(prompt, params, request_id)
        if params is not None and params.seed == POISON_SEED:
            poisoned.update(id(seq.generator) for seq in request.sequences)
        return request

    engine.request_factory.make_request = recording_make_request
    engine.sampler = PoisonedSampler(engine.sampler, poisoned)
    app = build_app(state)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://kiln", timeout=60) as client:
            streams = [stream_text(client, prompt) for prompt in PROMPTS]
            bad = {"prompt": "x = [", "stream": True, "max_tokens": 12, "seed": POISON_SEED}
            response = client.post("/v1/completions", json=bad)
            *results, response = await asyncio.gather(*streams, response)
            metrics = (await client.get("/metrics")).text
            return results, response, metrics

    results, response, metrics = asyncio.run(main())
    for (text, errors), output in zip(results, expected, strict=True):
        assert text == output.outputs[0].text and not errors
    error_chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    errors = [chunk["error"] for chunk in error_chunks if "error" in chunk]
    assert len(errors) == 1 and "injected sampler fault" in errors[0]["message"]
    usage = [line for line in metrics.splitlines() if line.startswith("kiln:kv_cache_usage_perc")]
    assert usage and float(usage[0].rsplit(" ", 1)[1]) == 0.0
    assert state.async_engine.is_running


def test_a_model_forward_fault_stops_the_engine_and_health_says_so(state):
    fatal: list[BaseException] = []
    state.async_engine.on_fatal = fatal.append

    def broken_forward(*_, **__):
        raise RuntimeError("injected fault in the model forward")

    state.engine.runner.execute = broken_forward
    app = build_app(state)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://kiln", timeout=60) as client:
            failed = await client.post("/v1/completions", json={"prompt": "x", **GREEDY})
            await asyncio.sleep(0.1)
            health = await client.get("/health")
            refused = await client.post("/v1/completions", json={"prompt": "x", **GREEDY})
            return failed, health, refused

    failed, health, refused = asyncio.run(main())
    assert failed.status_code == 500 and "injected fault" in failed.json()["error"]["message"]
    assert health.status_code == 503 and health.json() == {"status": "engine stopped"}
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_failed"
    assert [str(error) for error in fatal] == ["injected fault in the model forward"]


def test_kiln_serve_exits_non_zero_after_a_fatal_fault(start_server):
    server = start_server(module="tests.server.test_faults")
    response = httpx.post(server.url + "/v1/completions", json={"prompt": "x", **GREEDY}, timeout=30)
    assert response.status_code == 500 and "injected fault" in response.json()["error"]["message"]
    try:
        health = httpx.get(server.url + "/health", timeout=5).status_code
    except httpx.TransportError:  # already exited
        health = 503
    assert health == 503
    assert server.process.wait(15) == 1
    assert "shutting down with exit code 1" in server.log()


def _serve_with_a_broken_forward() -> None:
    from kiln.cli import main
    from kiln.engine.model_runner import ModelRunner

    def broken_forward(*_, **__):
        raise RuntimeError("injected fault in the model forward")

    ModelRunner.execute = broken_forward
    main()


if __name__ == "__main__":
    _serve_with_a_broken_forward()
