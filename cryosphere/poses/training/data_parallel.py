"""Streamed training on several processes (DistributedDataParallel) with a fixed global batch.

The global batch of step ``s`` is ``slots`` stream batches, ``stream.batch(s, slot)`` for
``slot = 0 .. slots - 1``, each a pure function of ``(stream seed, slot, s)``
(:mod:`cryosphere.poses.training.stream`). Rank ``r`` of ``W`` draws the contiguous slots
``r·slots/W .. (r+1)·slots/W - 1``, so the ranks hold disjoint seeded shares and their union
is the same global batch whatever ``W`` is. Hence:

* the global batch is ``slots × stream batch size`` images; the per-rank batch is
  ``slots / W × stream batch size`` (``W`` must divide ``slots``);
* two ranks with ``slots=2`` equal one rank with ``slots=2`` (one rank drawing a batch twice
  the size): the loss is the mean over each rank's images and DDP averages the gradients over
  ranks, which is the mean over the global batch because the shares have equal size;
* a checkpoint records ``slots`` (in its identity) but not ``W``: a run may resume on any
  rank count that divides ``slots`` and continues with the same batches, learning rates and
  optimiser state; only float rounding differs (the order of the gradient sums);
* a :class:`~cryosphere.poses.training.fixed_stream.FixedSetStream` must be made with the same
  ``slots``: slot ``k`` draws only from shard ``k`` of the split, so a rank needs (and may hold)
  only the shards of its own slots (``held_slots``); a
  :class:`~cryosphere.poses.training.stream.SimulatedStream` draws every slot fresh;
* with ``slots=1`` on one process this is :func:`cryosphere.poses.training.streamed.
  train_on_stream` step for step (same batches, same checkpoint format; either resumes the
  other's checkpoints).

Rank 0 alone writes the checkpoint (``run_dir/model/checkpoint.pt``, atomic) and the log and
shows the progress bar. Validation splits the fixed validation batch into contiguous rank
blocks; the loss sums, counts and best cells are gathered, so every rank gets the metrics of
the whole batch (the single-process metrics up to float rounding). ``bf16=True`` runs the
forward pass and loss under ``torch.autocast(dtype=torch.bfloat16)`` (meant for GPUs; on CPUs
it runs but is slower); the weights, gradients and optimiser state stay float32.
"""

from __future__ import annotations

import inspect
import os
import time
import warnings

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from cryosphere._checks import as_symmetry_ops
from cryosphere.poses import distributed as dd
from cryosphere.poses.network import checkpoints
from cryosphere.poses.network.model import ModelConfig
from cryosphere.poses.training import streamed as st
from cryosphere.poses.training.stream import Batch

__all__ = ["rank_slots", "draw_share", "train_distributed"]


def rank_slots(slots: int, rank: int, world_size: int) -> range:
    """The stream slots rank ``rank`` of ``world_size`` draws every step (contiguous)."""
    slots, world_size = int(slots), int(world_size)
    if slots < 1 or world_size < 1 or slots % world_size:
        raise ValueError(
            f"a global batch of {slots} stream batches cannot be split evenly over "
            f"{world_size} ranks; use a rank count that divides slots (or change slots and "
            "start a new run)"
        )
    per = slots // world_size
    return range(rank * per, (rank + 1) * per)


def draw_share(stream: st.BatchSource, step: int, slots: range) -> Batch:
    """This rank's share of step ``step``: the stream batches of ``slots`` concatenated."""
    parts = [stream.batch(step, slot) for slot in slots]
    if len(parts) == 1:
        return parts[0]
    return Batch(
        images=torch.cat([p.images for p in parts]),
        targets=torch.cat([p.targets for p in parts]),
        rotations=np.concatenate([p.rotations for p in parts]),
        noise_sigma=np.concatenate([p.noise_sigma for p in parts]),
        clean=torch.cat([p.clean for p in parts]),
    )


def _validate(model, validation: Batch, ops, loss: str, context, chunk: int = 256) -> dict:
    """Metrics of the whole validation batch, each rank scoring its contiguous block."""
    start, stop = dd.block_range(validation.images.shape[0], context.rank, context.world_size)
    total, mine = st.validation_sums(model, validation, start, stop, loss, context.device, chunk)
    parts = dd.all_gather(context, (total, mine))
    best_index = np.concatenate([p[1] for p in parts])
    total = sum(p[0] for p in parts)
    return st.validation_metrics(total, best_index, validation, ops, model.config.grid_level)


