"""AsyncEngine: concurrent streams from asyncio, abort (explicit or by leaving the loop), shutdown."""

import asyncio

import pytest

from kiln.engine import LLM, AsyncEngine, SamplingParams
from tests.engine.conftest import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=10)


async def collect(engine: AsyncEngine, prompt, params=GREEDY, request_id=None):
    deltas = [delta async for delta in engine.add_request(prompt, params, request_id)]
    completion = deltas[-1].outputs[0]
    tokens = [t for delta in deltas for c in delta.outputs for t in c.token_ids]
    text = "".join(c.text for delta in deltas for c in delta.outputs)
    return deltas, tokens, text, completion.finish_reason


def test_concurrent_streams_equal_offline_generation(text_model_dir):
    prompts = ["def main():", "import os", "x = 1", "class A:", "for i in range(3):", "y", "z = {}", "#"]
    expected = LLM(text_model_dir, verbose=False).generate(prompts, GREEDY)

    async def main():
        engine = AsyncEngine.from_dir(text_model_dir)
        try:
            return await asyncio.gather(*(collect(engine, prompt) for prompt in prompts))
        finally:
            await engine.shutdown()

    results = asyncio.run(main())
    for (deltas, tokens, text, _), output in zip(results, expected, strict=True):
        assert tokens == output.outputs[0].token_ids and text == output.outputs[0].text
        assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
        assert len(deltas) > 1  # streamed, not delivered at the end


def test_abort_ends_the_stream_and_frees_the_engine(hf_model_dir):
    (prompt,) = random_prompts([6], seed=11)
    long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)

    async def main():
        engine = AsyncEngine.from_dir(hf_model_dir("llama-gqa3-untied"))
        deltas = []
        async for delta in engine.add_request(prompt, long, request_id="a"):
            deltas.append(delta)
            if len(deltas) == 2:
                engine.abort("a")
        # Leaving a stream early aborts it as well.
        async for _ in engine.add_request(prompt, long, request_id="b"):
            break
        short = await collect(engine, prompt, request_id="c")
        await asyncio.sleep(0.05)
        unfinished = engine.engine.has_unfinished_requests()
        await engine.shutdown()
        return deltas, short, unfinished, engine.engine.counters

    deltas, short, unfinished, counters = asyncio.run(main())
    assert deltas[-1].finished and deltas[-1].outputs[0].finish_reason == "abort"
    assert len([t for d in deltas for c in d.outputs for t in c.token_ids]) < 100
    assert short[3] == "length" and len(short[1]) == 10
    assert not unfinished and counters.num_finished_requests == 1


def test_errors_reach_the_caller_and_shutdown_ends_streams(hf_model_dir):
    (prompt,) = random_prompts([6], seed=12)

    async def main():
        engine = AsyncEngine.from_dir(hf_model_dir("llama-gqa3-untied"))
        with pytest.raises(ValueError, match="token ids must be in"):
            await collect(engine, [10_000])
        stream = engine.add_request(prompt, SamplingParams(max_tokens=1000, ignore_eos=True), request_id="x")
        first = await anext(stream)
        with pytest.raises(ValueError, match="already in use"):
            await collect(engine, prompt, request_id="x")
        await engine.shutdown()
        rest = [delta async for delta in stream]
        with pytest.raises(ValueError, match="shut down"):
            await collect(engine, prompt)
        return first, rest

    first, rest = asyncio.run(main())
    assert not first.finished and rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
