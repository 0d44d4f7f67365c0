"""`kiln bench train`: tokens/s of kiln's training step against transformers' LlamaForCausalLM driven by a
plain PyTorch AdamW loop, same shapes, same weights, same batch, measured in one process.

Steps of the two are interleaved (kiln, peer, kiln, peer, ...) so drift in a shared machine's speed hits
both alike; the reported figure is each side's median step time.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kiln.config import ModelConfig
from kiln.train.config import TrainConfig
from kiln.train.trainer import Trainer


@dataclass
class TrainBenchResult:
    model: str
    parameters: int
    batch_size: int
    seq_len: int
    precision: str
    peer_precision: str
    compile: bool
    steps: int
    kiln_step_ms: float
    peer_step_ms: float
    kiln_tokens_per_second: float
    peer_tokens_per_second: float
    speedup: float
    kiln_final_loss: float
    peer_final_loss: float
    device: str
    threads: int
    torch_version: str
    transformers_version: str


class _FixedBatch:
    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def batch(self, step: int):
        return self.inputs, self.targets

    def state_dict(self):
        return {}

    def load_state_dict(self, state) -> None:
        pass


# `--moe`: the recipe's model as a Mixtral-style mixture of experts (8 experts, top-2, 4 layers).
MOE_SHAPE = {"num_layers": 4, "num_experts": 8, "num_experts_per_token": 2}


def _peer_model(trainer: Trainer):
    """transformers' Llama with kiln's weights (through kiln's own HF export, so the weights are equal);
    MixtralForCausalLM, loaded from kiln's save, for an MoE model."""
    import transformers

    if trainer.model.config.num_experts:
        return _moe_peer_model(trainer)

    from kiln.models.hf import FAMILIES
    from kiln.models.hf.io import hf_config, hf_state_dict

    family = FAMILIES["llama"]
    values = hf_config(trainer.model, family, torch.float32)
    config = transformers.LlamaConfig(
        **{k: v for k, v in values.items() if k not in ("architectures", "dtype")}
    )
    peer = transformers.LlamaForCausalLM(config).to(trainer.device)
    missing, unexpected = peer.load_state_dict(hf_state_dict(trainer.model, family), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    return peer.train()


def _moe_peer_model(trainer: Trainer):
    """MixtralForCausalLM from kiln's save, returning its router logits so it adds the same aux loss."""
    import tempfile

    import transformers

    from kiln.models.hf.io import save_model

    with tempfile.TemporaryDirectory(prefix="kiln-bench-moe-") as directory:
        save_model(trainer.model, directory, family="mixtral")
        peer = transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, output_router_logits=True
        )
    return peer.to(trainer.device).train()


def _peer_step(peer, optimizer, inputs, targets, autocast_dtype, grad_clip: float) -> float:
    """The loop a user writes by hand: forward, cross-entropy (+ the router's aux loss of an MoE model),
    backward, clip, AdamW step."""
    context = (
        torch.autocast(inputs.device.type, dtype=autocast_dtype)
        if autocast_dtype
        else contextlib.nullcontext()
    )
    with context:
        out = peer(input_ids=inputs)
    loss = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())
    if getattr(out, "aux_loss", None) is not None:
        loss = loss + peer.config.router_aux_loss_coef * out.aux_loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(peer.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def bench_train(
    model: ModelConfig,
    *,
    batch_size: int = 16,
    seq_len: int = 256,
    steps: int = 20,
    warmup: int = 3,
    precision: str = "fp32",
    peer_precision: str | None = None,
    compile: bool = False,
    device: str = "cpu",
    name: str = "demo",
) -> TrainBenchResult:
    import transformers

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.vocab_size, (batch_size, seq_len + 1), generator=generator)
    data = _FixedBatch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    config = TrainConfig(
        model=model,
        data_dir="-",
        out_dir="/tmp/kiln-bench-train",
        seq_len=seq_len,
        batch_size=batch_size,
        max_steps=10_000,
        warmup_steps=0,
        lr=1e-3,
        min_lr=1e-3,
        precision=precision,
        compile=compile,
        device=device,
        export=False,
    )
    trainer = Trainer(config, train_data=data)
    peer = _peer_model(trainer)
    peer_optimizer = torch.optim.AdamW(peer.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    inputs, targets = data.inputs.to(trainer.device), data.targets.to(trainer.device)
    peer_precision = peer_precision or trainer.precision  # default: the same numerics on both sides
    peer_autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(peer_precision)
    kiln_times, peer_times = [], []
    kiln_loss = peer_loss = float("nan")
    for step in range(warmup + steps):
        start = time.perf_counter()
        kiln_loss = trainer.train_step().loss
        middle = time.perf_counter()
        peer_loss = _peer_step(peer, peer_optimizer, inputs, targets, peer_autocast, config.grad_clip)
        end = time.perf_counter()
        if step >= warmup:
            kiln_times.append(middle - start)
            peer_times.append(end - middle)
    kiln_ms, peer_ms = 1000 * statistics.median(kiln_times), 1000 * statistics.median(peer_times)
    tokens_per_step = batch_size * seq_len
    return TrainBenchResult(
        model=name,
        parameters=trainer.model.num_parameters(),
        batch_size=batch_size,
        seq_len=seq_len,
        precision=trainer.precision,
        peer_precision=peer_precision,
        compile=compile,
        steps=steps,
        kiln_step_ms=kiln_ms,
        peer_step_ms=peer_ms,
        kiln_tokens_per_second=tokens_per_step / kiln_ms * 1000,
        peer_tokens_per_second=tokens_per_step / peer_ms * 1000,
        speedup=peer_ms / kiln_ms,
        kiln_final_loss=kiln_loss,
        peer_final_loss=peer_loss,
        device=str(trainer.device),
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
    )
