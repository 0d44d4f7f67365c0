"""How the torch paged-attention backend groups decodes, measured on CPU (best of --repeats):

python -m kiln.bench.paged_attention

Offline throughput against transformers is `kiln bench generate` (kiln/bench/generate.py).
"""

from __future__ import annotations

import argparse
import random

import torch

import kiln.engine.attention as paged
from kiln.bench.timing import best_of
from kiln.config import ModelConfig


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    attention(args)


if __name__ == "__main__":
    main()
