"""Training, checkpoints, resuming and prediction for :class:`~cryosphere.poses.network.model.PoseDistributionNetwork`.

The training API works on arrays so it does not depend on how the targets were made:

* ``images`` ``(n, N, N)`` float (noisy particle images ``[y, x]``),
* ``targets`` ``(n, G)`` on the HEALPix SO(3) grid of ``ModelConfig.grid_level``: a 0/1 mask of
  plausible poses for ``loss="bce"`` (binary cross-entropy with logits, the poster's loss) or a
  non-negative map normalised per image for ``loss="soft_ce"`` (cross-entropy against it),
* ``rotations`` ``(n, 3, 3)`` true poses (validation metrics only),
* ``symmetry_ops`` ``(K, 3, 3)`` point-group ops, identity first (symmetry-aware errors when
  ``K > 1``).

Run-folder files (under ``run_dir/model/``, all written atomically): ``checkpoint.pt`` (after every
epoch: model config and weights, optimizer state, RNG states, epoch, history, split),
``training_log.csv`` (one row per epoch), and after :func:`load_or_train` ``predictions.npz`` and
``predicted_particles.star`` (RELION angles of the most probable grid pose, with
``rlnMaxValueProbDistribution``).

Determinism: on CPU, the same inputs and ``TrainingConfig`` give bitwise identical weights, and a
run resumed from the checkpoint of epoch ``k`` ends with the same weights as an uninterrupted run
(the checkpoint restores the optimizer, the global torch/NumPy RNG states and the data-order
generator).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cryosphere.geometry import grids
from cryosphere.imaging.datasets import ParticleDataset
from cryosphere.poses.network.checkpoints import (
    _numpy_state_from_torch,
    _numpy_state_to_torch,
    _save_checkpoint,
    _write_log,
    checkpoint_path,
    load_checkpoint,
)
from cryosphere.poses.network.model import (
    ARCHITECTURE,
    ModelConfig,
    PoseDistributionNetwork,
    build_model,
)
from cryosphere.poses.prediction.predictions import (
    Predictions,
    pose_errors_deg,
    predict_dataset,
)
from cryosphere.poses.training.settings import (
    TrainingConfig,
    _check_inputs,
    _fingerprint,
    _normalisation,
    compute_loss,
    learning_rate_at,
    split_indices,
)

if TYPE_CHECKING:
    from cryosphere.poses.labels.dataset_labels import PoseLabels

__all__ = [
    "TrainingResult",
    "untrained_model",
    "train_model",
    "load_or_train",
]


@dataclass(frozen=True)
class TrainingResult:
    """What :func:`train_model` returns.

    Attributes:
        model: the trained network (eval mode).
        history: one dict per epoch with the ``training_log.csv`` columns.
        train_indices, validation_indices: ``(n_train,)``, ``(n_val,)`` int64 image indices.
        checkpoint: path of the checkpoint, or None without a run folder.
    """

    model: PoseDistributionNetwork
    history: list[dict[str, float]]
    train_indices: np.ndarray
    validation_indices: np.ndarray
    checkpoint: Path | None = None


def untrained_model(
    images: np.ndarray,
    model_config: ModelConfig,
    training_config: TrainingConfig | None = None,
) -> PoseDistributionNetwork:
    """The network :func:`train_model` starts from (same seed, same image normalisation from the
    same training split), untrained: the evaluation's random baseline. Eval mode, on CPU."""
    training_config = training_config or TrainingConfig()
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty stack (n, N, N), got {images.shape}")
    train_idx, _ = split_indices(
        images.shape[0], training_config.validation_fraction, training_config.seed
    )
    model = build_model(model_config, seed=training_config.seed)
    model.set_normalisation(*_normalisation(images[train_idx]))
    return model.eval()


