"""FLOP counts and hardware peaks for model FLOP utilisation (MFU).

Training FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B): 6 * N + 12 * L * d_attn * T,
where N counts the parameters that take part in matmuls (every block's weights plus the LM head; the
embedding lookup is free), L the layers, d_attn = num_heads * head_dim, and T the sequence length
(the attention score and value matmuls, counted over the full T x T square as PaLM does).
"""

from __future__ import annotations

import time

import torch

from kiln.config import ModelConfig

# Dense peak FLOP/s per dtype for GPUs kiln is benchmarked on (vendor data sheets, SXM parts).
GPU_PEAKS = {
    "H100": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12},
    "H200": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12},
    "A100": {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 19.5e12},
}


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    matmul_params = config.num_parameters(include_embeddings=False) + config.vocab_size * config.hidden_size
    attention = 12 * config.num_layers * config.num_heads * config.head_dim * seq_len
    return 6 * matmul_params + attention


def measured_matmul_peak(
    device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 5
) -> float:
    """FLOP/s of a square matmul on this device: the practical roofline used for MFU where no data
    sheet applies (CPUs). The best of `repeats` timings, so a briefly busy machine does not lower it."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = 0.0
    for _ in range(repeats + 1):  # the first round is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAKS.items():
            if key in name and dtype in peaks:
                return peaks[dtype], f"{name} data sheet"
    return measured_matmul_peak(device, dtype), f"measured {str(dtype).removeprefix('torch.')} matmul"


def choose_precision(device: torch.device) -> str:
    """bf16 where it is fast: CUDA GPUs that support it, CPUs whose bf16 matmul measures >= 1.5x fp32."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    ratio = measured_matmul_peak(device, torch.bfloat16) / measured_matmul_peak(device, torch.float32)
    return "bf16" if ratio >= 1.5 else "fp32"
