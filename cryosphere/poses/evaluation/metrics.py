"""Pose metrics and the baselines (template matching, uniform guess).

Metrics only: nothing here trains or labels. The equivariance test lives in
:mod:`cryosphere.poses.evaluation.equivariance`; the accuracy-against-SNR study, which
simulates, labels and trains, in :mod:`cryosphere.runs.snr_study`.

Pose metrics
------------
For predicted poses ``P`` and true poses ``T`` ``(n, 3, 3)`` (``x_mic = R @ x_vol``):

* **geodesic error** ``d(P, T) = arccos((tr(Pᵀ T) − 1) / 2)`` in degrees; with point-group ops
  ``g`` (volume frame, identity first) the minimum over the symmetry mates ``T @ g``;
* **viewing-direction / in-plane split** of the error: with ``E = P Tᵀ`` (the microscope-frame
  rotation that turns the true pose into the predicted one, ``P = E T``), the swing–twist
  decomposition about the optical axis ``z``, ``E = S · Rz(τ)``, gives the *viewing error*
  ``arccos(E[2, 2])`` (the angle between the viewing directions ``P[2, :]`` and ``T[2, :]``)
  and the *in-plane error* ``|τ|`` (``τ = 2 atan2(q_z, q_w)`` from the quaternion of ``E``,
  wrapped to [0°, 180°]). With symmetry, the split is taken for the mate nearest in geodesic
  error;
* **median, mean, acc@15°, acc@30°** of the geodesic error;
* **log-likelihood of the true pose** ``log(p(cell of T) · G / π²)`` for a distribution ``p``
  over the ``G`` grid cells (the density on SO(3) with Haar volume π², so a uniform guess scores
  ``−log π² ≈ −2.29``). With symmetry ``p`` is read at the true pose's own cell (a model that
  splits its mass between ``K`` mates pays ``log K``).

Baselines on the same images: exhaustive template matching on the same grid (noisy image
against every noise-free template, smallest MSE; :func:`cryosphere.poses.labels.landscape.template_matching`)
and a uniform guess (Haar-random rotations, seeded).
"""

from __future__ import annotations

import math

import numpy as np

from cryosphere._checks import as_pose_stack, as_symmetry_ops
from cryosphere.geometry import grids, point_groups, rotations
from cryosphere.poses.labels.landscape import template_matching

__all__ = [
    "UNIFORM_LOG_LIKELIHOOD",
    "pose_error_parts_deg",
    "true_pose_log_likelihood",
    "pose_metrics",
    "uniform_poses",
    "template_matched_poses",
    "compare_pose_estimators",
    "accuracy_curve",
]

UNIFORM_LOG_LIKELIHOOD = -math.log(math.pi**2)
"""Log-likelihood of any pose under the uniform distribution on SO(3): ``−log π² ≈ −2.29``."""