def _evaluate(
    model: PoseDistributionNetwork,
    images: torch.Tensor,
    targets: torch.Tensor,
    rotations: np.ndarray,
    ops: np.ndarray,
    grid: np.ndarray,
    loss: str,
    batch_size: int,
) -> dict[str, float]:
    if images.shape[0] == 0:
        nan = float("nan")
        return {"val_loss": nan, "val_acc15": nan, "val_median_deg": nan}
    model.eval()
    total, best = 0.0, []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            logits = model(images[start : start + batch_size])
            y = targets[start : start + batch_size]
            total += float(compute_loss(logits, y, loss)) * logits.shape[0]
            best.append(logits.argmax(dim=1).cpu())
    best_idx = torch.cat(best).numpy()
    errors = pose_errors_deg(grid[best_idx], rotations, ops)
    return {
        "val_loss": total / images.shape[0],
        "val_acc15": float(np.mean(errors < 15.0)),
        "val_median_deg": float(np.median(errors)),
    }


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def train_model(
    images: np.ndarray,
    targets: np.ndarray,
    rotations: np.ndarray,
    symmetry_ops: np.ndarray | None,
    model_config: ModelConfig,
    training_config: TrainingConfig | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    resume: bool = True,
    progress: bool = True,
) -> TrainingResult:
    """Train a :class:`PoseDistributionNetwork` on arrays (see module docstring for shapes).

    Args:
        images: ``(n, N, N)`` images, ``N == model_config.image_size``.
        targets: ``(n, G)`` masks (``loss="bce"``) or soft maps (``loss="soft_ce"``) on the grid
            of ``model_config.grid_level``.
        rotations: ``(n, 3, 3)`` true poses, for the validation metrics.
        symmetry_ops: ``(K, 3, 3)`` point-group ops (or None for C1).
        model_config, training_config: architecture and optimisation settings.
        run_dir: run folder; checkpoint and log go to ``run_dir/model/``. None: nothing written.
        resume: continue from ``run_dir/model/checkpoint.pt`` when it exists (its configs,
            except ``epochs`` and ``device``, and data must match, otherwise ValueError).
            False: start over.
        progress: tqdm bar over epochs.

    Returns:
        :class:`TrainingResult` (model in eval mode, on the training device).
    """
    training_config = training_config or TrainingConfig()
    images, targets, rotations, ops = _check_inputs(
        images, targets, rotations, symmetry_ops, model_config, training_config.loss
    )
    device = training_config.resolved_device()
    n = images.shape[0]
    train_idx, val_idx = split_indices(n, training_config.validation_fraction, training_config.seed)
    fingerprint = _fingerprint(images, targets, rotations, ops)

    ckpt = checkpoint_path(run_dir) if run_dir is not None else None
    log_path = ckpt.parent / "training_log.csv" if ckpt is not None else None
    model, optimizer, order, history, start_epoch = _start(
        model_config, training_config, images[train_idx], device,
        ckpt if resume else None, fingerprint,
    )  # fmt: skip
    tensors = _EpochData(
        images=torch.from_numpy(images).to(device),
        targets=torch.from_numpy(targets).to(device),
        train_idx=torch.from_numpy(train_idx).to(device),
        val_idx=val_idx,
        val_rotations=rotations[val_idx],
        ops=ops,
        grid=grids.healpix_so3_grid(model_config.grid_level),
    )
    bar = _epoch_bar(start_epoch, training_config.epochs, progress)
    for epoch in bar:
        row = _run_epoch(model, optimizer, order, tensors, training_config, epoch)
        history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.4f}", val_med=f"{row['val_median_deg']:.1f}")
        if ckpt is not None:
            _write_log(log_path, history)
            _save_checkpoint(
                ckpt,
                _checkpoint_record(
                    model, optimizer, order, model_config, training_config,
                    history, (train_idx, val_idx), fingerprint,
                ),
            )  # fmt: skip
    bar.close()
    if ckpt is not None and log_path is not None and not log_path.exists():
        _write_log(log_path, history)
    model.eval()
    return TrainingResult(
        model=model,
        history=history,
        train_indices=train_idx,
        validation_indices=val_idx,
        checkpoint=ckpt,
    )


