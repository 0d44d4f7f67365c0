"""Paged decode attention (Triton) against its torch reference, and the Triton engine backend against the
torch one: kernel outputs, mixed decode/prefill steps, and whole greedy generations.

Tolerances: fp32 to round-off (SCALED_TOLERANCE); fp16/bf16 to two units in the last place.
"""

import pytest
import torch

from tests.kernels.helpers import DEVICE, SCALED_TOLERANCE, assert_scaled_close, needs_triton

needs_triton()

from kiln.engine.attention import (  # noqa: E402
    KVPool,
    PagedBatch,
    TorchPagedAttention,
    TritonPagedAttention,
    paged_attention_backend,
)
from kiln.kernels.paged_attention import paged_decode_attention, paged_decode_reference  # noqa: E402


def _cache(lengths, heads, kv_heads, head_dim, page_size, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pages = [-(-length // page_size) for length in lengths]
    num_pages = sum(pages) + 3
    keys = torch.randn(num_pages * page_size, kv_heads, head_dim, generator=generator).to(DEVICE, dtype)
    values = torch.randn(num_pages * page_size, kv_heads, head_dim, generator=generator).to(DEVICE, dtype)
    order = torch.randperm(num_pages, generator=generator).tolist()  # scattered, as a busy pool's are
    tables, used = [], 0
    for count in pages:
        tables.append(order[used : used + count] + [0] * (max(pages) - count))
        used += count
    block_tables = torch.tensor(tables, dtype=torch.int32, device=DEVICE)
    context_lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(lengths), heads, head_dim, generator=generator).to(DEVICE, dtype)
    return q, keys, values, block_tables, context_lens


def _check(lengths, heads, kv_heads, head_dim, page_size, dtype=torch.float32, **options):
    q, keys, values, tables, context = _cache(lengths, heads, kv_heads, head_dim, page_size, dtype)
    got = paged_decode_attention(q, keys, values, tables, context, page_size, max(lengths), **options)
    options.pop("num_splits", None)
    expected = paged_decode_reference(q.float(), keys, values, tables, context, page_size, **options)
    assert got.dtype == dtype
    assert_scaled_close(got, expected, SCALED_TOLERANCE[dtype])


# contexts 1, 17, 100 and 1000; heads 1, 3, 12; GQA ratios 1, 4, 8; page sizes 1, 4, 16; head dim 40 padded
@pytest.mark.parametrize(
    "case",
    [
        ([1, 17, 100], 1, 1, 16, 16),
        ([17, 5], 3, 3, 40, 4),
        ([100, 1, 64], 12, 3, 64, 16),
        ([33, 9], 8, 1, 16, 1),
        ([1000], 4, 1, 32, 16),
    ],
    ids=str,
)
@pytest.mark.parametrize("num_splits", [1, 3], ids=lambda n: f"splits{n}")
def test_matches_reference(case, num_splits):
    _check(*case, num_splits=num_splits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(dtype):
    _check([70, 3], 8, 2, 64, 16, dtype, num_splits=2)


def test_more_splits_than_key_tiles_leaves_empty_splits_harmless():
    _check([5, 70], 4, 2, 16, 4, num_splits=6)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_alibi_and_sliding_window(num_splits):
    from kiln.models.layers import alibi_slopes

    _check([300, 12], 6, 2, 16, 16, num_splits=num_splits, alibi_slopes=alibi_slopes(6).to(DEVICE))
    _check([300, 12, 50], 4, 4, 16, 8, num_splits=num_splits, sliding_window=50)


def _step_inputs(config, batch: PagedBatch, seed: int):
    generator = torch.Generator().manual_seed(seed)
    rows = sum(batch.query_lens)
    q = torch.randn(1, rows, config.num_heads, config.head_dim, generator=generator).transpose(1, 2)
    k = torch.randn(1, config.num_kv_heads, rows, config.head_dim, generator=generator)
    v = torch.randn(1, config.num_kv_heads, rows, config.head_dim, generator=generator)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


@pytest.mark.parametrize("position", ["rope", "alibi"])
@pytest.mark.parametrize("sliding_window", [None, 6])
def test_backend_matches_torch_backend_on_mixed_steps(position, sliding_window):
    """Step 1 prefills three prompts; step 2 mixes two decodes, a prefill chunk and a new prompt."""
    import kiln

    config = kiln.preset("tiny", num_heads=6, num_kv_heads=2, head_dim=16, position=position,
                         sliding_window=sliding_window)  # fmt: skip
    block_size = 4
    pools = [KVPool(config, 16, block_size, torch.float32, DEVICE) for _ in range(2)]
    tables = [[3, 7], [1, 0, 9], [5, 2, 11, 4], [6, 8]]

    def slots(seq, start, count):
        return [
            tables[seq][p // block_size] * block_size + p % block_size for p in range(start, start + count)
        ]

    steps = [  # (seq, computed tokens before, new tokens)
        [(0, 0, 5), (1, 0, 9), (2, 0, 6)],
        [(0, 5, 1), (1, 9, 1), (2, 6, 7), (3, 0, 3)],
    ]
    for index, step in enumerate(steps):
        starts = [sum(n for _, _, n in step[:i]) for i in range(len(step))]
        batch = PagedBatch(
            slot_mapping=torch.tensor(
                [s for seq, done, n in step for s in slots(seq, done, n)], device=DEVICE
            ),
            query_starts=starts,
            query_lens=[n for _, _, n in step],
            context_lens=[done + n for _, done, n in step],
            block_tables=[tables[seq] for seq, _, _ in step],
        )
        q, k, v = _step_inputs(config, batch, seed=index)
        expected = TorchPagedAttention(pools[0], batch, config)(0, q, k, v)
        got = TritonPagedAttention(pools[1], batch, config)(0, q, k, v)
        assert_scaled_close(got, expected, SCALED_TOLERANCE[torch.float32])
        torch.testing.assert_close(pools[1].keys, pools[0].keys)


@pytest.mark.parametrize("case", ["llama-gqa3-untied", "bloom-heads3", "mistral-gqa4-window"])
def test_greedy_generation_is_unchanged(case, tmp_path):
    """Whole generations through the engine: the Triton backend produces the torch backend's tokens."""
    from kiln.engine import LLM, SamplingParams
    from tests.hf_cases import build_hf_model

    pytest.importorskip("transformers")
    build_hf_model(case, tmp_path)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 90, (length,), generator=generator).tolist() for length in (3, 11, 30, 7)]
    params = SamplingParams(temperature=0, max_tokens=10)
    runs = []
    for backend in (TorchPagedAttention, TritonPagedAttention):
        llm = LLM(
            tmp_path, block_size=4, max_num_batched_tokens=32, enable_prefix_caching=False, verbose=False
        )
        llm.engine.runner.attention = backend
        runs.append([output.outputs[0].token_ids for output in llm.generate(prompts, params)])
    assert runs[0] == runs[1]


def test_backend_choice():
    weight = torch.zeros(1, device=DEVICE)
    assert paged_attention_backend("torch", weight) is TorchPagedAttention
    assert paged_attention_backend("triton", weight) is TritonPagedAttention
    expected = TritonPagedAttention if DEVICE.type == "cuda" else TorchPagedAttention
    assert paged_attention_backend("auto", weight) is expected


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_splits", [None, 1, 8], ids=str)
def test_full_size_on_gpu(dtype, num_splits):
    lengths = [1, 17, 1000, 4096, 16384, 333, 2048, 77]
    _check(lengths, 32, 8, 128, 16, dtype, num_splits=num_splits)
    _check(lengths, 32, 4, 128, 16, dtype, num_splits=num_splits)
