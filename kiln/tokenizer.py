"""Tokenizer: a typed wrapper around HF `tokenizers`, with chat templates and streaming decode (BPE
training is in kiln/tokenizer_training.py).

Loading follows transformers 5.x so that kiln and HF agree token for token:
- tokenizer.json's post-processor alone decides whether BOS/EOS are added. transformers drops
  `add_bos_token`/`add_eos_token` from tokenizer_config.json whenever a tokenizer.json exists.
- The named special tokens of tokenizer_config.json are registered as special tokens in the backend (when
  tokenizer.json does not already list them), so text never splits them and
  `decode(skip_special_tokens=True)` drops them.
- `clean_up_tokenization_spaces` is ignored: transformers ignores it for BPE too, and it would make
  streamed text differ from `decode()`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

from kiln.errors import KilnError

# The named special tokens of tokenizer_config.json (transformers' SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = tuple(f"{kind}_token" for kind in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"))
ENDOFTEXT = "<|endoftext|>"
DEFAULT_SPECIAL_TOKENS = (ENDOFTEXT, "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# How many prompt tokens of left context an IncrementalDecoder decodes with (vLLM uses the same).
PROMPT_CONTEXT_TOKENS = 5


class Tokenizer:
    """A fast tokenizer plus the metadata kiln needs: special tokens, stop ids and the chat template."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        special_tokens: Mapping[str, str | None] | None = None,
        chat_template: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ) -> None:
        """Wrap `backend` (which is modified in place).

        `special_tokens` maps names from SPECIAL_TOKEN_NAMES ("bos_token", ...) to token strings;
        `extra_eos_token_ids` are further stop ids (e.g. from generation_config.json).
        """
        self._backend = backend
        # transformers turns truncation and padding off unless a call asks for them; never cut text silently.
        backend.no_truncation()
        backend.no_padding()
        self._special_tokens = {name: token for name, token in (special_tokens or {}).items() if token}
        already_added = {token.content for token in backend.get_added_tokens_decoder().values()}
        missing = [token for token in self._special_tokens.values() if token not in already_added]
        backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in missing])
        self.chat_template = chat_template
        self.eos_token_ids: set[int] = {int(token_id) for token_id in extra_eos_token_ids}
        if self.eos_token_id is not None:
            self.eos_token_ids.add(self.eos_token_id)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face tokenizer directory (tokenizer.json is required).

        Reads tokenizer_config.json, special_tokens_map.json, chat_template.jinja, and the `eos_token_id`
        of generation_config.json / config.json when present.
        """
        directory = Path(path)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise KilnError(
                f"{directory} has no tokenizer.json; kiln needs a Hugging Face fast-tokenizer file there. "
                "Save one with transformers' `tokenizer.save_pretrained(dir)` or train one with "
                "`kiln.tokenizer_training.train_bpe`."
            )
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # the Rust side raises a bare Exception
            raise KilnError(
                f"could not read {tokenizer_file} ({err}); re-save it with `tokenizers`."
            ) from err
        config = _read_json(directory / "tokenizer_config.json")
        if "added_tokens_decoder" not in config:
            # transformers only reads the legacy special_tokens_map.json in this case, and lets it win.
            config |= _read_json(directory / "special_tokens_map.json")
        special_tokens = {name: _token_content(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        chat_template = config.get("chat_template")
        if isinstance(chat_template, list):  # several named templates: [{"name": ..., "template": ...}]
            chat_template = {entry["name"]: entry["template"] for entry in chat_template}.get("default")
        template_file = directory / "chat_template.jinja"
        if template_file.is_file():  # newer transformers writes the template here; it wins over the config
            chat_template = template_file.read_text(encoding="utf-8")
        eos_token_ids: list[int] = []
        for name in ("generation_config.json", "config.json"):
            value = _read_json(directory / name).get("eos_token_id")
            eos_token_ids += value if isinstance(value, list) else [value] if isinstance(value, int) else []
        return cls(
            backend,
            special_tokens=special_tokens,
            chat_template=chat_template,
            extra_eos_token_ids=eos_token_ids,
        )

    @property
    def backend(self) -> BackendTokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (what an embedding table must cover)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, str]:
        """The named special tokens that are set, e.g. {"eos_token": "<|endoftext|>"}."""
        return dict(self._special_tokens)

    @property
    def bos_token(self) -> str | None:
        return self._special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self._special_tokens.get("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id_of(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of(self.pad_token)

    @property
    def add_bos_token(self) -> bool:
        """Whether encode() prepends BOS (tokenizer.json's post-processor decides, as in transformers)."""
        return self.bos_token_id is not None and self._backend.encode("").ids[:1] == [self.bos_token_id]

    @property
    def add_eos_token(self) -> bool:
        """Whether encode() appends EOS (tokenizer.json's post-processor decides, as in transformers)."""
        return self.eos_token_id is not None and self._backend.encode("").ids[-1:] == [self.eos_token_id]

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def token_to_id(self, token: str) -> int | None:
        """The id of `token`, or None when it is not in the vocabulary."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of `token_id`, or None when the id is out of range."""
        return self._backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` applies the post-processor (BOS/EOS if it adds them)."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text, encoded in parallel by the Rust batch encoder."""
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens are dropped unless `skip_special_tokens=False`."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def incremental_decoder(
        self, skip_special_tokens: bool = True, prompt_ids: Sequence[int] = ()
    ) -> IncrementalDecoder:
        """A streaming decoder for generated ids; `prompt_ids` give left context and are never emitted."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens, prompt_ids=prompt_ids)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **extra: Any,
    ) -> str | list[int]:
        """Render `messages` with the chat template, as transformers does; ids if `tokenize`.

        The template sees `messages`, `add_generation_prompt`, the named special tokens (`bos_token`, ...),
        `tools=None`, `documents=None` and every `extra` keyword. Token ids are encoded without adding
        special tokens, since the template writes them itself.
        """
        if self.chat_template is None:
            raise KilnError(
                "this model has no chat template (no chat_template in tokenizer_config.json and no "
                "chat_template.jinja); use plain-text prompts, or add a template to the model directory."
            )
        # Like transformers: keys set to None are dropped (OpenAI clients send content=None).
        plain_messages = [
            {key: value for key, value in message.items() if value is not None} for message in messages
        ]
        variables = {"tools": None, "documents": None, **self._special_tokens, **extra}
        try:
            template = _compile_template(self.chat_template)
            text = template.render(
                messages=plain_messages, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as err:
            raise KilnError(
                f"the chat template failed: {err.message or err}; check the messages (roles, order, fields) "
                "or fix the model's chat template."
            ) from err
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json that transformers' AutoTokenizer loads as-is."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(out / "tokenizer.json"))
        config: dict[str, Any] = {
            # The generic class loads tokenizer.json verbatim; a model-specific class may rebuild it.
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self._special_tokens,
            # transformers ignores these next to a tokenizer.json, but other converters (llama.cpp) read them.
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        # The config holds the template; a chat_template.jinja from an earlier save would win over it on load.
        (out / "chat_template.jinja").unlink(missing_ok=True)


class IncrementalDecoder:
    """Turns generated token ids into text deltas, never emitting half a UTF-8 character.

    Uses the prefix/read-offset technique of vLLM and TGI: each step decodes only the short window
    `ids[prefix_offset:]` and emits what it adds beyond `ids[prefix_offset:read_offset]`, so a step costs
    O(window), not O(sequence). Decoding a few tokens of left context, rather than the new tokens alone, keeps
    decoders that strip a leading space (SentencePiece-style) from changing the text at window edges. A
    window that decodes to a trailing U+FFFD ends inside a multi-byte character, so its text is held back
    until a later token completes it.
    """

    def __init__(
        self, tokenizer: Tokenizer, skip_special_tokens: bool = True, prompt_ids: Sequence[int] = ()
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_ids)
        self._num_prompt_ids = len(self._ids)
        self._prefix_offset = max(len(self._ids) - PROMPT_CONTEXT_TOKENS, 0)
        self._read_offset = len(self._ids)
        self._chunks: list[str] = []

    @property
    def token_ids(self) -> list[int]:
        """The ids added so far (prompt ids excluded)."""
        return self._ids[self._num_prompt_ids :]

    @property
    def text(self) -> str:
        """The text emitted so far."""
        return "".join(self._chunks)

    def add(self, token_id: int) -> str:
        """Append one id and return the newly completed text (often "", e.g. mid-character)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return the text still held back; call at the end of the stream."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._ids))
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd")):
            return ""
        delta = new_text[len(prefix_text) :]
        if len(self._ids) > self._read_offset:
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._chunks.append(delta)
        return delta

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special_tokens)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise KilnError(f"{path} is not valid JSON ({err}); fix or delete it.") from err


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json stores a special token as a string or as a serialized AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) as a no-op."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


@lru_cache(maxsize=32)
def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers uses (templates from the Hub are untrusted)."""

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        # jinja's own tojson escapes HTML characters, which would change the text the model sees.
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(date_format: str) -> str:
        return datetime.now().strftime(date_format)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    return environment.from_string(source)