def _epoch_bar(start_epoch: int, epochs: int, progress: bool) -> tqdm:
    """Progress bar over epochs ``start_epoch .. epochs - 1``, showing the epochs done."""
    return tqdm(
        range(start_epoch, epochs),
        total=epochs,
        initial=start_epoch,
        desc="training",
        unit="epoch",
        disable=not progress,
    )


def _start(
    model_config: ModelConfig,
    training_config: TrainingConfig,
    train_images: np.ndarray,
    device: torch.device,
    ckpt: Path | None,
    fingerprint: str,
) -> tuple[PoseDistributionNetwork, torch.optim.Adam, torch.Generator, list[dict[str, float]], int]:
    """The seeded network (normalised on the training images), its optimizer, the data-order
    generator, the history so far and the number of epochs done: restored from ``ckpt`` when
    it exists (after :func:`_check_resumable`), else fresh."""
    model = build_model(model_config, seed=training_config.seed)
    model.set_normalisation(*_normalisation(train_images))
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=training_config.learning_rate)
    order = torch.Generator(device="cpu").manual_seed(int(training_config.seed) + 1)
    if ckpt is None or not ckpt.exists():
        return model, optimizer, order, [], 0
    record = load_checkpoint(ckpt)
    _check_resumable(record, ckpt, model_config, training_config, fingerprint)
    return model, optimizer, order, _restore(record, model, optimizer, order), int(record["epoch"])


def _check_resumable(
    record: dict[str, Any],
    ckpt: Path,
    model_config: ModelConfig,
    training_config: TrainingConfig,
    fingerprint: str,
) -> None:
    """ValueError unless the checkpoint was made with these configs (epochs and device aside),
    on the same data, and holds no more epochs than requested."""
    saved_model = ModelConfig.from_dict(
        dict(record["model_config"])
    ).to_dict()  # defaults for keys it lacks
    if saved_model != model_config.to_dict():
        raise ValueError(
            f"{ckpt} was trained with model config {record['model_config']}, not "
            f"{model_config.to_dict()}; use another run folder or resume=False"
        )
    saved_training = dict(record["training_config"])
    wanted = training_config.to_dict()
    saved_training.setdefault("lr_schedule", "constant")  # checkpoints before schedules
    for free in ("epochs", "device"):  # more epochs, or another device, may resume
        saved_training.pop(free, None)
        wanted.pop(free, None)
    if saved_training != wanted:
        raise ValueError(
            f"{ckpt} was trained with training config {saved_training} (epochs and device "
            f"aside), not "
            f"{wanted}; use another run folder or resume=False"
        )
    if record["data_fingerprint"] != fingerprint:
        raise ValueError(
            f"{ckpt} was trained on different images/targets/poses; use another run folder "
            f"or resume=False"
        )
    if int(record["epoch"]) > training_config.epochs:
        raise ValueError(
            f"{ckpt} already holds {record['epoch']} epochs, more than the {training_config.epochs} "
            f"requested; ask for at least {record['epoch']} epochs or use resume=False"
        )


def _restore(
    record: dict[str, Any],
    model: PoseDistributionNetwork,
    optimizer: torch.optim.Optimizer,
    order: torch.Generator,
) -> list[dict[str, float]]:
    """Load weights, optimizer and RNG states from a checkpoint record; return its history."""
    model.load_state_dict(record["model_state"])
    optimizer.load_state_dict(record["optimizer_state"])
    torch.set_rng_state(record["rng"]["torch"])
    np.random.set_state(_numpy_state_from_torch(record["rng"]["numpy"]))  # noqa: NPY002
    order.set_state(record["rng"]["order"])
    return [dict(h) for h in record["history"]]


@dataclass(frozen=True)
class _EpochData:
    """The arrays one epoch reads: all images and targets (on the training device), the
    training indices (device), the validation indices with their true poses, the symmetry
    ops and the grid."""

    images: torch.Tensor
    targets: torch.Tensor
    train_idx: torch.Tensor
    val_idx: np.ndarray
    val_rotations: np.ndarray
    ops: np.ndarray
    grid: np.ndarray


