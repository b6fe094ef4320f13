"""Step counts and schedules for a wall-clock budget (``cryosphere train --minutes``).

* :func:`calibrated_steps`: how many optimiser steps fit ``seconds``, from the measured time
  of a few throwaway steps and one validation (the fewest over the ranks, so every rank runs
  the same schedule);
* :func:`scheduled`: a :class:`~cryosphere.poses.training.streamed.StreamTrainingConfig` for
  that many steps (warm-up at most 10 %, about 20 evaluations);
* :func:`resumed_schedule`: a resumed run keeps its checkpoint's warm-up and never asks for
  fewer steps than it has done.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from cryosphere.poses import distributed as dd
from cryosphere.poses.network.model import ModelConfig
from cryosphere.poses.training import refinement_stream as rs
from cryosphere.poses.training.stream import Batch
from cryosphere.poses.training.streamed import (
    BatchSource,
    StreamTrainingConfig,
    build_optimised_model,
    optimiser_step,
)

__all__ = ["calibrated_steps", "scheduled", "resumed_schedule"]


def calibrated_steps(
    stream: BatchSource,
    model_config: ModelConfig,
    config: StreamTrainingConfig,
    validation: Batch,
    seconds: float,
    context: dd.DistributedContext,
    slot: int = 0,
    evaluations: int = 20,
) -> int:
    """Steps that fit ``seconds`` (s) of training: three throwaway steps on batches of
    ``slot`` outside the training range (the first, warming up, not counted) and one
    validation pass on ``validation`` (counted twice: loss and top-k, ``evaluations`` times)
    are timed; 5 % is left for checkpoints. Every rank calls it (a collective): the fewest of
    the ranks' counts, at least 1."""
    device = config.resolved_device()
    model, optimizer = build_optimised_model(model_config, config, validation, device)
    times = []
    for i in range(3):
        started = time.perf_counter()
        optimiser_step(model, optimizer, stream.batch(10**9 + i, slot), config, 0, device)
        times.append(time.perf_counter() - started)
    started = time.perf_counter()
    rs.validation_scores(model, validation.images, validation.rotations)
    evaluation = 2.0 * (time.perf_counter() - started)  # loss pass + top-k pass
    per_step = float(np.median(times[1:]))
    steps = max(1, int((0.95 * seconds - evaluations * evaluation) / per_step))
    return min(dd.all_gather(context, steps))


def resumed_schedule(
    run_dir: str | os.PathLike[str], config: StreamTrainingConfig
) -> StreamTrainingConfig:
    """``config`` with the warm-up of the checkpoint in ``run_dir`` and at least its steps
    (a calibrated step count varies from call to call); unchanged without a checkpoint."""
    from cryosphere.poses.network import checkpoints

    checkpoint = checkpoints.checkpoint_path(run_dir)
    if not checkpoint.exists():
        return config
    record = checkpoints.load_checkpoint(checkpoint)
    warmup = int(record.get("training_config", {}).get("warmup_steps", config.warmup_steps))
    steps = max(int(config.steps), int(record["step"]))
    return dataclasses.replace(config, steps=steps, warmup_steps=warmup)


def scheduled(config: StreamTrainingConfig, steps: int) -> StreamTrainingConfig:
    """``config`` for ``steps`` steps: warm-up at most ``steps // 10``, an evaluation at most
    every ``steps // 20`` steps."""
    return dataclasses.replace(
        config,
        steps=int(steps),
        warmup_steps=min(config.warmup_steps, int(steps) // 10),
        eval_every=min(config.eval_every, max(1, int(steps) // 20)),
    )
