"""`kiln bench kv-cache`: the quantized KV cache (kv_cache_dtype int8 / int4) against the model-dtype cache.

Quality, on the trained demo model (`kiln demo` trains it; fp32 weights, its own validation shard):
- greedy: 64 prompts (the first 32 tokens of consecutive 96-token windows) x 64 new tokens, EOS ignored;
  how many continuations equal the unquantized cache's, and the largest change of the logprob of the
  unquantized continuation's tokens when it is fed back as a prompt (teacher-forced, 64 x 95 positions);
- validation perplexity over non-overlapping 256-token windows, scored through the engine (prompt logprobs,
  so every position attends the cache's keys/values as that cache holds them).
Memory: bytes per token = the pool's bytes / its capacity in tokens, from the engine.
Attention alone: one layer's decode attention on kiln's C++ op at the gpt2-small head shape (12 x 64),
`context` tokens per sequence, over each cache dtype's pool.
Speed, at the gpt2-small shape of kiln/bench/engine_speed.py (random weights): decode tokens/s at a long
context (`context` tokens of prompt, then `new_tokens` decode steps timed, prefill excluded), batch 1 and
batch `batch`, per model dtype (bf16, fp32) and cache dtype, on kiln's C++ CPU backend.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

CACHE_DTYPES = (None, "int8", "int4")


def _name(kv_cache_dtype: str | None) -> str:
    return kv_cache_dtype or "model dtype"


@dataclass
class KVCacheBenchResult:
    threads: int
    bytes_per_token: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # model dtype -> cache -> bytes
    demo: dict[str, Any] = field(default_factory=dict)
    speed: list[dict[str, Any]] = field(default_factory=list)
    attention: list[dict[str, Any]] = field(default_factory=list)  # one layer's decode attention, C++ op


@torch.no_grad()
def demo_quality(model_dir: Path, val_shard: Path, num_prompts: int = 64, new_tokens: int = 64,
                 windows: int = 32, window: int = 256) -> dict[str, Any]:  # fmt: skip
    """Greedy agreement and logprob change vs the unquantized cache, and validation perplexity."""
    from kiln.engine import LLM, SamplingParams

    tokens = np.load(val_shard, mmap_mode="r")
    prompts = [np.asarray(tokens[i * 96 : i * 96 + 32], dtype=np.int64).tolist() for i in range(num_prompts)]
    greedy = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    forced = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0, ignore_eos=True)
    score = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0, ignore_eos=True)
    texts = [
        np.asarray(tokens[i * window : (i + 1) * window], dtype=np.int64).tolist() for i in range(windows)
    ]
    out: dict[str, Any] = {
        "prompts": num_prompts,
        "new_tokens": new_tokens,
        "ppl_tokens": windows * (window - 1),
    }
    reference = None
    for kv_cache_dtype in CACHE_DTYPES:
        llm = LLM(model_dir, dtype="float32", kv_cache_dtype=kv_cache_dtype, enable_prefix_caching=False,
                  verbose=False)  # fmt: skip
        continuations = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
        if reference is None:
            reference = continuations
        fed = [p + c for p, c in zip(prompts, reference, strict=True)]
        scored = llm.generate(fed, forced)
        logprobs = [_token_logprobs(o) for o in scored]
        nll = [-x for o in llm.generate(texts, score) for x in _token_logprobs(o)]
        pairs = list(zip(continuations, reference, strict=True))
        entry = {
            # whole continuations equal to the reference's (one flipped near-tie anywhere counts the prompt)
            "identical": sum(a == b for a, b in pairs),
            # of the prompts x new_tokens generated tokens, those equal to the reference's at the same index
            "identical_tokens": sum(x == y for a, b in pairs for x, y in zip(a, b, strict=True)),
            # of the reference's continuation tokens fed back, those this cache also ranks first
            "forced_top1": sum(rank == 1 for o in scored for rank in _token_ranks(o)[-new_tokens:]),
            "logprobs": logprobs,
            "perplexity": math.exp(sum(nll) / len(nll)),
        }
        out[_name(kv_cache_dtype)] = entry
    base = out[_name(None)]
    for kv_cache_dtype in CACHE_DTYPES[1:]:
        entry = out[_name(kv_cache_dtype)]
        changes = [abs(a - b) for x, y in zip(entry["logprobs"], base["logprobs"], strict=True)
                   for a, b in zip(x, y, strict=True)]  # fmt: skip
        entry["max_logprob_change"] = max(changes)
        entry["mean_logprob_change"] = sum(changes) / len(changes)
        entry["perplexity_vs_model_dtype"] = entry["perplexity"] / base["perplexity"]
    for kv_cache_dtype in CACHE_DTYPES:
        del out[_name(kv_cache_dtype)]["logprobs"]
    return out


def _token_logprobs(output) -> list[float]:
    """The logprob of each prompt token after the first (prompt_logprobs=0 lists the token itself first)."""
    return [next(iter(entry.values())).logprob for entry in output.prompt_logprobs[1:]]


def _token_ranks(output) -> list[int]:
    """The rank (1 = the model's top choice) of each prompt token after the first."""
    return [next(iter(entry.values())).rank for entry in output.prompt_logprobs[1:]]


@torch.no_grad()
def decode_speed(directory: Path, dtype: str, kv_cache_dtype: str | None, context: int, batch: int,
                 new_tokens: int, vocab_size: int, **options: Any) -> dict[str, Any]:  # fmt: skip
    """Seconds per decode step of `batch` sequences at `context` tokens (prefill excluded); `options` are
    further engine options (e.g. loki_top_k)."""
    from kiln.engine import Engine, SamplingParams

    engine = Engine.from_dir(
        directory, dtype=dtype, kv_cache_dtype=kv_cache_dtype, enable_prefix_caching=False,
        max_num_seqs=batch, max_num_batched_tokens=2048, max_model_len=context + new_tokens + 1, **options,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(batch)
    params = SamplingParams(temperature=0, max_tokens=new_tokens + 1, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(torch.randint(3, vocab_size, (context,), generator=generator).tolist(), params)
    counters = engine.counters
    started: set[str] = set()
    while len(started) < batch:  # prefill: every sequence has its first token (a count of tokens would stop
        # early: a sequence prefilled first decodes while the later ones still prefill)
        started.update(out.request_id for out in engine.step() if any(c.token_ids for c in out.outputs))
    start, first_token, steps = time.perf_counter(), counters.num_generation_tokens, 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    seconds = time.perf_counter() - start
    return {
        "dtype": dtype, "kv_cache": _name(kv_cache_dtype), "batch": batch, "context": context,
        "seconds_per_step": seconds / steps,
        "tokens_per_second": (counters.num_generation_tokens - first_token) / seconds,
        "bytes_per_token": engine.runner.pool.num_bytes / engine.kv_capacity_tokens,
        "attention": engine.runner.attention.__name__,
    }  # fmt: skip


def attention_op_speed(
    dtype: str, kv_cache_dtype: str | None, context: int, batch: int, repeats: int = 20
) -> dict[str, Any]:
    """Seconds of one layer's decode attention on kiln's C++ op (one query per sequence, MHA at the
    gpt2-small shape), over a model-dtype or quantized pool: what the cache dtype changes inside attention."""
    from kiln.bench.timing import best_of
    from kiln.kernels import cpu_paged_attention as op
    from kiln.kernels.kv_quant import kv_cache_bits, quantize_kv

    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    heads, head_dim, block_size = 12, 64, 16
    generator = torch.Generator().manual_seed(0)
    blocks = -(-context // block_size)
    shape = (batch * blocks * block_size, heads, head_dim)
    keys, values = (torch.randn(shape, generator=generator) for _ in "kv")
    tables = torch.randperm(batch * blocks, generator=generator).view(batch, blocks).int()
    q = torch.randn(batch, heads, head_dim, generator=generator).to(torch_dtype)
    int32 = dict(dtype=torch.int32)
    metadata = (
        torch.arange(batch, **int32),
        torch.ones(batch, **int32),
        torch.full((batch,), context, **int32),
    )
    bits = kv_cache_bits(kv_cache_dtype)
    if bits:
        (key_codes, key_params), (value_codes, value_params) = (
            quantize_kv(keys, bits),
            quantize_kv(values, bits),
        )
        args = (q, key_codes, value_codes, key_params, value_params, bits, tables, *metadata, block_size)
        call = lambda: op.paged_attention_quantized(*args)  # noqa: E731
    else:
        args = (q, keys.to(torch_dtype), values.to(torch_dtype), tables, *metadata, block_size)
        call = lambda: op.paged_attention(*args)  # noqa: E731
    call()
    seconds, _ = best_of(repeats, call)
    return {"dtype": dtype, "kv_cache": _name(kv_cache_dtype), "batch": batch, "context": context,
            "seconds": seconds}  # fmt: skip


def bench_kv_cache(
    shape: str = "gpt2-small",
    context: int = 2000,
    batches: tuple[int, ...] = (1, 4),
    new_tokens: int = 16,
    dtypes: tuple[str, ...] = ("bfloat16", "float32"),
    threads: int = 2,
    demo_model: Path | None = None,
    demo_val: Path | None = None,
    log=print,
) -> KVCacheBenchResult:
    from kiln.bench.engine_speed import SHAPES, build_shape_dir

    torch.set_num_threads(threads)
    result = KVCacheBenchResult(threads=torch.get_num_threads())
    if demo_model is not None and demo_val is not None and demo_model.is_dir() and demo_val.is_file():
        result.demo = demo_quality(demo_model, demo_val)
        log(f"demo model: {result.demo}")
    from kiln.kernels.cpu_extension import cpu_ops_available

    if cpu_ops_available():
        for dtype in dtypes:
            for batch in batches:
                for kv_cache_dtype in CACHE_DTYPES:
                    entry = attention_op_speed(dtype, kv_cache_dtype, context, batch)
                    result.attention.append(entry)
                    log(
                        f"attention op {dtype} {entry['kv_cache']:>11} batch {batch} @ {context}: "
                        f"{entry['seconds'] * 1e3:.3f} ms"
                    )
    directory, _ = build_shape_dir(shape)
    for dtype in dtypes:
        for batch in batches:
            for kv_cache_dtype in CACHE_DTYPES:
                entry = decode_speed(directory, dtype, kv_cache_dtype, context, batch, new_tokens,
                                     SHAPES[shape].vocab_size)  # fmt: skip
                result.speed.append(entry)
                result.bytes_per_token.setdefault(dtype, {})[entry["kv_cache"]] = entry["bytes_per_token"]
                log(
                    f"{dtype} {entry['kv_cache']:>11} batch {batch} @ {context}: "
                    f"{entry['tokens_per_second']:.1f} tok/s, {entry['bytes_per_token']:,.0f} B/token"
                )
    return result


def write_kv_cache_result(result: KVCacheBenchResult, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(asdict(result), indent=2) + "\n")
