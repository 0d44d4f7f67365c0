"""kiln.LLM as a user meets it: text in, text out; chat; embed; stop tokens; errors that say what to do."""

import pytest
import torch
import torch.nn.functional as F

import kiln
from kiln.engine import LLM, SamplingParams
from kiln.generation import GenerationConfig, generate
from kiln.tokenizer import Tokenizer

PROMPTS = ["def main():", "import os\n", "x = [1, 2, 3]", "class Point:"]


@pytest.fixture(scope="module")
def llm(text_model_dir):
    return LLM(text_model_dir, block_size=8, verbose=False)


def test_greedy_text_matches_the_reference_generator(llm, text_model_dir):
    tokenizer = Tokenizer.from_dir(text_model_dir)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12))
    reference = generate(
        kiln.load_model(text_model_dir),
        [tokenizer.encode(p) for p in PROMPTS],
        GenerationConfig(max_new_tokens=12, stop_token_ids=tuple(tokenizer.eos_token_ids)),
    )
    for output, prompt, expected in zip(outputs, PROMPTS, reference, strict=True):
        assert output.prompt == prompt and output.prompt_token_ids == tokenizer.encode(prompt)
        assert output.outputs[0].token_ids == expected
        assert output.outputs[0].text == tokenizer.decode(expected)


def test_chat_goes_through_the_template(llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    params = SamplingParams(temperature=0, max_tokens=6)
    (answer,) = llm.chat(messages, params)
    ids = llm.tokenizer.apply_chat_template(messages, tokenize=True)
    assert answer.prompt_token_ids == ids
    assert answer.outputs[0].token_ids == llm.generate([ids], params)[0].outputs[0].token_ids
    assert len(llm.chat([messages, messages[1:]], params)) == 2


def test_stop_token_ids_finish_and_stay_in_token_ids(llm):
    free = llm.generate("x = ", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    stop_id = free.token_ids[3]
    out = llm.generate("x = ", SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_id]))[0]
    completion = out.outputs[0]
    cut = free.token_ids.index(stop_id) + 1
    assert completion.token_ids == free.token_ids[:cut]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop_id)
    assert completion.text == llm.tokenizer.decode(free.token_ids[: cut - 1])
    assert free.finish_reason == "length"


def test_min_tokens_and_max_model_len(text_model_dir):
    llm = LLM(text_model_dir, max_model_len=20, verbose=False)
    eos = llm.tokenizer.eos_token_id
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=None, stop_token_ids=[eos]))[0]
    assert len(out.outputs[0].token_ids) <= 17
    forced = llm.generate(
        [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=None, min_tokens=16, ignore_eos=True)
    )
    assert len(forced[0].outputs[0].token_ids) == 17 and forced[0].outputs[0].finish_reason == "length"
    with pytest.raises(ValueError, match="the prompt has 20 tokens, but max_model_len is 20"):
        llm.generate([list(range(3, 23))])


def test_outputs_carry_timings(llm):
    metrics = llm.generate("import os", SamplingParams(max_tokens=4))[0].metrics
    assert (
        metrics.arrival_time
        <= metrics.first_scheduled_time
        <= metrics.first_token_time
        <= metrics.finished_time
    )
    assert metrics.time_to_first_token >= 0 and metrics.latency >= metrics.time_to_first_token


def test_embeddings_are_normalised_mean_pooled_hidden_states(llm):
    texts = ["def main():", "a much longer line of text, to pad the batch", "x"]
    embeddings = llm.embed(texts)
    assert embeddings.shape == (3, llm.engine.model.config.hidden_size)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(3))
    with torch.no_grad():
        for text, embedding in zip(texts, embeddings, strict=True):
            ids = torch.tensor([llm.tokenizer.encode(text)])
            expected = F.normalize(llm.engine.model.hidden_states(ids)[0].mean(0), dim=-1)
            assert (expected - embedding).abs().max() < 1e-5
    assert torch.allclose(llm.embed(texts[1]), embeddings[1:2], atol=1e-5)


def test_startup_report_and_kv_sizing(text_model_dir, capsys):
    llm = LLM(text_model_dir, kv_cache_memory="1MB", max_model_len=512, block_size=16)
    engine = llm.engine
    per_token = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads, head_dim 16, fp32
    assert engine.kv_capacity_tokens == 10**6 // (per_token * 16) * 16
    printed = capsys.readouterr().err
    assert f"KV cache: {engine.kv_capacity_tokens:,} tokens" in printed.replace("\n", " ")
    assert f"max concurrency at 512 tokens: {engine.kv_capacity_tokens / 512:.2f}x" in printed.replace(
        "\n", " "
    )


def test_refuses_a_kv_cache_that_cannot_hold_one_sequence(text_model_dir):
    with pytest.raises(
        ValueError, match=r"raise kv_cache_memory to at least .*MiB or lower max_model_len to 64"
    ):
        LLM(text_model_dir, num_kv_blocks=4, block_size=16, max_model_len=1024, verbose=False)
    with pytest.raises(ValueError, match="kv_cache_memory"):
        LLM(text_model_dir, kv_cache_memory="1KB", verbose=False)


@pytest.mark.parametrize(
    "prompts, message",
    [
        ([[]], "the prompt is empty"),
        ([[5000]], r"token ids must be in \[0, 400\)"),
        ([], "no prompts given"),
    ],
)
def test_bad_prompts(llm, prompts, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(prompts)


def test_models_without_a_tokenizer_take_token_ids(hf_model_dir):
    llm = LLM(hf_model_dir("gpt2-heads3-tied"), verbose=False)
    assert llm.generate([[5, 6]], SamplingParams(max_tokens=3))[0].outputs[0].text == ""
    with pytest.raises(ValueError, match="prompts must be token ids"):
        llm.generate("hello")
    with pytest.raises(ValueError, match="got 1 SamplingParams for 2 prompts"):
        llm.generate([[5], [6]], [SamplingParams()])


def test_a_config_and_overrides_of_its_fields(text_model_dir):
    from kiln.engine import EngineConfig

    config = EngineConfig(block_size=8, max_model_len=64, seed=3)
    llm = LLM(text_model_dir, config, max_model_len=32, verbose=False)
    assert (llm.engine.config.block_size, llm.engine.config.max_model_len) == (8, 32)
    assert llm.engine.max_model_len == 32 and llm.engine.config.seed == 3
    assert config.max_model_len == 64  # the caller's config is not changed


def test_unknown_engine_options_are_refused_with_the_valid_ones(text_model_dir):
    with pytest.raises(
        kiln.KilnError, match=r"unknown engine option\(s\) blok_size; the options are: .*block_size"
    ):
        LLM(text_model_dir, blok_size=4, verbose=False)
