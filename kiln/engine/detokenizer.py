"""Detokenizer: one sequence's output text, grown a token at a time, with stop strings cut out.

Text is emitted in deltas that never split a UTF-8 character (`IncrementalDecoder` holds those back) and
never show any part of a stop string: the last `longest stop - 1` characters are held back until the
sequence finishes or more text proves they do not begin a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from kiln.tokenizer import Tokenizer


class Detokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._decoder = tokenizer.incremental_decoder(
            skip_special_tokens=skip_special_tokens, prompt_ids=prompt_ids
        )
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""
        self._num_emitted_chars = 0

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append a token's text; return the stop string it completed (the text then ends before it)."""
        return self._extend(self._decoder.add(token_id), check_stop)

    def flush(self, check_stop: bool = True) -> str | None:
        """Append the text the decoder still holds (a final partial character); like `add`."""
        return self._extend(self._decoder.flush(), check_stop)

    def _extend(self, delta: str, check_stop: bool) -> str | None:
        if not delta:
            return None
        # A new match must end inside `delta`, so it starts at most `longest stop - 1` characters earlier.
        search_from = max(len(self.text) - self._hold, 0)
        self.text += delta
        if not check_stop:
            return None
        matches = [(index, stop) for stop in self._stop if (index := self.text.find(stop, search_from)) >= 0]
        if not matches:
            return None
        index, stop = min(matches)
        self.text = self.text[:index]
        return stop

    def take_delta(self, finished: bool) -> str:
        """Text not yet emitted that is safe to emit: all of it once finished."""
        end = len(self.text) if finished else max(len(self.text) - self._hold, 0)
        delta = self.text[self._num_emitted_chars : end]
        self._num_emitted_chars = max(self._num_emitted_chars, end)
        return delta
