"""RequestFactory: turns a prompt and its SamplingParams into an EngineRequest with one Sequence per
sample, after checking the prompt against the model (vocabulary, context length) and the tokenizer."""

from __future__ import annotations

import itertools
import time
import uuid

import torch

from kiln.config import ModelConfig
from kiln.engine.detokenizer import Detokenizer
from kiln.engine.outputs import RequestMetrics
from kiln.engine.sampling_params import SamplingParams
from kiln.engine.sequence import EngineRequest, Sequence
from kiln.errors import KilnError
from kiln.tokenizer import Tokenizer

Prompt = str | list[int]


class RequestFactory:
    def __init__(
        self,
        model_config: ModelConfig,
        tokenizer: Tokenizer | None,
        *,
        max_model_len: int,
        device: torch.device,
        enable_prefix_caching: bool,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = model_config.vocab_size
        self.max_model_len = max_model_len
        self.device = device
        self.enable_prefix_caching = enable_prefix_caching
        eos = model_config.eos_token_id
        eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
        self.eos_token_ids = frozenset(
            eos_ids | (tokenizer.eos_token_ids if tokenizer is not None else set())
        )
        self._seq_ids = itertools.count()

    def make_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        virtual_ids: list[int] | tuple[int, ...] = (),
        cache_salt: bytes = b"",
    ) -> EngineRequest:
        """Tokenize and validate a request (safe to call from any thread). `virtual_ids` (a prompt-tuning
        adapter's virtual tokens) lead each sequence's tokens; `cache_salt` keeps its prefix-cache blocks
        apart from other adapters'."""
        params = params or SamplingParams()
        self.check_params(params)
        text = prompt if isinstance(prompt, str) else None
        prompt_ids = self.prompt_token_ids(prompt)
        num_prompt_tokens = len(virtual_ids) + len(prompt_ids)
        if num_prompt_tokens >= self.max_model_len:
            raise KilnError(
                f"the prompt has {num_prompt_tokens} tokens, but max_model_len is {self.max_model_len} and "
                "at least one token must be generated; shorten the prompt or raise max_model_len"
            )
        request = EngineRequest(
            request_id=request_id if request_id is not None else uuid.uuid4().hex,
            prompt=text,
            prompt_token_ids=prompt_ids,
            params=params,
            metrics=RequestMetrics(arrival_time=time.monotonic()),
            prompt_logprobs=None if params.prompt_logprobs is None else [None],
        )
        for index in range(params.n):
            request.sequences.append(self._sequence(request, index, list(virtual_ids), cache_salt))
        return request

    def check_params(self, params: SamplingParams) -> None:
        """Refuse what this model cannot do: token ids outside its vocabulary, top-k or logprobs past it,
        stop strings without a tokenizer. (Checked here, once per request, so that the sampler never meets
        a value that would fail a whole step.)"""
        vocab_size = self.vocab_size
        if params.stop and self.tokenizer is None:
            raise KilnError("stop strings need a tokenizer; use stop_token_ids with this model", param="stop")
        outside = [token for token in params.stop_token_ids if not 0 <= token < vocab_size]
        if outside:
            raise KilnError(
                f"stop_token_ids must be in [0, {vocab_size}), this model's vocabulary; got {outside[0]}",
                param="stop_token_ids",
            )
        if params.top_k > vocab_size:
            raise KilnError(
                f"top_k must be at most the vocabulary size {vocab_size} (0 or -1 = off); got {params.top_k}",
                param="top_k",
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > vocab_size:
                raise KilnError(
                    f"{name} must be at most the vocabulary size {vocab_size}; got {value}", param=name
                )

    def _sequence(
        self, request: EngineRequest, index: int, virtual_ids: list[int], cache_salt: bytes
    ) -> Sequence:
        params, prompt_ids = request.params, virtual_ids + request.prompt_token_ids
        stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self.eos_token_ids
        )
        max_total = self.max_model_len
        if params.max_tokens is not None:
            max_total = min(len(prompt_ids) + params.max_tokens, max_total)
        return Sequence(
            seq_id=next(self._seq_ids),
            index=index,
            request=request,
            token_ids=list(prompt_ids),
            num_prompt_tokens=len(prompt_ids),
            params=params,
            stop_token_ids=stop_ids,
            max_total_tokens=max_total,
            generator=params.sample_generator(index, self.device),
            detokenizer=self._detokenizer(request.prompt_token_ids, params),
            leader=request.sequences[0] if index and self.enable_prefix_caching else None,
            logprobs=None if params.logprobs is None else [],
            num_virtual_tokens=len(virtual_ids),
            cache_salt=cache_salt,
        )

    def prompt_token_ids(self, prompt: Prompt) -> list[int]:
        """The token ids of a prompt (text is encoded with the tokenizer), checked against the vocabulary."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise KilnError("this model directory has no tokenizer.json, so prompts must be token ids")
            prompt_ids = self.tokenizer.encode(prompt)
        else:
            prompt_ids = [int(token) for token in prompt]
        if not prompt_ids:
            raise KilnError("the prompt is empty; give at least one token", param="prompt")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:
            raise KilnError(
                f"prompt token ids must be in [0, {self.vocab_size}); is the tokenizer for this model?",
                param="prompt",
            )
        return prompt_ids

    def _detokenizer(self, prompt_ids: list[int], params: SamplingParams) -> Detokenizer | None:
        if self.tokenizer is None:
            return None
        return Detokenizer(self.tokenizer, prompt_ids, params.stop, params.skip_special_tokens)
