"""OutputProcessor: applies a step's sampled tokens to their sequences. Each token is appended with its
logprobs (as text-bearing `PositionLogprobs`), and the sequence finishes on a stop token, a stop string or
its length limit."""

from __future__ import annotations

from kiln.engine.outputs import Logprob, PositionLogprobs
from kiln.engine.sampler import TopLogprobs
from kiln.engine.sequence import Sequence
from kiln.tokenizer import Tokenizer


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer  # None: logprobs carry no decoded text

    def append_token(self, seq: Sequence, token_id: int, logprobs: TopLogprobs | None) -> None:
        seq.token_ids.append(token_id)
        if logprobs is not None:
            seq.logprobs.append(self.position_logprobs(logprobs))
            seq.cumulative_logprob += logprobs.logprob
        check_stop(seq, token_id)

    def record_prompt_logprobs(self, seq: Sequence, entries: list[TopLogprobs]) -> None:
        seq.request.prompt_logprobs.extend(self.position_logprobs(entry) for entry in entries)

    def position_logprobs(self, entry: TopLogprobs) -> PositionLogprobs:
        """The chosen token and the top-N of one position, keyed by token id, with their text."""

        def text(token_id: int) -> str | None:
            return (
                None
                if self.tokenizer is None
                else self.tokenizer.decode([token_id], skip_special_tokens=False)
            )

        logprobs = {
            entry.token_id: Logprob(
                logprob=entry.logprob, rank=entry.rank, decoded_token=text(entry.token_id)
            )
        }
        for rank, (token_id, value) in enumerate(
            zip(entry.top_ids, entry.top_logprobs, strict=True), start=1
        ):
            if token_id not in logprobs:
                logprobs[token_id] = Logprob(logprob=value, rank=rank, decoded_token=text(token_id))
        return logprobs


def check_stop(seq: Sequence, token_id: int) -> None:
    """Finish `seq` on a stop token, a stop string, or its length limit (in that order)."""
    can_stop = seq.num_output_tokens >= seq.params.min_tokens
    detokenizer = seq.detokenizer
    if can_stop and token_id in seq.stop_token_ids:
        # The stop token stays in token_ids; its text does not join the output.
        if detokenizer is not None:
            detokenizer.flush(check_stop=False)
        seq.finish("stop", token_id if token_id in seq.params.stop_token_ids else None)
        return
    stop = detokenizer.add(token_id, check_stop=can_stop) if detokenizer is not None else None
    if stop is None and seq.num_tokens >= seq.max_total_tokens:
        stop = detokenizer.flush(check_stop=can_stop) if detokenizer is not None else None
        if stop is None:
            seq.finish("length")
    if stop is not None:
        seq.finish("stop", stop)
