"""Engine: the core loop. Requests come in; each `step` schedules one forward pass, samples, applies
the results and hands back what each request gained (streaming deltas). `kiln.LLM` drives it for offline
batches; `AsyncEngine` runs it in a thread for the server."""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kiln.engine.block_manager import BlockManager
from kiln.engine.config import EngineConfig, kv_bytes_per_token, num_kv_blocks
from kiln.engine.detokenizer import Detokenizer
from kiln.engine.model_runner import ModelRunner, RunnerOutput
from kiln.engine.outputs import Logprob, PositionLogprobs, RequestMetrics, RequestOutput
from kiln.engine.sampling import Sampler, SamplingParams, TopLogprobs
from kiln.engine.scheduler import Scheduler, SchedulerOutput
from kiln.engine.sequence import Request, Sequence
from kiln.errors import KilnError
from kiln.models.transformer import Transformer
from kiln.parsing import resolve_device
from kiln.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Prompt = str | list[int]


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
        self, model: Transformer, tokenizer: Tokenizer | None, config: EngineConfig | None = None
    ) -> None:
        """Serve `model` (in eval mode, on its device); `tokenizer` None means token-id prompts only."""
        self.model, self.tokenizer = model, tokenizer
        self.config = config = config or EngineConfig()
        model_config = model.config
        if tokenizer is not None and tokenizer.vocab_size > model_config.vocab_size:
            raise KilnError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                f"{model_config.vocab_size}; they do not belong together"
            )
        weight = model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.max_model_len = config.resolve_max_model_len(model_config)
        num_blocks = num_kv_blocks(config, model_config, self.dtype, self.device, self.max_model_len)
        self._refuse_small_kv_cache(num_blocks)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self.runner = ModelRunner(model, num_blocks, config.block_size)
        self.sampler = Sampler(self.device, config.seed)
        self.counters = EngineCounters()
        eos = model_config.eos_token_id
        eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
        self.eos_token_ids = frozenset(
            eos_ids | (tokenizer.eos_token_ids if tokenizer is not None else set())
        )
        self._requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._aborted: list[RequestOutput] = []  # final outputs of aborted requests, for the next step
        logger.info(self.startup_summary())

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        *,
        dtype: str | torch.dtype = "auto",
        device: str = "auto",
        config: EngineConfig | None = None,
    ) -> Engine:
        """Load an HF model directory (and its tokenizer.json when there is one) onto `device`."""
        from kiln.models.hf.io import load_model

        model = load_model(model_dir, dtype=dtype, device=resolve_device(device))
        has_tokenizer = (Path(model_dir) / "tokenizer.json").is_file()
        return cls(model, Tokenizer.from_dir(model_dir) if has_tokenizer else None, config)

    # --------------------------------------------------------------------------------------- set-up

    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.config.block_size

    def _refuse_small_kv_cache(self, num_blocks: int) -> None:
        capacity = num_blocks * self.config.block_size
        if capacity >= self.max_model_len:
            return
        block_bytes = kv_bytes_per_token(self.model.config, self.dtype) * self.config.block_size
        needed = -(-self.max_model_len // self.config.block_size) * block_bytes
        raise KilnError(
            f"the KV cache holds {capacity} tokens ({num_blocks} blocks of {self.config.block_size}), "
            f"less than one sequence of max_model_len={self.max_model_len} tokens; raise kv_cache_memory "
            f"to at least {needed / 2**20:.1f}MiB or lower max_model_len to {capacity} or less"
        )

    def startup_summary(self) -> str:
        """Model size, KV capacity and the concurrency it allows at full context length."""
        parameters = self.model.num_parameters()
        weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        dtype = str(self.dtype).removeprefix("torch.")
        capacity = self.kv_capacity_tokens
        return (
            f"model: {parameters / 1e6:.2f}M parameters ({weight_bytes / 2**20:.1f}MiB {dtype}) "
            f"on {self.device}; KV cache: {capacity:,} tokens ({self.block_manager.num_blocks} blocks of "
            f"{self.config.block_size}, {self.runner.pool.num_bytes / 2**20:.1f}MiB); "
            f"max concurrency at {self.max_model_len:,} tokens: {capacity / self.max_model_len:.2f}x"
        )

    # ------------------------------------------------------------------------------------- requests

    def make_request(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> Request:
        """Tokenize and validate a request without adding it (safe to call from any thread)."""
        params = params or SamplingParams()
        if params.stop and self.tokenizer is None:
            raise KilnError("stop strings need a tokenizer; use stop_token_ids with this model")
        text = prompt if isinstance(prompt, str) else None
        prompt_ids = self.prompt_token_ids(prompt)
        if len(prompt_ids) >= self.max_model_len:
            raise KilnError(
                f"the prompt has {len(prompt_ids)} tokens, but max_model_len is {self.max_model_len} and at "
                "least one token must be generated; shorten the prompt or raise max_model_len"
            )
        request = Request(
            request_id=request_id if request_id is not None else uuid.uuid4().hex,
            prompt=text,
            prompt_token_ids=prompt_ids,
            params=params,
            metrics=RequestMetrics(arrival_time=time.monotonic()),
            prompt_logprobs=None if params.prompt_logprobs is None else [None],
        )
        stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self.eos_token_ids
        )
        max_total = self.max_model_len
        if params.max_tokens is not None:
            max_total = min(len(prompt_ids) + params.max_tokens, max_total)
        for index in range(params.n):
            request.sequences.append(
                Sequence(
                    seq_id=next(self._seq_ids),
                    index=index,
                    request=request,
                    token_ids=list(prompt_ids),
                    num_prompt_tokens=len(prompt_ids),
                    params=params,
                    stop_token_ids=stop_ids,
                    max_total_tokens=max_total,
                    generator=params.sample_generator(index, self.device),
                    detokenizer=self._detokenizer(prompt_ids, params),
                    leader=request.sequences[0] if index and self.config.enable_prefix_caching else None,
                    logprobs=None if params.logprobs is None else [],
                )
            )
        return request

    def prompt_token_ids(self, prompt: Prompt) -> list[int]:
        """The token ids of a prompt (text is encoded with the tokenizer), checked against the vocabulary."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise KilnError("this model directory has no tokenizer.json, so prompts must be token ids")
            prompt_ids = self.tokenizer.encode(prompt)
        else:
            prompt_ids = [int(token) for token in prompt]
        if not prompt_ids:
            raise KilnError("the prompt is empty; give at least one token")
        vocab_size = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab_size:
            raise KilnError(
                f"prompt token ids must be in [0, {vocab_size}); is the tokenizer for this model?"
            )
        return prompt_ids

    def _detokenizer(self, prompt_ids: list[int], params: SamplingParams) -> Detokenizer | None:
        if self.tokenizer is None:
            return None
        return Detokenizer(self.tokenizer, prompt_ids, params.stop, params.skip_special_tokens)

    def add_request(
        self, prompt: Prompt | Request, params: SamplingParams | None = None, request_id: str | None = None
    ) -> Request:
        """Queue a request (a prompt, or one built by `make_request`); returns it."""
        request = prompt if isinstance(prompt, Request) else self.make_request(prompt, params, request_id)
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
        """Run one forward pass; return a delta for every request that gained tokens or finished."""
        outputs, self._aborted = self._aborted, []
        plan = self.scheduler.schedule()
        self.counters.num_preemptions += len(plan.preempted)
        if not plan.scheduled:
            assert not self._requests, "unfinished requests but nothing could be scheduled"
            return outputs
        self.counters.num_steps += 1
        result = self.runner.execute(plan.scheduled)
        sampled = self.sampler(result.logits, result.sampling_seqs)
        now = time.monotonic()
        self._record_progress(plan, now)
        self._record_prompt_logprobs(result)
        for seq, token_id, logprobs in zip(
            result.sampling_seqs, sampled.token_ids, sampled.logprobs, strict=True
        ):
            self._append_token(seq, token_id, logprobs, now)
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

    def _record_prompt_logprobs(self, result: RunnerOutput) -> None:
        for seq, entries in result.prompt_logprobs:
            seq.request.prompt_logprobs.extend(self._position_logprobs(entry) for entry in entries)

    def _append_token(self, seq: Sequence, token_id: int, logprobs: TopLogprobs | None, now: float) -> None:
        seq.token_ids.append(token_id)
        self.counters.num_generation_tokens += 1
        if seq.request.metrics.first_token_time is None:
            seq.request.metrics.first_token_time = now
        if logprobs is not None:
            seq.logprobs.append(self._position_logprobs(logprobs))
            seq.cumulative_logprob += logprobs.logprob
        self._check_stop(seq, token_id)

    def _check_stop(self, seq: Sequence, token_id: int) -> None:
        """Finish `seq` on a stop token, a stop string, or its length limit (in that order)."""
        can_stop = seq.num_output_tokens >= seq.params.min_tokens
        detokenizer = seq.detokenizer
        if can_stop and token_id in seq.stop_token_ids:
            # The stop token stays in token_ids; its text does not join the output.
            if detokenizer is not None:
                detokenizer.flush(check_stop=False)
            seq.finish("stop", token_id if token_id in seq.params.stop_token_ids else None)
            return
        stop = detokenizer.add(token_id, check_stop=can_stop) if detokenizer is not None else None
        if stop is None and seq.num_tokens >= seq.max_total_tokens:
            stop = detokenizer.flush(check_stop=can_stop) if detokenizer is not None else None
            if stop is None:
                seq.finish("length")
        if stop is not None:
            seq.finish("stop", stop)

    def _position_logprobs(self, entry: TopLogprobs) -> PositionLogprobs:
        def text(token_id: int) -> str | None:
            return (
                None
                if self.tokenizer is None
                else self.tokenizer.decode([token_id], skip_special_tokens=False)
            )

        logprobs = {
            entry.token_id: Logprob(
                logprob=entry.logprob, rank=entry.rank, decoded_token=text(entry.token_id)
            )
        }
        for rank, (token_id, value) in enumerate(
            zip(entry.top_ids, entry.top_logprobs, strict=True), start=1
        ):
            if token_id not in logprobs:
                logprobs[token_id] = Logprob(logprob=value, rank=rank, decoded_token=text(token_id))
        return logprobs

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
