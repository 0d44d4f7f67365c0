"""Document quality filters: Gopher/C4-style heuristics. Each check returns a drop reason or None.

Defaults follow Gopher (Rae et al., 2021, appendix A) where it has a rule: at least 50 words, at most 30% of
lines duplicated. The symbol ratio and line-length caps are looser than Gopher's word-level rules because
they must also keep code and paragraph-per-line prose; they catch symbol soup, base64 blobs and minified
files. Every threshold can be switched off by setting it to None.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kiln.errors import KilnError

TOO_SHORT = "too_short"
LONG_LINE = "long_line"
SYMBOL_RATIO = "symbol_ratio"
REPEATED_LINES = "repeated_lines"
FILTER_REASONS = (TOO_SHORT, LONG_LINE, SYMBOL_RATIO, REPEATED_LINES)

_SYMBOL = re.compile(r"[^\w\s]|_")  # one visible character that is not a letter or digit


@dataclass(kw_only=True, slots=True)
class FilterConfig:
    """Thresholds for dropping low-quality documents; None disables a check."""

    min_words: int | None = 50
    """Drop documents with fewer whitespace-separated words than this (Gopher: 50)."""
    max_line_chars: int | None = 5000
    """Drop documents with any line longer than this many characters (minified code, encoded blobs)."""
    max_symbol_ratio: float | None = 0.3
    """Drop documents where more than this fraction of non-space characters are not letters or digits."""
    max_repeated_line_ratio: float | None = 0.3
    """Drop documents where more than this fraction of non-empty lines repeat an earlier one (Gopher: 0.3)."""

    def __post_init__(self) -> None:
        for name in ("min_words", "max_line_chars"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise KilnError(f"FilterConfig.{name} must be >= 0 or None (disabled), got {value}.")
        for name in ("max_symbol_ratio", "max_repeated_line_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise KilnError(f"FilterConfig.{name} must be in [0, 1] or None (disabled), got {value}.")


def count_words(text: str) -> int:
    return len(text.split())


def max_line_chars(text: str) -> int:
    return max((len(line) for line in text.splitlines()), default=0)


def symbol_ratio(text: str) -> float:
    """Fraction of non-whitespace characters that are neither letters nor digits (C-level scans, no loop)."""
    num_visible = sum(map(len, text.split()))
    if num_visible == 0:
        return 0.0
    return len(_SYMBOL.findall(text)) / num_visible


def repeated_line_ratio(text: str) -> float:
    """Fraction of non-empty lines that repeat an earlier line (each extra copy counts once)."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)


def filter_reason(text: str, config: FilterConfig) -> str | None:
    """The first failed check's reason, cheapest checks first; None when the document passes."""
    if config.min_words is not None and count_words(text) < config.min_words:
        return TOO_SHORT
    if not text.strip():
        return TOO_SHORT
    if config.max_line_chars is not None and max_line_chars(text) > config.max_line_chars:
        return LONG_LINE
    if config.max_symbol_ratio is not None and symbol_ratio(text) > config.max_symbol_ratio:
        return SYMBOL_RATIO
    if (
        config.max_repeated_line_ratio is not None
        and repeated_line_ratio(text) > config.max_repeated_line_ratio
    ):
        return REPEATED_LINES
    return None
