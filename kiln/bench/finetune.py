"""`kiln bench finetune`: adapters on a base model, measured.

- step: a LoRA (or prompt-tuning) training step against full finetuning of the same model: tokens/s
  (steps interleaved in one process) and peak memory (each method alone in a fresh process: peak RSS,
  and the gradient + AdamW state of its trainable parameters).
- learning: the learning curve of LoRA and prompt tuning on a synthetic task (reverse three letters,
  `do: a c b` -> `b c a`, train and held-out words disjoint): held-out task loss every few steps and
  exact match before and after.
- serve: one engine serving two LoRAs, a prompt-tuning adapter and the base in mixed batches, against
  serving the same requests one model at a time (merged copies for the LoRAs).
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import random
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

LETTERS = "abcdefgh"


def _reverse_examples(seed: int = 0, num_train: int = 400) -> tuple[list[dict], list[dict]]:
    def chat(word: str) -> dict:
        answer = " ".join(reversed(word.split()))
        return {
            "messages": [{"role": "user", "content": f"do: {word}"}, {"role": "assistant", "content": answer}]
        }

    words = [" ".join(w) for w in itertools.product(LETTERS, repeat=3)]
    random.Random(seed).shuffle(words)
    return [chat(w) for w in words[:num_train]], [chat(w) for w in words[num_train:]]


def _prepare(examples: list[dict], folder: Path, base: str) -> Path:
    from kiln.data.sft import prepare_sft

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "examples.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    prepare_sft([path], folder / "data", base, val_fraction=0.0)
    return folder / "data"


# ------------------------------------------------------------------------------------------ step


@dataclass
class StepResult:
    method: str
    trainable_parameters: int
    total_parameters: int
    batch_size: int
    seq_len: int
    median_step_ms: float
    tokens_per_second: float
    peak_rss_mib: float  # the process's peak resident memory
    rss_after_load_mib: float  # after loading the model, before the first step
    train_state_mib: float  # gradients + AdamW moments of the trainable parameters (fp32)


def _trainer(base: str, method: str, batch_size: int, seq_len: int):
    from kiln.bench.train import _FixedBatch
    from kiln.train.finetune import FinetuneConfig, adapted_model, finetune_train_config
    from kiln.train.trainer import Trainer

    train = finetune_train_config(base, "-", tempfile.mkdtemp(), batch_size=batch_size, seq_len=seq_len)
    model = adapted_model(FinetuneConfig(base=base, method=method, train=train))
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, train.model.vocab_size, (batch_size, seq_len + 1), generator=generator)
    data = _FixedBatch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    return Trainer(train, train_data=data, model=model)


def _memory_worker(base: str, method: str, batch_size: int, seq_len: int, queue) -> None:
    """Peak RSS of a process that loads the base and runs three steps of `method`, and nothing else."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainer = _trainer(base, method, batch_size, seq_len)
    after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for _ in range(3):
        trainer.train_step()
    queue.put((rss, after_load, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def bench_step(
    base: str, methods=("full", "lora", "prompt"), batch_size=8, seq_len=256, steps=10
) -> list[StepResult]:
    """Step times with the methods' steps interleaved in one process (full, lora, prompt, full, ...: a
    shared machine's drift hits all alike; medians reported); peak memory of each in a fresh process."""
    from kiln.finetune import count_trainable_parameters

    # Memory first, from a parent that holds no model yet (a child's peak RSS starts at its parent's).
    context = multiprocessing.get_context("spawn")
    memory = {}
    for method in methods:
        queue = context.Queue()
        process = context.Process(target=_memory_worker, args=(base, method, batch_size, seq_len, queue))
        process.start()
        memory[method] = queue.get()[1:]
        process.join()
    trainers = {method: _trainer(base, method, batch_size, seq_len) for method in methods}
    times: dict[str, list[float]] = {method: [] for method in methods}
    for step in range(steps + 2):
        for method, trainer in trainers.items():
            start = time.perf_counter()
            trainer.train_step()
            if step >= 2:  # two warm-up steps
                times[method].append(time.perf_counter() - start)
    results = []
    for method, trainer in trainers.items():
        after_load, peak = memory[method]
        trainable, total = count_trainable_parameters(trainer.model)
        median = statistics.median(times[method])
        results.append(
            StepResult(
                method=method,
                trainable_parameters=trainable,
                total_parameters=total,
                batch_size=batch_size,
                seq_len=seq_len,
                median_step_ms=median * 1e3,
                tokens_per_second=batch_size * seq_len / median,
                peak_rss_mib=peak,
                rss_after_load_mib=after_load,
                train_state_mib=trainable * 4 * 3 / 2**20,
            )
        )
    return results


# -------------------------------------------------------------------------------------- learning


@dataclass
class LearningCurve:
    method: str
    trainable_parameters: int
    steps: list[int] = field(default_factory=list)
    held_out_loss: list[float] = field(default_factory=list)
    base_exact_match: float = 0.0
    exact_match: float = 0.0
    loss_cut: float = 0.0  # 1 - final / initial held-out loss
    seconds: float = 0.0
    lr: float = 0.0
    num_virtual_tokens: int = 0  # prompt tuning
    init_text: str | None = None  # prompt tuning (None: random vocabulary embeddings)
    samples: list[str] = field(default_factory=list)  # the first held-out greedy replies, "word -> reply"


def bench_learning(
    base: str,
    method: str,
    steps: int = 200,
    eval_every: int = 25,
    lr: float | None = None,
    held_out: int = 60,
    num_virtual_tokens: int = 20,
    init_text: str | None = "reverse the letters",
) -> LearningCurve:
    """Finetune `method` on the reverse task: held-out loss every `eval_every` steps, exact match at the
    start and the end."""
    from kiln.data.sft import SFTLoader
    from kiln.finetune import LoraConfig, PromptTuningConfig, count_trainable_parameters
    from kiln.finetune.evaluation import exact_match, task_loss
    from kiln.models.hf.io import load_model
    from kiln.tokenizer import Tokenizer
    from kiln.train.finetune import FinetuneConfig, FinetuneTrainer, finetune_train_config

    train_examples, test_examples = _reverse_examples()
    test_examples = test_examples[:held_out]
    folder = Path(tempfile.mkdtemp(prefix="kiln-bench-finetune-"))
    data = _prepare(train_examples, folder / "train", base)
    held = SFTLoader(_prepare(test_examples, folder / "held", base), seq_len=64, batch_size=1)
    held_batches = [held.collate(held.examples)]
    tokenizer = Tokenizer.from_dir(base)
    lr = lr or {"lora": 3e-3, "prompt": 3e-2, "full": 3e-4}[method]
    train = finetune_train_config(
        base, str(data), str(folder / method), max_steps=steps, lr=lr, batch_size=16
    )
    config = FinetuneConfig(
        base=base,
        method=method,
        lora=LoraConfig(rank=8, alpha=16, targets="q,v"),
        prompt=PromptTuningConfig(num_virtual_tokens=num_virtual_tokens, init_text=init_text),
        train=train,
    )
    trainer = FinetuneTrainer(config)
    model = trainer.model
    curve = LearningCurve(
        method=method,
        trainable_parameters=count_trainable_parameters(model)[0],
        lr=lr,
        num_virtual_tokens=num_virtual_tokens if method == "prompt" else 0,
        init_text=init_text if method == "prompt" else None,
    )
    curve.base_exact_match = exact_match(load_model(base), tokenizer, test_examples)
    start = time.perf_counter()
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            curve.steps.append(step)
            curve.held_out_loss.append(task_loss(model, held_batches))
        if step < steps:
            trainer.train_step()
    curve.seconds = time.perf_counter() - start
    curve.exact_match = exact_match(model, tokenizer, test_examples)
    curve.samples = _samples(model, tokenizer, test_examples[:4])
    curve.loss_cut = 1 - curve.held_out_loss[-1] / curve.held_out_loss[0]
    trainer.export(folder / f"{method}-adapter")
    return curve


def _samples(model, tokenizer, examples: list[dict]) -> list[str]:
    """'question -> greedy reply' of a few held-out examples (what a wrong exact match looks like)."""
    from kiln.finetune.evaluation import greedy_completions

    model.eval()
    prompts = [
        tokenizer.apply_chat_template(e["messages"][:-1], add_generation_prompt=True, tokenize=True)
        for e in examples
    ]
    replies = greedy_completions(model, prompts, set(tokenizer.eos_token_ids), max_new_tokens=8)
    model.train()
    return [
        f"{e['messages'][0]['content']} -> {tokenizer.decode(r, skip_special_tokens=False)!r}"
        for e, r in zip(examples, replies, strict=True)
    ]


# ----------------------------------------------------------------------------------------- serve


@dataclass
class ServeResult:
    num_requests: int
    max_tokens: int
    adapters: list[str]
    mixed_seconds: float  # one engine, every request at once
    one_at_a_time_seconds: float  # one model (merged copy / single adapter / base) at a time, its requests
    mixed_tokens_per_second: float
    one_at_a_time_tokens_per_second: float
    speedup: float
    outputs_equal: bool


def _random_adapters(base: str, folder: Path) -> dict[str, Path]:
    from kiln.finetune import LoraConfig, PromptTuningConfig, apply_lora, apply_prompt_tuning, save_adapter
    from kiln.models.hf.io import load_model

    adapters = {}
    for name, targets, seed in (("lora-qv", "q,v", 1), ("lora-mlp", "gate,up,down", 2)):
        model = load_model(base)
        apply_lora(model, LoraConfig(rank=8, alpha=16, targets=targets))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        adapters[name] = save_adapter(model, folder / name, base_model=base)
    prompt = apply_prompt_tuning(load_model(base), PromptTuningConfig(num_virtual_tokens=20), seed=3)
    adapters["prompt"] = save_adapter(prompt, folder / "prompt", base_model=base)
    return adapters


def bench_serve(base: str, num_requests: int = 24, max_tokens: int = 32) -> ServeResult:
    from kiln.engine import LLM, SamplingParams
    from kiln.train.finetune import merge_adapter

    folder = Path(tempfile.mkdtemp(prefix="kiln-bench-adapters-"))
    adapters = _random_adapters(base, folder)
    names = [None, *adapters]
    _, test_examples = _reverse_examples()
    conversations = [e["messages"][:1] for e in test_examples[:num_requests]]
    params = [
        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, adapter=names[i % len(names)])
        for i in range(num_requests)
    ]
    mixed = LLM(base, adapters=adapters, verbose=False)
    mixed.chat(conversations[:2], params[:2])  # warm-up
    start = time.perf_counter()
    mixed_outputs = mixed.chat(conversations, params)
    mixed_seconds = time.perf_counter() - start
    del mixed
    separate_seconds, separate_outputs = 0.0, {}
    for name in names:
        rows = [i for i in range(num_requests) if params[i].adapter == name]
        if name is None:
            llm, own = LLM(base, verbose=False), [params[i] for i in rows]
        elif name.startswith("lora"):
            merged = merge_adapter(adapters[name], folder / f"{name}-merged", base)
            llm = LLM(merged, verbose=False)
            own = [SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True) for _ in rows]
        else:
            llm, own = LLM(base, adapters={name: adapters[name]}, verbose=False), [params[i] for i in rows]
        llm.chat(conversations[:1], own[:1])  # warm-up
        start = time.perf_counter()
        outputs = llm.chat([conversations[i] for i in rows], own)
        separate_seconds += time.perf_counter() - start
        separate_outputs.update({i: o.outputs[0].token_ids for i, o in zip(rows, outputs, strict=True)})
    # LoRA merged into bf16/fp32 weights rounds differently from the unmerged update: compare greedy tokens.
    equal = all(mixed_outputs[i].outputs[0].token_ids == separate_outputs[i] for i in range(num_requests))
    total_tokens = num_requests * max_tokens
    return ServeResult(
        num_requests=num_requests,
        max_tokens=max_tokens,
        adapters=list(adapters),
        mixed_seconds=mixed_seconds,
        one_at_a_time_seconds=separate_seconds,
        mixed_tokens_per_second=total_tokens / mixed_seconds,
        one_at_a_time_tokens_per_second=total_tokens / separate_seconds,
        speedup=separate_seconds / mixed_seconds,
        outputs_equal=equal,
    )
