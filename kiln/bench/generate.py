"""`kiln bench generate`: offline batch generation throughput of `kiln.LLM` (paged KV cache, continuous
batching) against transformers' `generate` on the same weights and prompts (one left-padded batch, its
default dynamic KV cache), and against kiln's own reference generator, in one process.

All sides decode greedily for a fixed number of new tokens (EOS ignored), so they produce the same
amount of work; the result also counts how many outputs are token-identical across them.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.bench.timing import best_of
from kiln.config import ModelConfig
from kiln.engine.config import EngineConfig


@dataclass
class GenerateBenchResult:
    model: str
    parameters: int
    num_prompts: int
    prompt_tokens: str
    new_tokens: int
    kiln_seconds: float
    peer_seconds: float
    reference_seconds: float
    kiln_tokens_per_second: float
    peer_tokens_per_second: float
    reference_tokens_per_second: float
    speedup_vs_peer: float
    identical_to_peer: int
    device: str
    threads: int
    transformers_version: str


def peer_generate(
    peer, prompts: list[list[int]], new_tokens: int, batch_size: int | None = None
) -> list[list[int]]:
    """transformers' greedy `generate` of exactly `new_tokens` per prompt, in left-padded batches of
    `batch_size` (None: one batch of all); the new tokens of each prompt."""
    from kiln.generation import left_pad

    batch_size = batch_size or len(prompts)
    outputs = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start : start + batch_size])
        out = peer.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        outputs += out[:, ids.shape[1] :].tolist()
    return outputs


@torch.no_grad()
def bench_generate(
    model: ModelConfig,
    *,
    name: str = "demo",
    num_prompts: int = 32,
    min_prompt: int = 8,
    max_prompt: int = 256,
    new_tokens: int = 64,
    repeats: int = 2,
    engine_config: EngineConfig | None = None,
) -> GenerateBenchResult:
    """`engine_config` sets kiln's engine (kernels, block size, token budget, ...); it runs all prompts
    at once (max_num_seqs = num_prompts) in float32, as the peer does."""
    import transformers

    from kiln.engine import LLM, SamplingParams
    from kiln.generation import GenerationConfig, generate
    from kiln.models.hf.io import load_model, save_model
    from kiln.models.transformer import Transformer

    directory = Path(tempfile.mkdtemp(prefix="kiln-bench-generate-"))
    torch.manual_seed(0)
    save_model(Transformer(model.replace(eos_token_id=None)), directory)
    rng = random.Random(0)
    lengths = [rng.randint(min_prompt, max_prompt) for _ in range(num_prompts)]
    prompts = [[rng.randrange(3, model.vocab_size) for _ in range(n)] for n in lengths]

    engine_config = (engine_config or EngineConfig()).replace(max_num_seqs=num_prompts, dtype="float32")
    llm = LLM(directory, engine_config, verbose=False)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    peer = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    reference_model = load_model(directory, dtype="float32")
    llm.generate(prompts[:2], params)  # warm-up
    kiln_s, outputs = best_of(repeats, lambda: llm.generate(prompts, params))
    peer_s, peer_out = best_of(repeats, lambda: peer_generate(peer, prompts, new_tokens))
    config = GenerationConfig(max_new_tokens=new_tokens)
    reference_s, _ = best_of(repeats, lambda: generate(reference_model, prompts, config))
    total = num_prompts * new_tokens
    identical = sum(o.outputs[0].token_ids == p for o, p in zip(outputs, peer_out, strict=True))
    return GenerateBenchResult(
        model=name,
        parameters=reference_model.num_parameters(),
        num_prompts=num_prompts,
        prompt_tokens=f"{min_prompt}-{max_prompt}",
        new_tokens=new_tokens,
        kiln_seconds=kiln_s,
        peer_seconds=peer_s,
        reference_seconds=reference_s,
        kiln_tokens_per_second=total / kiln_s,
        peer_tokens_per_second=total / peer_s,
        reference_tokens_per_second=total / reference_s,
        speedup_vs_peer=peer_s / kiln_s,
        identical_to_peer=identical,
        device="cpu",
        threads=torch.get_num_threads(),
        transformers_version=transformers.__version__,
    )
