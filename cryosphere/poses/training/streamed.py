"""Training on a stream of batches (:mod:`cryosphere.poses.training.stream`): steps, not epochs.

One step draws ``stream.batch(step)``, computes the cross-entropy between the network's grid
distribution and the batch targets (``loss="soft_ce"``; ``"bce"`` for 0/1 masks) and takes an
Adam step. The learning rate warms up linearly over ``warmup_steps`` and then follows
``lr_schedule`` (``"cosine"``: down to 1 % of ``learning_rate`` at ``steps``). Every
``eval_every`` steps the fixed validation batch is scored (loss, median error and acc@15° of
the most probable level-``grid_level`` cell) and, with a run folder, a checkpoint is written
atomically.

Determinism: batches are a pure function of ``(stream seed, rank, step)`` and the network is
initialised from ``seed`` with a private generator, so on one device with a fixed thread count
the same configs give the same weights, and a run resumed from any checkpoint ends with the
same weights as an uninterrupted one. ``time_budget_s`` stops early (the checkpoint records
the steps done; the result then depends on the machine's speed, and the log says so).

Checkpoints (``run_dir/model/checkpoint.pt``) use the format of :mod:`cryosphere.poses.training.fixed_set`,
so :func:`cryosphere.poses.network.checkpoints.load_model` and :func:`~cryosphere.poses.prediction.predictions.predict` read
them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from cryosphere._checks import as_symmetry_ops
from cryosphere.geometry import grids
from cryosphere.imaging.projection import resolve_device
from cryosphere.poses.network import checkpoints
from cryosphere.poses.network.model import (
    ARCHITECTURE,
    ModelConfig,
    PoseDistributionNetwork,
    build_model,
)
from cryosphere.poses.prediction.predictions import pose_errors_deg
from cryosphere.poses.training import settings
from cryosphere.poses.training.stream import Batch

__all__ = [
    "NonFiniteLossError",
    "StreamTrainingConfig",
    "StreamTrainingResult",
    "learning_rate_at_step",
    "train_on_stream",
]


class NonFiniteLossError(ValueError):
    """The loss of a step was NaN or infinite: training stopped before that step changed the
    weights; the last checkpoint written stays the last good one."""


class BatchSource(Protocol):
    def batch(self, step: int, rank: int = 0) -> Batch: ...

    def description(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class StreamTrainingConfig:
    """Optimisation settings of streamed training (frozen).

    Attributes:
        steps: optimiser steps (each one batch of the stream).
        learning_rate: peak Adam learning rate.
        lr_schedule: ``"cosine"`` or ``"constant"`` after the warm-up.
        warmup_steps: linear warm-up from 0.
        weight_decay: AdamW decoupled weight decay (0: Adam).
        eval_every: validation (and checkpoint) interval in steps.
        seed: network initialisation seed.
        loss: ``"soft_ce"`` (cross-entropy against target distributions) or ``"bce"``.
        time_budget_s: stop after this many seconds of training (None: run all steps).
        device: ``"cpu"``, ``"cuda"``, ... or None (CUDA when available).
    """

    steps: int = 3000
    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"
    warmup_steps: int = 100
    weight_decay: float = 0.0
    eval_every: int = 250
    seed: int = 0
    loss: str = "soft_ce"
    time_budget_s: float | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if int(self.steps) < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.lr_schedule not in settings.LR_SCHEDULES:
            raise ValueError(
                f"lr_schedule must be one of {settings.LR_SCHEDULES}, got {self.lr_schedule!r}"
            )
        if int(self.warmup_steps) < 0 or int(self.eval_every) < 1:
            raise ValueError("warmup_steps must be >= 0 and eval_every >= 1")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.loss not in settings.LOSSES:
            raise ValueError(f"loss must be one of {settings.LOSSES}, got {self.loss!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0 seconds or None, got {self.time_budget_s}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)


@dataclass(frozen=True)
class StreamTrainingResult:
    """What :func:`train_on_stream` returns.

    Attributes:
        model: the trained network (eval mode, on the training device).
        history: one dict per evaluation (step, train_loss, val_loss, val_acc15,
            val_median_deg, seconds, images_seen).
        steps_done: optimiser steps taken in all (resumed runs included).
        images_seen: training images drawn in all.
        train_seconds: wall-clock seconds of training in all.
        checkpoint: checkpoint path, or None without a run folder.
    """

    model: PoseDistributionNetwork
    history: list[dict[str, float]]
    steps_done: int
    images_seen: int
    train_seconds: float
    checkpoint: Path | None


def learning_rate_at_step(config: StreamTrainingConfig, step: int) -> float:
    """Learning rate of 0-based ``step``: linear warm-up, then constant or cosine to 1 %."""
    lr = float(config.learning_rate)
    if step < config.warmup_steps:
        return lr * (step + 1) / (config.warmup_steps + 1)
    if config.lr_schedule == "constant":
        return lr
    span = max(1, config.steps - config.warmup_steps)
    fraction = min(1.0, (step - config.warmup_steps) / span)
    return lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * fraction)))


def validation_sums(
    model: PoseDistributionNetwork,
    validation: Batch,
    start: int,
    stop: int,
    loss: str,
    device: torch.device,
    chunk: int = 256,
) -> tuple[float, np.ndarray]:
    """Summed loss and the most probable cell ``(stop − start,)`` of validation images
    ``start .. stop − 1``, scored ``chunk`` at a time (the loss on float32 logits)."""
    model.eval()
    total, best = 0.0, []
    with torch.no_grad():
        for first in range(start, stop, chunk):
            last = min(stop, first + chunk)
            logits = model(validation.images[first:last].to(device))
            targets = validation.targets[first:last].to(device)
            total += float(settings.compute_loss(logits.float(), targets, loss)) * (last - first)
            best.append(logits.argmax(dim=1).cpu().numpy())
    return total, (np.concatenate(best) if best else np.zeros(0, np.int64))


def validation_metrics(
    total_loss: float, best_index: np.ndarray, validation: Batch, ops: np.ndarray, level: int
) -> dict[str, float]:
    """Validation loss (mean), acc@15° and median error of the cells ``best_index``."""
    return {"val_loss": total_loss / validation.images.shape[0]} | pose_error_scores(
        best_index, validation.rotations, ops, level
    )


def pose_error_scores(
    best_index: np.ndarray, rotations: np.ndarray, ops: np.ndarray | None, level: int
) -> dict[str, float]:
    """``val_acc15`` and ``val_median_deg`` (°) of the level-``level`` cells ``best_index``
    ``(n,)`` against the poses ``rotations`` ``(n, 3, 3)``, symmetry-aware (``ops``; None:
    no symmetry, as :func:`~cryosphere.poses.prediction.predictions.pose_errors_deg`)."""
    errors = pose_errors_deg(grids.healpix_so3_grid(level)[best_index], rotations, ops)
    return {"val_acc15": float(np.mean(errors < 15.0)), "val_median_deg": float(np.median(errors))}


def _validate(
    model: PoseDistributionNetwork, validation: Batch, ops: np.ndarray, loss: str
) -> dict[str, float]:
    """Validation loss, acc@15° and median error of the most probable cell (NaN without
    validation images)."""
    n = validation.images.shape[0]
    if n == 0:
        return dict.fromkeys(("val_loss", "val_acc15", "val_median_deg"), float("nan"))
    device = model.image_mean.device
    total, best = validation_sums(model, validation, 0, n, loss, device)
    return validation_metrics(total, best, validation, ops, model.config.grid_level)


def _identity(model_config: ModelConfig, config: StreamTrainingConfig, stream: BatchSource) -> dict:
    training = config.to_dict()
    for free in ("steps", "device", "time_budget_s", "eval_every"):
        training.pop(free)
    return {"model": model_config.to_dict(), "training": training, "stream": stream.description()}


def _resume(
    ckpt: Path, identity: dict, model, optimizer, config, steps_per_epoch: int | None = None
) -> tuple[int, list, float, int]:
    record = checkpoints.load_checkpoint(ckpt)
    saved = record.get("stream_identity")
    if saved is None:
        raise ValueError(
            f"{ckpt} was written by an older CryoSphere trainer and cannot be resumed; train in "
            "a new run folder or with resume=False (the network itself still loads)"
        )
    if saved != identity:
        fix = "use another run folder or resume=False"
        if saved["model"] != identity["model"]:
            what = f"model config {saved['model']}, not {identity['model']}"
        elif saved["training"] != identity["training"]:
            what = f"training config {saved['training']}, not {identity['training']}"
        elif saved["stream"].get("fingerprint") != identity["stream"].get("fingerprint"):
            what = "different images/targets/poses"
        else:
            what = f"other settings of its stream ({saved['stream']}, not {identity['stream']})"
        raise ValueError(f"{ckpt} was trained with {what}; {fix}")
    if int(record["step"]) > config.steps:
        done, asked, unit = int(record["step"]), config.steps, "steps"
        if steps_per_epoch:
            done, asked, unit = done // steps_per_epoch, config.steps // steps_per_epoch, "epochs"
        raise ValueError(
            f"{ckpt} already holds {done} {unit}, more than the {asked} asked for; ask for "
            f"at least {done} {unit} or use resume=False"
        )
    model.load_state_dict(record["model_state"])
    optimizer.load_state_dict(record["optimizer_state"])
    history = [dict(h) for h in record["history"]]
    return int(record["step"]), history, float(record["train_seconds"]), int(record["images_seen"])


def train_on_stream(
    stream: BatchSource,
    model_config: ModelConfig,
    config: StreamTrainingConfig,
    validation: Batch,
    symmetry_ops: np.ndarray | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    extra_validation: Callable[[PoseDistributionNetwork], dict[str, float]] | None = None,
    input_statistics: tuple[float, float] | None = None,
    steps_per_epoch: int | None = None,
) -> StreamTrainingResult:
    """Train a :class:`PoseDistributionNetwork` on ``stream`` (module docstring).

    Args:
        stream: a :class:`~cryosphere.poses.training.stream.SimulatedStream` or
            :class:`~cryosphere.poses.training.fixed_stream.FixedSetStream` (anything with ``batch(step)`` and
            ``description()``); its targets live on ``model_config.grid_level``.
        model_config, config: architecture and optimisation.
        validation: fixed held-out batch (``stream.heldout(n)`` for a simulated stream).
        symmetry_ops: ``(K, 3, 3)`` point group for symmetry-aware errors (None: C1).
        run_dir: checkpoint and ``training_log.csv`` go to ``run_dir/model/``; None: no files.
        resume: continue from an existing checkpoint with the same settings (ValueError when
            they differ); False starts over.
        progress: tqdm bar over steps.
        stop_after: stop once this many steps are done in all, as an interrupted run would
            (the schedule stays that of ``config.steps``; calling again resumes). None: run to
            ``config.steps``. Resuming with another ``config.steps`` is allowed and changes the
            remaining schedule.
        extra_validation: more scores of the model at every evaluation, added to its row
            (e.g. :func:`cryosphere.poses.training.refinement_stream.topk_validator`).
        input_statistics: ``(mean, std)`` of the network's input normalisation (ignored with
            per-image normalisation); None: those of the validation images.
        steps_per_epoch: steps of one pass over a fixed set (:class:`FixedSetStream`'s
            ``per_epoch``): every row and the checkpoint then also count epochs (``epoch``),
            and messages speak of epochs. None: a stream without epochs.
    """
    ops = as_symmetry_ops(symmetry_ops)
    device = config.resolved_device()
    model, optimizer = build_optimised_model(
        model_config, config, validation, device, input_statistics
    )
    identity = _identity(model_config, config, stream)
    ckpt = checkpoints.checkpoint_path(run_dir) if run_dir is not None else None
    step, history, seconds, seen = 0, [], 0.0, 0
    if ckpt is not None and resume and ckpt.exists():
        step, history, seconds, seen = _resume(
            ckpt, identity, model, optimizer, config, steps_per_epoch
        )
    bar = tqdm(total=config.steps, initial=step, desc="training", unit="step", disable=not progress)
    started, running, count = time.perf_counter() - seconds, 0.0, 0
    last = config.steps if stop_after is None else min(config.steps, int(stop_after))
    while step < last:
        if (
            config.time_budget_s is not None
            and time.perf_counter() - started > config.time_budget_s
        ):
            break
        batch = stream.batch(step)
        try:
            loss = optimiser_step(model, optimizer, batch, config, step, device)
        except NonFiniteLossError as error:
            bar.close()
            raise NonFiniteLossError(f"{error}; {_kept(ckpt, history)}") from None
        step, seen = step + 1, seen + batch.images.shape[0]
        running, count = running + loss * batch.images.shape[0], count + batch.images.shape[0]
        bar.update()
        if step % config.eval_every == 0 or step == config.steps:
            row = {"step": step} | ({"epoch": step // steps_per_epoch} if steps_per_epoch else {})
            row["train_loss"] = running / count
            row.update(_validate(model, validation, ops, config.loss))
            row.update(extra_validation(model) if extra_validation is not None else {})
            row.update(seconds=time.perf_counter() - started, images_seen=seen)
            history.append(row)
            running, count = 0.0, 0
            postfix = {
                "loss": f"{row['train_loss']:.3f}",
                "val_med": f"{row['val_median_deg']:.1f}",
            }
            if "val_topk_hit" in row:
                postfix |= {
                    "acc15": f"{row['val_acc15']:.2f}",
                    "topk": f"{row['val_topk_hit']:.2f}",
                }
            bar.set_postfix(postfix)
            if ckpt is not None:
                _checkpoint(
                    ckpt, model, optimizer, model_config, config, identity, step, seen, history,
                    row["seconds"], row.get("epoch"),
                )  # fmt: skip
    bar.close()
    seconds = time.perf_counter() - started
    if ckpt is not None and (not history or history[-1]["step"] != step):
        epoch = step // steps_per_epoch if steps_per_epoch else None
        _checkpoint(
            ckpt, model, optimizer, model_config, config, identity, step, seen, history, seconds,
            epoch,
        )  # fmt: skip
    model.eval()
    return StreamTrainingResult(model, history, step, seen, seconds, ckpt)


def build_optimised_model(
    model_config: ModelConfig,
    config: StreamTrainingConfig,
    validation: Batch,
    device: torch.device,
    input_statistics: tuple[float, float] | None = None,
) -> tuple[PoseDistributionNetwork, torch.optim.Optimizer]:
    """The network initialised from ``config.seed`` (input statistics ``(mean, std)`` given,
    else from the validation images, unless it normalises each image itself), on ``device``,
    and its AdamW optimiser (Adam when ``weight_decay`` is 0)."""
    model = build_model(model_config, seed=config.seed)
    if not model_config.per_image_normalisation:
        if input_statistics is None:
            images = validation.images.double()
            input_statistics = (float(images.mean()), float(images.std()))
        model.set_normalisation(*input_statistics)
    model.to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    return model, optimizer


def optimiser_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    config: StreamTrainingConfig,
    step: int,
    device: torch.device,
    bf16: bool = False,
) -> float:
    """One step on ``batch`` at step ``step``'s learning rate; returns the batch loss.

    ``bf16``: forward pass and loss under bfloat16 autocast (the loss is taken on float32
    logits); off, the step is plain float32. A NaN or infinite loss raises
    :class:`NonFiniteLossError` before the weights change.
    """
    model.train()
    for group in optimizer.param_groups:
        group["lr"] = learning_rate_at_step(config, step)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(bf16)):
        logits = model(batch.images.to(device))
        loss = settings.compute_loss(logits.float(), batch.targets.to(device), config.loss)
    if not bool(torch.isfinite(loss.detach())):
        raise NonFiniteLossError(
            f"training stopped at step {step + 1}: the loss is {float(loss.detach())} (NaN or "
            "infinite; damaged images or too high a learning rate)"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _kept(ckpt: Path | None, history: list) -> str:
    """What a stopped run leaves: its last good checkpoint, or none."""
    if ckpt is None or not history:
        return "no checkpoint was written"
    return f"the last good checkpoint {ckpt} (step {int(history[-1]['step'])}) is kept"


def _checkpoint(
    ckpt, model, optimizer, model_config, config, identity, step, seen, history, seconds, epoch=None
):
    checkpoints._save_checkpoint(
        ckpt,
        {
            "architecture": ARCHITECTURE,
            "model_config": model_config.to_dict(),
            "training_config": config.to_dict(),
            "stream_identity": identity,
            "model_state": {k: v.cpu() for k, v in model.state_dict().items()},
            "optimizer_state": optimizer.state_dict(),
            "step": step,
            "epoch": step if epoch is None else int(epoch),
            "images_seen": seen,
            "train_seconds": seconds,
            "history": history,
        },
    )
    checkpoints.write_log_rows(ckpt.parent / "training_log.csv", history)
