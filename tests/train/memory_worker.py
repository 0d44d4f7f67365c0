"""Measure a training run's peak memory per rank; run directly or under torchrun:

    python tests/train/memory_worker.py OUT_PREFIX '{"model.hidden_size": 512, "dp_shard": 2, ...}'

writes {"rank", "rss_peak_delta_bytes"} to OUT_PREFIX.rank<N>: the growth of the resident set from just
before the Trainer is built to its peak over a few steps (Linux: VmHWM after resetting it through
/proc/self/clear_refs). Run it with MALLOC_MMAP_THRESHOLD_ set low, so that freed tensors go back to the
system instead of staying in glibc's heap and the peak reflects what was alive at once.
"""

import dataclasses
import gc
import json
import sys
from pathlib import Path

import torch

import kiln
from kiln.train.config import TrainConfig
from kiln.train.trainer import Trainer


class RandomTokens:
    def __init__(self, vocab_size: int, seq_len: int, batch_size: int):
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size

    def batch(self, step: int):
        generator = torch.Generator().manual_seed(step)
        rows = torch.randint(0, self.vocab_size, (self.batch_size, self.seq_len + 1), generator=generator)
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def run(config: TrainConfig, steps: int) -> Trainer:
    trainer = Trainer(
        config, train_data=RandomTokens(config.model.vocab_size, config.seq_len, config.batch_size)
    )
    for _ in range(steps):
        trainer.train_step()
    return trainer


def main() -> None:
    out_prefix, overrides = sys.argv[1], json.loads(sys.argv[2])
    base = TrainConfig(
        model=kiln.preset("tiny"),
        data_dir="-",
        out_dir=str(Path(out_prefix).parent),
        max_steps=100,
        seq_len=64,
        batch_size=2,
        eval_every=0,
        checkpoint_every=0,
        export=False,
        precision="fp32",
        device="cpu",
    )
    config = base.override([f"{key}={value}" for key, value in overrides.items()])
    # A throwaway run of the tiny model under the same layout first: it faults in the code pages of every
    # kernel a step uses (libtorch's count towards RSS once touched), which the measured run would else pay.
    warm = dataclasses.replace(
        config, model=base.model.replace(tie_word_embeddings=config.model.tie_word_embeddings)
    )
    del_trainer = run(warm, 2)
    del del_trainer
    gc.collect()
    before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak) to the current RSS
    trainer = run(config, 3)
    record = {"rank": trainer.distributed.rank, "rss_peak_delta_bytes": (status_kib("VmHWM") - before) * 1024}
    Path(f"{out_prefix}.rank{trainer.distributed.rank}").write_text(json.dumps(record))
    trainer.distributed.close()


if __name__ == "__main__":
    main()
