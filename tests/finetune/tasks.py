"""A synthetic task for finetuning tests: reverse three letters (`do: a c b` -> `b c a`), with train and
held-out words disjoint."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

LETTERS = "abcdefgh"


def chat(instruction: str, word: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"{instruction}: {word}"},
            {"role": "assistant", "content": answer},
        ]
    }


def reverse(word: str) -> str:
    return " ".join(reversed(word.split()))


def split_words(seed: int = 0, num_train: int = 400) -> tuple[list[str], list[str]]:
    words = [" ".join(w) for w in itertools.product(LETTERS, repeat=3)]
    random.Random(seed).shuffle(words)
    return words[:num_train], words[num_train:]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
