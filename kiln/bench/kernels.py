"""`kiln bench kernels`: every Triton kernel against its torch reference, and flash attention against
`F.scaled_dot_product_attention`, across sizes, on a CUDA GPU.

Compute-bound ops (attention, the fused LM head + loss) report TFLOP/s, memory-bound ones (norms, RoPE,
SwiGLU, paged decode) GB/s of the bytes they must move, each with its fraction of the GPU's data-sheet
peak. Times are medians of triton.testing.do_bench. Interpreted Triton on a CPU says nothing about
speed, so without CUDA this refuses rather than print such numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kiln.errors import KilnError

# Dense bf16 FLOP/s and memory bandwidth (bytes/s) from vendor data sheets, SXM parts.
GPU_PEAKS = {
    "H100": (989e12, 3.35e12),
    "H200": (989e12, 4.8e12),
    "A100": (312e12, 2.039e12),
}


@dataclass
class KernelTiming:
    op: str  # e.g. "attention forward"
    shape: str
    implementation: str  # "triton", "torch" (the reference beside the kernel) or "sdpa"
    ms: float
    throughput: float  # in `unit`
    unit: str  # "TFLOP/s" or "GB/s"
    fraction_of_peak: float


@dataclass
class KernelBenchResult:
    device: str
    torch_version: str
    triton_version: str
    peak_tflops: float  # bf16 dense
    peak_gbs: float
    timings: list[KernelTiming] = field(default_factory=list)


@dataclass
class _Case:
    """One op at one size: the implementations to time and the work one call does."""

    op: str
    shape: str
    runs: dict[str, Callable[[], object]]
    flops: float = 0.0  # reported as TFLOP/s when set
    bytes: float = 0.0  # else as GB/s


def _peaks(device: torch.device) -> tuple[float, float]:
    name = torch.cuda.get_device_name(device)
    for key, peaks in GPU_PEAKS.items():
        if key in name:
            return peaks
    raise KilnError(f"no data-sheet peaks for {name!r}; add them to kiln.bench.kernels.GPU_PEAKS")


def bench_kernels(quick: bool = False, only: str | None = None) -> KernelBenchResult:
    """Time every case (those whose op contains `only`); `quick` keeps one size per op."""
    if not torch.cuda.is_available():
        raise KilnError(
            "kiln bench kernels needs a CUDA GPU: interpreted Triton on a CPU measures the interpreter, "
            "not the kernels (the CPU tests check their correctness instead)"
        )
    import triton
    import triton.testing

    device = torch.device("cuda")
    peak_flops, peak_bytes = _peaks(device)
    result = KernelBenchResult(
        device=torch.cuda.get_device_name(device),
        torch_version=torch.__version__,
        triton_version=triton.__version__,
        peak_tflops=peak_flops / 1e12,
        peak_gbs=peak_bytes / 1e9,
    )
    for case in _cases(device, quick):
        if only and only not in case.op:
            continue
        for implementation, run in case.runs.items():
            ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
            if case.flops:
                throughput, unit, fraction = (
                    case.flops / ms / 1e9,
                    "TFLOP/s",
                    case.flops / (ms / 1e3) / peak_flops,
                )
            else:
                throughput, unit, fraction = (
                    case.bytes / ms / 1e6,
                    "GB/s",
                    case.bytes / (ms / 1e3) / peak_bytes,
                )
            result.timings.append(
                KernelTiming(case.op, case.shape, implementation, ms, throughput, unit, fraction)
            )
        torch.cuda.empty_cache()
    return result


def _cases(device: torch.device, quick: bool) -> Iterator[_Case]:
    yield from _attention_cases(device, quick)
    yield from _norm_cases(device, quick)
    yield from _elementwise_cases(device, quick)
    yield from _loss_cases(device, quick)
    yield from _decode_cases(device, quick)


def _inference(runs: dict[str, Callable[[], object]]) -> dict[str, Callable[[], None]]:
    """The same calls under torch.no_grad (forward-only timings keep no autograd graph)."""

    def no_grad(fn):
        def run() -> None:
            with torch.no_grad():
                fn()

        return run

    return {name: no_grad(fn) for name, fn in runs.items()}


def _forward_backward(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], None]:
    grad = None

    def run() -> None:
        nonlocal grad
        out = fn()
        grad = torch.randn_like(out) if grad is None else grad
        torch.autograd.grad(out, inputs, grad)

    return run


def _attention_cases(device: torch.device, quick: bool) -> Iterator[_Case]:
    from kiln.kernels.flash_attention import attention_flops, attention_reference, flash_attention

    dtype = torch.bfloat16
    # (batch, heads, kv heads, sequence): 16k tokens per batch; the headline is causal, seq 4k, D 128
    sizes = [(4, 16, 16, 4096)] if quick else [(16, 16, 16, 1024), (8, 16, 16, 2048), (4, 16, 16, 4096),
                                                (2, 16, 16, 8192), (4, 32, 8, 4096)]  # fmt: skip
    for (batch, heads, kv_heads, seq), causal in ((s, c) for s in sizes for c in (True, False)):
        if quick and not causal:
            continue
        head_dim = 128
        q = torch.randn(batch, seq, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
        k = torch.randn(batch, seq, kv_heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
        v = torch.randn_like(k)
        inputs = [x.requires_grad_() for x in (q, k, v)]
        gqa = heads != kv_heads
        runs = {
            "triton": lambda q=q, k=k, v=v, c=causal: flash_attention(q, k, v, causal=c),
            "sdpa": lambda q=q, k=k, v=v, c=causal, g=gqa: F.scaled_dot_product_attention(
                q, k, v, is_causal=c, enable_gqa=g
            ),
        }
        if seq <= 2048:  # the reference materialises (B, H, T, T) fp32 scores
            runs["torch"] = lambda q=q, k=k, v=v, c=causal: attention_reference(q, k, v, causal=c)
        shape = (
            f"B={batch} H={heads} KVH={kv_heads} T={seq} D={head_dim} {'causal' if causal else 'full'} bf16"
        )
        flops = attention_flops(batch, heads, seq, seq, head_dim, causal)
        yield _Case("attention forward", shape, _inference(runs), flops=flops)
        backward_runs = {name: _forward_backward(run, inputs) for name, run in runs.items()}
        yield _Case("attention forward+backward", shape, backward_runs, flops=3.5 * flops)


def _norm_cases(device: torch.device, quick: bool) -> Iterator[_Case]:
    from kiln.kernels import norms

    dtype = torch.bfloat16
    for tokens, hidden in [(16384, 4096)] if quick else [(16384, 1024), (16384, 4096), (8192, 8192)]:
        x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
        weight = torch.ones(hidden, device=device, dtype=dtype, requires_grad=True)
        bias = torch.zeros(hidden, device=device, dtype=dtype, requires_grad=True)
        size = tokens * hidden * 2
        ops = {
            "rms_norm": (
                lambda x=x, w=weight: norms.rms_norm(x, w, 1e-5),
                lambda x=x, w=weight: norms.rms_norm_reference(x, w, 1e-5),
                [x, weight],
            ),
            "layer_norm": (
                lambda x=x, w=weight, b=bias: norms.layer_norm(x, w, b, 1e-5),
                lambda x=x, w=weight, b=bias: norms.layer_norm_reference(x, w, b, 1e-5),
                [x, weight, bias],
            ),
        }
        for name, (kernel, reference, inputs) in ops.items():
            shape = f"{tokens}x{hidden} bf16"
            yield _Case(
                f"{name} forward", shape, _inference({"triton": kernel, "torch": reference}), bytes=2 * size
            )
            runs = {
                "triton": _forward_backward(kernel, inputs),
                "torch": _forward_backward(reference, inputs),
            }
            yield _Case(f"{name} forward+backward", shape, runs, bytes=6 * size)  # + x, dy in; dx out


def _elementwise_cases(device: torch.device, quick: bool) -> Iterator[_Case]:
    from kiln.kernels.rope import apply_rope_, rope_reference
    from kiln.kernels.swiglu import swiglu, swiglu_reference

    dtype = torch.bfloat16
    tokens, heads, kv_heads, head_dim = 16384, 32, 8, 128
    q = torch.randn(tokens, heads * head_dim, device=device, dtype=dtype)
    k = torch.randn(tokens, kv_heads * head_dim, device=device, dtype=dtype)
    angles = torch.rand(tokens, head_dim, device=device)
    cos, sin = angles.cos(), angles.sin()
    moved = 2 * (q.numel() + k.numel()) * 2 + 2 * cos.numel() * 4  # q, k read and written; fp32 tables read
    runs = _inference(
        {"triton": lambda: apply_rope_(q, k, cos, sin), "torch": lambda: rope_reference(q, k, cos, sin)}
    )
    yield _Case(
        "rope forward (q and k)", f"N={tokens} H={heads} KVH={kv_heads} D={head_dim} bf16", runs, bytes=moved
    )
    for tokens, inner in [(16384, 11008)] if quick else [(16384, 4096), (16384, 11008)]:
        gate = torch.randn(tokens, inner, device=device, dtype=dtype, requires_grad=True)
        up = torch.randn_like(gate, requires_grad=True)
        size = gate.numel() * 2
        runs = {
            "triton": lambda g=gate, u=up: swiglu(g, u),
            "torch": lambda g=gate, u=up: swiglu_reference(g, u),
        }
        yield _Case("swiglu forward", f"{tokens}x{inner} bf16", _inference(runs), bytes=3 * size)
        runs = {
            "triton": _forward_backward(lambda g=gate, u=up: swiglu(g, u), [gate, up]),
            "torch": _forward_backward(lambda g=gate, u=up: swiglu_reference(g, u), [gate, up]),
        }
        yield _Case("swiglu forward+backward", f"{tokens}x{inner} bf16", runs, bytes=8 * size)


def _loss_cases(device: torch.device, quick: bool) -> Iterator[_Case]:
    from kiln.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

    for tokens, hidden, vocab in (
        [(8192, 2048, 50_304)] if quick else [(8192, 2048, 50_304), (8192, 4096, 128_256)]
    ):
        x = torch.randn(tokens, hidden, device=device, requires_grad=True)
        weight = (torch.randn(vocab, hidden, device=device) * 0.02).requires_grad_()
        targets = torch.randint(0, vocab, (tokens,), device=device)

        def run(kind: str, x=x, weight=weight, targets=targets) -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if kind == "unfused":
                    loss = linear_cross_entropy_reference(x, weight, targets)
                else:
                    loss = linear_cross_entropy(x, weight, targets, chunk_size=2048, kernels=kind)
            torch.autograd.grad(loss, (x, weight))

        runs = {kind: (lambda kind=kind: run(kind)) for kind in ("triton", "torch", "unfused")}
        flops = 6 * tokens * hidden * vocab  # logits, d hidden, d weight
        shape = f"N={tokens} H={hidden} V={vocab} bf16 autocast"
        yield _Case("linear cross-entropy forward+backward", shape, runs, flops=flops)


def _decode_cases(device: torch.device, quick: bool) -> Iterator[_Case]:
    from kiln.config import ModelConfig
    from kiln.engine.attention import KVPool, PagedBatch, TorchPagedAttention, TritonPagedAttention

    heads, kv_heads, head_dim, block_size = 32, 8, 128, 16
    config = ModelConfig(vocab_size=8, hidden_size=heads * head_dim, num_layers=1, num_heads=heads,
                         num_kv_heads=kv_heads)  # fmt: skip
    for num_seqs, context in [(64, 4096)] if quick else [(8, 32768), (64, 4096), (256, 1024), (256, 4096)]:
        blocks_per_seq = context // block_size
        pool = KVPool(config, num_seqs * blocks_per_seq + 1, block_size, torch.bfloat16, device)
        order = torch.randperm(num_seqs * blocks_per_seq).view(num_seqs, blocks_per_seq).tolist()
        slots = [table[-1] * block_size + block_size - 1 for table in order]
        batch = PagedBatch(
            slot_mapping=torch.tensor(slots, device=device),
            query_starts=list(range(num_seqs)),
            query_lens=[1] * num_seqs,
            context_lens=[context] * num_seqs,
            block_tables=order,
        )
        q = torch.randn(1, num_seqs, heads, head_dim, device=device, dtype=torch.bfloat16).transpose(1, 2)
        k = torch.randn(1, kv_heads, num_seqs, head_dim, device=device, dtype=torch.bfloat16)
        backends = {
            "triton": TritonPagedAttention(pool, batch, config),
            "torch": TorchPagedAttention(pool, batch, config),
        }
        runs = _inference(
            {name: (lambda b=backend, q=q, k=k: b(0, q, k, k)) for name, backend in backends.items()}
        )
        moved = 2 * num_seqs * context * kv_heads * head_dim * 2  # every cached key and value, once
        yield _Case("paged decode attention", f"seqs={num_seqs} context={context} H={heads} KVH={kv_heads} "
                    f"D={head_dim} bf16", runs, bytes=moved)  # fmt: skip


def format_rows(result: KernelBenchResult) -> list[tuple[str, ...]]:
    """Table rows: op, shape, implementation, ms, throughput, % of peak, and that implementation's time
    over Triton's (above 1: Triton is faster)."""
    triton_ms = {(t.op, t.shape): t.ms for t in result.timings if t.implementation == "triton"}
    rows = []
    for t in result.timings:
        ratio = t.ms / triton_ms[(t.op, t.shape)] if (t.op, t.shape) in triton_ms else float("nan")
        rows.append((t.op, t.shape, t.implementation, f"{t.ms:.3f}", f"{t.throughput:,.0f} {t.unit}",
                     f"{t.fraction_of_peak:.1%}", f"{ratio:.2f}x"))  # fmt: skip
    return rows
