"""Input checks shared by every stage: rotation stacks, point-group operators, grid levels,
images, volumes, poses with weights and configuration records, each returned as the array the
caller works on or refused with a ``ValueError`` that names the problem and the fix.

Below every stage (it imports only NumPy and torch), so geometry, imaging, poses and
reconstruction all check their inputs the same way.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

import numpy as np
import torch

__all__ = [
    "as_matrices",
    "check_rotations",
    "as_pose_stack",
    "as_symmetry_ops",
    "check_grid_level",
    "known_fields",
    "as_images",
    "as_weighted_poses",
    "as_ops",
    "as_volume",
    "MAX_LABEL_LEVEL",
    "check_label_level",
    "check_q",
    "check_lam",
    "check_mse",
    "as_image_matrix",
]

_Config = TypeVar("_Config")


# --------------------------------------------------------------------------------------------
# NumPy: rotations, point groups, grid levels
# --------------------------------------------------------------------------------------------
def as_matrices(R: np.ndarray, name: str = "R") -> np.ndarray:
    """``R`` as float64 ``(..., 3, 3)``; ValueError naming the shape otherwise."""
    R = np.asarray(R, dtype=np.float64)
    if R.ndim < 2 or R.shape[-2:] != (3, 3):
        raise ValueError(f"{name} must have shape (..., 3, 3), got {R.shape}")
    return R


def check_rotations(R: np.ndarray, name: str = "R", atol: float = 1e-5) -> np.ndarray:
    """Raise ValueError unless every matrix in ``R`` (..., 3, 3) is a proper rotation."""
    R = as_matrices(R, name)
    if R.size == 0:
        return R
    if not np.all(np.isfinite(R)):
        raise ValueError(f"{name} contains non-finite values")
    gram = np.swapaxes(R, -1, -2) @ R
    orth_err = np.abs(gram - np.eye(3)).max()
    det_err = np.abs(np.linalg.det(R) - 1.0).max()
    if orth_err > atol or det_err > atol:
        raise ValueError(
            f"{name} is not a stack of rotation matrices (max |R^T R - I| = {orth_err:.2e}, "
            f"max |det R - 1| = {det_err:.2e}, tolerance {atol:g})"
        )
    return R


def as_pose_stack(R: np.ndarray, name: str) -> np.ndarray:
    """Finite poses as float64 ``(n, 3, 3)`` (one ``(3, 3)`` pose becomes ``(1, 3, 3)``)."""
    array = np.asarray(R, dtype=np.float64)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (3, 3):
        raise ValueError(f"{name} must have shape (n, 3, 3), got {np.shape(R)}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds NaN or infinite values")
    return array


def as_symmetry_ops(symmetry_ops: np.ndarray | None) -> np.ndarray:
    """Point-group operators as a float64 ``(K, 3, 3)`` array; None gives C1 (the identity).

    Raises ValueError naming the shape when it is not ``(K, 3, 3)`` with ``K >= 1``.
    """
    if symmetry_ops is None:
        return np.eye(3)[None]
    ops = np.asarray(symmetry_ops, dtype=np.float64)
    if ops.ndim != 3 or ops.shape[1:] != (3, 3) or ops.shape[0] < 1:
        raise ValueError(f"symmetry_ops must have shape (K, 3, 3), got {ops.shape}")
    return ops


def check_grid_level(level: int, max_level: int, what: str, hint: str = "") -> int:
    """``level`` as an int in ``0..max_level``; ValueError otherwise.

    Args:
        level: HEALPix SO(3) grid level (``72 * 8**level`` cells).
        max_level: the largest level the caller accepts.
        what: what the level is for, e.g. ``"HEALPix SO(3) grid level"``.
        hint: appended to the out-of-range message (default: the cell count asked for).
    """
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
        raise ValueError(f"{what} must be an int in 0..{max_level}, got {level!r}")
    if not 0 <= int(level) <= max_level:
        hint = hint or f"level {level} would have {72 * 8 ** int(level)} cells"
        raise ValueError(f"{what} must be in 0..{max_level}, got {level} ({hint})")
    return int(level)


def known_fields(
    cls: type[_Config], record: dict[str, Any], error: type[Exception] = ValueError
) -> type[_Config]:
    """Raise ``error`` naming the keys of ``record`` that are not fields of dataclass ``cls``
    (and the valid ones); returns ``cls`` so ``known_fields(cls, record)(**record)`` builds it."""
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(record) - names)
    if unknown:
        raise error(f"unknown {cls.__name__} fields {unknown}; valid: {sorted(names)}")
    return cls


# --------------------------------------------------------------------------------------------
# torch: images, poses with weights, operators, volumes
# --------------------------------------------------------------------------------------------
def as_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A non-empty stack of square images as a tensor ``(n, N, N)`` (one image gains n = 1)."""
    tensor = torch.as_tensor(images)
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim != 3:
        raise ValueError(f"images must have shape (n, N, N), got {tuple(tensor.shape)}")
    if tensor.shape[1] != tensor.shape[2]:
        raise ValueError(
            f"images must be square (n, N, N), got {tuple(tensor.shape[1:])} pixels; "
            "crop or pad them to a square box first"
        )
    if tensor.shape[0] == 0:
        raise ValueError("no images to reconstruct from")
    return tensor


