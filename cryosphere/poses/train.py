"""Training, checkpoints, resuming and prediction for :class:`~cryosphere.poses.model.PoseDistributionNetwork`.

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

import csv
import dataclasses
import hashlib
import io as _io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cryosphere import io
from cryosphere.geometry import so3
from cryosphere.imaging.projection import default_device
from cryosphere.poses.model import (
    ARCHITECTURE,
    ModelConfig,
    PoseDistributionNetwork,
    build_model,
    grid_wigner,
)

__all__ = [
    "LOSSES",
    "LR_SCHEDULES",
    "learning_rate_at",
    "TrainingConfig",
    "TrainingResult",
    "Predictions",
    "resolve_device",
    "split_indices",
    "compute_loss",
    "pose_errors_deg",
    "untrained_model",
    "train_model",
    "checkpoint_path",
    "load_checkpoint",
    "load_model",
    "predict",
    "save_predictions",
    "load_or_train",
    "predict_dataset",
    "read_training_log",
    "write_log_rows",
]

LOSSES = ("bce", "soft_ce")
LR_SCHEDULES = ("constant", "cosine")
_COSINE_FLOOR = 0.01
_LOG_COLUMNS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_acc15",
    "val_median_deg",
    "epoch_seconds",
)


# --------------------------------------------------------------------------------------------
# configuration and results
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation settings (frozen).

    Attributes:
        epochs: passes over the training split (paper: 200).
        learning_rate: Adam learning rate (paper: 1e-3), constant.
        batch_size: images per step.
        seed: seeds the network initialisation, the validation split and the data order.
        validation_fraction: fraction of images held out (seeded), in [0, 1).
        loss: ``"bce"`` (BCE with logits against 0/1 masks) or ``"soft_ce"`` (cross-entropy
            against the per-image normalised soft map).
        lr_schedule: ``"constant"`` (the poster) or ``"cosine"``: epoch ``e`` (0-based) of ``E``
            uses ``lr · (f + (1 − f) · (1 + cos(π e / E)) / 2)`` with ``f = 0.01``
            (:func:`learning_rate_at`); stateless, so resuming keeps the schedule of the
            requested ``epochs``.
        device: ``"cpu"``, ``"cuda"``, ... or None (CUDA when available).
    """

    epochs: int = 200
    learning_rate: float = 1e-3
    batch_size: int = 32
    seed: int = 0
    validation_fraction: float = 0.2
    loss: str = "bce"
    lr_schedule: str = "constant"
    device: str | None = None

    def __post_init__(self) -> None:
        if int(self.epochs) < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if not float(self.learning_rate) > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= float(self.validation_fraction) < 1.0:
            raise ValueError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction}"
            )
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> TrainingConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(record) - names
        if unknown:
            raise ValueError(f"unknown TrainingConfig fields {sorted(unknown)}")
        return cls(**record)

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)


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


@dataclass(frozen=True)
class Predictions:
    """Network output for ``n`` images on the grid of ``G`` rotations.

    Attributes:
        probabilities: ``(n, G)`` float32, softmax of the logits (each row sums to 1).
        logits: ``(n, G)`` float32.
        coefficients: ``(n, dim_so3)`` float32 SO(3) harmonic coefficients of the logits.
        best_index: ``(n,)`` int64 most probable grid cell.
        best_rotation: ``(n, 3, 3)`` float64 pose of that cell.
        best_probability: ``(n,)`` float32 its probability.
    """

    probabilities: np.ndarray
    logits: np.ndarray
    coefficients: np.ndarray
    best_index: np.ndarray
    best_rotation: np.ndarray
    best_probability: np.ndarray


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch device; None: CUDA when available, else CPU
    (:func:`cryosphere.imaging.projection.default_device`)."""
    return default_device() if device is None else torch.device(device)


def split_indices(n: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into sorted (train, validation) index arrays.

    ``round(n * validation_fraction)`` images are held out (at least 1 when the fraction is
    positive and ``n >= 2``; none when ``n == 1``).
    """
    n = int(n)
    n_val = int(round(n * float(validation_fraction)))
    if validation_fraction > 0 and n >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, n - 1) if n >= 1 else 0
    order = np.random.default_rng(int(seed)).permutation(n)
    return np.sort(order[n_val:]).astype(np.int64), np.sort(order[:n_val]).astype(np.int64)