def pose_error_parts_deg(
    predicted: np.ndarray, true: np.ndarray, symmetry_ops: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Geodesic error and its viewing-direction and in-plane parts, in degrees.

    Args:
        predicted, true: ``(n, 3, 3)`` poses.
        symmetry_ops: ``(K, 3, 3)`` point-group ops (identity first) or None.

    Returns:
        ``(total, viewing, in_plane)``, each ``(n,)`` float64 in [0°, 180°] (module docstring).
        With symmetry, ``total`` is the minimum over the mates ``true @ g`` and the parts are
        those of that mate.
    """
    P = as_pose_stack(predicted, "predicted")
    T = as_pose_stack(true, "true")
    if P.shape != T.shape:
        raise ValueError(f"predicted {P.shape} and true {T.shape} poses differ in count")
    mates = point_groups.symmetry_mates(T, as_symmetry_ops(symmetry_ops))  # (n, K, 3, 3)
    distances = rotations.geodesic_distance_deg(P[:, None], mates)  # (n, K)
    best = distances.argmin(axis=1)
    nearest = mates[np.arange(len(P)), best]
    E = P @ np.swapaxes(nearest, -1, -2)
    viewing = np.degrees(np.arccos(np.clip(E[:, 2, 2], -1.0, 1.0)))
    q = rotations.matrices_to_quaternions(E)  # (w, x, y, z)
    twist = np.degrees(2.0 * np.arctan2(q[:, 3], q[:, 0]))
    in_plane = np.abs((twist + 180.0) % 360.0 - 180.0)
    return distances[np.arange(len(P)), best], viewing, in_plane


def true_pose_log_likelihood(
    probabilities: np.ndarray,
    true: np.ndarray,
    level: int,
    symmetry_ops: np.ndarray | None = None,
) -> np.ndarray:
    """``log(p(cell nearest T) · G / π²)`` per image ``(n,)`` (module docstring).

    With a point group of ``K`` operators the mass of the cells nearest every mate ``T @ g``
    counts, as a density on the quotient: ``log(Σ_g p(cell(T g)) · G / (K π²))``, so a guess
    that splits its mass over the mates scores as one that picks the right mate, and a uniform
    guess still scores ``−log π²``.

    Args:
        probabilities: ``(n, G)`` normalised grid distributions (rows summing to 1).
        true: ``(n, 3, 3)`` true poses.
        level: grid level of ``probabilities``.
        symmetry_ops: ``(K, 3, 3)`` point group (None: C1).
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    G = grids.healpix_so3_grid_size(level)
    T = as_pose_stack(true, "true")
    if probs.shape != (len(T), G):
        raise ValueError(
            f"probabilities must have shape (n, G) = ({len(T)}, {G}) for level {level}, "
            f"got {probs.shape}"
        )
    if not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise ValueError("probabilities must be finite and non-negative")
    ops = as_symmetry_ops(symmetry_ops)
    grid = grids.healpix_so3_grid(level)
    rows = np.arange(len(T))
    mass = np.zeros(len(T))
    taken = np.zeros((len(T), 0), dtype=np.int64)
    for g in ops:
        cells = grids.nearest_grid_indices(T @ g, grid)
        fresh = ~np.any(taken == cells[:, None], axis=1)  # mates in one cell count once
        mass += np.where(fresh, probs[rows, cells], 0.0)
        taken = np.concatenate([taken, cells[:, None]], axis=1)
    with np.errstate(divide="ignore"):
        return np.log(mass * G / len(ops)) + UNIFORM_LOG_LIKELIHOOD


def pose_metrics(
    predicted: np.ndarray,
    true: np.ndarray,
    symmetry_ops: np.ndarray | None = None,
    *,
    probabilities: np.ndarray | None = None,
    level: int | None = None,
    log_likelihood: float | None = None,
) -> dict[str, float | None]:
    """Summary of pose errors (degrees) of one estimator on ``n`` images.

    Returns a dict: ``n``, ``median_deg``, ``mean_deg``, ``acc15``, ``acc30`` (fractions),
    ``viewing_median_deg``, ``in_plane_median_deg`` and ``log_likelihood`` (mean over images,
    from ``probabilities`` on grid ``level``; or the given constant; None when neither is
    given, e.g. for template matching, which gives a point estimate only).
    """
    total, viewing, in_plane = pose_error_parts_deg(predicted, true, symmetry_ops)
    if probabilities is not None:
        if level is None:
            raise ValueError("level is needed with probabilities")
        ll = float(np.mean(true_pose_log_likelihood(probabilities, true, level, symmetry_ops)))
    else:
        ll = None if log_likelihood is None else float(log_likelihood)
    return {
        "n": int(len(total)),
        "median_deg": float(np.median(total)),
        "mean_deg": float(np.mean(total)),
        "acc15": float(np.mean(total < 15.0)),
        "acc30": float(np.mean(total < 30.0)),
        "viewing_median_deg": float(np.median(viewing)),
        "in_plane_median_deg": float(np.median(in_plane)),
        "log_likelihood": ll,
    }


def accuracy_curve(errors_deg: np.ndarray, thresholds_deg: np.ndarray) -> np.ndarray:
    """Fraction of errors below each threshold: ``(len(thresholds),)``."""
    errors = np.asarray(errors_deg, dtype=np.float64)
    return (errors[None, :] < np.asarray(thresholds_deg, dtype=np.float64)[:, None]).mean(axis=1)


def uniform_poses(n: int, seed: int = 0) -> np.ndarray:
    """The uniform baseline: ``n`` Haar-random poses ``(n, 3, 3)`` (seeded)."""
    return rotations.random_rotations(int(n), seed)


def template_matched_poses(
    noisy_images: np.ndarray, templates: np.ndarray, level: int, progress: bool = False
) -> np.ndarray:
    """Exhaustive template matching on the level-``level`` grid: the grid pose of smallest MSE
    between each noisy image ``(n, N, N)`` and the noise-free templates ``(G, N, N)``."""
    grid = grids.healpix_so3_grid(level)
    if templates.shape[0] != len(grid):
        raise ValueError(
            f"{templates.shape[0]} templates do not match the level-{level} grid ({len(grid)})"
        )
    return grid[template_matching(noisy_images, templates, progress=progress)]


def compare_pose_estimators(
    true: np.ndarray,
    symmetry_ops: np.ndarray | None,
    *,
    model_probabilities: np.ndarray,
    model_poses: np.ndarray,
    template_poses: np.ndarray,
    level: int,
    seed: int = 0,
) -> dict[str, dict[str, float | None]]:
    """:func:`pose_metrics` of the model, template matching and a uniform guess on the same
    images: ``{"model": {...}, "template_matching": {...}, "uniform": {...}}``."""
    true = as_pose_stack(true, "true")
    return {
        "model": pose_metrics(
            model_poses, true, symmetry_ops, probabilities=model_probabilities, level=level
        ),
        "template_matching": pose_metrics(template_poses, true, symmetry_ops),
        "uniform": pose_metrics(
            uniform_poses(len(true), seed), true, symmetry_ops,
            log_likelihood=UNIFORM_LOG_LIKELIHOOD,
        ),
    }  # fmt: skip
