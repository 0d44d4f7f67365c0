"""Streaming text: whole UTF-8 characters only, and stop strings never leak, not even in part."""

import pytest

from kiln.engine import LLM, SamplingParams
from kiln.engine.detokenizer import Detokenizer
from kiln.tokenizer import Tokenizer

TEXT = "naïve café — 雪 ☃ done"


def test_multibyte_characters_are_never_split(text_model_dir):
    tokenizer = Tokenizer.from_dir(text_model_dir)
    ids = tokenizer.encode(TEXT)
    assert len(ids) > len(TEXT.encode()) // 2  # the ASCII-trained BPE splits multi-byte characters
    detokenizer = Detokenizer(tokenizer, prompt_ids=[])
    deltas = []
    for token_id in ids:
        detokenizer.add(token_id)
        deltas.append(detokenizer.take_delta(finished=False))
    detokenizer.flush()
    deltas.append(detokenizer.take_delta(finished=True))
    assert "".join(deltas) == TEXT
    assert not any("\ufffd" in delta for delta in deltas)


@pytest.mark.parametrize("stop", ["雪 ☃", "é —", "e"])
def test_stop_strings_cut_the_text_and_never_stream(text_model_dir, stop):
    tokenizer = Tokenizer.from_dir(text_model_dir)
    detokenizer = Detokenizer(tokenizer, prompt_ids=[], stop=["never there", stop])
    deltas, found = [], None
    for token_id in tokenizer.encode(TEXT):
        found = detokenizer.add(token_id)
        deltas.append(detokenizer.take_delta(finished=found is not None))
        if found:
            break
    assert found == stop
    assert "".join(deltas) == detokenizer.text == TEXT[: TEXT.index(stop)]


def test_engine_stops_on_a_string_from_its_own_output(text_model_dir):
    llm = LLM(text_model_dir, verbose=False)
    free = llm.generate(["def main():"], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[
        0
    ].outputs[0]
    stop = free.text[12:16]
    assert len(free.text) > 20 and stop.strip()
    params = SamplingParams(temperature=0, max_tokens=40, stop=stop, ignore_eos=True)
    stopped = llm.generate(["def main():"], params)[0].outputs[0]
    assert stopped.text == free.text[: free.text.index(stop)]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop)
    streamed = list(llm.stream("def main():", params))
    assert "".join(c.text for out in streamed for c in out.outputs) == stopped.text
    assert [t for out in streamed for c in out.outputs for t in c.token_ids] == stopped.token_ids
    assert streamed[-1].finished and not any(out.finished for out in streamed[:-1])
