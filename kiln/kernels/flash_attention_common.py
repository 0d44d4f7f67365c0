"""What flash attention's forward (flash_attention.py) and backward (flash_attention_backward.py) share:
the Triton helpers both kernels call, the launcher, and `AttentionProblem`, the shapes and strides of one
call that the forward saves for the backward.
"""

from __future__ import annotations

import torch

from kiln.errors import KilnError
from kiln.kernels.jit import DOT_IN_FP32, dot_precision, tl, triton

LOG2_E = 1.4426950408889634
MAX_HEAD_DIM = 256  # larger heads would not fit the tiles in shared memory; callers fall back to SDPA


@triton.jit
def sequence_bounds(CuSeqlens, batch, seqlen, VARLEN: tl.constexpr):
    """(first row, length) of sequence `batch`: packed by cu_seqlens, or padded to `seqlen`."""
    if VARLEN:
        start = tl.load(CuSeqlens + batch).to(tl.int32)
        end = tl.load(CuSeqlens + batch + 1).to(tl.int32)
        return start, end - start
    else:
        return batch * 0, seqlen


@triton.jit
def load_tile(ptrs, row_ok, col_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """A tile load masked only along the axes that can run past the data (masks broadcast to ptrs)."""
    if CHECK_ROWS:
        if CHECK_COLS:
            return tl.load(ptrs, mask=row_ok & col_ok, other=0.0)
        else:
            return tl.load(ptrs, mask=row_ok, other=0.0)
    else:
        if CHECK_COLS:
            return tl.load(ptrs, mask=col_ok, other=0.0)
        else:
            return tl.load(ptrs)


INTERPRETED_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32}  # few, big numpy steps: the interpreter's sweet spot


def launch(tuned, kernel, grid: tuple[int, int], args: list, constants: dict, block: str = "BLOCK_M"):
    """Run `tuned` (the autotuner) on a GPU, or `kernel` with INTERPRETED_BLOCKS under the interpreter.
    grid = (rows, programs): the first grid axis is rows split into tiles of size `block`."""
    rows, programs = grid
    if tuned is None:
        blocks = INTERPRETED_BLOCKS
        kernel[(triton.cdiv(rows, blocks[block]), programs)](*args, **constants, **blocks)
    else:
        tuned[lambda meta: (triton.cdiv(rows, meta[block]), programs)](*args, **constants)


class AttentionProblem:
    """Shapes and strides of one call, batched (B, H, T, D) or packed (N, H, D) with cu_seqlens."""

    def __init__(self, q, k, v, causal, softmax_scale, alibi_slopes, cu_seqlens, max_seqlen):
        self.varlen = cu_seqlens is not None
        self.num_heads, self.num_kv_heads = q.shape[1], k.shape[1]
        self.head_dim = q.shape[-1]
        if self.varlen:
            self.batch = cu_seqlens.numel() - 1
            self.seqlen_q = self.seqlen_k = max_seqlen or int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            self.total_q = q.shape[0]
        else:
            self.batch, self.seqlen_q, self.seqlen_k = q.shape[0], q.shape[2], k.shape[2]
            self.total_q = self.batch * self.seqlen_q
        if self.head_dim > MAX_HEAD_DIM:
            raise KilnError(f"flash attention supports head dims up to {MAX_HEAD_DIM}, got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise KilnError(
                f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if causal and not self.varlen and self.seqlen_q > self.seqlen_k:
            raise KilnError(f"causal attention needs queries <= keys, got {self.seqlen_q} > {self.seqlen_k}")
        self.causal = causal
        self.scale = softmax_scale if softmax_scale is not None else self.head_dim**-0.5
        self.slopes = alibi_slopes.float().contiguous() if alibi_slopes is not None else None
        self.cu_seqlens = cu_seqlens.to(torch.int32) if self.varlen else None
        self.block_d = max(16, triton.next_power_of_2(self.head_dim))

    def strides(self, x: torch.Tensor) -> tuple[int, int, int]:
        """(batch, head, token) strides; the last dimension is contiguous."""
        if self.varlen:
            return 0, x.stride(1), x.stride(0)
        return x.stride(0), x.stride(1), x.stride(2)

    def constants(self, dtype: torch.dtype) -> dict:
        return dict(
            NUM_HEADS=self.num_heads,
            GROUP_SIZE=self.num_heads // self.num_kv_heads,
            HEAD_DIM=self.head_dim,
            CAUSAL=self.causal,
            HAS_ALIBI=self.slopes is not None,
            VARLEN=self.varlen,
            DOT_F32=DOT_IN_FP32,
            PRECISION=dot_precision(dtype),
            BLOCK_D=self.block_d,
        )

    def pointers(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (cu_seqlens, slopes) arguments; an unused one points at q (never read)."""
        return (
            self.cu_seqlens if self.varlen else q,
            self.slopes if self.slopes is not None else q,
        )


def contiguous_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
