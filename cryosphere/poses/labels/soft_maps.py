"""Soft pose maps, top-fraction masks and the λ auto-tuning criterion.

* **Soft map** ``Pr[R_g | I_i] ∝ exp(−λ · MSE_ig)²`` (the square as in the poster), normalised
  over the grid (computed as ``exp(−2λ (MSE_ig − min_g MSE_ig))`` so it never underflows).
* **Mask**: 1 on the ``⌈q · G⌉`` cells of smallest MSE (largest 1/MSE); ties go to the lower
  cell index. For a symmetric particle every symmetry mate has near-zero MSE, so the mask
  holds all mates.
* **λ** (:func:`tune_lambda`): the criterion is in :mod:`cryosphere.poses.labels.dataset_labels`.
"""

from __future__ import annotations

import math

import numpy as np

from cryosphere._checks import check_label_level, check_lam, check_mse, check_q
from cryosphere.geometry import distributions

__all__ = [
    "soft_labels",
    "top_fraction_mask",
    "mask_size",
    "default_radius_deg",
    "tune_lambda",
]


def soft_labels(mse: np.ndarray, lam: float, normalize: bool = True) -> np.ndarray:
    """Soft pose map ``Pr[R_g | I_i] ∝ exp(−λ · MSE_ig)²``.

    Args:
        mse: ``(n, G)`` MSE landscape.
        lam: λ > 0, in inverse MSE units (image units⁻²).
        normalize: normalise each row to sum 1 (computed as ``exp(−2λ (MSE − min MSE))``, which
            cannot underflow); ``False`` returns the raw ``exp(−λ·MSE)²``.

    Returns:
        ``(n, G)`` float32.
    """
    lam = check_lam(lam)
    array = check_mse(mse).astype(np.float64)
    if not normalize:
        return np.exp(-2.0 * lam * array).astype(np.float32)
    weights = np.exp(-2.0 * lam * (array - array.min(axis=1, keepdims=True)))
    weights /= weights.sum(axis=1, keepdims=True)
    return weights.astype(np.float32)


def mask_size(n_cells: int, q: float) -> int:
    """``⌈q · G⌉`` (at least 1), the number of cells a top-``q`` mask holds."""
    q = check_q(q)
    return max(1, min(n_cells, math.ceil(q * n_cells - 1e-9)))


def top_fraction_mask(mse: np.ndarray, q: float = 0.05) -> np.ndarray:
    """Binary mask of the ``⌈q · G⌉`` smallest-MSE cells of each row (largest ``1 / MSE``).

    Ties at the threshold go to the lowest cell indices, so every row holds exactly
    ``mask_size(G, q)`` ones and the result is deterministic.

    Args:
        mse: ``(n, G)``.
        q: fraction in (0, 1].

    Returns:
        ``(n, G)`` bool.
    """
    array = check_mse(mse)
    n_cells = array.shape[1]
    k = mask_size(n_cells, q)
    kth = np.partition(array, k - 1, axis=1)[:, k - 1 : k]  # k-th smallest value per row
    below = array < kth
    equal = array == kth
    room = k - below.sum(axis=1, keepdims=True)
    take_equal = equal & (np.cumsum(equal, axis=1) <= room)
    return below | take_equal


def default_radius_deg(level: int) -> float:
    """``max(15°, grid spacing 60° / 2**level)``: the λ criterion's radius."""
    return max(15.0, 60.0 / 2 ** check_label_level(level))


def tune_lambda(
    mse: np.ndarray,
    grid: np.ndarray,
    true_rotations: np.ndarray,
    symmetry_ops: np.ndarray | None = None,
    *,
    target_share: float = 0.5,
    radius_deg: float = 15.0,
    max_images: int = 512,
) -> float:
    """λ at which the mean soft-map mass within ``radius_deg`` of the truth is ``target_share``.

    Criterion: ``mean_i Σ_{g: d_sym(R_g, R_i) ≤ radius} Pr_λ[R_g | I_i] = target_share``, with
    ``Pr_λ`` the normalised :func:`soft_labels` and ``d_sym`` the symmetry-aware geodesic
    distance. Solved by bisection in ``log λ``: the bracket starts at ``1 / s`` times
    ``e^{±1}`` (``s`` = median over images of the median MSE gap above the row minimum), is
    widened by factors ``e^{4}`` until it straddles the target, then halved 32 times
    (final bracket width ``< 1e-9`` in ``log λ``).
    Deterministic; the first ``max_images`` images are used.

    Args:
        mse: ``(n, G)`` noise-free MSE landscape.
        grid: ``(G, 3, 3)`` grid rotations.
        true_rotations: ``(n, 3, 3)``.
        symmetry_ops: ``(K, 3, 3)`` (None: no symmetry).
        target_share: in (0, 1).
        radius_deg: ball radius in degrees.
        max_images: at most this many images enter the criterion.

    Raises:
        ValueError: the target is not reachable (e.g. the smallest-MSE cells lie far from the
            truth, as with very noisy images), with the reachable range in the message.
    """
    if not 0 < target_share < 1:
        raise ValueError(f"target_share must be in (0, 1), got {target_share}")
    array = check_mse(mse)[:max_images].astype(np.float64)
    rotations = np.asarray(true_rotations, dtype=np.float64)[:max_images]
    if rotations.shape[0] != array.shape[0]:
        raise ValueError(
            f"mse has {array.shape[0]} rows but true_rotations has {rotations.shape[0]}"
        )
    within = distributions.cells_within_deg(grid, rotations, symmetry_ops, radius_deg)
    if within.shape != array.shape:
        raise ValueError(f"mse has {array.shape[1]} cells but the grid has {within.shape[1]}")
    gaps = np.median(array, axis=1) - array.min(axis=1)
    scale = float(np.median(gaps))
    if not scale > 0:
        raise ValueError("the MSE landscape is flat (all cells equal); λ cannot be tuned")
    log_lo, log_hi = -math.log(scale) - 1.0, -math.log(scale) + 1.0
    shifted = array - array.min(axis=1, keepdims=True)

    def share(log_lam: float) -> float:
        weights = np.exp(-2.0 * math.exp(log_lam) * shifted)
        return float(((weights * within).sum(axis=1) / weights.sum(axis=1)).mean())

    for _ in range(20):
        if share(log_lo) <= target_share:
            break
        log_lo -= 4.0
    for _ in range(20):
        if share(log_hi) >= target_share:
            break
        log_hi += 4.0
    lo_share, hi_share = share(log_lo), share(log_hi)
    if not lo_share <= target_share <= hi_share:
        raise ValueError(
            f"no λ gives a mean mass share of {target_share:.2f} within {radius_deg:g}° of the "
            f"true pose (reachable: {lo_share:.3f} to {hi_share:.3f}); lower target_share or "
            "pass lam explicitly"
        )
    for _ in range(32):
        mid = 0.5 * (log_lo + log_hi)
        if share(mid) < target_share:
            log_lo = mid
        else:
            log_hi = mid
    return float(math.exp(0.5 * (log_lo + log_hi)))
