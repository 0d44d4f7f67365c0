"""`kiln generate` and `kiln chat`: the engine from the command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from kiln.engine.options import (
    DEFAULT,
    Device,
    Dtype,
    Kernels,
    KVCacheDtype,
    KVCacheMemory,
    LokiRank,
    LokiTopK,
    MaxModelLen,
    ModelDir,
    Quantization,
    Threads,
    engine_config_from_flags,
)

if TYPE_CHECKING:
    from kiln.engine.config import EngineConfig
    from kiln.engine.llm import LLM
    from kiln.engine.sampling_params import SamplingParams

Temperature = Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")]
TopK = Annotated[int, typer.Option(help="Keep only the k most likely tokens (0 = off).")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")]
MinP = Annotated[float, typer.Option(help="Drop tokens below min-p times the top probability (0 = off).")]
RepetitionPenalty = Annotated[float, typer.Option(help="Discourage repeating tokens (1 = off).")]
Seed = Annotated[int | None, typer.Option(help="Random seed for reproducible sampling.")]
Stop = Annotated[list[str] | None, typer.Option("--stop", help="Stop string; repeat for several.")]

console = Console(highlight=False)


def _sampling_params(flags: dict[str, Any], **fields: Any) -> SamplingParams:
    """The SamplingParams of generate's and chat's sampling flags (`flags`: the command's parameters)."""
    from kiln.engine.sampling_params import SamplingParams

    names = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
    return SamplingParams(
        max_tokens=flags["max_new_tokens"], **{name: flags[name] for name in names}, **fields
    )


def _load(model: Path, config: EngineConfig) -> LLM:
    from kiln.engine.llm import LLM

    return LLM(model, config)


def generate_command(
    model: ModelDir,
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt text; repeat for a batch.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 64,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    seed: Seed = None,
    stop: Stop = None,
    chat: Annotated[
        bool, typer.Option(help="Wrap each prompt as a user message in the chat template.")
    ] = False,
    stream: Annotated[bool, typer.Option(help="Print tokens as they are generated (single prompt).")] = True,
    dtype: Dtype = DEFAULT.dtype,
    device: Device = DEFAULT.device,
    max_model_len: MaxModelLen = DEFAULT.max_model_len,
    kv_cache_memory: KVCacheMemory = DEFAULT.kv_cache_memory,
    kernels: Kernels = DEFAULT.kernels,
    threads: Threads = DEFAULT.num_threads,
    quantization: Quantization = DEFAULT.quantization,
    kv_cache_dtype: KVCacheDtype = DEFAULT.kv_cache_dtype,
    loki_top_k: LokiTopK = DEFAULT.loki_top_k,
    loki_rank: LokiRank = DEFAULT.loki_rank,
) -> None:
    """Generate text for one or more prompts with the engine (greedy or sampled, batched together)."""
    flags = dict(locals())  # the parameters, before any other local exists
    from kiln.errors import KilnError

    # The KV cache is sized for this many full-length sequences at most.
    llm = _load(model, engine_config_from_flags(flags, max_num_seqs=len(prompt)))
    params = _sampling_params(flags, stop=stop or ())
    if llm.tokenizer is None:
        raise KilnError(f"{model} has no tokenizer.json; kiln generate needs one to read text prompts")
    inputs: list = list(prompt)
    if chat:
        inputs = [
            llm.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True) for p in prompt
        ]
    if stream and len(prompt) == 1:
        console.print(prompt[0], end="", style="bold", markup=False)
        for delta in llm.stream(inputs[0], params):
            sys.stdout.write(delta.outputs[0].text if delta.outputs else "")
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    for text, output in zip(prompt, llm.generate(inputs, params), strict=True):
        console.print(text, end="", style="bold", markup=False)
        console.print(output.outputs[0].text, markup=False)
        console.rule()


def chat_command(
    model: ModelDir,
    system: Annotated[str | None, typer.Option(help="System prompt that opens the conversation.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest reply in tokens.")] = 512,
    temperature: Temperature = 0.7,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    seed: Seed = None,
    dtype: Dtype = DEFAULT.dtype,
    device: Device = DEFAULT.device,
    max_model_len: MaxModelLen = DEFAULT.max_model_len,
    kv_cache_memory: KVCacheMemory = DEFAULT.kv_cache_memory,
    kernels: Kernels = DEFAULT.kernels,
    threads: Threads = DEFAULT.num_threads,
    quantization: Quantization = DEFAULT.quantization,
    kv_cache_dtype: KVCacheDtype = DEFAULT.kv_cache_dtype,
    loki_top_k: LokiTopK = DEFAULT.loki_top_k,
    loki_rank: LokiRank = DEFAULT.loki_rank,
) -> None:
    """Chat with a model in the terminal: replies stream as they are generated, the history is kept.

    Type /reset to start over and /exit (or Ctrl-D) to quit; Ctrl-C stops a reply.
    """
    flags = dict(locals())  # the parameters, before any other local exists
    from kiln.errors import KilnError

    # One conversation: the KV cache is sized for one full-length sequence at most.
    llm = _load(model, engine_config_from_flags(flags, max_num_seqs=1))
    if llm.tokenizer is None or llm.tokenizer.chat_template is None:
        raise KilnError(f"{model} has no chat template (or no tokenizer); use kiln generate instead")
    params = _sampling_params(flags)
    opening = [{"role": "system", "content": system}] if system else []
    history = list(opening)
    console.print("[dim]/reset starts over, /exit or Ctrl-D quits, Ctrl-C stops a reply[/]")
    while (line := _read_line()) is not None:
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = list(opening)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            reply = _stream_reply(llm, history, params)
        except KilnError as error:  # most likely the conversation outgrew the context
            console.print(f"[red]error:[/] {error}; /reset starts a new conversation", markup=True)
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})


def _read_line() -> str | None:
    try:
        return console.input("[bold green]> [/]")
    except EOFError:
        return None


def _stream_reply(llm: LLM, history: list[dict[str, str]], params) -> str:
    parts: list[str] = []
    try:
        for delta in llm.chat_stream(history, params):
            for completion in delta.outputs:
                parts.append(completion.text)
                sys.stdout.write(completion.text)
                sys.stdout.flush()
    except KeyboardInterrupt:  # stop this reply, keep the conversation
        pass
    sys.stdout.write("\n")
    return "".join(parts)