def as_weighted_poses(
    rotations: np.ndarray | torch.Tensor, weights: np.ndarray | torch.Tensor | None, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return rotations ``(n, k, 3, 3)`` float64 and weights ``(n, k)`` float64."""
    if isinstance(rotations, np.ndarray) and not rotations.flags.writeable:
        rotations = rotations.copy()  # torch refuses to wrap read-only arrays (cached grids)
    rots = torch.as_tensor(rotations, dtype=torch.float64)
    if rots.ndim == 3:
        rots = rots[:, None]
    if rots.ndim != 4 or tuple(rots.shape[-2:]) != (3, 3):
        raise ValueError(
            f"rotations must have shape (n, 3, 3) or (n, k, 3, 3), got {tuple(rots.shape)}"
        )
    if rots.shape[0] != n:
        raise ValueError(
            f"got {n} images but {rots.shape[0]} poses; pass one pose (or one set of k poses) "
            "per image, in the same order"
        )
    if weights is None:
        if rots.shape[1] != 1:
            raise ValueError(
                f"rotations hold k = {rots.shape[1]} poses per image: pass weights (n, k) "
                "(e.g. the poses' probabilities)"
            )
        w = torch.ones(rots.shape[:2], dtype=torch.float64)
    else:
        w = torch.as_tensor(weights, dtype=torch.float64)
        if w.ndim == 1:
            w = w[:, None]
        if tuple(w.shape) != tuple(rots.shape[:2]):
            raise ValueError(
                f"weights must have shape {tuple(rots.shape[:2])} (one per pose), "
                f"got {tuple(w.shape)}"
            )
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError("weights must be finite and >= 0")
    if not torch.isfinite(rots).all():
        raise ValueError("rotations hold NaN or infinite values")
    return rots, w


def as_ops(symmetry_ops: np.ndarray | torch.Tensor | None) -> torch.Tensor:
    """Proper rotations ``(K, 3, 3)`` float64 tensor; None gives C1 (the identity)."""
    if symmetry_ops is None:
        return torch.eye(3, dtype=torch.float64)[None]
    ops = torch.as_tensor(np.asarray(symmetry_ops), dtype=torch.float64)
    if ops.ndim == 2:
        ops = ops[None]
    if ops.ndim != 3 or tuple(ops.shape[1:]) != (3, 3):
        raise ValueError(f"symmetry_ops must have shape (K, 3, 3), got {tuple(ops.shape)}")
    eye = torch.eye(3, dtype=torch.float64)
    orthogonal = torch.allclose(ops @ ops.transpose(1, 2), eye.expand_as(ops), atol=1e-5)
    if not orthogonal or not torch.allclose(
        torch.linalg.det(ops), torch.ones(len(ops), dtype=ops.dtype)
    ):
        raise ValueError("symmetry_ops must be proper rotations (e.g. so3.point_group(name))")
    return ops


def as_volume(
    volume: np.ndarray | torch.Tensor, name: str = "volume", finite: bool = False
) -> torch.Tensor:
    """A cubic ``(N, N, N)`` tensor (no copy when possible); ``finite``: refuse NaN/infinity."""
    tensor = torch.as_tensor(np.asarray(volume) if not torch.is_tensor(volume) else volume)
    if tensor.ndim != 3 or len(set(tensor.shape)) != 1:
        raise ValueError(
            f"{name} must be a cubic array (N, N, N), got shape {tuple(tensor.shape)}; "
            "pad or crop it to a cube first"
        )
    if finite and not torch.isfinite(tensor).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return tensor


# --------------------------------------------------------------------------------------------
# pose labels: grid level, mask fraction, λ, MSE landscapes, image matrices
# --------------------------------------------------------------------------------------------
MAX_LABEL_LEVEL = 3


def check_label_level(level: int) -> int:
    """A grid level for pose labels, 0..3 (level 4's templates do not fit in memory)."""
    return check_grid_level(
        level,
        MAX_LABEL_LEVEL,
        "grid level for pose labels",
        "level 2, 4,608 rotations, is the default; level 3 has 36,864",
    )


def check_q(q: float) -> float:
    if not (isinstance(q, (int, float, np.floating)) and 0 < float(q) <= 1):
        raise ValueError(f"q (mask fraction) must be in (0, 1], got {q!r}; e.g. q=0.05 for 5%")
    return float(q)


def check_lam(lam: float) -> float:
    if not (isinstance(lam, (int, float, np.floating)) and math.isfinite(lam) and lam > 0):
        raise ValueError(f"λ (lam) must be a positive finite number, got {lam!r}")
    return float(lam)


def check_mse(mse: np.ndarray) -> np.ndarray:
    array = np.asarray(mse)
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"mse must have shape (n images, G cells), got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("mse holds NaN or infinite values; check the images and templates")
    return array


def as_image_matrix(images: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """``(n, N, N)`` images as a C-contiguous ``(n, N*N)`` float32 array (no copy if possible)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    array = np.asarray(images)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[-1] != array.shape[-2]:
        raise ValueError(f"{name} must have shape (n, N, N), got {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return np.ascontiguousarray(array, dtype=np.float32).reshape(array.shape[0], -1)
