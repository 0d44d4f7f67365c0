"""Load: 200 streamed requests at concurrency 32 all complete with [DONE] and exactly the offline greedy
text; then 50 clients disconnect mid-stream and the KV cache drains to zero. Also `kiln bench serve`.
Fairness: a request larger than the server is refused, a disconnected batch leaves the queue at once, a
huge prompt is tokenized off the event loop, and a big embedding request is interleaved with generation."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from kiln.bench.serve import ServeBenchConfig, run_benchmark
from kiln.cli import app
from kiln.engine import LLM, SamplingParams

NUM_REQUESTS, CONCURRENCY, MAX_TOKENS = 200, 32, 16


@pytest.fixture(scope="module")
def server(start_server):
    return start_server()


def stdlib_prompts(count: int) -> list[str]:
    lines = [line.strip() for line in Path(os.__file__).read_text().splitlines() if len(line.strip()) > 8]
    return list(dict.fromkeys(lines))[:count]


async def stream_completion(client: httpx.AsyncClient, prompt: str) -> dict:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    events = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
    chunks = [json.loads(event) for event in events if event != "[DONE]"]
    return {
        "events": events,
        "text": "".join(c["text"] for chunk in chunks for c in chunk["choices"]),
        "finishes": [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]],
        "usage": chunks[-1]["usage"],
        "errors": [chunk for chunk in chunks if "error" in chunk],
    }


def test_200_concurrent_streams_equal_offline_greedy(server, model_dir):
    prompts = stdlib_prompts(NUM_REQUESTS)
    assert len(prompts) == NUM_REQUESTS
    offline = LLM(model_dir, verbose=False).generate(
        prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    )

    async def main():
        gate = asyncio.Semaphore(CONCURRENCY)
        limits = httpx.Limits(max_connections=CONCURRENCY)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:

            async def one(prompt):
                async with gate:
                    return await stream_completion(client, prompt)

            return await asyncio.gather(*(one(prompt) for prompt in prompts))

    start = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - start
    for result, expected in zip(results, offline, strict=True):
        assert result["events"][-1] == "[DONE]" and result["events"].count("[DONE]") == 1
        assert not result["errors"]
        assert result["text"] == expected.outputs[0].text  # no token duplicated, lost or reordered
        assert result["finishes"] == ["length"]
        assert result["usage"]["completion_tokens"] == MAX_TOKENS
    assert server.metric("kiln:request_success_total") >= NUM_REQUESTS
    print(f"{NUM_REQUESTS} streams at concurrency {CONCURRENCY}: {elapsed:.1f}s")


def test_disconnected_clients_free_their_kv_blocks(server):
    num_clients = 50
    body = {"prompt": "def main():", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    aborted_before = server.metric("kiln:requests_aborted_total")

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            streams = [client.stream("POST", "/v1/completions", json=body) for _ in range(num_clients)]
            responses = await asyncio.gather(*(stream.__aenter__() for stream in streams))
            # Read until every request has produced text, so that all of them hold KV blocks. The line
            # iterators stay referenced: httpx closes a response (disconnects) when its iterator is collected.
            readers = [response.aiter_lines() for response in responses]
            for lines in readers:
                async for line in lines:
                    if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                        break
            usage_while_streaming = server.metric("kiln:kv_cache_usage_perc")
            running = server.metric("kiln:num_requests_running")
            await asyncio.gather(*(stream.__aexit__(None, None, None) for stream in streams))
            return usage_while_streaming, running

    usage_while_streaming, running = asyncio.run(main())
    assert usage_while_streaming > 0 and running == num_clients
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and server.metric("kiln:kv_cache_usage_perc") > 0:
        time.sleep(0.1)
    assert server.metric("kiln:kv_cache_usage_perc") == 0
    assert server.metric("kiln:num_requests_running") == 0
    assert server.metric("kiln:num_requests_waiting") == 0
    assert server.metric("kiln:requests_aborted_total") - aborted_before == num_clients
    # Far fewer tokens were generated than 50 full requests would have.
    assert server.metric("kiln:generation_tokens_total") < NUM_REQUESTS * MAX_TOKENS + num_clients * 500


def test_bench_serve_against_the_server(server):
    config = ServeBenchConfig(
        base_url=server.url + "/v1",
        num_prompts=24,
        input_len=12,
        output_len=8,
        request_rate=40,
        max_concurrency=8,
        slos_ms={"ttft": 60_000, "e2e": 60_000},
    )
    summary = asyncio.run(run_benchmark(config))
    assert summary["completed"] == 24 and summary["failed"] == 0
    assert summary["output_tokens"] == 24 * 8  # ignore_eos: exactly output_len each
    assert summary["goodput"] == pytest.approx(summary["request_throughput"])
    for metric in ("ttft", "tpot", "itl", "e2e"):
        stats = summary[metric]
        assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] and math.isfinite(stats["mean_ms"])
    chat = asyncio.run(run_benchmark(dataclasses.replace(config, endpoint="chat")))
    assert chat["completed"] == 24 and chat["output_tokens"] == 24 * 8


def test_bench_serve_cli_sweeps_and_plots(server, tmp_path):
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text(
        '{"prompt": "def main():", "output_len": 4}\n{"messages": [{"role": "user", "content": "hi"}]}\n'
    )
    output, plot = tmp_path / "serve.json", tmp_path / "serve.png"
    result = CliRunner().invoke(
        app,
        ["bench", "serve", "--base-url", server.url + "/v1", "--num-prompts", "6", "--dataset", str(dataset)]
        + ["--output-len", "6", "--request-rate", "20", "--request-rate", "inf", "--slo", "ttft=60000"]
        + ["--output", str(output), "--plot", str(plot)],
    )
    assert result.exit_code == 0, result.output
    runs = json.loads(output.read_text())
    assert [run["config"]["request_rate"] for run in runs] == [20, "inf"]
    assert all(run["completed"] == 6 and run["output_tokens"] == 3 * 4 + 3 * 6 for run in runs)
    assert plot.stat().st_size > 10_000


def test_disconnect_during_a_non_streamed_request_aborts_it(server):
    aborted_before = server.metric("kiln:requests_aborted_total")
    body = {"prompt": "def main():", "max_tokens": 1000, "ignore_eos": True, "n": 4}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and server.metric("kiln:requests_aborted_total") == aborted_before:
        time.sleep(0.05)
    assert server.metric("kiln:requests_aborted_total") == aborted_before + 1
    assert server.metric("kiln:kv_cache_usage_perc") == 0


# ------------------------------------------------------------------------------------ fairness


def test_a_request_larger_than_the_server_is_refused_not_queued(server):
    # 1000 prompts x n=64 = 64,000 sequences; this server admits 64 + 256 at once.
    start = time.monotonic()
    huge = httpx.post(
        server.url + "/v1/completions", json={"prompt": ["a"] * 1000, "n": 64, "max_tokens": 16}, timeout=30
    )
    elapsed = time.monotonic() - start
    assert huge.status_code == 400, huge.text
    error = huge.json()["error"]
    assert (
        error["param"] == "n"
        and error["code"] == "request_too_large"
        and "64000 sequences" in error["message"]
    )
    assert elapsed < 2
    many = httpx.post(
        server.url + "/v1/completions", json={"prompt": ["a"] * 321, "max_tokens": 1}, timeout=30
    )
    assert many.status_code == 400 and many.json()["error"]["param"] == "prompt"
    inputs = httpx.post(server.url + "/v1/embeddings", json={"input": ["a"] * 2049}, timeout=30)
    assert inputs.status_code == 400 and inputs.json()["error"]["param"] == "input"
    fits = httpx.post(
        server.url + "/v1/completions", json={"prompt": ["a"] * 320, "max_tokens": 1}, timeout=60
    )
    assert fits.status_code == 200 and len(fits.json()["choices"]) == 320
    assert server.metric("kiln:num_requests_waiting") == 0


def test_a_disconnected_batch_leaves_the_queue_at_once(server):
    body = {"prompt": ["def main():"] * 300, "max_tokens": 500, "ignore_eos": True, "stream": True}

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                lines = response.aiter_lines()
                while not (await anext(lines)).startswith("data: "):
                    pass
                queued = server.metric("kiln:num_requests_waiting") + server.metric(
                    "kiln:num_requests_running"
                )
        return queued, time.monotonic()

    queued, closed = asyncio.run(main())
    assert queued > 64  # more than one step's worth were waiting
    while time.monotonic() < closed + 10 and server.metric("kiln:kv_cache_usage_perc") > 0:
        time.sleep(0.05)
    assert server.metric("kiln:num_requests_waiting") + server.metric("kiln:num_requests_running") == 0
    assert time.monotonic() - closed < 2


def test_a_prompt_longer_than_any_tokenization_could_fit_is_refused_untokenized(server):
    prompt = "the quick brown fox " * 195_000  # 3.9 MB: over 1024 tokens whatever the tokenizer does
    start = time.monotonic()
    response = httpx.post(
        server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 4}, timeout=60
    )
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "context_length_exceeded"
    assert "at least" in error["message"] and time.monotonic() - start < 2


def test_tokenizing_a_huge_prompt_does_not_stall_the_event_loop(start_server):
    # A context long enough that the 3.9 MB prompt must really be tokenized to be judged.
    server = start_server("--max-model-len", "300000")
    prompt = "the quick brown fox " * 195_000  # 3.9 MB

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            big = asyncio.create_task(
                client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4})
            )
            await asyncio.sleep(0.3)  # the body is sent and being tokenized
            gaps = []
            while not big.done():
                start = time.monotonic()
                assert (await client.get("/health")).status_code == 200
                gaps.append(time.monotonic() - start)
                await asyncio.sleep(0.05)
            return await big, gaps

    big, gaps = asyncio.run(main())
    assert big.status_code == 400 and big.json()["error"]["code"] == "context_length_exceeded"
    assert len(gaps) >= 3 and max(gaps) < 1, gaps  # it used to answer nothing for 4-5 s


def test_a_big_embedding_request_is_interleaved_with_generation(server):
    inputs = [[1 + (i % 50)] * 250 for i in range(2000)]  # 500,000 tokens, 1.5 MB

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            embedding = asyncio.create_task(client.post("/v1/embeddings", json={"input": inputs}))
            await asyncio.sleep(0.5)
            start = time.monotonic()
            completion = await client.post(
                "/v1/completions", json={"prompt": "def main():", "max_tokens": 16, "temperature": 0}
            )
            completion_s, still_embedding = time.monotonic() - start, not embedding.done()
            return await embedding, completion, completion_s, still_embedding

    embedding, completion, completion_s, still_embedding = asyncio.run(main())
    assert completion.status_code == 200 and embedding.status_code == 200
    assert still_embedding, f"the completion ({completion_s:.1f}s) waited for the whole embedding request"
    data = embedding.json()["data"]
    assert len(data) == 2000 and data[0]["embedding"] == data[50]["embedding"]


def test_chunked_embeddings_equal_offline(model_dir):
    from kiln.engine.async_engine import AsyncEngine, embedding_chunks

    assert embedding_chunks([5, 1, 3, 9, 2], token_budget=10) == [[1, 4, 2], [0], [3]]
    texts = [f"item {i}: " + "word " * (i % 7) for i in range(20)]
    expected = LLM(model_dir, verbose=False).embed(texts)

    async def main():
        engine = AsyncEngine.from_dir(model_dir)
        try:
            return await engine.embed(texts, token_budget=24)  # several chunks of a few inputs each
        finally:
            await engine.shutdown()

    torch.testing.assert_close(asyncio.run(main()), expected, atol=1e-5, rtol=1e-5)


def test_fairness_bench_smoke(server):
    from kiln.bench.fairness import run_fairness

    result = run_fairness(
        server.url,
        num_requests=3,
        num_prompts=10,
        n=64,
        big_prompt_bytes=100_000,
        num_embedding_inputs=20,
        embedding_input_tokens=20,
    )
    for phase in ("idle", "loaded"):
        assert 0 < result[phase]["p50_ms"] <= result[phase]["p99_ms"] <= result[phase]["max_ms"]
    answers = result["hostile_answers"]
    assert set(answers["many_sequences"]) == {"400"}  # 640 sequences: more than the server admits
    assert set(answers["big_embedding"]) == {"200"}
    assert result["p99_ratio"] > 0 and isinstance(result["meets_target"], bool)
