"""Engine: the core loop. Requests come in; each `step` schedules one forward pass, samples, applies
the results and hands back what each request gained (streaming deltas). `kiln.LLM` drives it for offline
batches; `AsyncEngine` runs it in a thread for the server."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kiln.engine.attention import TorchPagedAttention
from kiln.engine.block_manager import BlockManager
from kiln.engine.config import (
    PACKING_HEADROOM_BYTES,
    EngineConfig,
    kv_bytes_per_token,
    num_kv_blocks,
    packing_budget,
)
from kiln.engine.model_runner import ModelRunner
from kiln.engine.output_processor import OutputProcessor
from kiln.engine.outputs import RequestOutput
from kiln.engine.request_factory import Prompt, RequestFactory
from kiln.engine.sampler import Sampler, TopLogprobs
from kiln.engine.sampling_params import SamplingParams
from kiln.engine.scheduler import Scheduler, SchedulerOutput
from kiln.engine.sequence import EngineRequest, Sequence, sampling_batch
from kiln.engine.threads import apply_num_threads
from kiln.errors import KilnError
from kiln.finetune.serving import ServedAdapters
from kiln.kernels.kv_quant import kv_cache_bits
from kiln.kernels.runtime import KernelChoice, use_triton
from kiln.models.transformer import Transformer
from kiln.parsing import resolve_device
from kiln.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class EngineCounters:
    """Cumulative counts since start-up (tests assert on them; the server exports them)."""

    num_steps: int = 0
    num_prompt_tokens_computed: int = 0  # prompt tokens run through the model (prefix-cache hits excluded)
    num_prefix_cache_hit_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    num_recomputed_tokens: int = 0  # generated tokens run again after a preemption
    num_generation_tokens: int = 0  # tokens sampled
    num_preemptions: int = 0
    num_finished_requests: int = 0


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer | None,
        config: EngineConfig | None = None,
        adapters: Mapping[str, str | Path] | None = None,
    ) -> None:
        """Serve `model` (in eval mode, on its device); `tokenizer` None means token-id prompts only.
        `adapters` (name -> PEFT adapter dir, LoRA or prompt tuning) are served beside the base model;
        a request picks one with SamplingParams(adapter=name)."""
        self.model, self.tokenizer = model, tokenizer
        self.config = config = config or EngineConfig()
        model_config = model.config
        if tokenizer is not None and tokenizer.vocab_size > model_config.vocab_size:
            raise KilnError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                f"{model_config.vocab_size}; they do not belong together"
            )
        if model_config.attention_pattern != "dense":
            raise KilnError(
                f"the engine serves dense attention only and this model uses "
                f"attention_pattern={model_config.attention_pattern!r}; generate with kiln.generation instead"
            )
        self.quantization_summary = _quantize(model, config.quantization)
        weight = model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.num_threads = apply_num_threads(config.num_threads) if self.device.type == "cpu" else None
        self.max_model_len = config.resolve_max_model_len(model_config)
        kv_cache_bits(config.kv_cache_dtype, model_config.head_dim)  # int4 on an odd head_dim fails here
        num_blocks = num_kv_blocks(config, model_config, self.dtype, self.device, self.max_model_len)
        self._refuse_small_kv_cache(num_blocks)
        model.set_kernels(config.kernels)
        self.adapters = ServedAdapters(model, adapters) if adapters else None
        kv_cache_bytes = (
            num_blocks
            * config.block_size
            * kv_bytes_per_token(model_config, self.dtype, config.kv_cache_dtype)
        )
        self.num_cpu_linears, self.num_cpu_layers, self.packed_bytes, self.unpacked_bytes = _install_cpu_ops(
            model, config.kernels, kv_cache_bytes
        )
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self.runner = ModelRunner(
            model,
            num_blocks,
            config.block_size,
            attention=_attention_backend(config, model_config, weight),
            adapters=self.adapters,
            kv_cache_dtype=config.kv_cache_dtype,
        )
        self.sampler = Sampler(self.device, config.seed)
        self.request_factory = RequestFactory(
            model_config,
            tokenizer,
            max_model_len=self.max_model_len,
            device=self.device,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self.output_processor = OutputProcessor(tokenizer)
        self.counters = EngineCounters()
        self._requests: dict[str, EngineRequest] = {}
        self._aborted: list[RequestOutput] = []  # final outputs of aborted requests, for the next step
        logger.info(self.startup_summary())

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        config: EngineConfig | None = None,
        adapters: Mapping[str, str | Path] | None = None,
        **overrides: Any,
    ) -> Engine:
        """Load an HF model directory (and its tokenizer.json when there is one) as `config` says (its
        dtype and device), with `adapters` (name -> PEFT adapter dir) served beside it; `overrides` are
        EngineConfig fields that replace the config's."""
        from kiln.models.hf.io import load_model

        config = (config or EngineConfig()).replace(**overrides)
        if config.loki_top_k is not None and config.loki_basis is None:
            from kiln.engine.loki import LOKI_FILE

            config = config.replace(loki_basis=str(Path(model_dir) / LOKI_FILE))
        model = load_model(model_dir, dtype=config.dtype, device=resolve_device(config.device))
        has_tokenizer = (Path(model_dir) / "tokenizer.json").is_file()
        return cls(model, Tokenizer.from_dir(model_dir) if has_tokenizer else None, config, adapters)

    # --------------------------------------------------------------------------------------- set-up

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one token's keys and values take in the pool, all layers (quantized ones included)."""
        return kv_bytes_per_token(self.model.config, self.dtype, self.config.kv_cache_dtype)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.config.block_size

    def _refuse_small_kv_cache(self, num_blocks: int) -> None:
        capacity = num_blocks * self.config.block_size
        if capacity >= self.max_model_len:
            return
        block_bytes = self.kv_bytes_per_token * self.config.block_size
        needed = -(-self.max_model_len // self.config.block_size) * block_bytes
        raise KilnError(
            f"the KV cache holds {capacity} tokens ({num_blocks} blocks of {self.config.block_size}), "
            f"less than one sequence of max_model_len={self.max_model_len} tokens; raise kv_cache_memory "
            f"to at least {needed / 2**20:.1f}MiB or lower max_model_len to {capacity} or less"
        )

    def startup_summary(self) -> str:
        """Model size, KV capacity and the concurrency it allows at full context length."""
        from kiln.quant import weight_bytes

        parameters = self.model.num_parameters()
        dtype = str(self.dtype).removeprefix("torch.")
        capacity = self.kv_capacity_tokens
        weights = f"{weight_bytes(self.model) / 2**20:.1f}MiB {dtype}"
        if self.quantization_summary is not None:
            scheme, before, after = self.quantization_summary
            freed_tokens = (before - after) // self.kv_bytes_per_token
            weights = (
                f"{scheme}: weights {before / 2**20:.1f}MiB -> {after / 2**20:.1f}MiB, "
                f"the {(before - after) / 2**20:.1f}MiB saved hold {freed_tokens:,} more KV tokens"
            )
        config = self.model.config
        idle = config.num_parameters() - config.num_active_parameters()  # routed experts a token skips
        active = f", {(parameters - idle) / 1e6:.2f}M active per token" if config.num_experts else ""
        kv = ""
        if self.runner.pool.bits:
            # What the quantized cache buys: tokens per byte against the model dtype's cache.
            ratio = kv_bytes_per_token(config, self.dtype) / self.kv_bytes_per_token
            kv = f"{self.config.kv_cache_dtype}, {ratio:.2f}x the tokens of a {dtype} cache, "
        # every layer on the C++ op: a decode step runs them all in one call (cpu_decoder.CpuDecoderLayers)
        calls = "a step" if self.num_cpu_layers == len(getattr(self.model, "layers", ())) else "each"
        return (
            f"model: {parameters / 1e6:.2f}M parameters{active} ({weights}) "
            f"on {self.device}; KV cache: {capacity:,} tokens ({kv}{self.block_manager.num_blocks} blocks of "
            f"{self.config.block_size}, {self.runner.pool.num_bytes / 2**20:.1f}MiB); "
            f"max concurrency at {self.max_model_len:,} tokens: {capacity / self.max_model_len:.2f}x; "
            f"attention: {self.runner.attention.__name__}"
            + (f", {self.num_threads} CPU threads" if self.num_threads else "")
            + (f", {self.num_cpu_linears} linears on kiln's C++ op" if self.num_cpu_linears else "")
            + (
                f", {self.num_cpu_layers} decode layers in one C++ call {calls}"
                if self.num_cpu_layers
                else ""
            )
            + (
                f", {dtype} linears also packed for oneDNN (+{self.packed_bytes / 2**20:.1f}MiB)"
                if self.packed_bytes
                else ""
            )
            + (
                f", {dtype} linears not packed for oneDNN: the copies "
                f"(+{self.unpacked_bytes / 2**20:.1f}MiB) would leave less than "
                f"{PACKING_HEADROOM_BYTES / 2**30:.0f}GiB of memory free"
                if self.unpacked_bytes
                else ""
            )
        )

    # ------------------------------------------------------------------------------------- requests

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.request_factory.eos_token_ids

    def make_request(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> EngineRequest:
        """Tokenize and validate a request without adding it (safe to call from any thread)."""
        name = params.adapter if params is not None else None
        if name is None:
            return self.request_factory.make_request(prompt, params, request_id)
        if self.adapters is None:
            raise KilnError(f"unknown adapter {name!r}; this engine serves no adapters", param="model")
        self.adapters.adapter_index(name)  # an unknown name is refused here
        virtual_ids = self.adapters.virtual_ids.get(name, [])
        if virtual_ids and params.prompt_logprobs is not None:
            raise KilnError(
                f"prompt logprobs are not available with the prompt-tuning adapter {name!r}",
                param="prompt_logprobs",
            )
        return self.request_factory.make_request(
            prompt, params, request_id, virtual_ids=virtual_ids, cache_salt=b"adapter:" + name.encode()
        )

    def prompt_token_ids(self, prompt: Prompt) -> list[int]:
        """The token ids of a prompt (text is encoded with the tokenizer), checked against the vocabulary."""
        return self.request_factory.prompt_token_ids(prompt)

    def add_request(
        self,
        prompt: Prompt | EngineRequest,
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> EngineRequest:
        """Queue a request (a prompt, or one built by `make_request`); returns it."""
        if isinstance(prompt, EngineRequest):
            request = prompt
        else:
            request = self.make_request(prompt, params, request_id)
        if request.request_id in self._requests:
            raise KilnError(f"request id {request.request_id!r} is already in use; pick a unique id")
        self._requests[request.request_id] = request
        for seq in request.sequences:
            self.scheduler.add(seq)
        return request

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now (its blocks are freed); its final output comes from the next `step`."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        for seq in request.sequences:
            if not seq.is_finished:
                seq.finish("abort")
        self.scheduler.remove_finished()
        request.metrics.finished_time = time.monotonic()
        self._aborted.append(request.output(delta=True))
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._aborted)

    # ----------------------------------------------------------------------------------------- step

    def step(self) -> list[RequestOutput]:
        """Run one forward pass; return a delta for every request that gained tokens or finished.

        A fault in one request's sampling or output processing fails that request alone (finish_reason
        "error", RequestOutput.error says why) and the others carry on. A fault in scheduling or the
        forward pass touches shared state (the KV pool, the block tables) and propagates.
        """
        outputs, self._aborted = self._aborted, []
        plan = self.scheduler.schedule()
        self.counters.num_preemptions += len(plan.preempted)
        if not plan.scheduled:
            assert not self._requests, "unfinished requests but nothing could be scheduled"
            return outputs
        self.counters.num_steps += 1
        self._apply_schedule(plan)
        result = self.runner.execute(plan.scheduled)
        failed: dict[int, tuple[EngineRequest, Exception]] = {}
        picks = self._sample(result.logits, result.sampling_seqs, failed)
        now = time.monotonic()
        self._record_progress(plan, now)
        for seq, entries in result.prompt_logprobs:
            self._isolated(seq, failed, self.output_processor.record_prompt_logprobs, seq, entries)
        for seq, pick in zip(result.sampling_seqs, picks, strict=True):
            if pick is None or id(seq.request) in failed:
                continue
            self.counters.num_generation_tokens += 1
            if seq.request.metrics.first_token_time is None:
                seq.request.metrics.first_token_time = now
            self._isolated(seq, failed, self.output_processor.append_token, seq, *pick)
        for request, error in failed.values():
            self._fail(request, error)
        self.scheduler.remove_finished()
        touched = {id(item.seq.request): item.seq.request for item in plan.scheduled}
        for request in touched.values():
            if request.is_finished:
                request.metrics.finished_time = now
                self.counters.num_finished_requests += 1
                del self._requests[request.request_id]
            if request.is_finished or any(seq.has_news for seq in request.sequences):
                outputs.append(request.output(delta=True))
        return outputs

    # ------------------------------------------------------------------------------ fault isolation

    def _sample(
        self, logits: torch.Tensor, seqs: list[Sequence], failed: dict[int, tuple[EngineRequest, Exception]]
    ) -> list[tuple[int, TopLogprobs | None] | None]:
        """The (token, logprobs) of each row. When the batched pick fails, every row is picked alone so
        that only the requests whose rows fail are failed (None for those rows)."""
        try:
            sampled = self.sampler(logits, sampling_batch(seqs))
            return list(zip(sampled.token_ids, sampled.logprobs, strict=True))
        except Exception:  # find the culprit rows below; the others keep their step
            logger.warning("batched sampling failed; sampling the %d rows one by one", len(seqs))
        picks: list[tuple[int, TopLogprobs | None] | None] = []
        for row, seq in enumerate(seqs):
            try:
                one = self.sampler(logits[row : row + 1], sampling_batch([seq]))
                picks.append((one.token_ids[0], one.logprobs[0]))
            except Exception as error:
                failed.setdefault(id(seq.request), (seq.request, error))
                picks.append(None)
        return picks

    @staticmethod
    def _isolated(seq: Sequence, failed: dict, function: Callable[..., None], *args: Any) -> None:
        """Run one sequence's share of the step's bookkeeping; a fault fails its request only."""
        if id(seq.request) in failed:
            return
        try:
            function(*args)
        except Exception as error:
            failed[id(seq.request)] = (seq.request, error)

    def _fail(self, request: EngineRequest, error: Exception) -> None:
        """Finish every sample of `request` with "error"; its blocks are freed with the step's finished."""
        logger.error("request %s failed in the engine: %r", request.request_id, error, exc_info=error)
        request.error = f"{type(error).__name__}: {error}"
        for seq in request.sequences:
            if not seq.is_finished:
                seq.finish("error")

    # `num_computed_tokens` (the tokens whose keys and values are in the KV cache) is written only here:
    # the scheduler and the block manager decide, the engine applies.
    def _apply_schedule(self, plan: SchedulerOutput) -> None:
        """Before the forward pass: preempted sequences start over, prefix-cache hits count as computed."""
        for seq in plan.preempted:
            seq.num_computed_tokens = 0
        for item in plan.scheduled:
            if item.num_cached_tokens:
                item.seq.num_computed_tokens = item.num_cached_tokens

    def _record_progress(self, plan: SchedulerOutput, now: float) -> None:
        counters = self.counters
        for item in plan.scheduled:
            seq = item.seq
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + item.num_new_tokens
            num_prompt = max(min(end, seq.num_prompt_tokens) - start, 0)
            counters.num_prompt_tokens_computed += num_prompt
            # Output tokens computed again after a preemption (the newest is computed for the first time).
            counters.num_recomputed_tokens += max(
                min(end, seq.num_tokens - 1) - max(start, seq.num_prompt_tokens), 0
            )
            counters.num_prefix_cache_hit_tokens += item.num_cached_tokens
            request = seq.request
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
                request.num_cached_tokens = item.num_cached_tokens
            seq.num_computed_tokens = end
            seq.prompt_done |= end >= seq.num_prompt_tokens
            self.block_manager.cache_full_blocks(seq)

    # ---------------------------------------------------------------------------------------- stats

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use by running sequences."""
        return self.block_manager.usage

    def stats(self) -> dict[str, float]:
        """Counters and gauges, flat (for logs and Prometheus)."""
        gauges = {"num_running": self.num_running, "num_waiting": self.num_waiting, "kv_usage": self.kv_usage}
        return {**asdict(self.counters), **gauges}


def _quantize(model: Transformer, quantization: str | None) -> tuple[str, int, int] | None:
    """Quantize the model's linears in place (kiln.quant) when `quantization` names a scheme; the
    scheme and the weight bytes before and after, for the start-up line."""
    if quantization is None:
        return None
    from kiln.quant import QuantizedLinear, parse_scheme, quantize_model, weight_bytes

    if any(isinstance(module, QuantizedLinear) for module in model.modules()):
        raise KilnError(
            f"this model is already quantized; drop quantization={quantization!r} to serve it as stored"
        )
    scheme = parse_scheme(quantization)
    before = weight_bytes(model)
    with torch.no_grad():
        quantize_model(model, scheme)
    return scheme.describe(), before, weight_bytes(model)


def _uses_cpu_ops(kernels: KernelChoice, weight: torch.Tensor) -> bool:
    """Whether `kernels` picks kiln's C++ CPU ops for weights on `weight`'s device: "auto" on CPU, once
    they are built (kiln.kernels.cpu_extension)."""
    if kernels != "auto" or weight.device.type != "cpu":
        return False
    from kiln.kernels.cpu_extension import cpu_ops_available

    return cpu_ops_available()


def _install_cpu_ops(
    model: Transformer, kernels: KernelChoice, kv_cache_bytes: int
) -> tuple[int, int, int, int]:
    """With kiln's C++ CPU ops, route the model's linears (LM head included) through the small-row linear
    op where it wins (decode-sized batches; BENCHMARKS.md), pack their weights for oneDNN where that wins
    for larger steps (kiln/kernels/packed_weight.py: bf16 on AMX and AVX512-BF16 CPUs), and run each
    Llama-style layer of a decode-only step in one C++ call (kiln/engine/cpu_decoder.py). Returns
    (linears, layers) that can, the bytes the packed copies hold, and the bytes of the copies not made
    because they would not leave PACKING_HEADROOM_BYTES free beside the KV cache of `kv_cache_bytes`."""
    if not _uses_cpu_ops(kernels, model.embed_tokens.weight):
        return 0, 0, 0, 0
    from kiln.engine.cpu_decoder import install_cpu_decoder_layers
    from kiln.kernels.cpu_linear import install_cpu_linears
    from kiln.kernels.packed_weight import pack_linears

    packed, unpacked = pack_linears(model, packing_budget(kv_cache_bytes))
    return install_cpu_linears(model), install_cpu_decoder_layers(model), packed, unpacked


def _attention_backend(config: EngineConfig, model_config, weight: torch.Tensor):
    """The paged backend `_paged_attention` picks, or Loki's (kiln/engine/loki.py) when loki_top_k is set."""
    if config.loki_top_k is None:
        return _paged_attention(config.kernels, weight)
    from kiln.engine.loki import load_loki_settings, loki_backend

    settings = load_loki_settings(
        config.loki_basis, model_config, config.loki_rank, config.loki_top_k, weight.dtype, weight.device
    )
    settings.use_cpp = _uses_cpu_ops(config.kernels, weight)
    settings.use_triton = use_triton(config.kernels, weight)
    if settings.use_triton and kv_cache_bits(config.kv_cache_dtype):
        raise KilnError(
            "Loki over an int8/int4 KV cache runs on CPU (the C++ op or torch); the Triton kernels read a "
            "model-dtype pool: drop kv_cache_dtype, or pick kernels='torch' to run Loki's torch code"
        )
    return loki_backend(settings)


def _paged_attention(kernels: KernelChoice, weight: torch.Tensor) -> type:
    """The paged attention backend class that `kernels` picks for weights on `weight`'s device: Triton on
    CUDA (auto/triton), kiln's C++ op reading the pool in place on CPU (auto, when it is built), and the
    torch reference otherwise (always with kernels="torch")."""
    if use_triton(kernels, weight):
        from kiln.engine.attention import paged_attention_backend

        return paged_attention_backend(kernels, weight)
    if _uses_cpu_ops(kernels, weight):
        from kiln.engine.cpu_attention import CppPagedAttention

        return CppPagedAttention
    return TorchPagedAttention
