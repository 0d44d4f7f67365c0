"""`kiln bench serve`: an async load generator for any OpenAI-compatible server (kiln's, or a peer's).

Requests stream (SSE), so each one yields its time to first token (TTFT), the gaps between content chunks
(ITL), time per output token after the first (TPOT) and end-to-end latency (E2E). Arrivals follow a gamma
process at `request_rate` (burstiness 1 is Poisson; lower is burstier) or all come at once (rate inf);
`max_concurrency` caps requests in flight. Goodput counts the requests per second that met every SLO.
Several rates make a sweep, which `plot` draws as latency against throughput.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from kiln.errors import KilnError

# Common English words: a random prompt of N words is about N tokens for most BPE tokenizers.
WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be or had "
    "not but have one they their all new there when who more been has would about also time into only "
    "city first after other some year over world two state many part made people most such school these "
    "may then river music later than during used under where between both name three while well before "
    "house water light small large game early group number power since great line team north south"
).split()
PERCENTILES = (50, 90, 99)


@dataclass(kw_only=True, slots=True)
class BenchRequest:
    prompt: str | list[dict[str, str]]  # text (completions) or messages (chat)
    output_len: int


@dataclass(kw_only=True, slots=True)
class RequestResult:
    success: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


@dataclass(kw_only=True, slots=True)
class ServeBenchConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str | None = None  # None: the first model the server lists
    endpoint: str = "completions"  # or "chat"
    api_key: str | None = None
    num_prompts: int = 100
    dataset: Path | None = None  # JSONL of {"prompt": str} or {"messages": [...]}, optional "output_len"
    input_len: int = 128  # words per random prompt
    output_len: int = 128
    range_ratio: float = 0.0  # lengths drawn uniformly from [len * (1 - r), len * (1 + r)]
    request_rate: float = math.inf  # requests/s; inf sends all at once
    burstiness: float = 1.0  # gamma shape of the gaps between arrivals: 1 is Poisson
    max_concurrency: int | None = None
    ignore_eos: bool = True  # ask (vLLM/kiln extension) for exactly output_len tokens
    temperature: float = 0.0
    slos_ms: dict[str, float] = field(default_factory=dict)  # {"ttft": 500, "tpot": 50, "e2e": 5000}
    seed: int = 0
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.endpoint not in ("completions", "chat"):
            raise KilnError(f"endpoint must be completions or chat, got {self.endpoint!r}")
        if self.num_prompts < 1 or self.input_len < 1 or self.output_len < 1:
            raise KilnError("num_prompts, input_len and output_len must be >= 1")
        if not 0 <= self.range_ratio < 1:
            raise KilnError(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        if self.request_rate <= 0 or self.burstiness <= 0:
            raise KilnError("request_rate and burstiness must be > 0 (rate inf: all at once)")
        unknown = set(self.slos_ms) - {"ttft", "tpot", "itl", "e2e"}
        if unknown:
            raise KilnError(f"unknown SLO {', '.join(sorted(unknown))}; use ttft, tpot, itl or e2e")


# ------------------------------------------------------------------------------------------ workload


def make_requests(config: ServeBenchConfig) -> list[BenchRequest]:
    rng = random.Random(config.seed)

    def length(mean: int) -> int:
        low, high = int(mean * (1 - config.range_ratio)), int(mean * (1 + config.range_ratio))
        return max(rng.randint(low, high), 1)

    if config.dataset is not None:
        rows = [json.loads(line) for line in config.dataset.read_text().splitlines() if line.strip()]
        if not rows:
            raise KilnError(f"{config.dataset} has no requests; write one JSON object per line")
        picked = [rows[i % len(rows)] for i in range(config.num_prompts)]
        return [
            BenchRequest(
                prompt=_dataset_prompt(row, config.endpoint, config.dataset),
                output_len=int(row.get("output_len") or length(config.output_len)),
            )
            for row in picked
        ]
    requests = []
    for _ in range(config.num_prompts):
        text = " ".join(rng.choice(WORDS) for _ in range(length(config.input_len)))
        prompt: Any = [{"role": "user", "content": text}] if config.endpoint == "chat" else text
        requests.append(BenchRequest(prompt=prompt, output_len=length(config.output_len)))
    return requests


def _dataset_prompt(row: dict[str, Any], endpoint: str, path: Path) -> str | list[dict[str, str]]:
    if "messages" in row:
        if endpoint == "chat":
            return row["messages"]
        return "\n".join(message["content"] for message in row["messages"])
    if "prompt" not in row:
        raise KilnError(f"{path}: every line needs a 'prompt' or 'messages' field")
    return [{"role": "user", "content": row["prompt"]}] if endpoint == "chat" else row["prompt"]


def arrival_gaps(config: ServeBenchConfig) -> list[float]:
    """Seconds to wait before each request: gamma(shape=burstiness) with mean 1/rate; 0 for rate inf."""
    if math.isinf(config.request_rate):
        return [0.0] * config.num_prompts
    rng = random.Random(config.seed + 1)
    scale = 1 / (config.request_rate * config.burstiness)
    return [rng.gammavariate(config.burstiness, scale) for _ in range(config.num_prompts)]


# ------------------------------------------------------------------------------------------- client


async def send_request(
    client: Any, config: ServeBenchConfig, model: str, request: BenchRequest
) -> RequestResult:
    """Stream one request, timing each content chunk."""
    payload: dict[str, Any] = {
        "model": model,
        "max_tokens": request.output_len,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.ignore_eos:
        payload["ignore_eos"] = True
    key = "messages" if config.endpoint == "chat" else "prompt"
    payload[key] = request.prompt
    path = "/chat/completions" if config.endpoint == "chat" else "/completions"
    result = RequestResult()
    start = last = time.perf_counter()
    num_chunks = 0
    try:
        async with client.stream("POST", config.base_url + path, json=payload) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    result.success = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error event")
                    return result
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if any(_carries_tokens(choice) for choice in chunk.get("choices") or ()):
                    now = time.perf_counter()
                    if num_chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last, num_chunks = now, num_chunks + 1
    except Exception as error:  # a failed request is data here, not a crash
        result.error = f"{type(error).__name__}: {error}"
        return result
    result.e2e = time.perf_counter() - start
    result.output_tokens = result.output_tokens or num_chunks  # servers that send no usage
    if not result.success:
        result.error = "the stream ended without [DONE]"
    return result


def _carries_tokens(choice: dict[str, Any]) -> bool:
    """Whether a streamed choice delivers generated tokens: a completion's `text` or a chat delta's
    `content`, even when empty (a token whose text the detokenizer holds back, or that decodes to nothing,
    is still a token; timing only non-empty text left TTFT at zero for streams that never showed any).
    A chat stream's opening role-only delta carries none."""
    if "text" in choice:
        return True
    return (choice.get("delta") or {}).get("content") is not None


