"""Measure a pipeline schedule's bubble under torchrun: each rank's share of a schedule step (the
micro-batches' forwards and backwards, not the optimizer) spent outside its stages' forward and
backward computation (waiting for its neighbours, and the sends themselves).

    torchrun --nproc-per-node 2 tests/train/pipeline_bubble_worker.py OUT_PREFIX '{"pp": 2, ...}'

writes {"rank", "busy_s", "step_s", "bubble"} to OUT_PREFIX.rank<N>, over `steps` timed steps after two
warm-up steps; compare with kiln.train.plan.bubble_fraction.
"""

import json
import sys
import time
from pathlib import Path

from torch.distributed.pipelining import PipelineStage

import kiln
from kiln.train.config import TrainConfig
from kiln.train.pipeline import Pipeline
from kiln.train.trainer import Trainer
from tests.train.memory_worker import RandomTokens

BUSY, SCHEDULE = [0.0], [0.0]


def timed(method, total):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - start

    return wrapper


def main() -> None:
    out_prefix, overrides = sys.argv[1], json.loads(sys.argv[2])
    steps = overrides.pop("steps", 5)
    PipelineStage.forward_one_chunk = timed(PipelineStage.forward_one_chunk, BUSY)
    PipelineStage.backward_one_chunk = timed(PipelineStage.backward_one_chunk, BUSY)
    Pipeline.run = timed(Pipeline.run, SCHEDULE)
    base = TrainConfig(
        model=kiln.preset("tiny"),
        data_dir="-",
        out_dir=str(Path(out_prefix).parent),
        max_steps=100,
        eval_every=0,
        checkpoint_every=0,
        export=False,
        precision="fp32",
        device="cpu",
    )
    config = base.override([f"{key}={value}" for key, value in overrides.items()])
    trainer = Trainer(
        config, train_data=RandomTokens(config.model.vocab_size, config.seq_len, config.batch_size)
    )
    for _ in range(2):
        trainer.train_step()
    BUSY[0] = SCHEDULE[0] = 0.0
    for _ in range(steps):
        trainer.train_step()
    step_s, busy_s = SCHEDULE[0] / steps, BUSY[0] / steps
    rank = trainer.distributed.rank
    record = {"rank": rank, "busy_s": busy_s, "step_s": step_s, "bubble": 1 - busy_s / step_s}
    Path(f"{out_prefix}.rank{trainer.distributed.rank}").write_text(json.dumps(record))
    trainer.distributed.close()


if __name__ == "__main__":
    main()
