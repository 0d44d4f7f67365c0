"""BigBird block-sparse attention (kiln/models/bigbird.py) against dense causal attention, by sequence length:

kiln bench bigbird          # 1k, 2k, 4k, 8k tokens, forward and forward + backward
kiln bench bigbird --flex   # also FlexAttention's block mask, compiled (slow to compile)
(python -m kiln.bench.bigbird runs the same, with --lengths space-separated)

One layer's attention on the demo shape (6 heads, 2 KV heads, head_dim 32, batch 1, fp32), pattern of
64-token blocks with 3 window, 1 global and 1 random block. FLOPs count the multiply-adds of QK^T and PV
(2 each per query-key pair and dimension) that each implementation computes: the block-sparse op computes
every pair of its query block x listed key blocks (masked ones included), dense SDPA the causal half.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from kiln.bench.results import write_result
from kiln.bench.timing import best_of
from kiln.config import preset
from kiln.kernels.block_sparse_attention import block_sparse_attention
from kiln.models import bigbird


@dataclass
class ScalingResult:
    shape: str
    pattern: str
    threads: int
    # sequence length -> implementation -> {"forward_s", "forward_backward_s", "gflop"}
    rows: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)


def _time(run, repeats: int) -> float:
    return best_of(repeats, run)[0]


def scaling(args: argparse.Namespace) -> ScalingResult:
    config = preset(
        "demo", num_heads=6, num_kv_heads=2, hidden_size=192, attention_pattern="bigbird",
        bigbird_block_size=64, bigbird_num_window_blocks=3, bigbird_num_global_blocks=1,
        bigbird_num_random_blocks=1, max_position_embeddings=max(args.lengths),
    )  # fmt: skip
    heads, kv_heads, dim = 6, 2, 32
    result = ScalingResult(
        shape="6 heads, 2 KV heads, head_dim 32, batch 1, fp32",
        pattern="block 64, window 3, global 1, random 1", threads=torch.get_num_threads(),
    )  # fmt: skip
    flex = _flex_runner(config) if args.flex else None
    for length in args.lengths:
        q = torch.randn(1, heads, length, dim, requires_grad=True)
        k = torch.randn(1, kv_heads, length, dim, requires_grad=True)
        v = torch.randn(1, kv_heads, length, dim, requires_grad=True)
        row = _row(args, config, q, k, v, flex)
        result.rows[length] = row
        print(
            f"T={length:>5}: "
            + "  ".join(
                f"{name} fwd {r['forward_s'] * 1e3:.1f}ms"
                + (f" fwd+bwd {r['forward_backward_s'] * 1e3:.1f}ms" if args.backward else "")
                + (f" ({r['gflop']:.2f} GFLOP)" if "gflop" in r else "")
                for name, r in row.items()
            )
        )
    return result


def _row(args, config, q, k, v, flex) -> dict[str, dict[str, float]]:
    heads, length, dim = q.shape[1], q.shape[2], q.shape[3]
    size = config.bigbird_block_size
    table = bigbird.key_blocks(config, 0, -(-length // size))
    runs = {
        "bigbird block-sparse": (lambda: block_sparse_attention(q, k, v, table, size), table.shape[1] * size),
        "dense causal SDPA": (
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            (length + 1) / 2,
        ),
    }
    if flex is not None:
        runs["bigbird FlexAttention (compiled)"] = (lambda: flex(q, k, v, length), None)
    row = {}
    for name, (run, keys_per_query) in runs.items():
        with torch.no_grad():
            run()  # warm-up (and compile)
            forward = _time(run, args.repeats)
        both = 0.0
        if args.backward and "Flex" not in name:
            both = _time(lambda run=run: run().sum().backward(), max(1, args.repeats // 2))
        row[name] = {"forward_s": forward, "forward_backward_s": both}
        if keys_per_query is not None:
            row[name]["gflop"] = 4 * heads * dim * length * keys_per_query / 1e9
    return row


def _flex_runner(config):
    """The same pattern through torch.nn.attention.flex_attention's block mask, compiled (eager flex
    materialises the whole score matrix)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention)
    size = config.bigbird_block_size

    def run(q, k, v, length):
        allowed = bigbird.block_allowed(config, 0, -(-length // size))

        def mask_mod(b, h, query, key):
            return allowed[query // size, key // size] & (key <= query)

        mask = create_block_mask(mask_mod, 1, 1, length, length, device="cpu", BLOCK_SIZE=size)
        return compiled(q, k, v, block_mask=mask, enable_gqa=True)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backward", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--flex", action="store_true", help="Also time compiled FlexAttention (forward).")
    parser.add_argument("--out", type=Path, default=None, help="Write the result as JSON here.")
    args = parser.parse_args()
    result = scaling(args)
    if args.out is not None:
        write_result(result, args.out)


if __name__ == "__main__":
    main()