async def run_benchmark(config: ServeBenchConfig) -> dict[str, Any]:
    """Send the workload at the configured rate and concurrency; return the summary (see `summarize`)."""
    import httpx

    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(config.timeout_s, connect=30)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        model = config.model or await _first_model(client, config.base_url)
        requests = make_requests(config)
        gate = asyncio.Semaphore(config.max_concurrency or len(requests))

        async def limited(request: BenchRequest) -> RequestResult:
            async with gate:
                return await send_request(client, config, model, request)

        start = time.perf_counter()
        tasks = []
        for request, gap in zip(requests, arrival_gaps(config), strict=True):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(limited(request)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(results, duration, config, model)


async def _first_model(client: Any, base_url: str) -> str:
    response = await client.get(base_url + "/models")
    if response.status_code != 200:
        raise KilnError(f"GET {base_url}/models answered {response.status_code}; pass --model or --api-key")
    return response.json()["data"][0]["id"]


# ------------------------------------------------------------------------------------------ summary


def _stats(values: list[float]) -> dict[str, float]:
    """Mean, median, p90, p99 in milliseconds (NaN when there are no values)."""
    if not values:
        return {"mean_ms": math.nan, **{f"p{p}_ms": math.nan for p in PERCENTILES}}
    ordered = sorted(values)

    def percentile(p: float) -> float:  # linear interpolation, as numpy's default
        position = (len(ordered) - 1) * p / 100
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return {
        "mean_ms": 1000 * sum(ordered) / len(ordered),
        **{f"p{p}_ms": 1000 * percentile(p) for p in PERCENTILES},
    }


def summarize(
    results: list[RequestResult], duration: float, config: ServeBenchConfig, model: str
) -> dict[str, Any]:
    done = [r for r in results if r.success]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done)
    slos = {name: value / 1000 for name, value in config.slos_ms.items()}

    def meets_slos(r: RequestResult) -> bool:
        measured = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "itl": max(r.itl, default=0.0), "e2e": r.e2e}
        return all(measured[name] <= limit for name, limit in slos.items())

    errors = [r.error for r in results if not r.success]
    return {
        "model": model,
        "base_url": config.base_url,
        "config": {k: v for k, v in asdict(config).items() if k != "api_key"},
        "duration_s": duration,
        "num_requests": len(results),
        "completed": len(done),
        "failed": len(errors),
        "errors": sorted(set(errors))[:10],
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "request_throughput": len(done) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration,
        "goodput": sum(meets_slos(r) for r in done) / duration if slos else None,
        "ttft": _stats([r.ttft for r in done]),
        "tpot": _stats([r.tpot for r in done if r.tpot is not None]),
        "itl": _stats([gap for r in done for gap in r.itl]),
        "e2e": _stats([r.e2e for r in done]),
    }


