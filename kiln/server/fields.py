"""The field types of request bodies: integers bounded to what the engine holds, floats in ranges that
cannot give NaN, non-empty prompts, and the check that every string in a body is valid Unicode.

pydantic states each bound in /openapi.json too, so the schema and the server refuse the same inputs.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import Field
from pydantic_core import PydanticCustomError

MAX_N = 128  # samples per prompt
MAX_LOGPROBS = 20  # top candidates per position, as OpenAI's top_logprobs allows
MAX_INT32 = 2**31 - 1  # token ids and token counts: the engine keeps them in int32/int64 tensors
MIN_INT64, MAX_INT64 = -(2**63), 2**63 - 1  # seeds, as vLLM takes them
# A temperature below this is greedy: fp32 logits divided by a smaller one overflow to inf, then NaN.
MIN_TEMPERATURE = 1e-5
MIN_TOP_P = 1e-8  # a smaller top_p rounds to 0 in fp32, which would drop every token
# Wider than this, a penalised fp32 logit can overflow to inf and the softmax give NaN.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
MAX_STOP_STRINGS = 256  # each is checked against the text at every step
MAX_STOP_TOKEN_IDS = 1024

NonNegative = Annotated[int, Field(ge=0, le=MAX_INT32)]
Positive = Annotated[int, Field(ge=1, le=MAX_INT32)]
TokenId = Annotated[int, Field(ge=0, le=MAX_INT32)]  # the vocabulary bound is the engine's check
Penalty = Annotated[float, Field(ge=-2, le=2)]
NonEmptyText = Annotated[str, Field(min_length=1)]
# A prompt: text, token ids, or a batch of either; never empty.
PromptInput = (
    NonEmptyText
    | Annotated[list[NonEmptyText], Field(min_length=1)]
    | Annotated[list[TokenId], Field(min_length=1)]
    | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
)

_SURROGATE = re.compile(r"[\ud800-\udfff]")


def invalid_unicode_path(value: Any, path: str = "") -> str | None:
    """The dotted path (".messages.0.content") of the first string or key in parsed JSON that holds a lone
    UTF-16 surrogate, which JSON's "\\ud800" escapes let through and no tokenizer or UTF-8 encoder takes."""
    if isinstance(value, str):
        return path if not value.isascii() and _SURROGATE.search(value) else None
    if isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, str | list | dict) and (
                found := invalid_unicode_path(item, f"{path}.{index}")
            ):
                return found
    elif isinstance(value, dict):
        for key, item in value.items():
            # A bad key is named escaped: the error message must itself encode as UTF-8.
            name = f"{path}.{key.encode('utf-8', 'backslashreplace').decode()}"
            if invalid_unicode_path(key, name) is not None:
                return name
            if (found := invalid_unicode_path(item, name)) is not None:
                return found
    return None


def prompt_list(prompt: PromptInput) -> list[str | list[int]]:
    """The prompts of a (possibly batched) input, each text or token ids."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


def field_error(param: str, message: str) -> PydanticCustomError:
    """A validation error about `param` raised by a model validator (where pydantic knows no field)."""
    return PydanticCustomError("field_invalid", "{param}: " + message, {"param": param})