def _prepare(model_config, config, validation, context, bf16):
    model, optimizer = st.build_optimised_model(model_config, config, validation, context.device)
    wrapped = model
    if context.distributed:
        ids = [context.device.index] if context.device.type == "cuda" else None
        # the buffers (grids, Wigner matrices, normalisation) never change: no per-step sync
        sync = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else {"broadcast_buffers": False}
        )
        wrapped = DistributedDataParallel(model, device_ids=ids, **sync)
        # a (C, 1, k, k) convolution weight's size-1 axis has another stride in DDP's bucket:
        # harmless (torch says so), but warned once per rank
        warnings.filterwarnings("ignore", "Grad strides do not match", UserWarning)
    if bf16 and context.device.type not in ("cuda", "cpu"):
        raise ValueError(f"bf16 autocast runs on cuda or cpu, not {context.device.type}")
    return model, wrapped, optimizer


def _out_of_time(config, started: float, context) -> bool:
    if config.time_budget_s is None:
        return False
    late = float(time.perf_counter() - started > config.time_budget_s)
    return dd.all_reduce_sum(context, [late])[0] > 0  # every rank stops at the same step


def train_distributed(
    stream: st.BatchSource,
    model_config: ModelConfig,
    config: st.StreamTrainingConfig,
    validation: Batch,
    *,
    slots: int = 1,
    symmetry_ops: np.ndarray | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    bf16: bool = False,
    context: dd.DistributedContext | None = None,
) -> st.StreamTrainingResult:
    """Train on ``stream`` over the ranks of ``context`` (module docstring).

    Args:
        stream, model_config, config, validation, symmetry_ops, run_dir, resume, stop_after:
            as in :func:`~cryosphere.poses.training.streamed.train_on_stream`
            (``config.device`` is ignored: the context gives each rank its device).
        slots: stream batches per global batch (per optimiser step); the rank count must
            divide it. Recorded in the checkpoint: a resumed run keeps it.
        progress: progress bar (rank 0 only).
        bf16: autocast the forward pass to bfloat16.
        context: the process group (:func:`cryosphere.poses.distributed.init_from_env`);
            None joins the one described by the environment, or runs alone.
    """
    context = context or dd.init_from_env(config.device)
    mine = rank_slots(slots, context.rank, context.world_size)
    if getattr(stream, "slots", slots) != slots:
        raise ValueError(
            f"the stream deals its epochs in {stream.slots} slots but training asks for {slots}; "
            f"make the FixedSetStream with slots={slots}"
        )
    ops = as_symmetry_ops(symmetry_ops)
    model, wrapped, optimizer = _prepare(model_config, config, validation, context, bf16)
    identity = st._identity(model_config, config, stream)
    if int(slots) != 1:
        identity["slots"] = int(slots)
    ckpt = checkpoints.checkpoint_path(run_dir) if run_dir is not None else None
    step, history, seconds, seen = 0, [], 0.0, 0
    with dd.collective_check(context, "resuming from the checkpoint"):
        if ckpt is not None and resume and ckpt.exists():
            step, history, seconds, seen = st._resume(ckpt, identity, model, optimizer, config)
    show = progress and context.writes
    bar = tqdm(total=config.steps, initial=step, desc="training", unit="step", disable=not show)
    started, running, count = time.perf_counter() - seconds, 0.0, 0
    last = config.steps if stop_after is None else min(config.steps, int(stop_after))
    while step < last and not _out_of_time(config, started, context):
        batch = draw_share(stream, step, mine)
        try:
            loss = st.optimiser_step(wrapped, optimizer, batch, config, step, context.device, bf16)
        except st.NonFiniteLossError as error:
            bar.close()
            raise st.NonFiniteLossError(f"{error}; {st._kept(ckpt, history)}") from None
        step, seen = step + 1, seen + batch.images.shape[0] * context.world_size
        running, count = running + loss, count + 1
        bar.update()
        if step % config.eval_every == 0 or step == config.steps:
            row = {"step": step, "train_loss": dd.all_reduce_sum(context, [running / count])[0]}
            row["train_loss"] /= context.world_size
            row.update(_validate(model, validation, ops, config.loss, context))
            row.update(seconds=time.perf_counter() - started, images_seen=seen)
            history.append(row)
            running, count = 0.0, 0
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_med=f"{row['val_median_deg']:.1f}")
            if ckpt is not None and context.writes:
                st._checkpoint(
                    ckpt, model, optimizer, model_config, config, identity, step, seen, history,
                    row["seconds"],
                )  # fmt: skip
    bar.close()
    seconds = time.perf_counter() - started
    if ckpt is not None and context.writes and (not history or history[-1]["step"] != step):
        st._checkpoint(
            ckpt, model, optimizer, model_config, config, identity, step, seen, history, seconds
        )
    if context.distributed:
        torch.distributed.barrier()  # the checkpoint is whole before any rank returns
    model.eval()
    return st.StreamTrainingResult(model, history, step, seen, seconds, ckpt)
