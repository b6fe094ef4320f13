"""Training targets on the HEALPix SO(3) grid, and the exact in-plane augmentation.

Three targets, each a distribution ``(n, G)`` over the ``G`` cells of the level-``L`` grid
(:func:`cryosphere.geometry.grids.healpix_so3_grid`), rows summing to 1, float32:

* ``"pose"`` (:func:`pose_kernel_targets`): a kernel around the true pose,
  ``t_g ∝ exp(−d(R_g, R)² / 2w²)`` with ``d`` the symmetry-aware geodesic distance (degrees) and
  ``w`` half the grid spacing by default (7.4° at level 2). It needs only the true pose. Its
  cross-entropy is the negative log-likelihood of the true pose smoothed over a cell, a proper
  scoring rule: with unlimited data the network's optimum is the posterior ``p(R | I)``.
* ``"bayes"`` (:func:`bayes_posterior`): the posterior of a noisy image under the simulation's
  own model, ``p(R_g | I) ∝ exp(−‖I − T_g‖² / 2σ²)`` with the noise σ (image units) and the
  noise-free templates ``T_g``. The best any estimator can do on the grid; cross-entropy against
  it has the same expected gradient as the ``"pose"`` target's one-hot limit with less variance.
  Also the reference for calibration (its mean log-likelihood of the true pose is the ceiling).
  Evaluated at the cell centres it is overconfident where the posterior is narrower than a
  cell; on templates a grid finer, each cell summing its templates' mass
  (:func:`cryosphere.geometry.distributions.integrate_over_parents`; ``StreamConfig.bayes_level``),
  it is the posterior *integrated* over the cell, which is the ``"pose"`` target's
  expectation given the image (the truth's own cell) with far less variance, as far as the
  templates resolve the posterior (they must be finer than it is wide).
* ``"soft"``: the poster's soft map ``exp(−λ·MSE)²`` of the clean image
  (:func:`cryosphere.poses.labels.soft_maps.soft_labels`).

In-plane augmentation: rotating an image by ``θ = k · Δψ`` (``Δψ = 360° / (6 · 2^L)``, the grid's
in-plane step; 15° at level 2) gives the image of pose ``Rz(θ) @ R``, and the target moves by an
exact permutation of the grid cells: ``t'[p, j] = t[p, (j + k) mod n_ψ]``
(:func:`in_plane_permutation`, with cell ``g = p · n_ψ + j``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cryosphere import _checks
from cryosphere.geometry import grids
from cryosphere.geometry import rotations as geometry_rotations
from cryosphere.geometry.grids import in_plane_permutation
from cryosphere.imaging.projection import rotate_images
from cryosphere.poses.labels.landscape import mse_landscape

__all__ = [
    "TARGETS",
    "pose_kernel_targets",
    "bayes_posterior",
    "posterior_from_mse",
    "in_plane_step_deg",
    "rotate_in_plane",
]

TARGETS = ("pose", "bayes", "soft")


def pose_kernel_targets(
    rotations: np.ndarray,
    level: int,
    symmetry_ops: np.ndarray | None = None,
    width_deg: float | None = None,
) -> np.ndarray:
    """Kernel targets ``t_g ∝ exp(−d_sym(R_g, R)² / 2w²)`` around true poses.

    Args:
        rotations: ``(n, 3, 3)`` true poses.
        level: grid level (``G = 72 · 8^level``).
        symmetry_ops: ``(K, 3, 3)`` point group (volume frame); the distance is the minimum over
            mates ``R @ g``, so every mate gets the same weight. None: C1.
        width_deg: kernel width ``w`` in degrees; default half the grid spacing.

    Returns:
        ``(n, G)`` float32 rows summing to 1.
    """
    R = np.asarray(rotations, dtype=np.float64)
    if R.ndim != 3 or R.shape[1:] != (3, 3):
        raise ValueError(f"rotations must have shape (n, 3, 3), got {R.shape}")
    width = (
        0.5 * grids.grid_nearest_neighbour_spacing_deg(level) if width_deg is None else width_deg
    )
    if not (math.isfinite(width) and width > 0):
        raise ValueError(f"width_deg must be a positive number of degrees, got {width_deg}")
    grid_q = torch.from_numpy(
        geometry_rotations.matrices_to_quaternions(grids.healpix_so3_grid(level))
    )
    mates = np.einsum("nij,kjl->nkil", R, _checks.as_symmetry_ops(symmetry_ops))  # (n, K, 3, 3)
    mate_q = torch.from_numpy(geometry_rotations.matrices_to_quaternions(mates.reshape(-1, 3, 3)))
    # |q_R · q_g| = cos(d / 2); the nearest mate has the largest |dot|.
    dots = (mate_q @ grid_q.T).abs().reshape(R.shape[0], -1, grid_q.shape[0]).amax(dim=1)
    distance_deg = torch.rad2deg(2.0 * torch.arccos(dots.clamp(max=1.0)))
    logits = -(distance_deg**2) / (2.0 * width**2)
    return torch.softmax(logits, dim=1).float().numpy()


def bayes_posterior(
    noisy_images: np.ndarray | torch.Tensor,
    templates: np.ndarray | torch.Tensor,
    noise_sigma: float | np.ndarray,
) -> np.ndarray:
    """Posterior ``p(R_g | I) ∝ exp(−‖I − T_g‖² / 2σ²)`` of white Gaussian noise, uniform prior.

    Args:
        noisy_images: ``(n, N, N)`` images.
        templates: ``(G, N, N)`` noise-free templates on the grid (same blur as the images).
        noise_sigma: noise standard deviation (image units), a scalar or one per image ``(n,)``.

    Returns:
        ``(n, G)`` float32 rows summing to 1 (computed from the row minimum, so it never
        underflows).
    """
    mse = mse_landscape(noisy_images, templates)
    return posterior_from_mse(mse, int(np.prod(np.asarray(templates.shape[1:]))), noise_sigma)


def posterior_from_mse(
    mse: np.ndarray, n_pixels: int, noise_sigma: float | np.ndarray
) -> np.ndarray:
    """``p(R_g | I) ∝ exp(−n_pixels · MSE_ig / 2σ²)`` from per-pixel MSEs ``(n, G)`` (any model
    of the noise-free image: plain templates, or templates carrying a CTF). Returns ``(n, G)``
    float32 rows summing to 1, computed from the row minimum."""
    mse = np.asarray(mse).astype(np.float64)
    sigma = np.broadcast_to(np.asarray(noise_sigma, dtype=np.float64), (mse.shape[0],))
    if not np.all(np.isfinite(sigma)) or np.any(sigma <= 0):
        raise ValueError(f"noise_sigma must be positive and finite, got {noise_sigma}")
    scale = n_pixels / (2.0 * sigma**2)
    log_p = -(mse - mse.min(axis=1, keepdims=True)) * scale[:, None]
    p = np.exp(log_p)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def in_plane_step_deg(level: int) -> float:
    """In-plane angle step ``Δψ = 360° / (6 · 2^level)`` of the level-``level`` grid."""
    return 360.0 / (6 * 2 ** int(level))


def rotate_in_plane(
    images: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor,
    steps: np.ndarray,
    level: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment ``(images (n, N, N), targets (n, G))`` by in-plane turns of ``steps[i] · Δψ``.

    Images are rotated about pixel ``N // 2`` (:func:`cryosphere.imaging.projection.
    rotate_images`: exact for multiples of 90°, bilinear otherwise); targets are permuted
    exactly (:func:`in_plane_permutation`).
    """
    images_t = torch.as_tensor(images, dtype=torch.float32)
    targets_t = torch.as_tensor(targets)
    steps = np.asarray(steps, dtype=np.int64).reshape(-1)
    if steps.shape[0] != images_t.shape[0] or targets_t.shape[0] != images_t.shape[0]:
        raise ValueError("images, targets and steps need one entry per image")
    step_deg = in_plane_step_deg(level)
    rotated = rotate_images(images_t, steps * step_deg)
    index = torch.from_numpy(np.stack([in_plane_permutation(level, s) for s in steps]))  # (n, G)
    return rotated, torch.gather(targets_t, 1, index.to(targets_t.device))
