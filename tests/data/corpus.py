"""Crafted documents for the data-pipeline tests: readable filler that passes every quality filter."""

from __future__ import annotations

import random

_SYLLABLES = ("ka", "lo", "mi", "ten", "ru", "sa", "vo", "nel", "pi", "dor", "qua", "ze", "fin", "bo", "li")


def vocabulary(size: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def words(num_words: int, seed: int) -> list[str]:
    """num_words words drawn from a large vocabulary, so distinct seeds share almost no 5-word shingle."""
    rng = random.Random(seed)
    return rng.choices(vocabulary(), k=num_words)


def prose(num_words: int, seed: int) -> str:
    """A document of sentences on lines of ~12 words: passes the default filters when num_words >= 50."""
    chosen = words(num_words, seed)
    lines = [" ".join(chosen[i : i + 12]).capitalize() + "." for i in range(0, num_words, 12)]
    return "\n".join(lines)


def with_substitutions(text_words: list[str], num_substitutions: int, seed: int) -> list[str]:
    """A copy with `num_substitutions` evenly spaced words replaced by words the vocabulary lacks."""
    copy = list(text_words)
    stride = len(copy) // num_substitutions
    for k in range(num_substitutions):
        copy[k * stride + stride // 2] = f"novel{seed}x{k}"
    return copy


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b)