def _run_epoch(
    model: PoseDistributionNetwork,
    optimizer: torch.optim.Optimizer,
    order: torch.Generator,
    data: _EpochData,
    config: TrainingConfig,
    epoch: int,
) -> dict[str, float]:
    """One pass over the training images in the order drawn from ``order``, at the learning
    rate of 0-based ``epoch``, then validation; returns the epoch's ``training_log.csv`` row."""
    t0 = time.perf_counter()
    model.train()
    n_train = len(data.train_idx)
    permutation = torch.randperm(n_train, generator=order).to(data.train_idx.device)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate_at(config, epoch)
    batch_size = int(config.batch_size)
    total = 0.0
    for start in range(0, n_train, batch_size):
        batch = data.train_idx[permutation[start : start + batch_size]]
        logits = model(data.images[batch])
        loss = compute_loss(logits, data.targets[batch], config.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * batch.shape[0]
    row = {"epoch": epoch + 1, "train_loss": total / n_train}
    row.update(
        _evaluate(
            model, data.images[data.val_idx], data.targets[data.val_idx], data.val_rotations,
            data.ops, data.grid, config.loss, max(batch_size, 256),
        )
    )  # fmt: skip
    row["epoch_seconds"] = time.perf_counter() - t0
    return row


def _checkpoint_record(
    model: PoseDistributionNetwork,
    optimizer: torch.optim.Optimizer,
    order: torch.Generator,
    model_config: ModelConfig,
    training_config: TrainingConfig,
    history: list[dict[str, float]],
    split: tuple[np.ndarray, np.ndarray],
    fingerprint: str,
) -> dict[str, Any]:
    """What ``checkpoint.pt`` holds after ``len(history)`` epochs (read by
    :func:`load_checkpoint`; the RNG states make a resumed run match an uninterrupted one)."""
    return {
        "architecture": ARCHITECTURE,
        "model_config": model_config.to_dict(),
        "training_config": training_config.to_dict(),
        "model_state": {k: v.cpu() for k, v in model.state_dict().items()},
        "optimizer_state": optimizer.state_dict(),
        "epoch": len(history),
        "history": history,
        "train_indices": torch.from_numpy(split[0]),
        "validation_indices": torch.from_numpy(split[1]),
        "data_fingerprint": fingerprint,
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state_to_torch(np.random.get_state()),  # noqa: NPY002
            "order": order.get_state(),
        },
    }


def load_or_train(
    run_dir: str | os.PathLike[str],
    dataset: ParticleDataset,
    labels: PoseLabels,
    model_config: ModelConfig | None = None,
    training_config: TrainingConfig | None = None,
    progress: bool = True,
) -> tuple[TrainingResult, Predictions]:
    """Train (or resume, or reload a finished run) on a run folder's dataset and labels.

    Args:
        run_dir: run folder (checkpoint, log and predictions go to ``run_dir/model/``).
        dataset: :class:`cryosphere.imaging.datasets.ParticleDataset` (uses ``noisy_images``,
            ``rotations``, ``symmetry_ops``, ``pixel_size``).
        labels: pose labels with ``mask`` (n, G) bool, ``soft`` (n, G) and ``level``.
        model_config: default ``ModelConfig(image_size=dataset.image_size,
            grid_level=labels.level)``.
        training_config: default :class:`TrainingConfig`.

    Returns:
        ``(TrainingResult, Predictions for every image)``; predictions are saved with
        :func:`save_predictions`.
    """
    training_config = training_config or TrainingConfig()
    if model_config is None:
        model_config = ModelConfig(image_size=dataset.image_size, grid_level=int(labels.level))
    source = labels.mask if training_config.loss == "bce" else labels.soft
    targets = np.asarray(source, dtype=np.float32)
    result = train_model(
        dataset.noisy_images,
        targets,
        dataset.rotations,
        dataset.symmetry_ops,
        model_config,
        training_config,
        run_dir=run_dir,
        resume=True,
        progress=progress,
    )
    return result, predict_dataset(run_dir, result.model, dataset)
