"""Point-group symmetry of maps: real-space averaging and a check that a map obeys a group.

A point group ``ops`` is ``(K, 3, 3)`` volume-frame rotations ``g``, identity first (poses ``R``
and ``R @ g`` give the same image; :func:`cryosphere.geometry.point_groups.point_group`).
:func:`symmetrize_map` averages a finished map over ``V(g x)`` (trilinear resampling).
:func:`symmetry_correlation` scores how well a map obeys the group in its stated frame, and
:func:`check_point_group` raises a ``ValueError`` when that score is below a threshold: the
stated group does not match the map's frame. Reconstruction imposes a group by insertion
instead (:func:`cryosphere.reconstruction.backprojection.reconstruct`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from cryosphere._checks import as_ops, as_volume
from cryosphere.geometry import rotations

__all__ = ["symmetrize_map", "symmetry_correlation", "check_point_group"]


def _rotate_map(volume: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``V(g x)`` on the grid (trilinear), centre at voxel ``N // 2``."""
    n = volume.shape[0]
    coords = torch.arange(n, dtype=torch.float32, device=volume.device) - n // 2
    zz, yy, xx = torch.meshgrid(coords, coords, coords, indexing="ij")
    x = torch.stack([xx, yy, zz], -1).reshape(-1, 3)
    gx = x @ g.T.to(device=volume.device, dtype=torch.float32)  # row vectors: (g x)ᵀ
    scale = 2.0 / (n - 1)
    offset = 2.0 * (n // 2) / (n - 1) - 1.0
    grid = (gx * scale + offset).reshape(1, n, n, n, 3)
    return F.grid_sample(
        volume[None, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )[0, 0]


def symmetrize_map(volume: np.ndarray | torch.Tensor, symmetry_ops: np.ndarray) -> torch.Tensor:
    """Average of ``V(g x)`` over the point group (real space, trilinear resampling).

    ``volume`` ``(N, N, N)`` ``[z, y, x]`` centred at voxel ``N // 2``; ``symmetry_ops``
    ``(K, 3, 3)``. A map already symmetric under the group comes back unchanged (exactly for
    operators that permute voxels, e.g. 2-folds along grid axes; to interpolation error
    otherwise). Returns float32 ``(N, N, N)``.
    """
    vol = as_volume(volume).float()
    ops = as_ops(symmetry_ops)
    total = torch.zeros_like(vol)
    for g in ops:
        total += vol if torch.equal(g, torch.eye(3, dtype=g.dtype)) else _rotate_map(vol, g)
    return total / len(ops)


def _lowpass(volume: torch.Tensor, fraction: float) -> torch.Tensor:
    n = volume.shape[0]
    k = torch.fft.fftfreq(n, device=volume.device)
    kr = torch.fft.rfftfreq(n, device=volume.device)
    k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + kr[None, None, :] ** 2
    keep = k2 <= (0.5 * fraction) ** 2
    return torch.fft.irfftn(torch.fft.rfftn(volume) * keep, s=volume.shape)


def _masked_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))


def symmetry_correlation(
    volume: np.ndarray | torch.Tensor,
    symmetry_ops: np.ndarray,
    lowpass_fraction: float = 0.5,
    n_controls: int = 8,
) -> float:
    """How well a map obeys a point group in its stated frame (about 1: yes, about 0: no).

    The map is low-pass filtered to ``lowpass_fraction`` of Nyquist (where even a noisy
    reconstruction is reliable) and restricted to the sphere of radius ``N/2 - 1``. For each
    non-identity operator ``g`` (rotation angle ``θ``) the Pearson correlation ``c_g`` of
    ``V(x)`` with ``V(g x)`` is compared with ``c_0``, the median correlation for rotations by
    the same ``θ`` about ``n_controls`` fixed, well-spread axes (a compact particle
    correlates with any rotated copy of itself through its envelope alone):
    ``score_g = (c_g - c_0) / (1 - c_0)``. Returns ``min_g score_g`` (``1.0`` for C1).
    """
    vol = as_volume(volume).float()
    ops = as_ops(symmetry_ops)
    if len(ops) == 1:
        return 1.0
    smooth = _lowpass(vol, lowpass_fraction)
    n = vol.shape[0]
    coords = torch.arange(n, dtype=torch.float32, device=vol.device) - n // 2
    r2 = coords[:, None, None] ** 2 + coords[None, :, None] ** 2 + coords[None, None, :] ** 2
    mask = r2 <= (n / 2 - 1) ** 2
    reference = smooth[mask]
    # Fixed control axes: a golden-spiral set on the half sphere (deterministic).
    i = np.arange(n_controls) + 0.5
    z = 1 - i / n_controls
    phi = math.pi * (1 + 5**0.5) * i
    axes = np.stack([np.sqrt(1 - z**2) * np.cos(phi), np.sqrt(1 - z**2) * np.sin(phi), z], -1)
    controls: dict[float, float] = {}
    scores = []
    for g in ops[1:]:
        angle = math.acos(max(-1.0, min(1.0, (float(torch.trace(g)) - 1) / 2)))
        key = round(angle, 4)
        if key not in controls:
            turns = [rotations.rotation_about_axis(axis, math.degrees(angle)) for axis in axes]
            values = [
                _masked_correlation(reference, _rotate_map(smooth, torch.as_tensor(turn))[mask])
                for turn in turns
            ]
            controls[key] = float(np.median(values))
        c0 = controls[key]
        cg = _masked_correlation(reference, _rotate_map(smooth, g)[mask])
        scores.append((cg - c0) / max(1 - c0, 1e-6))
    return float(min(scores))


def raise_frame_mismatch(corr: float, threshold: float, order: int) -> None:
    """Raise the ``ValueError`` of a map whose :func:`symmetry_correlation` ``corr`` is below
    ``threshold`` for a group of ``order`` operators (shared with ``reconstruct``)."""
    raise ValueError(
        f"the stated point group (order {order}) does not match the map's frame: the map's "
        f"correlation with its symmetry-rotated copies is {corr:.3f} < {threshold}. Check the "
        "group name and its frame (so3.point_group(name, frame) with the frame from "
        "structure.resolve_point_group), or reconstruct without symmetry_ops"
    )


def check_point_group(
    volume: np.ndarray | torch.Tensor,
    symmetry_ops: np.ndarray,
    threshold: float = 0.5,
    lowpass_fraction: float = 0.5,
) -> float:
    """Raise ``ValueError`` when ``volume`` does not obey ``symmetry_ops`` in its frame.

    Returns the :func:`symmetry_correlation` when it is at least ``threshold``.
    """
    corr = symmetry_correlation(volume, symmetry_ops, lowpass_fraction)
    if corr < threshold:
        raise_frame_mismatch(corr, threshold, len(as_ops(symmetry_ops)))
    return corr
