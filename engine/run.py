"""A run's lifecycle: its folder and files, where it starts (from scratch, or resumed from its newest checkpoint),
and what happens after every update (log, evaluate, checkpoint, stop a run whose updates keep failing).

A run is a sequence of stages (train.py's table); its position is (stage, step within the stage), and every piece of
its data is a function of that position (the tasks a step plays, its key, an epoch's shuffle), so a resumed run
replays exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import grpo
import model as lm
import multihost
from engine import checkpoints, estimates, evaluate, logs
from engine.settings import Args
from engine.setup import Setup

MAX_SKIPPED_IN_A_ROW = 3  # one non-finite update is skipped (grpo.skip_if_not_finite); this many in a row stop the run


class DataError(Exception):
    """A stage's own data cannot train it (e.g. too few valid transitions), found after the run folder is written:
    printed as one message; exit status 2."""


@dataclasses.dataclass
class Run:
    """What every stage of a run shares: its settings and pieces (Setup), its folder, key, evaluation, logger and
    checkpoints, and where it is."""

    setup: Setup
    out: Path
    key: jax.Array
    evaluator: evaluate.Evaluator
    logger: logs.Logger
    checkpoints: checkpoints.Checkpoints
    global_step: int = 0
    stage_lengths: dict = dataclasses.field(default_factory=dict)
    skipped_in_a_row: int = 0
    """updates skipped in a row for a loss or gradient that was not finite (metric skipped)"""

    @property
    def args(self) -> Args:
        return self.setup.args

    @property
    def config(self) -> lm.Config:
        return self.setup.config

    @property
    def mesh(self):
        return self.setup.mesh

    @property
    def game(self):
        return self.setup.game

    @property
    def tokenizer(self):
        return self.setup.tokenizer

    @property
    def pad_id(self) -> int:
        return self.setup.pad_id

    @functools.cached_property
    def peak_flops(self) -> float:
        """FLOP/s of the mesh's devices at their measured matmul peak in the compute dtype (estimates.matmul_peak)."""
        return estimates.matmul_peak(self.args.compute_dtype) * self.mesh.size

    def step_key(self, stage: int, step: int) -> jax.Array:
        """The key of a stage's step: a function of the position, so a resumed run draws the same numbers."""
        return jax.random.fold_in(jax.random.fold_in(self.key, stage), step)

    def data_key(self, stage: int) -> jax.Array:
        """The key of a stage's data collection, apart from its step keys."""
        return jax.random.fold_in(jax.random.fold_in(self.key, stage), 2**31 - 1)

    def key_data(self) -> jax.Array:
        """The run's key as checkpointed: replicated over the mesh, a global array that every process saves (from
        numpy: sharding.place says why)."""
        return jax.device_put(np.asarray(jax.random.key_data(self.key)), NamedSharding(self.mesh, PartitionSpec()))

    def evaluate(self, params, stage: str) -> dict:
        metrics = self.evaluator(params, jax.random.key(evaluate.EVAL_SEED))  # one key for every evaluation: less noise
        self.logger.log(self.global_step, stage, metrics, prefix="eval")
        return metrics

    def set_length(self, stage: int, steps: int) -> None:
        """A stage's length, once known (a data stage's depends on its data), and the progress bar's total with it."""
        self.stage_lengths[stage] = steps
        if self.logger.bar is not None:
            self.logger.bar.total = sum(self.stage_lengths.values())

    def finish_step(self, index: int, stage: str, step: int, state: grpo.TrainState, reference, metrics: dict, *,
                    every: int, rate_flag: str):
        """Log a step's metrics (and the memory in use and at its peak, and MFU); evaluate every `every` steps and
        at the stage's end, checkpoint on schedule. Stop the run (DataError) after MAX_SKIPPED_IN_A_ROW updates in a
        row were skipped as not finite, naming the stage's learning rate (rate_flag) as the fix."""
        self.global_step += 1
        if "model_flops" in metrics:  # MFU: the update's model FLOPs over its seconds and the devices' measured peak
            metrics["mfu"] = metrics["model_flops"] / max(metrics["seconds_update"], 1e-9) / self.peak_flops
        self.logger.log(self.global_step, stage, dict(metrics, **estimates.memory_gib()))
        self.logger.advance()
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if metrics.get("skipped") else 0
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise DataError(f"{stage}: the updates of the last {self.skipped_in_a_row} steps (to step "
                            f"{self.global_step}) had a loss or gradient that is not finite (NaN or infinity) and "
                            f"were skipped (train/skipped in metrics.jsonl); the run stops, its checkpoints hold the "
                            f"finite parameters from before. Fix: start again in another --out with a lower "
                            f"{rate_flag}, or with --compute-dtype float32.")
        last = step + 1 == self.stage_lengths[index]
        if (step + 1) % every == 0 or last:
            self.evaluate(state.params, stage)
        if self.global_step % self.args.checkpoint_every == 0 or last:
            arrays = {"state": state, "key": self.key_data()}
            if reference is not None:
                arrays["reference"] = reference
            self.checkpoints.save(self.global_step, arrays, {"stage": index, "step": step + 1})

    def restore(self, step: int, state: grpo.TrainState, reference) -> tuple[grpo.TrainState, object]:
        """The state (and reference) of checkpoint `step`, restored into the shapes and shardings of the given ones."""
        like = {"state": state, "key": self.key_data()}
        if reference is not None:
            like["reference"] = reference
        restored = self.checkpoints.restore(step, like)
        return restored["state"], restored.get("reference")

    def close(self):
        self.evaluator.close()
        self.logger.close()


