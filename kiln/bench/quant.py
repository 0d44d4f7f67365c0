"""`kiln bench quant`: each quantization scheme against kiln's bf16 at the 134M shape of
`kiln bench generate --shape gpt2-small`, speed and accuracy, in one process.

Speed (random weights, bf16 activations, `threads` threads, best of `repeats`): batch-1 decode (a
16-token prompt, 128 greedy tokens) and offline 64 x (128 prompt, 128 output) tokens/s, kiln.LLM with
`quantization=` against kiln.LLM in bf16, prefix caching off (as the engine-speed benchmark).
Accuracy: KL(bf16 || scheme) of next-token distributions on the same 134M random model (4 x 128 random
tokens, fp32 activations), and the trained demo model's validation perplexity per scheme (its own val
shard, non-overlapping windows, fp32 activations) when the demo model and its data are present.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kiln.bench.engine_speed import SHAPES, Workloads, build_shape_dir
from kiln.bench.timing import best_of
from kiln.engine.config import EngineConfig
from kiln.quant import parse_scheme, quantize_model, weight_bytes

SCHEMES = ("int8", "int4", "w8a8")
TARGETS = {"int8": ("batch1", 1.8), "int4": ("batch1", 3.0), "w8a8": ("offline", 1.3)}


@dataclass
class SchemeSpeed:
    scheme: str  # "bf16" for the baseline
    weight_bytes: int
    batch1_tokens_per_second: float
    offline_tokens_per_second: float | None  # None: not timed
    batch1_vs_bf16: float = 1.0
    offline_vs_bf16: float | None = 1.0


@dataclass
class QuantBenchResult:
    shape: str
    threads: int
    torch_version: str
    speed: list[SchemeSpeed] = field(default_factory=list)
    kl_to_bf16: dict[str, float] = field(default_factory=dict)  # mean nats per token, 134M random model
    demo_perplexity: dict[str, float] = field(default_factory=dict)  # "float" = unquantized
    demo_eval_tokens: int = 0
    kernels: list[dict[str, Any]] = field(default_factory=list)  # kiln.bench.quant_kernels rows


@torch.no_grad()
def time_schemes(
    directory: Path, schemes: tuple[str, ...], work: Workloads, rounds: int, offline: tuple[str, ...]
) -> list[SchemeSpeed]:
    """kiln.LLM in bf16 ("bf16") and quantized with each scheme, all loaded at once: batch-1 decode timed
    round-robin `rounds` times (the best of each counts, so a burst of load on a shared machine hits
    every side alike), then offline for the schemes in `offline`, in the same alternation."""
    from kiln.engine import LLM, SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    llms = {}
    for name in ("bf16", *schemes):
        config = EngineConfig(
            dtype="bf16",
            max_num_seqs=64,
            enable_prefix_caching=False,
            kv_cache_memory="1GB",
            quantization=None if name == "bf16" else name,
        )
        llms[name] = LLM(directory, config, verbose=False)
        llms[name].generate([work.short], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    batch1 = dict.fromkeys(llms, float("inf"))
    offline_seconds = {name: float("inf") for name in llms if name in offline}
    for _ in range(rounds):
        for name, llm in llms.items():
            batch1[name] = min(batch1[name], best_of(1, lambda: llm.generate([work.short], greedy))[0])  # noqa: B023
    for _ in range(max(1, rounds // 2)):
        for name in offline_seconds:
            seconds, _ = best_of(1, lambda: llms[name].generate(work.offline, greedy))  # noqa: B023
            offline_seconds[name] = min(offline_seconds[name], seconds)
    out = []
    for name, llm in llms.items():
        offline_tps = len(work.offline) * 128 / offline_seconds[name] if name in offline_seconds else None
        out.append(SchemeSpeed(name, weight_bytes(llm.engine.model), 128 / batch1[name], offline_tps))
    base = out[0]
    for entry in out[1:]:
        entry.batch1_vs_bf16 = entry.batch1_tokens_per_second / base.batch1_tokens_per_second
        timed = entry.offline_tokens_per_second is not None and base.offline_tokens_per_second
        entry.offline_vs_bf16 = (
            entry.offline_tokens_per_second / base.offline_tokens_per_second if timed else None
        )
    return out


@torch.no_grad()
def kl_to_bf16(directory: Path, schemes: tuple[str, ...], seed: int = 0) -> dict[str, float]:
    """Mean KL(bf16 model || quantized model) per token over 4 x 128 random tokens, fp32 activations;
    the reference is the bf16 weights (as the speed baseline serves them) run in fp32."""
    from kiln.models.hf.io import load_model

    model = load_model(directory, dtype="bf16").float()
    ids = torch.randint(3, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(seed))
    reference = F.log_softmax(model(ids).float(), dim=-1)
    out = {}
    for scheme in schemes:
        quantized = load_model(directory, dtype="bf16").float()
        quantize_model(quantized, scheme)
        logprobs = F.log_softmax(quantized(ids).float(), dim=-1)
        out[scheme] = F.kl_div(logprobs, reference, log_target=True, reduction="none").sum(-1).mean().item()
    return out


# The demo model's hidden size is 192, which group 128 does not divide: its int4 uses group 64.
# label -> (scheme, calibration: None, "gptq" or "smoothquant", outlier channels planted first)
DEMO_SCHEMES = {
    "int8": ("int8", None, False),
    "int4 g64": (parse_scheme("int4", 64), None, False),
    "int4 g64 GPTQ": (parse_scheme("int4", 64), "gptq", False),
    "w8a8": ("w8a8", None, False),
    "w8a8 SmoothQuant": ("w8a8", "smoothquant", False),
    "w8a8, outlier channels": ("w8a8", None, True),
    "w8a8 SmoothQuant, outlier channels": ("w8a8", "smoothquant", True),
}
SMOOTH_ALPHA = 0.5
OUTLIER_CHANNELS, OUTLIER_FACTOR = 4, 64.0


@torch.no_grad()
def plant_outlier_channels(
    model, channels: int = OUTLIER_CHANNELS, factor: float = OUTLIER_FACTOR, seed: int = 0
):
    """Give kiln Transformer `model` the outlier activation channels of larger LLMs (LLM.int8(), "massive
    activations"), which the small demo model lacks, without changing what it computes: in every block,
    `channels` random hidden channels of both norms' weights times `factor` (a power of two) and the
    columns of the linears reading them divided by it. Returns the channels of each layer."""
    generator = torch.Generator().manual_seed(seed)
    planted = []
    for block in model.layers:
        picked = torch.randperm(model.config.hidden_size, generator=generator)[:channels]
        attn, mlp = block.attn, block.mlp
        readers = {block.attn_norm: (attn.q_proj, attn.k_proj, attn.v_proj)}
        readers[block.mlp_norm] = tuple(
            linear for linear in (mlp.gate_proj, mlp.up_proj) if linear is not None
        )
        for norm, linears in readers.items():
            norm.weight[picked] *= factor
            for linear in linears:
                linear.weight[:, picked] /= factor
        planted.append(picked.tolist())
    return planted


@torch.no_grad()
def demo_perplexity(
    model_dir: Path, val_shard: Path, window: int = 256, max_windows: int = 64, calibration_tokens: int = 2048
) -> tuple[dict[str, float], int]:
    """Validation perplexity of the demo model, unquantized ("float") and per DEMO_SCHEMES entry (fp32
    activations), over the first `max_windows` non-overlapping windows of its val shard; GPTQ and
    SmoothQuant calibrate on the first `calibration_tokens` of the train shard beside it. Also returns the
    tokens scored. The planted outlier channels leave the float model's perplexity as it was."""
    from kiln.models.hf.io import load_model
    from kiln.models.hf.quantize import smoothing_groups
    from kiln.quant.calibration import collect_hessians, collect_input_maxima
    from kiln.quant.smoothing import smooth

    tokens = np.load(val_shard, mmap_mode="r")
    count = min(max_windows, (len(tokens) - 1) // window)
    data = torch.from_numpy(np.asarray(tokens[: count * window + 1], dtype=np.int64))
    inputs, targets = data[:-1].view(count, window), data[1:].view(count, window)
    train = np.load(val_shard.with_name("train_00000.npy"), mmap_mode="r")
    calibration = torch.from_numpy(np.asarray(train[:calibration_tokens], dtype=np.int64)).view(-1, window)
    out = {}
    for label, (scheme, method, outliers) in {"float": (None, None, False), **DEMO_SCHEMES}.items():
        model = load_model(model_dir, dtype="float32")
        if outliers:
            plant_outlier_channels(model)
        if method == "smoothquant":
            smooth(smoothing_groups(model), collect_input_maxima(model, calibration.split(2)), SMOOTH_ALPHA)
        if scheme is not None:
            hessians = collect_hessians(model, calibration.split(2)) if method == "gptq" else None
            quantize_model(model, scheme, hessians=hessians)
        losses = [
            F.cross_entropy(model(inputs[i : i + 8]).flatten(0, 1), targets[i : i + 8].flatten()).item()
            for i in range(0, count, 8)
        ]
        out[label] = math.exp(sum(losses) / len(losses))
    return out, count * window


def bench_quant(
    shape: str = "gpt2-small",
    schemes: tuple[str, ...] = SCHEMES,
    threads: int = 2,
    repeats: int = 3,
    offline: tuple[str, ...] = ("bf16", "w8a8"),
    demo_model: Path | None = None,
    demo_val: Path | None = None,
    kernels: bool = True,
    log=print,
) -> QuantBenchResult:
    for scheme in schemes:
        parse_scheme(scheme)  # an unknown name fails before minutes of timing
    torch.set_num_threads(threads)
    result_kernels: list[dict[str, Any]] = []
    if kernels:
        from kiln.bench.quant_kernels import bench_kernels, format_kernels
        from kiln.kernels.cpu_extension import cpu_ops_available

        if cpu_ops_available():
            result_kernels = bench_kernels()
            log(format_kernels(result_kernels))
    directory, _ = build_shape_dir(shape)
    result = QuantBenchResult(shape=shape, threads=torch.get_num_threads(), torch_version=torch.__version__)
    result.kernels = result_kernels
    work = Workloads.make(SHAPES[shape].vocab_size)
    result.speed = time_schemes(directory, schemes, work, repeats, offline)
    for entry in result.speed:
        log(
            f"{entry.scheme}: batch-1 {entry.batch1_tokens_per_second:.1f} tok/s "
            f"({entry.batch1_vs_bf16:.2f}x), "
            f"offline {_num(entry.offline_tokens_per_second)} ({_num(entry.offline_vs_bf16, '.2f')}x)"
        )
    result.kl_to_bf16 = kl_to_bf16(directory, schemes)
    log(f"KL to bf16 (nats/token): {result.kl_to_bf16}")
    if demo_model is not None and demo_val is not None and demo_model.is_dir() and demo_val.is_file():
        result.demo_perplexity, result.demo_eval_tokens = demo_perplexity(demo_model, demo_val)
        log(f"demo validation perplexity: {result.demo_perplexity}")
    return result


def _num(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def write_quant_result(result: QuantBenchResult, output: Path) -> dict[str, Any]:
    data = asdict(result)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(data, indent=2) + "\n")
    return data


def format_quant(result: QuantBenchResult) -> str:
    """The speed table with each scheme's target, then accuracy."""
    lines = [f"{result.shape}, {result.threads} threads, bf16 activations (torch {result.torch_version})"]
    lines.append(
        f"{'scheme':<6} {'weights MiB':>11} {'batch-1 tok/s':>13} {'vs bf16':>7} "
        f"{'offline tok/s':>13} {'vs bf16':>7}  target"
    )
    for s in result.speed:
        workload, goal = TARGETS.get(s.scheme, ("", 0.0))
        got = s.batch1_vs_bf16 if workload == "batch1" else s.offline_vs_bf16
        target = f"{workload} >= {goal}x: {'met' if got and got >= goal else 'MISSED'}" if goal else ""
        lines.append(
            f"{s.scheme:<6} {s.weight_bytes / 2**20:>11.1f} {s.batch1_tokens_per_second:>13.1f} "
            f"{s.batch1_vs_bf16:>6.2f}x {_num(s.offline_tokens_per_second):>13} "
            f"{_num(s.offline_vs_bf16, '.2f'):>6}x  {target}"
        )
    lines.append(
        "KL(bf16 || scheme), nats/token, 134M random model: "
        + ", ".join(f"{k} {v:.2e}" for k, v in result.kl_to_bf16.items())
    )
    if result.demo_perplexity:
        base = result.demo_perplexity["float"]
        lines.append(
            f"demo model validation perplexity ({result.demo_eval_tokens:,} tokens): float {base:.3f}; "
            + ", ".join(
                f"{k} {v:.3f} ({v / base - 1:+.2%})"
                for k, v in result.demo_perplexity.items()
                if k != "float"
            )
        )
    return "\n".join(lines)
