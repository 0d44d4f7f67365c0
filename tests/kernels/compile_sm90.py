"""Compile every Triton kernel for an H100 (sm_90) without a GPU: `python -m tests.kernels.compile_sm90`.

Triton's interpreter runs kernels as numpy and so accepts code the compiler rejects (non-constexpr
shapes, mismatched branch types, tiles that overflow shared memory). Ahead-of-time compilation to a
cubin for sm_90, at the block sizes a GPU would autotune over, catches those on a CPU-only machine.
Run in a process without TRITON_INTERPRET (test_compile_sm90.py does). Prints one line per kernel
variant: compile seconds, shared memory bytes, registers per thread and spilled bytes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kiln.kernels import (
    flash_attention,
    flash_attention_backward,
    linear_cross_entropy,
    norms,
    paged_attention,
    rope,
    swiglu,
)

FLOAT_SCALARS = {"scale_log2", "softmax_scale", "eps", "z_loss"}
POINTER_TYPES = {  # pointers default to bf16 activations
    "*fp32": {
        "Lse",
        "Delta",
        "Mean",
        "Rstd",
        "PartialDW",
        "PartialDB",
        "Losses",
        "NumKept",
        "Slopes",
        "W",
        "B",
        "PartialOut",
        "PartialLse",
        "Cos",
        "Sin",
    },  # fmt: skip
    "*i32": {"CuSeqlens", "BlockTables", "ContextLens"},
    "*i64": {"Targets"},
}


def signature(kernel) -> dict[str, str]:
    types = {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            types[name] = "constexpr"
        elif name[0].isupper():
            types[name] = next((t for t, names in POINTER_TYPES.items() if name in names), "*bf16")
        else:
            types[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    return types


def resources(compiled) -> str:
    """'registers/spills' from cuobjdump on the cubin (Triton ships the tool)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        out = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True).stdout
    fields = dict(item.split(":") for item in out.split() if ":" in item and item.split(":")[1].isdigit())
    return f"regs {fields.get('REG', '?')} stack {fields.get('STACK', '?')} local {fields.get('LOCAL', '?')}"


def compile_for_sm90(name, kernel, constants, num_warps=4, num_stages=2):
    start = time.perf_counter()
    source = ASTSource(fn=kernel, signature=signature(kernel), constexprs=constants)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    print(f"{name:<58} {time.perf_counter() - start:5.1f}s shared {compiled.metadata.shared:>6} "
          f"{resources(compiled)}", flush=True)  # fmt: skip


def attention_variants():
    base = dict(NUM_HEADS=32, GROUP_SIZE=4, HEAD_DIM=128, CAUSAL=True, HAS_ALIBI=False, VARLEN=False,
                DOT_F32=False, PRECISION="tf32", BLOCK_D=128)  # fmt: skip
    kernels = [
        ("forward", flash_attention._forward_kernel, flash_attention._forward_configs()),
        ("dkdv", flash_attention_backward._dkdv_kernel, flash_attention_backward._dkdv_tuned.configs),
        ("dq", flash_attention_backward._dq_kernel, flash_attention_backward._dq_tuned.configs),
    ]
    for label, kernel, configs in kernels:
        for config in configs:  # every autotuning candidate, causal bf16 head dim 128
            yield (
                f"attention {label} {config.kwargs} w{config.num_warps} s{config.num_stages}",
                kernel,
                base | config.kwargs,
                config.num_warps,
                config.num_stages,
            )
        config = configs[0]
        extras = [
            dict(CAUSAL=False, VARLEN=True, HAS_ALIBI=True),
            dict(HEAD_DIM=80, GROUP_SIZE=1),
            dict(HEAD_DIM=64, BLOCK_D=64, PRECISION="ieee"),
            dict(HEAD_DIM=256, BLOCK_D=256),
        ]
        for extra in extras:
            yield (
                f"attention {label} {extra}",
                kernel,
                base | config.kwargs | extra,
                config.num_warps,
                config.num_stages,
            )


def other_variants():
    for rms in (True, False):
        for block, rows in ((4096, 1), (1024, 4), (8192, 1)):
            constants = dict(RMS=rms, HAS_BIAS=not rms, BLOCK_ROWS=rows, BLOCK=block)
            warps = min(max(block * rows // 512, 1), 16)
            yield (
                f"norm forward rms={rms} block={block}x{rows}",
                norms._norm_forward_kernel,
                constants,
                warps,
                2,
            )
            yield (
                f"norm backward rms={rms} block={block}x{rows}",
                norms._norm_backward_kernel,
                constants,
                warps,
                2,
            )
    for inverse in (False, True):
        constants = dict(HALF=64, BLOCK_HALF=64, BLOCK_R=32, INVERSE=inverse)
        yield f"rope inverse={inverse}", rope._rope_kernel, constants, 4, 2
    yield "swiglu forward", swiglu._swiglu_forward_kernel, dict(BLOCK=swiglu.BLOCK), 4, 2
    yield "swiglu backward", swiglu._swiglu_backward_kernel, dict(BLOCK=swiglu.BLOCK), 4, 2
    for write_grad in (True, False):
        constants = dict(WRITE_GRAD=write_grad, BLOCK_ROWS=1, BLOCK_V=4096)
        yield (
            f"cross-entropy rows grad={write_grad}",
            linear_cross_entropy._cross_entropy_rows_kernel,
            constants,
            8,
            2,
        )
    decode = dict(NUM_SPLITS=1, GROUP_SIZE=4, BLOCK_G=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_N=64, PAGE_SIZE=16,
                  HAS_ALIBI=False, HAS_WINDOW=False, DOT_F32=False, PRECISION="tf32")  # fmt: skip
    for extra in ({}, dict(NUM_SPLITS=8, HAS_ALIBI=True, HAS_WINDOW=True), dict(GROUP_SIZE=1, PAGE_SIZE=1)):
        yield f"paged decode {extra}", paged_attention._paged_decode_kernel, decode | extra, 8, 2
    combine = dict(NUM_SPLITS=8, BLOCK_SPLITS=8, HEAD_DIM=128, BLOCK_D=128)
    yield "paged decode combine splits", paged_attention._combine_splits_kernel, combine, 4, 2


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    for name, kernel, constants, warps, stages in [*attention_variants(), *other_variants()]:
        if only in name:
            compile_for_sm90(name, kernel, constants, warps, stages)
    return 0


if __name__ == "__main__":
    sys.exit(main())
