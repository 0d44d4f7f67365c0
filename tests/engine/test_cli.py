"""`kiln chat` (a streaming REPL with history) and `kiln generate`, both on the engine."""

from typer.testing import CliRunner

from kiln.cli import app
from kiln.engine import LLM, SamplingParams

runner = CliRunner()


def test_chat_streams_replies_and_keeps_the_history(text_model_dir):
    args = [
        "chat",
        "-m",
        str(text_model_dir),
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
        "--system",
        "Be brief.",
    ]
    result = runner.invoke(app, args, input="hello\n\n/reset\nhello\nand then?\n/exit\nnever read\n")
    assert result.exit_code == 0, result.output
    llm = LLM(text_model_dir, verbose=False)
    params = SamplingParams(temperature=0, max_tokens=8)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    first = llm.chat(history, params)[0].outputs[0].text
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "and then?"}]
    second = llm.chat(history, params)[0].outputs[0].text
    assert result.stdout.count(first + "\n") >= 2 and second + "\n" in result.stdout
    assert "max concurrency" in result.stderr


def test_chat_ends_on_end_of_input_and_needs_a_template(text_model_dir, hf_model_dir):
    result = runner.invoke(app, ["chat", "-m", str(text_model_dir), "--max-new-tokens", "2"], input="hi\n")
    assert result.exit_code == 0, result.output
    missing = runner.invoke(app, ["chat", "-m", str(hf_model_dir("gpt2-heads3-tied"))], input="hi\n")
    assert missing.exit_code != 0 and "no chat template" in str(missing.exception)


def test_generate_batch_with_stop_strings(text_model_dir):
    base = ["generate", "-m", str(text_model_dir), "-p", "import os", "-p", "x = 1", "--max-new-tokens", "12"]
    free = runner.invoke(app, base)
    assert free.exit_code == 0, free.output
    stopped = runner.invoke(app, [*base, "--stop", "e", "--min-p", "0.05", "--repetition-penalty", "1.2"])
    assert stopped.exit_code == 0, stopped.output
    assert "import os" in stopped.stdout and "x = 1" in stopped.stdout


def test_help(text_model_dir):
    for verb in ("chat", "generate"):
        result = runner.invoke(app, [verb, "--help"])
        assert result.exit_code == 0 and "--kv-cache-memory" in result.output


def test_engine_flags_are_shared_and_mapped_once(text_model_dir):
    from kiln.engine.options import engine_config_from_flags

    for verb in (["generate"], ["chat"], ["serve"], ["bench", "generate"]):
        result = runner.invoke(app, [*verb, "--help"], terminal_width=200)
        assert result.exit_code == 0, result.output
        assert "--kernels" in result.output and "--kv-cache-memory" in result.output, verb
    # Parameters that are no engine flag (generate's sampling `seed`, `temperature`) are ignored.
    flags = dict(prefix_caching=False, kernels="torch", engine_seed=5, seed=9, temperature=0.5)
    config = engine_config_from_flags(flags, max_num_seqs=3)
    assert (config.enable_prefix_caching, config.kernels, config.seed) == (False, "torch", 5)
    assert config.max_num_seqs == 3
    bad = runner.invoke(app, ["generate", "-m", str(text_model_dir), "-p", "x", "--kernels", "cuda"])
    assert bad.exit_code != 0 and "kernels must be one of torch, triton, auto" in str(bad.exception)