def open_run(setup: Setup, policy_stages: dict[int, int]) -> tuple[Run, int | None, dict]:
    """The run folder (args.json; process 0 writes it), the checkpoints, the logger, and where training starts:
    (run, the checkpoint resumed from or None, {"stage", "step"}). policy_stages: the lengths of the stages known
    before any data (policy RL's), by stage index."""
    args = setup.args
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # every process: Orbax's checkpoints go in it
    if multihost.is_primary():
        (out / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2) + "\n")
        if not args.resume:  # a start that failed before its first checkpoint may have left a stage's data: not reused
            for stale in [*out.glob("stage*-triplets.json"), *out.glob("stage*-spa-examples.json")]:
                stale.unlink()
    saved = checkpoints.Checkpoints(out / "checkpoints")
    latest = saved.latest() if args.resume else None
    if args.resume and latest is None:
        print(f"--resume: no checkpoint in {out / 'checkpoints'} (the run stopped before its first); starting from the "
              "beginning")
    position, global_step = {"stage": 0, "step": 0}, 0
    while latest is not None:
        try:
            position, global_step = saved.position(latest), latest
            break
        except checkpoints.UnreadableCheckpoint as error:
            latest = set_aside(saved, error)
    logger = logs.Logger(out, sum(policy_stages.values()), global_step, args.tensorboard, args.progress, args.method,
                         writes=multihost.is_primary())
    run = Run(setup, out, jax.random.key(args.seed), setup.evaluator(), logger, saved, global_step,
              dict(policy_stages))
    return run, latest, position


def set_aside(saved: checkpoints.Checkpoints, error: checkpoints.UnreadableCheckpoint) -> int | None:
    """Move an unreadable checkpoint out of the way and say so; returns the newest intact one's step (None: none).

    Resuming from the one before is the same run: every piece of data is a function of the position, so the steps
    between the two are replayed exactly as they ran (Orbax keeps the last two checkpoints)."""
    aside = saved.set_aside(error.step)
    latest = saved.latest()
    print(f"--resume: {error}; moved it to {aside}. Continuing from "
          f"{'the beginning' if latest is None else f'step {latest}'}, the newest intact checkpoint.", file=sys.stderr)
    return latest