def learning_rate_at(config: TrainingConfig, epoch: int) -> float:
    """Learning rate of 0-based ``epoch`` under ``config.lr_schedule`` (see TrainingConfig)."""
    if config.lr_schedule == "constant" or config.epochs <= 1:
        return float(config.learning_rate)
    fraction = min(max(int(epoch), 0), config.epochs) / config.epochs
    factor = _COSINE_FLOOR + (1 - _COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * fraction))
    return float(config.learning_rate) * factor


def compute_loss(logits: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean loss of grid logits ``(n, G)`` against targets ``(n, G)``.

    ``"bce"``: binary cross-entropy with logits, averaged over images and cells.
    ``"soft_ce"``: ``-sum_g t_g log softmax(logits)_g`` with ``t`` normalised per image,
    averaged over images.
    """
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(logits, targets)
    if loss == "soft_ce":
        t = targets / targets.sum(dim=1, keepdim=True).clamp_min(1e-30)
        return -(t * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def pose_errors_deg(
    predicted: np.ndarray, true: np.ndarray, symmetry_ops: np.ndarray | None = None
) -> np.ndarray:
    """Geodesic error in degrees ``(n,)`` between predicted and true poses ``(n, 3, 3)``,
    symmetry-aware (``min_g d(P, T @ g)``) when ``symmetry_ops`` has more than one op."""
    if symmetry_ops is not None and np.asarray(symmetry_ops).shape[0] > 1:
        return so3.symmetric_geodesic_distance_deg(predicted, true, symmetry_ops)
    return so3.geodesic_distance_deg(predicted, true)


def _fingerprint(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _check_inputs(
    images: np.ndarray,
    targets: np.ndarray,
    rotations: np.ndarray,
    symmetry_ops: np.ndarray | None,
    model_config: ModelConfig,
    loss: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3 or images.shape[0] == 0:
        raise ValueError(
            f"images must be a non-empty stack (n, N, N), got shape {images.shape}; an empty "
            f"dataset cannot be trained on"
        )
    n, N = images.shape[0], model_config.image_size
    if images.shape[1:] != (N, N):
        raise ValueError(
            f"images are {images.shape[1]}x{images.shape[2]} px but ModelConfig.image_size is "
            f"{N}; set image_size={images.shape[-1]}"
        )
    if not np.all(np.isfinite(images)):
        raise ValueError("images contain non-finite values")
    G = so3.healpix_so3_grid_size(model_config.grid_level)
    targets = np.asarray(targets, dtype=np.float32)
    if targets.shape != (n, G):
        raise ValueError(
            f"targets must have shape (n, G) = ({n}, {G}) for grid level "
            f"{model_config.grid_level}, got {targets.shape}; make labels on the same grid level"
        )
    if not np.all(np.isfinite(targets)) or targets.min() < 0:
        raise ValueError("targets must be finite and non-negative")
    if loss == "bce" and targets.max() > 1:
        raise ValueError("targets for loss='bce' must lie in [0, 1] (e.g. the 0/1 label mask)")
    if loss == "soft_ce" and np.any(targets.sum(axis=1) <= 0):
        raise ValueError("targets for loss='soft_ce' need a positive sum in every row")
    rotations = np.asarray(rotations, dtype=np.float64)
    if rotations.shape != (n, 3, 3):
        raise ValueError(f"rotations must have shape ({n}, 3, 3), got {rotations.shape}")
    ops = np.eye(3)[None] if symmetry_ops is None else np.asarray(symmetry_ops, np.float64)
    if ops.ndim != 3 or ops.shape[1:] != (3, 3) or ops.shape[0] < 1:
        raise ValueError(f"symmetry_ops must have shape (K, 3, 3), got {ops.shape}")
    return images, targets, rotations, ops


def _normalisation(images: np.ndarray) -> tuple[float, float]:
    mean = float(images.mean(dtype=np.float64))
    std = float(images.std(dtype=np.float64))
    return mean, (std if std > 0 else 1.0)


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


def checkpoint_path(run_dir: str | os.PathLike[str]) -> Path:
    """``run_dir/model/checkpoint.pt``."""
    return Path(run_dir) / "model" / "checkpoint.pt"


def _write_log(path: Path, history: list[dict[str, float]]) -> None:
    write_log_rows(path, history, _LOG_COLUMNS)


def write_log_rows(
    path: Path, rows: list[dict[str, float]], columns: tuple[str, ...] | None = None
) -> None:
    """Write ``rows`` as CSV atomically; columns default to the keys of the rows, in order."""
    if columns is None:
        columns = tuple(dict.fromkeys(k for row in rows for k in row))
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, float("nan")) for k in columns})
    with io.atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def read_training_log(run_dir: str | os.PathLike[str]) -> list[dict[str, float]]:
    """Rows of ``run_dir/model/training_log.csv`` as dicts of floats (epoch as int)."""
    path = Path(run_dir) / "model" / "training_log.csv"
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [
        {k: (int(v) if k in ("epoch", "step") else float(v)) for k, v in r.items()} for r in rows
    ]


def _numpy_state_to_torch(state: tuple) -> list[Any]:
    name, keys, pos, has_gauss, cached = state
    return [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached]


def _numpy_state_from_torch(state: list[Any]) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached))


def _save_checkpoint(path: Path, record: dict[str, Any]) -> None:
    with io.atomic_path(path) as tmp:
        torch.save(record, tmp)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a checkpoint written by :func:`train_model` (``weights_only`` load).

    Raises:
        FileNotFoundError: no file.
        ValueError: not a CryoSphere checkpoint, or one from another architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train a model first (train_model)")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise ValueError(f"{path} is not a readable CryoSphere checkpoint: {exc}") from exc
    if not isinstance(record, dict) or "architecture" not in record:
        raise ValueError(f"{path} is not a CryoSphere checkpoint (no 'architecture' entry)")
    if record["architecture"] != ARCHITECTURE:
        raise ValueError(
            f"{path} holds architecture {record['architecture']!r}, this version reads "
            f"{ARCHITECTURE!r}; retrain with this version"
        )
    return record


def _model_from_record(record: dict[str, Any], source: str) -> PoseDistributionNetwork:
    try:
        config = ModelConfig.from_dict(dict(record["model_config"]))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: invalid model configuration in checkpoint: {exc}") from exc
    model = PoseDistributionNetwork(config, seed=0)
    try:
        model.load_state_dict(record["model_state"])
    except RuntimeError as exc:
        raise ValueError(
            f"{source}: weights do not match the architecture of its configuration ({exc})"
        ) from exc
    return model


def load_model(
    path: str | os.PathLike[str], device: str | torch.device | None = None
) -> PoseDistributionNetwork:
    """The network stored in a checkpoint (eval mode; CPU unless ``device`` is given).

    Raises FileNotFoundError / ValueError with a clear message (see :func:`load_checkpoint`).
    """
    record = load_checkpoint(path)
    model = _model_from_record(record, str(path))
    return model.to(device or "cpu").eval()


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
    grid = so3.healpix_so3_grid(model_config.grid_level)

    model = build_model(model_config, seed=training_config.seed)
    model.set_normalisation(*_normalisation(images[train_idx]))
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=training_config.learning_rate)
    order = torch.Generator(device="cpu").manual_seed(int(training_config.seed) + 1)
    history: list[dict[str, float]] = []
    start_epoch = 0

    ckpt = checkpoint_path(run_dir) if run_dir is not None else None
    log_path = ckpt.parent / "training_log.csv" if ckpt is not None else None
    if ckpt is not None and resume and ckpt.exists():
        record = load_checkpoint(ckpt)
        saved_model = ModelConfig.from_dict(dict(record["model_config"])).to_dict()  # 0.1 keys
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
        model.load_state_dict(record["model_state"])
        optimizer.load_state_dict(record["optimizer_state"])
        torch.set_rng_state(record["rng"]["torch"])
        np.random.set_state(_numpy_state_from_torch(record["rng"]["numpy"]))  # noqa: NPY002
        order.set_state(record["rng"]["order"])
        history = [dict(h) for h in record["history"]]
        start_epoch = int(record["epoch"])

    images_t = torch.from_numpy(images).to(device)
    targets_t = torch.from_numpy(targets).to(device)
    train_idx_t = torch.from_numpy(train_idx).to(device)
    val_images, val_targets = images_t[val_idx], targets_t[val_idx]
    batch_size = int(training_config.batch_size)

    bar = tqdm(
        range(start_epoch, training_config.epochs),
        total=training_config.epochs,
        initial=start_epoch,
        desc="training",
        unit="epoch",
        disable=not progress,
    )
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        permutation = torch.randperm(len(train_idx), generator=order).to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(training_config, epoch)
        total = 0.0
        for start in range(0, len(train_idx), batch_size):
            batch = train_idx_t[permutation[start : start + batch_size]]
            logits = model(images_t[batch])
            loss = compute_loss(logits, targets_t[batch], training_config.loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * batch.shape[0]
        row = {"epoch": epoch + 1, "train_loss": total / len(train_idx)}
        row.update(
            _evaluate(
                model,
                val_images,
                val_targets,
                rotations[val_idx],
                ops,
                grid,
                training_config.loss,
                max(batch_size, 256),
            )
        )
        row["epoch_seconds"] = time.perf_counter() - t0
        history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.4f}", val_med=f"{row['val_median_deg']:.1f}")
        if ckpt is not None:
            _write_log(log_path, history)
            _save_checkpoint(
                ckpt,
                {
                    "architecture": ARCHITECTURE,
                    "model_config": model_config.to_dict(),
                    "training_config": training_config.to_dict(),
                    "model_state": {k: v.cpu() for k, v in model.state_dict().items()},
                    "optimizer_state": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "history": history,
                    "train_indices": torch.from_numpy(train_idx),
                    "validation_indices": torch.from_numpy(val_idx),
                    "data_fingerprint": fingerprint,
                    "rng": {
                        "torch": torch.get_rng_state(),
                        "numpy": _numpy_state_to_torch(np.random.get_state()),  # noqa: NPY002
                        "order": order.get_state(),
                    },
                },
            )
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


# --------------------------------------------------------------------------------------------
# prediction
# --------------------------------------------------------------------------------------------
def predict(
    model: PoseDistributionNetwork,
    images: np.ndarray | torch.Tensor,
    batch_size: int = 256,
    progress: bool = False,
    level: int | None = None,
) -> Predictions:
    """Pose distributions for images ``(n, N, N)`` (n may be 0), on the model's device.

    Probabilities are the softmax of the grid logits over the ``G`` grid cells. ``level``
    reads the network's harmonic output on another grid than the one it was trained on
    (e.g. 3: 36,864 cells, 7.5° spacing, so errors can fall below the level-2 cell floor);
    None: the model's ``grid_level``.
    """
    images = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if images.ndim != 3:
        raise ValueError(f"images must have shape (n, N, N), got {tuple(images.shape)}")
    N = model.config.image_size
    if tuple(images.shape[1:]) != (N, N):
        raise ValueError(
            f"images are {images.shape[1]}x{images.shape[2]} px but the model was trained on "
            f"{N}x{N} px images; resample them or train a model for this size"
        )
    device = model.image_mean.device
    level = model.config.grid_level if level is None else int(level)
    grid = so3.healpix_so3_grid(level)
    wigner = model.grid_wigner
    if level != model.config.grid_level:
        wigner = torch.from_numpy(grid_wigner(level, model.config.lmax).T.copy()).float()
        wigner = wigner.to(device)
    model.eval()
    logits_all, coeff_all = [], []
    starts = range(0, images.shape[0], int(batch_size))
    with torch.no_grad():
        for start in tqdm(starts, desc="predicting", disable=not progress):
            coeff = model.coefficients(images[start : start + batch_size].to(device))
            logits_all.append((coeff @ wigner).cpu())
            coeff_all.append(coeff.cpu())
    G, dim = wigner.shape[1], wigner.shape[0]
    logits = torch.cat(logits_all) if logits_all else torch.zeros(0, G)
    coefficients = torch.cat(coeff_all) if coeff_all else torch.zeros(0, dim)
    probabilities = torch.softmax(logits, dim=1)
    best_probability, best_index = (
        probabilities.max(dim=1) if logits.shape[0] else (torch.zeros(0), torch.zeros(0).long())
    )
    best_index = best_index.numpy().astype(np.int64)
    return Predictions(
        probabilities=probabilities.numpy(),
        logits=logits.numpy(),
        coefficients=coefficients.numpy(),
        best_index=best_index,
        best_rotation=grid[best_index].copy(),
        best_probability=best_probability.numpy(),
    )


def save_predictions(
    run_dir: str | os.PathLike[str],
    predictions: Predictions,
    pixel_size: float,
    image_size: int,
    true_rotations: np.ndarray | None = None,
    symmetry_ops: np.ndarray | None = None,
    stack_name: str = "../particles.mrcs",
) -> tuple[Path, Path]:
    """Write ``run_dir/model/predictions.npz`` and ``run_dir/model/predicted_particles.star``.

    The npz holds every :class:`Predictions` field (and ``errors_deg`` when ``true_rotations``
    are given). The STAR file has the RELION angles of ``best_rotation`` and the column
    ``rlnMaxValueProbDistribution``; images refer to ``stack_name`` relative to the STAR file.
    Returns the two paths.
    """
    folder = Path(run_dir) / "model"
    arrays = dataclasses.asdict(predictions)
    if true_rotations is not None:
        arrays["errors_deg"] = pose_errors_deg(
            predictions.best_rotation, np.asarray(true_rotations), symmetry_ops
        )
    npz = io.write_npz(folder / "predictions.npz", **arrays)
    star = io.write_particles_star(
        folder / "predicted_particles.star",
        so3.relion_euler_from_matrices(predictions.best_rotation).reshape(-1, 3),
        stack_name=stack_name,
        pixel_size=pixel_size,
        image_size=image_size,
        extra_columns={"MaxValueProbDistribution": predictions.best_probability},
    )
    return npz, star


def load_or_train(
    run_dir: str | os.PathLike[str],
    dataset: Any,
    labels: Any,
    model_config: ModelConfig | None = None,
    training_config: TrainingConfig | None = None,
    progress: bool = True,
) -> tuple[TrainingResult, Predictions]:
    """Train (or resume, or reload a finished run) on a run folder's dataset and labels.

    Args:
        run_dir: run folder (checkpoint, log and predictions go to ``run_dir/model/``).
        dataset: :class:`cryosphere.imaging.simulate.ParticleDataset` (uses ``noisy_images``,
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


def predict_dataset(
    run_dir: str | os.PathLike[str],
    model: PoseDistributionNetwork,
    dataset: Any,
    stack_name: str = "../particles.mrcs",
) -> Predictions:
    """:func:`predict` every image of ``dataset`` and :func:`save_predictions` them (with the
    errors against its true poses) under ``run_dir/model/``; ``stack_name`` is the dataset's
    stack relative to that folder."""
    predictions = predict(model, dataset.noisy_images)
    save_predictions(
        run_dir,
        predictions,
        pixel_size=dataset.pixel_size,
        image_size=dataset.image_size,
        true_rotations=dataset.rotations,
        symmetry_ops=dataset.symmetry_ops,
        stack_name=stack_name,
    )
    return predictions
