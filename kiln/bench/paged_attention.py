"""Paged attention on CPU, best of --repeats:

python -m kiln.bench.paged_attention                # how the torch backend groups decodes
python -m kiln.bench.paged_attention --mode cpp     # torch backend vs the C++ op's, per layer call

`--mode cpp` times decode of 64 sequences x 256 context tokens on the 134M shape (12 heads, 12 KV heads,
head dim 64), fp32 and bf16, and a 64-token chunk over 448 cached tokens.

Offline throughput against transformers is `kiln bench generate` (kiln/bench/generate.py).
"""

from __future__ import annotations

import argparse
import random

import torch

import kiln.engine.attention as paged
from kiln.bench.timing import best_of
from kiln.config import ModelConfig
from kiln.engine.cpu_attention import CppPagedAttention
from kiln.kernels.cpu_extension import cpu_ops_available


def attention(args: argparse.Namespace) -> None:
    config = ModelConfig(vocab_size=100, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2)
    rng = random.Random(0)
    budgets = {"one call per decode": 0, "default": paged.DECODE_PADDING_BUDGET, "one padded call": 10**12}
    for low, high in [(16, 512), (200, 260), (16, 2048)]:
        lengths = sorted((rng.randint(low, high) for _ in range(32)), reverse=True)
        times = {
            name: _time_decodes(config, lengths, budget, args.repeats) for name, budget in budgets.items()
        }
        print(
            f"32 decodes, contexts {low}-{high}: "
            + "  ".join(f"{k}: {v * 1e3:.1f}ms" for k, v in times.items())
        )


def _time_decodes(config: ModelConfig, lengths: list[int], budget: int, repeats: int) -> float:
    block_size = 16
    tables, next_block = [], 0
    for length in lengths:
        count = -(-length // block_size)
        tables.append(list(range(next_block, next_block + count)))
        next_block += count
    pool = paged.KVPool(config, next_block, block_size, torch.float32, torch.device("cpu"))
    pool.keys.normal_()
    pool.values.normal_()
    last = [(length - 1) // block_size for length in lengths]
    batch = paged.PagedBatch(
        slot_mapping=torch.tensor([t[b] * block_size for t, b in zip(tables, last, strict=True)]),
        query_starts=list(range(len(lengths))),
        query_lens=[1] * len(lengths),
        context_lens=lengths,
        block_tables=tables,
    )
    q = torch.randn(1, config.num_heads, len(lengths), config.head_dim)
    k = torch.randn(1, config.num_kv_heads, len(lengths), config.head_dim)
    default, paged.DECODE_PADDING_BUDGET = paged.DECODE_PADDING_BUDGET, budget
    try:

        def step():
            backend = paged.TorchPagedAttention(pool, batch, config)
            for layer in range(config.num_layers):
                backend(layer, q, k, k)

        return best_of(repeats, step)[0]
    finally:
        paged.DECODE_PADDING_BUDGET = default


def cpp_against_torch(args: argparse.Namespace) -> None:
    if not cpu_ops_available():
        raise SystemExit("the C++ CPU ops are not built here (see the line above); nothing to compare")
    config = ModelConfig(vocab_size=100, hidden_size=768, num_layers=1, num_heads=12, num_kv_heads=12)
    steps = {"decode 64 x 256": ([1] * 64, [256] * 64), "chunk 64 over 448": ([64], [512])}
    for dtype in (torch.float32, torch.bfloat16):
        for name, (query_lens, context_lens) in steps.items():
            times = {
                backend.__name__: _time_layer_call(
                    backend, config, query_lens, context_lens, dtype, args.repeats
                )
                for backend in (paged.TorchPagedAttention, CppPagedAttention)
            }
            torch_time, cpp_time = times.values()
            print(
                f"{str(dtype).removeprefix('torch.')} {name}, per layer call: "
                + "  ".join(f"{k}: {v * 1e3:.2f}ms" for k, v in times.items())
                + f"  ({torch_time / cpp_time:.1f}x)"
            )


def _time_layer_call(backend, config, query_lens, context_lens, dtype, repeats: int) -> float:
    """Seconds of one layer's call of `backend` (built once, as the engine does per step), shuffled blocks."""
    block_size = 16
    counts = [-(-length // block_size) for length in context_lens]
    order = torch.randperm(sum(counts), generator=torch.Generator().manual_seed(0)).tolist()
    tables = [order[sum(counts[:i]) : sum(counts[: i + 1])] for i in range(len(counts))]
    pool = paged.KVPool(config, sum(counts), block_size, dtype, torch.device("cpu"))
    pool.keys.normal_()
    pool.values.normal_()
    slots = [
        table[p // block_size] * block_size + p % block_size
        for table, n, length in zip(tables, query_lens, context_lens, strict=True)
        for p in range(length - n, length)
    ]
    batch = paged.PagedBatch(
        slot_mapping=torch.tensor(slots),
        query_starts=[sum(query_lens[:i]) for i in range(len(query_lens))],
        query_lens=query_lens,
        context_lens=context_lens,
        block_tables=tables,
    )
    num_tokens, head_dim = sum(query_lens), config.head_dim
    q = torch.randn(1, num_tokens, config.num_heads, head_dim, dtype=dtype).transpose(1, 2)
    k = torch.randn(1, num_tokens, config.num_kv_heads, head_dim, dtype=dtype).transpose(1, 2)
    attention = backend(pool, batch, config)
    attention(0, q, k, k)  # warm-up
    return best_of(repeats, lambda: attention(0, q, k, k))[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["grouping", "cpp"], default="grouping")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.mode == "cpp":
        cpp_against_torch(args)
    else:
        attention(args)


if __name__ == "__main__":
    main()
