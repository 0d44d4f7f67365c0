"""Backend: the engine a batch runner drives. `LLMBackend` runs `kiln.LLM` in this process; the server
drives its running AsyncEngine through a backend of its own (kiln/server/batches.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kiln.engine.engine import Engine
from kiln.engine.llm import LLM
from kiln.engine.outputs import RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.errors import KilnError


class Backend:
    """Tokenizing and checking requests against an engine; subclasses run them."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    @property
    def tokenizer(self):
        if self.engine.tokenizer is None:
            raise KilnError("this model directory has no tokenizer.json; batch jobs need one")
        return self.engine.tokenizer

    def prompt_token_ids(self, prompt: str | Sequence[int]) -> list[int]:
        return self.engine.prompt_token_ids(prompt if isinstance(prompt, str) else list(prompt))

    def continuation_token_ids(self, text: str) -> list[int]:
        """Token ids of text that follows a prompt (no BOS or other special tokens)."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def chat_token_ids(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.prompt_token_ids(self.continuation_token_ids(text))  # the template wrote the specials

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise KilnError for a request this engine would refuse (too long, bad parameters)."""
        self.engine.make_request(prompt_ids, params)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
        raise NotImplementedError

    def embed(self, prompts: list[list[int]]) -> torch.Tensor:
        raise NotImplementedError


class LLMBackend(Backend):
    """`kiln.LLM` in this process: a chunk's requests all go to `LLM.generate` at once."""

    def __init__(self, llm: LLM, model_name: str) -> None:
        super().__init__(llm.engine, model_name)
        self.llm = llm

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
        return self.llm.generate(prompts, params) if prompts else []

    def embed(self, prompts: list[list[int]]) -> torch.Tensor:
        return self.llm.embed(prompts)
