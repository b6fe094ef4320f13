"""Distributions over the HEALPix SO(3) grid: normalisation, viewing-direction marginals, mass
near the true pose.

A *grid distribution* is an array ``probs`` of shape ``(..., G)`` of non-negative weights, one
per cell of the level-``L`` grid of :func:`cryosphere.geometry.grids.healpix_so3_grid` (``G = 72 * 8**L``),
ordered pixel-major (HEALPix NESTED pixel ``p`` of the viewing direction, ``P = 12 * 4**L``
pixels) then in-plane minor (``6 * 2**L`` in-plane angles): cell ``g = p * 6 * 2**L + j``.

Distances between poses are geodesic angles in degrees; with point-group symmetry ``ops``
``(K, 3, 3)`` (identity first) a grid cell is as close to the pose ``R`` as to its nearest
symmetry mate ``R @ g``.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from cryosphere import _checks
from cryosphere.geometry import grids, point_groups
from cryosphere.geometry import rotations as geometry_rotations

__all__ = [
    "normalize_rows",
    "healpix_pixel_directions",
    "viewing_direction_marginal",
    "cells_within_deg",
    "mass_within_deg",
    "nearest_cell_recall",
    "integrate_over_parents",
]


def _check_probs(probs: np.ndarray, name: str = "probs") -> np.ndarray:
    array = np.asarray(probs)
    if array.ndim < 1:
        raise ValueError(f"{name} must have shape (..., G), got a scalar")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds NaN or infinite values")
    if np.any(array < 0):
        raise ValueError(f"{name} holds negative weights; a grid distribution must be >= 0")
    return array


def normalize_rows(probs: np.ndarray) -> np.ndarray:
    """Divide each distribution ``(..., G)`` by its sum over the last axis.

    Returns float64 ``(..., G)`` rows summing to 1. Raises ValueError for negative, non-finite
    or all-zero rows.
    """
    array = _check_probs(probs).astype(np.float64)
    totals = array.sum(axis=-1, keepdims=True)
    if np.any(totals <= 0):
        raise ValueError("a distribution row sums to 0; it cannot be normalised")
    return array / totals


@functools.cache
def _pixel_directions(level: int) -> np.ndarray:
    import healpy

    nside = 2**level
    vec = np.stack(healpy.pix2vec(nside, np.arange(12 * nside * nside), nest=True), axis=-1)
    vec = np.ascontiguousarray(vec, dtype=np.float64)
    vec.flags.writeable = False
    return vec


def healpix_pixel_directions(level: int) -> np.ndarray:
    """Unit vectors ``(P, 3)`` (x, y, z) of the NESTED HEALPix pixel centres, ``P = 12 * 4**level``.

    These are the viewing directions of the grid cells: cell ``p * 6 * 2**level + j`` has
    viewing direction ``healpix_pixel_directions(level)[p]``. Read-only cached array.
    """
    grids.healpix_so3_grid_size(level)  # validates the level
    return _pixel_directions(int(level))


def viewing_direction_marginal(
    probs: np.ndarray, level: int, density: bool = False, normalize: bool = True
) -> np.ndarray:
    """Marginal over viewing directions: sum a grid distribution over the in-plane angle.

    Args:
        probs: ``(..., G)`` non-negative weights on the level-``level`` grid.
        level: grid level (0..4); ``G`` must be ``72 * 8**level``.
        density: return a density per steradian (each HEALPix pixel covers ``4π / P`` sr)
            instead of a mass per pixel.
        normalize: normalise each row of ``probs`` to sum 1 first.

    Returns:
        ``(..., P)`` float64, ``P = 12 * 4**level``, indexed by NESTED pixel. With
        ``normalize`` the masses sum to 1 (densities integrate to 1 over the sphere).
    """
    n_cells = grids.healpix_so3_grid_size(level)
    array = normalize_rows(probs) if normalize else _check_probs(probs).astype(np.float64)
    if array.shape[-1] != n_cells:
        raise ValueError(
            f"probs has {array.shape[-1]} cells on its last axis, but the level-{level} grid "
            f"has {n_cells}"
        )
    n_pix = 12 * 4**level
    marginal = array.reshape(array.shape[:-1] + (n_pix, n_cells // n_pix)).sum(axis=-1)
    if density:
        marginal = marginal / (4.0 * math.pi / n_pix)
    return marginal


def cells_within_deg(
    grid: np.ndarray,
    true_rotations: np.ndarray,
    symmetry_ops: np.ndarray | None = None,
    radius_deg: float = 15.0,
) -> np.ndarray:
    """Which grid cells lie within ``radius_deg`` of each true pose or one of its mates.

    Args:
        grid: ``(G, 3, 3)`` grid rotations.
        true_rotations: ``(n, 3, 3)`` poses.
        symmetry_ops: ``(K, 3, 3)`` point-group ops (None: no symmetry).
        radius_deg: geodesic radius in degrees (> 0).

    Returns:
        ``(n, G)`` bool. Uses ``cos(d / 2) = |q_a . q_b|`` on unit quaternions.
    """
    if not (radius_deg > 0 and math.isfinite(radius_deg)):
        raise ValueError(f"radius_deg must be a positive number of degrees, got {radius_deg}")
    grid = np.asarray(grid, dtype=np.float64)
    rotations = np.asarray(true_rotations, dtype=np.float64)
    if rotations.ndim == 2:
        rotations = rotations[None]
    if grid.ndim != 3 or grid.shape[1:] != (3, 3):
        raise ValueError(f"grid must have shape (G, 3, 3), got {grid.shape}")
    if rotations.ndim != 3 or rotations.shape[1:] != (3, 3):
        raise ValueError(f"true_rotations must have shape (n, 3, 3), got {rotations.shape}")
    ops = _checks.as_symmetry_ops(symmetry_ops)
    mates = point_groups.symmetry_mates(rotations, ops)  # (n, K, 3, 3)
    q_mates = geometry_rotations.matrices_to_quaternions(mates)  # (n, K, 4)
    q_grid = geometry_rotations.matrices_to_quaternions(grid)  # (G, 4)
    threshold = math.cos(math.radians(radius_deg) / 2.0)
    within = np.zeros((rotations.shape[0], grid.shape[0]), dtype=bool)
    for k in range(q_mates.shape[1]):
        within |= np.abs(q_mates[:, k] @ q_grid.T) >= threshold
    return within


def mass_within_deg(
    probs: np.ndarray,
    grid: np.ndarray,
    true_rotations: np.ndarray,
    symmetry_ops: np.ndarray | None = None,
    radius_deg: float = 15.0,
) -> np.ndarray:
    """Share of each distribution's mass within ``radius_deg`` of the true pose or a mate.

    Args:
        probs: ``(n, G)`` non-negative weights (normalised here).
        grid: ``(G, 3, 3)`` grid rotations.
        true_rotations: ``(n, 3, 3)`` true poses.
        symmetry_ops: ``(K, 3, 3)`` point-group ops (None: no symmetry).
        radius_deg: geodesic radius in degrees.

    Returns:
        ``(n,)`` float64 in [0, 1].
    """
    weights = normalize_rows(np.atleast_2d(probs))
    within = cells_within_deg(grid, true_rotations, symmetry_ops, radius_deg)
    if within.shape != weights.shape:
        raise ValueError(
            f"probs has shape {weights.shape} but grid and true_rotations give {within.shape}"
        )
    return (weights * within).sum(axis=-1)


def nearest_cell_recall(
    mask: np.ndarray,
    grid: np.ndarray,
    true_rotations: np.ndarray,
    symmetry_ops: np.ndarray | None = None,
) -> np.ndarray:
    """How often the grid cell nearest to each symmetry mate of the true pose is in the mask.

    Args:
        mask: ``(n, G)`` bool.
        grid: ``(G, 3, 3)`` grid rotations.
        true_rotations: ``(n, 3, 3)``.
        symmetry_ops: ``(K, 3, 3)``, identity first (None: identity only).

    Returns:
        ``(K,)`` float64: entry ``k`` is the fraction of images whose cell nearest to
        ``R_i @ g_k`` has ``mask[i, cell]`` true (entry 0 is the true pose itself).
    """
    mask = np.asarray(mask, dtype=bool)
    ops = _checks.as_symmetry_ops(symmetry_ops)
    rotations = np.asarray(true_rotations, dtype=np.float64)
    if mask.shape != (rotations.shape[0], np.asarray(grid).shape[0]):
        raise ValueError(
            f"mask has shape {mask.shape}, expected (n images, G cells) = "
            f"({rotations.shape[0]}, {np.asarray(grid).shape[0]})"
        )
    mates = point_groups.symmetry_mates(rotations, ops)  # (n, K, 3, 3)
    n, k = mates.shape[:2]
    nearest = grids.nearest_grid_indices(mates.reshape(-1, 3, 3), grid).reshape(n, k)
    hits = np.take_along_axis(mask, nearest, axis=1)
    return hits.mean(axis=0)


def integrate_over_parents(
    probability: np.ndarray, candidates: np.ndarray, coarse_level: int, fine_level: int
) -> np.ndarray:
    """The mass of every level-``coarse_level`` cell ``(n, G_coarse)`` float64: the sum of its
    children's probability (``probability`` ``(n, c)`` over the level-``fine_level`` cells
    ``candidates``: ``(n, c)``, one row per image, or ``(c,)`` for every row), a child going to
    its nearest coarse cell (:func:`~cryosphere.geometry.grids.parent_cells`); cells with no
    child among the candidates get 0. E.g. a search posterior or a ``"bayes"`` training target
    on finer templates, integrated over each cell."""
    p = np.asarray(probability, dtype=np.float64)
    cand = np.asarray(candidates, dtype=np.int64)
    if p.ndim != 2 or cand.shape not in (p.shape, p.shape[1:]):
        raise ValueError(
            f"candidates must give one cell per column of probability: {cand.shape} cells for "
            f"a {p.shape} probability array"
        )
    if int(fine_level) == int(coarse_level):
        cells = cand
    else:
        cells = grids.parent_cells(int(coarse_level), int(fine_level))[cand]
    n_cells = grids.healpix_so3_grid_size(coarse_level)
    flat = np.broadcast_to(cells, p.shape) + n_cells * np.arange(p.shape[0])[:, None]
    summed = np.bincount(flat.reshape(-1), weights=p.reshape(-1), minlength=p.shape[0] * n_cells)
    return summed.reshape(p.shape[0], n_cells)
