"""Loki sparse attention (kiln/engine/loki.py): quality and decode attention time against dense attention.

kiln bench loki decode          # attention time per decode step (or: python -m kiln.bench.loki decode)
kiln bench loki engine          # the whole engine's decode tokens/s, dense vs Loki, on the demo model
kiln bench loki perplexity      # dense vs Loki perplexity of the demo model (--model DIR --val VAL.npy)

`perplexity` runs every query of each --seq-len window of the validation tokens as Loki would at decode
(query t keeps ceil(top_k * (t + 1)) keys; kiln.engine.loki.LokiSequenceAttention) against the model's dense
attention. The model directory needs `kiln calibrate-loki` first.

`engine` times the whole engine's decode steps (kiln.Engine on --model, random prompts of each --contexts
length, --batches sequences, --new-tokens steps after the prefill) with dense attention and with Loki.

`decode` times one engine decode step's attention (all layers: the backend call per layer, which writes the
new key/value and attends) for --batch sequences at each --contexts length on the demo shape (6 heads, 2 KV
heads, head_dim 32, 4 layers, fp32; --heads / --kv-heads / --head-dim for others, e.g. 8 / 8 / 128, the
head size of the Loki paper's models): the dense C++ paged-attention backend (the engine's default on CPU),
the dense torch backend, and Loki on its C++ op and on torch, with a random orthonormal basis (the time
does not depend on the basis).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kiln.bench.results import write_result
from kiln.bench.timing import best_of_each
from kiln.config import ModelConfig
from kiln.engine.attention import KVPool, PagedBatch, TorchPagedAttention
from kiln.engine.loki import (
    LOKI_FILE,
    LokiPagedAttention,
    LokiSequenceAttention,
    LokiSettings,
    load_loki_settings,
)
from kiln.kernels.cpu_extension import cpu_ops_available


@dataclass
class PerplexityResult:
    model: str
    seq_len: int
    num_windows: int
    rank: int
    top_k: float
    dense_perplexity: float
    loki_perplexity: float
    ratio: float


@dataclass
class DecodeResult:
    shape: str
    batch: int
    rank: int
    top_k: float
    threads: int
    # context length -> backend -> seconds of attention per decode step (all layers)
    seconds: dict[int, dict[str, float]] = field(default_factory=dict)


@dataclass
class EngineResult:
    model: str
    rank: int | None
    top_k: float
    threads: int
    new_tokens: int
    kv_cache_dtype: str | None
    # one row per (context, batch): dense and Loki decode tokens/s of the whole engine step, and their ratio
    rows: list[dict] = field(default_factory=list)


def engine(args: argparse.Namespace) -> EngineResult:
    """Decode tokens/s of the whole engine (kiln.Engine on --model, prefix caching off, random prompts of
    each context length) with dense attention and with Loki, in alternating rounds; the best round counts.
    Both sides use --kv-cache-dtype (None: the model dtype)."""
    from kiln.bench.kv_cache import decode_speed

    config = json.loads((args.model / "config.json").read_text())
    result = EngineResult(
        model=str(args.model), rank=args.rank, top_k=args.top_k, threads=torch.get_num_threads(),
        new_tokens=args.new_tokens, kv_cache_dtype=args.kv_cache_dtype,
    )  # fmt: skip
    loki, vocab = {"loki_top_k": args.top_k, "loki_rank": args.rank}, config["vocab_size"]
    for context in args.contexts:
        for batch in args.batches:
            best: dict[str, float] = {}
            for _ in range(args.rounds):
                for name, options in (("dense", {}), ("loki", loki)):
                    row = decode_speed(
                        args.model,
                        "auto",
                        args.kv_cache_dtype,
                        context,
                        batch,
                        args.new_tokens,
                        vocab,
                        **options,
                    )
                    best[name] = max(best.get(name, 0.0), row["tokens_per_second"])
            ratio = best["loki"] / best["dense"]
            result.rows.append(
                {"context": context, "batch": batch, "dense_tokens_per_second": best["dense"],
                 "loki_tokens_per_second": best["loki"], "loki_speed_vs_dense": ratio}
            )  # fmt: skip
            print(
                f"context {context:>5}, batch {batch}: dense {best['dense']:,.1f} tok/s, Loki "
                f"{best['loki']:,.1f} tok/s ({ratio:.2f}x dense's speed)"
            )
    return result


@torch.no_grad()
def perplexity(args: argparse.Namespace) -> PerplexityResult:
    from kiln.models.hf.io import load_model

    model = load_model(args.model, dtype="float32").eval()
    settings = load_loki_settings(
        args.model / LOKI_FILE, model.config, args.rank, args.top_k, torch.float32, torch.device("cpu")
    )
    tokens = np.load(args.val, mmap_mode="r")
    num_windows = min(args.num_windows, len(tokens) // args.seq_len)
    positions = torch.arange(args.seq_len)[None]
    losses = {"dense": 0.0, "loki": 0.0}
    for index in range(num_windows):
        window = np.asarray(tokens[index * args.seq_len : (index + 1) * args.seq_len], dtype=np.int64)
        ids = torch.from_numpy(window)[None]
        for name, attention in (("dense", None), ("loki", LokiSequenceAttention(settings))):
            if attention is None:
                hidden = model.hidden_states(ids)
            else:
                hidden = model.hidden_states(ids, positions, attention=attention)
            logits = model.logits(hidden)[0, :-1].float()
            losses[name] += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
    count = num_windows * (args.seq_len - 1)
    dense, loki = (math.exp(losses[name] / count) for name in ("dense", "loki"))
    result = PerplexityResult(
        model=str(args.model), seq_len=args.seq_len, num_windows=num_windows, rank=settings.rank,
        top_k=args.top_k, dense_perplexity=dense, loki_perplexity=loki, ratio=loki / dense,
    )  # fmt: skip
    print(
        f"{num_windows} windows x {args.seq_len} tokens: dense perplexity {dense:.3f}, Loki (rank "
        f"{settings.rank}, top_k {args.top_k:g}) {loki:.3f}: {100 * (loki / dense - 1):+.2f}%"
    )
    return result


def _decode_step(config: ModelConfig, batch: int, context: int, block_size: int = 16):
    """A pool holding `batch` sequences of `context` tokens (the last one new) and the step's PagedBatch."""
    blocks_per_seq = -(-context // block_size)
    pool = KVPool(config, batch * blocks_per_seq, block_size, torch.float32, torch.device("cpu"))
    pool.keys.normal_()
    pool.values.normal_()
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch)]
    last = context - 1
    paged = PagedBatch(
        slot_mapping=torch.tensor([t[last // block_size] * block_size + last % block_size for t in tables]),
        query_starts=list(range(batch)), query_lens=[1] * batch, context_lens=[context] * batch,
        block_tables=tables,
    )  # fmt: skip
    return pool, paged


def _step(build, pool, paged, config, q, k, v) -> None:
    """One decode step's attention: build the backend, call it for every layer."""
    backend = build(pool, paged, config)
    for layer in range(config.num_layers):
        backend(layer, q, k, v)


def decode(args: argparse.Namespace) -> DecodeResult:
    heads, kv_heads, head_dim = args.heads, args.kv_heads, args.head_dim
    if heads % kv_heads or head_dim % 2:
        raise SystemExit(f"--heads ({heads}) must be a multiple of --kv-heads ({kv_heads}), --head-dim even")
    config = ModelConfig(
        vocab_size=8192, hidden_size=heads * head_dim, num_layers=4, num_heads=heads, num_kv_heads=kv_heads
    )
    rank = args.rank or head_dim // 4
    basis = torch.linalg.qr(torch.randn(config.num_layers, kv_heads, head_dim, head_dim))[0]
    demo = (heads, kv_heads, head_dim) == (6, 2, 32)
    result = DecodeResult(
        shape=f"{'demo: ' if demo else ''}{heads} heads, {kv_heads} KV heads, head_dim {head_dim}, 4 layers, "
        "fp32, block 16",
        batch=args.batch, rank=rank, top_k=args.top_k, threads=torch.get_num_threads(),
    )  # fmt: skip
    backends = {"dense torch": TorchPagedAttention}
    if cpu_ops_available():
        from kiln.engine.cpu_attention import CppPagedAttention

        backends["dense C++ (engine default)"] = CppPagedAttention
    for use_cpp in [False, True] if cpu_ops_available() else [False]:
        settings = LokiSettings(basis=basis, rank=rank, top_k=args.top_k, use_cpp=use_cpp)
        name = f"Loki {'C++' if use_cpp else 'torch'}"
        backends[name] = lambda pool, batch, cfg, s=settings: LokiPagedAttention(pool, batch, cfg, s)
    for context in args.contexts:
        pool, paged = _decode_step(config, args.batch, context)
        q = torch.randn(1, config.num_heads, args.batch, config.head_dim)
        k = torch.randn(1, config.num_kv_heads, args.batch, config.head_dim)
        inputs = (pool, paged, config, q, k, torch.randn_like(k))
        runs = {name: lambda b=build, i=inputs: _step(b, *i) for name, build in backends.items()}
        timed = best_of_each(args.repeats, runs)  # round-robin: a slow phase lands on every backend alike
        result.seconds[context] = {name: seconds for name, (seconds, _) in timed.items()}
        print(
            f"context {context:>5}, {args.batch} decodes: "
            + "  ".join(f"{name} {seconds * 1e3:.3f}ms" for name, seconds in result.seconds[context].items())
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["perplexity", "decode", "engine"])
    parser.add_argument("--model", type=Path, help="HF model directory calibrated by `kiln calibrate-loki`.")
    parser.add_argument("--val", type=Path, help="Validation token shard (.npy).")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--num-windows", type=int, default=64)
    parser.add_argument("--rank", type=int, default=None, help="Default: head_dim / 4.")
    parser.add_argument("--top-k", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=6, help="decode: query heads (default: demo).")
    parser.add_argument("--kv-heads", type=int, default=2, help="decode: KV heads.")
    parser.add_argument("--head-dim", type=int, default=32, help="decode: head dimension.")
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="engine: sequences decoding.")
    parser.add_argument("--new-tokens", type=int, default=64, help="engine: decode steps timed.")
    parser.add_argument("--rounds", type=int, default=2, help="engine: alternating dense / Loki rounds.")
    parser.add_argument("--out", type=Path, default=None, help="Write the result as JSON here.")
    args = parser.parse_args()
    result = {"perplexity": perplexity, "decode": decode, "engine": engine}[args.mode](args)
    if args.out is not None:
        write_result(result, args.out)


if __name__ == "__main__":
    main()
