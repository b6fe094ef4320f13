"""What training starts from: the optimisation settings (:class:`TrainingConfig`), the losses
and learning-rate schedules, the seeded validation split, the checked input arrays, the image
normalisation and the fingerprint of the data a checkpoint was trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cryosphere._checks import as_symmetry_ops, known_fields
from cryosphere.geometry import grids
from cryosphere.imaging.projection import resolve_device
from cryosphere.poses.network.model import ModelConfig

__all__ = [
    "LOSSES",
    "LR_SCHEDULES",
    "TrainingConfig",
    "split_indices",
    "compute_loss",
]

LOSSES = ("bce", "soft_ce")
LR_SCHEDULES = ("constant", "cosine")


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
        lr_schedule: ``"constant"`` (the poster) or ``"cosine"``: step ``t`` of ``T`` (all
            epochs' steps) uses ``lr · (f + (1 − f) · (1 + cos(π t / T)) / 2)`` with
            ``f = 0.01`` (:func:`cryosphere.poses.training.streamed.learning_rate_at_step`);
            stateless, so resuming keeps the schedule of the requested ``epochs``.
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
        return known_fields(cls, record)(**record)

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)


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
    G = grids.healpix_so3_grid_size(model_config.grid_level)
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
    ops = as_symmetry_ops(symmetry_ops)
    return images, targets, rotations, ops


def _normalisation(images: np.ndarray) -> tuple[float, float]:
    mean = float(images.mean(dtype=np.float64))
    std = float(images.std(dtype=np.float64))
    return mean, (std if std > 0 else 1.0)
