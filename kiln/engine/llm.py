"""LLM: the offline Python API. Load a model once, then generate, chat or embed over batches."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kiln.engine.config import EngineConfig
from kiln.engine.engine import Engine
from kiln.engine.outputs import RequestOutput
from kiln.engine.request_factory import Prompt
from kiln.engine.sampling_params import SamplingParams
from kiln.engine.sequence import EngineRequest
from kiln.errors import KilnError
from kiln.models.transformer import Transformer

Message = Mapping[str, Any]


class LLM:
    """A model served by the engine (paged KV cache, continuous batching, prefix caching).

    >>> llm = kiln.LLM("path/to/model", kv_cache_memory="1GB")
    >>> llm.generate(["Once upon a time"], kiln.SamplingParams(max_tokens=32))[0].outputs[0].text
    """

    def __init__(
        self,
        model: str | Path,
        config: EngineConfig | None = None,
        *,
        adapters: Mapping[str, str | Path] | None = None,
        verbose: bool = True,
        **overrides: Any,
    ) -> None:
        """Load `model` (an HF model directory) under `config` (EngineConfig; the defaults without one).
        `adapters` (name -> PEFT adapter dir: LoRA or prompt tuning) are served beside the base; a request
        picks one with SamplingParams(adapter=name), and one batch may mix them.
        `overrides` are EngineConfig fields (dtype="bf16", kv_cache_memory="1GB", kernels="triton", ...)
        replacing the config's; `verbose` prints the model size and KV capacity to stderr."""
        self.engine = Engine.from_dir(model, config, adapters, **overrides)
        if verbose:
            from rich.console import Console

            Console(stderr=True).print(f"[dim]kiln: {self.engine.startup_summary()}[/]", highlight=False)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, or token ids) at once; outputs come back in prompt order.

        `sampling_params` is one SamplingParams for all prompts or a list with one per prompt.
        """
        prompt_list = _prompt_list(prompts)
        params = _params_list(sampling_params, len(prompt_list))
        requests = [self.engine.make_request(p, sp) for p, sp in zip(prompt_list, params, strict=True)]
        return self._run(requests)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """Answer one conversation (a list of {"role", "content"} messages) or a list of them, through the
        model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        prompts = [self._chat_prompt(c, add_generation_prompt, **template_kwargs) for c in conversations]
        return self.generate(prompts, sampling_params)

    def stream(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None
    ) -> Iterator[RequestOutput]:
        """Generate for one prompt, yielding deltas (new text and tokens) as they come."""
        request = self.engine.add_request(self.engine.make_request(prompt, sampling_params))
        try:
            while not request.is_finished:
                yield from (out for out in self.engine.step() if out.request_id == request.request_id)
        finally:
            self.engine.abort_request(request.request_id)  # no-op once finished

    def chat_stream(
        self,
        messages: Sequence[Message],
        sampling_params: SamplingParams | None = None,
        **template_kwargs: Any,
    ) -> Iterator[RequestOutput]:
        """`stream` for one conversation, through the chat template."""
        return self.stream(self._chat_prompt(messages, True, **template_kwargs), sampling_params)

    def embed(self, texts: str | Sequence[str | Sequence[int]], batch_size: int = 32) -> torch.Tensor:
        """Normalised mean of the final hidden states over each text's tokens; (len(texts), hidden) fp32."""
        ids = [self.engine.prompt_token_ids(p) for p in _prompt_list(texts)]
        return embed_token_ids(self.engine.model, ids, batch_size)

    def _chat_prompt(
        self, messages: Sequence[Message], add_generation_prompt: bool, **kwargs: Any
    ) -> list[int]:
        if self.tokenizer is None:
            raise KilnError(
                "chat needs the model's tokenizer, and this model directory has no tokenizer.json"
            )
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, **kwargs
        )

    def _run(self, requests: list[EngineRequest]) -> list[RequestOutput]:
        for request in requests:
            self.engine.add_request(request)
        try:
            while not all(request.is_finished for request in requests):
                self.engine.step()
        except BaseException:
            for request in requests:
                self.engine.abort_request(request.request_id)
            raise
        return [request.output() for request in requests]


@torch.no_grad()
def embed_token_ids(model: Transformer, ids: Sequence[Sequence[int]], batch_size: int = 32) -> torch.Tensor:
    """Normalised mean of the final hidden states over each prompt's tokens; (len(ids), hidden) fp32.
    Shared by `LLM.embed` and `AsyncEngine.embed`."""
    device = model.embed_tokens.weight.device
    out = torch.empty(len(ids), model.config.hidden_size)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch
    for start in range(0, len(order), batch_size):
        members = order[start : start + batch_size]
        longest = max(len(ids[i]) for i in members)
        input_ids = torch.zeros(len(members), longest, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, index in enumerate(members):  # left padding, which the model's positions skip
            input_ids[row, longest - len(ids[index]) :] = torch.tensor(ids[index])
            mask[row, longest - len(ids[index]) :] = 1
        hidden = model.hidden_states(input_ids.to(device), attention_mask=mask.to(device)).float().cpu()
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        out[members] = F.normalize(pooled, dim=-1)
    return out


def _prompt_list(prompts: Any) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise KilnError("no prompts given; pass a string, a list of token ids, or a list of either")
    if all(isinstance(p, int) for p in prompts):
        return [prompts]  # one prompt of token ids
    return [p if isinstance(p, str) else [int(t) for t in p] for p in prompts]


def _params_list(
    params: SamplingParams | Sequence[SamplingParams] | None, count: int
) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * count
    params = list(params)
    if len(params) != count:
        raise KilnError(f"got {len(params)} SamplingParams for {count} prompts; pass one, or one per prompt")
    return params