def serve_command(
    base_url: Annotated[str, typer.Option(help="The server's OpenAI API root.")] = "http://127.0.0.1:8000/v1",
    model: Annotated[
        str | None, typer.Option(help="Model name (default: the first the server lists).")
    ] = None,
    endpoint: Annotated[str, typer.Option(help="completions or chat.")] = "completions",
    api_key: Annotated[str | None, typer.Option(envvar="KILN_API_KEY", help="Bearer key, if needed.")] = None,
    num_prompts: Annotated[int, typer.Option(help="Requests per run.")] = 100,
    dataset: Annotated[
        Path | None,
        typer.Option(help="JSONL: {'prompt': ...} or {'messages': [...]}, optional 'output_len'."),
    ] = None,
    input_len: Annotated[int, typer.Option(help="Words per random prompt (about one token each).")] = 128,
    output_len: Annotated[int, typer.Option(help="max_tokens per request.")] = 128,
    range_ratio: Annotated[float, typer.Option(help="Sample lengths in [len*(1-r), len*(1+r)].")] = 0.0,
    request_rate: Annotated[
        list[float] | None, typer.Option(help="Requests/s (inf: all at once); repeat for a sweep.")
    ] = None,
    burstiness: Annotated[
        float, typer.Option(help="Gamma shape of arrival gaps: 1 Poisson, <1 burstier.")
    ] = 1.0,
    max_concurrency: Annotated[int | None, typer.Option(help="Most requests in flight at once.")] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Ask for exactly --output-len tokens (vLLM/kiln).")] = True,
    slo: Annotated[
        list[str] | None, typer.Option(help="SLO for goodput, e.g. ttft=500 (ms); ttft, tpot, itl, e2e.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of prompts, lengths and arrivals.")] = 0,
    output: Annotated[Path, typer.Option(help="JSON results.")] = Path("benchmarks/serve.json"),
    plot: Annotated[Path | None, typer.Option(help="PNG of latency against throughput (a sweep).")] = None,
) -> None:
    """Load-test an OpenAI-compatible server: throughput, TTFT, TPOT, ITL, E2E latency and goodput."""
    from kiln.bench.serve_report import plot_sweep, print_summary, to_json

    slos: dict[str, float] = {}
    for item in slo or []:
        name, _, value = item.partition("=")
        try:
            slos[name.strip()] = float(value)
        except ValueError:
            raise KilnError(f"--slo {item!r}: write it as NAME=MILLISECONDS, e.g. ttft=500") from None
    runs = []
    for rate in request_rate or [math.inf]:
        config = ServeBenchConfig(
            base_url=base_url.rstrip("/"),
            model=model,
            endpoint=endpoint,
            api_key=api_key,
            num_prompts=num_prompts,
            dataset=dataset,
            input_len=input_len,
            output_len=output_len,
            range_ratio=range_ratio,
            request_rate=rate,
            burstiness=burstiness,
            max_concurrency=max_concurrency,
            ignore_eos=ignore_eos,
            slos_ms=slos,
            seed=seed,
        )
        summary = asyncio.run(run_benchmark(config))
        print_summary(summary)
        runs.append(summary)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(to_json(runs if len(runs) > 1 else runs[0]), indent=2) + "\n")
    typer.echo(f"wrote {output}")
    if plot is not None:
        typer.echo(f"wrote {plot_sweep(runs, plot)}")
