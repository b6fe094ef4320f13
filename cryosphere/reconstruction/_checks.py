"""Input checks shared by the reconstruction modules: images, poses with weights, point-group
operators and maps, each turned into a tensor or refused with a message that names the fix."""

from __future__ import annotations

import numpy as np
import torch


def as_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
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


def as_poses(
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


def as_volume(volume: np.ndarray | torch.Tensor, name: str = "volume") -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(volume) if not torch.is_tensor(volume) else volume)
    if tensor.ndim != 3 or len(set(tensor.shape)) != 1:
        raise ValueError(f"{name} must be a cubic array (N, N, N), got {tuple(tensor.shape)}")
    return tensor
