"""Engine benchmarks on CPU (not collected by pytest). Both sides run in one process, best of --repeats.

python tests/engine/bench_engine.py throughput   # kiln.LLM vs kiln.generation.generate: tokens/s
python tests/engine/bench_engine.py attention    # decode grouping of the torch paged attention
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

import kiln
import kiln.engine.attention as paged
from kiln.engine import LLM, SamplingParams
from kiln.generation import GenerationConfig, generate


def best_of(repeats: int, run) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def throughput(args: argparse.Namespace) -> None:
    directory = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    kiln.save_model(kiln.Transformer(kiln.preset(args.preset, initializer_range=0.3)), directory)
    rng = random.Random(0)
    lengths = [rng.randint(args.min_prompt, args.max_prompt) for _ in range(args.num_prompts)]
    prompts = [[rng.randrange(3, 1000) for _ in range(n)] for n in lengths]
    model = kiln.load_model(directory)
    llm = LLM(directory, verbose=False, max_num_seqs=args.num_prompts)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    config = GenerationConfig(max_new_tokens=args.max_tokens)
    llm.generate(prompts[:2], params)  # warm-up
    reference_s, reference = best_of(args.repeats, lambda: generate(model, prompts, config))
    engine_s, outputs = best_of(args.repeats, lambda: llm.generate(prompts, params))
    num_tokens = args.num_prompts * args.max_tokens
    same = sum(o.outputs[0].token_ids == r for o, r in zip(outputs, reference, strict=True))
    print(
        f"{args.preset} ({model.num_parameters() / 1e6:.1f}M), {args.num_prompts} prompts of "
        f"{args.min_prompt}-{args.max_prompt} tokens, {args.max_tokens} new tokens each, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"  reference generate (padded batch): {reference_s:.2f}s  {num_tokens / reference_s:,.0f} tokens/s"
    )
    print(f"  kiln.LLM (paged, continuous):      {engine_s:.2f}s  {num_tokens / engine_s:,.0f} tokens/s")
    print(f"  identical greedy outputs: {same}/{args.num_prompts}; ratio {reference_s / engine_s:.2f}x")


def attention(args: argparse.Namespace) -> None:
    config = kiln.ModelConfig(vocab_size=100, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2)
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


def _time_decodes(config: kiln.ModelConfig, lengths: list[int], budget: int, repeats: int) -> float:
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
    parser.add_argument("what", choices=["throughput", "attention"])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--min-prompt", type=int, default=8)
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    {"throughput": throughput, "attention": attention}[args.what](args)


if __name__ == "__main__":
    main()
