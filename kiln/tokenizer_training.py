"""Byte-level BPE training (GPT-2 style: every byte encodable) for `kiln tokenizer train` and data
preparation without a tokenizer of its own."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from kiln.errors import KilnError
from kiln.tokenizer import CHATML_TEMPLATE, DEFAULT_SPECIAL_TOKENS, ENDOFTEXT, Tokenizer


def train_bpe(
    files: Sequence[str | Path],
    vocab_size: int,
    output_dir: str | Path | None = None,
    *,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    min_frequency: int = 2,
    show_progress: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style, every byte encodable) on text files.

    `special_tokens` take the first ids and must include "<|endoftext|>", the EOS token. When "<|im_start|>"
    and "<|im_end|>" are among them the tokenizer gets a ChatML chat template. Saved to `output_dir` if given.
    """
    paths = [Path(file) for file in files]
    if not paths:
        raise KilnError("train_bpe needs at least one text file; pass the paths of the training corpus.")
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise KilnError(f"training files not found: {', '.join(missing)}; check the paths.")
    if all(path.stat().st_size == 0 for path in paths):
        raise KilnError(f"all {len(paths)} training files are empty; pass files that contain text.")
    backend, trainer = _new_bpe(vocab_size, special_tokens, min_frequency, show_progress)
    backend.train([str(path) for path in paths], trainer)
    return _finish_bpe(backend, special_tokens, output_dir)


def train_bpe_from_iterator(
    texts: Iterable[str],
    vocab_size: int,
    output_dir: str | Path | None = None,
    *,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    min_frequency: int = 2,
    show_progress: bool = True,
    length: int | None = None,
) -> Tokenizer:
    """Like `train_bpe`, from an iterable of documents; `length` (the number of texts) only feeds the
    progress bar."""
    backend, trainer = _new_bpe(vocab_size, special_tokens, min_frequency, show_progress)
    num_chars = 0

    def counted() -> Iterator[str]:
        nonlocal num_chars
        for text in texts:
            num_chars += len(text)
            yield text

    backend.train_from_iterator(counted(), trainer, length=length)
    if num_chars == 0:
        raise KilnError("train_bpe_from_iterator got no text; pass an iterable of non-empty documents.")
    return _finish_bpe(backend, special_tokens, output_dir)


def _new_bpe(
    vocab_size: int, special_tokens: Sequence[str], min_frequency: int, show_progress: bool
) -> tuple[BackendTokenizer, trainers.BpeTrainer]:
    if ENDOFTEXT not in special_tokens:
        raise KilnError(f"special_tokens must include {ENDOFTEXT!r}, the end-of-text (EOS) token.")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    smallest = len(alphabet) + len(special_tokens)
    if vocab_size < smallest:
        raise KilnError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs {len(alphabet)} byte tokens plus "
            f"{len(special_tokens)} special tokens; use at least {smallest}."
        )
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=alphabet,  # every byte gets a token even if the corpus never uses it
        show_progress=show_progress,
    )
    return backend, trainer


def _finish_bpe(
    backend: BackendTokenizer, special_tokens: Sequence[str], output_dir: str | Path | None
) -> Tokenizer:
    has_chatml = "<|im_start|>" in special_tokens and "<|im_end|>" in special_tokens
    tokenizer = Tokenizer(
        backend,
        special_tokens={"eos_token": ENDOFTEXT},
        chat_template=CHATML_TEMPLATE if has_chatml else None,
        # A chat turn ends with <|im_end|>; generation must stop there too.
        extra_eos_token_ids=[backend.token_to_id("<|im_end|>")] if has_chatml else (),
    )
    if output_dir is not None:
        tokenizer.save(output_dir)
    return tokenizer
