import pytest

from kiln.data.filters import (
    LONG_LINE,
    REPEATED_LINES,
    SYMBOL_RATIO,
    TOO_SHORT,
    FilterConfig,
    filter_reason,
    repeated_line_ratio,
    symbol_ratio,
)
from kiln.errors import KilnError

from .corpus import prose


def test_normal_document_passes():
    assert filter_reason(prose(200, seed=1), FilterConfig()) is None


def test_too_short():
    assert filter_reason(prose(20, seed=1), FilterConfig()) == TOO_SHORT
    assert filter_reason("   \n\n ", FilterConfig(min_words=None)) == TOO_SHORT
    assert filter_reason(prose(20, seed=1), FilterConfig(min_words=10)) is None


def test_symbol_soup():
    soup = " ".join("#$%!@&*{}[]<>|~^" * 3 + f"x{i}" for i in range(60))
    assert symbol_ratio(soup) > 0.9
    assert filter_reason(soup, FilterConfig()) == SYMBOL_RATIO
    assert filter_reason(soup, FilterConfig(max_symbol_ratio=None)) is None


def test_repeated_lines():
    text = "\n".join(
        ["Click here to subscribe to our newsletter today."] * 8 + prose(60, seed=2).splitlines()
    )
    assert repeated_line_ratio(text) == pytest.approx(7 / 13)  # 8 copies + 5 distinct lines
    assert filter_reason(text, FilterConfig()) == REPEATED_LINES


def test_long_line():
    text = prose(100, seed=3) + "\n" + "a" * 6000
    assert filter_reason(text, FilterConfig()) == LONG_LINE
    assert filter_reason(text, FilterConfig(max_line_chars=10_000)) is None


def test_bad_thresholds_raise():
    with pytest.raises(KilnError, match="max_symbol_ratio"):
        FilterConfig(max_symbol_ratio=1.5)
