"""Pose labels: template bank, MSE landscapes, soft maps and top-fraction masks.

Recipe (per image ``i`` with true pose ``R_i`` and each cell ``R_g`` of the HEALPix SO(3) grid)
-------------------------------------------------------------------------------------------
* **Templates** ``T_g = blur(P(R_g) V)``: projections of the map at every grid rotation,
  blurred by the dataset's Gaussian (``blur_sigma`` pixels), so they match the clean images
  ``blur(P(R_i) V)`` exactly at ``R_g = R_i``.
* **MSE landscape** ``MSE_ig = mean_pixels (T_g - I_i)²`` (float32), computed for all pairs as
  ``(‖a‖² + ‖b‖² − 2 a·b) / n_pixels`` (both sides centred on the mean template first) with
  one float32 matrix product per block, blocks sized to a stated memory bound.
* **Soft map** ``Pr[R_g | I_i] ∝ exp(−λ · MSE_ig)²`` (the square as in the poster), normalised
  over the grid (computed as ``exp(−2λ (MSE_ig − min_g MSE_ig))`` so it never underflows).
* **Mask**: 1 on the ``⌈q · G⌉`` cells of smallest MSE (largest 1/MSE); ties go to the lower
  cell index. For a symmetric particle every symmetry mate has near-zero MSE, so the mask
  holds all mates.

λ auto-tuning criterion (:func:`tune_lambda`)
--------------------------------------------
λ is the value at which, averaged over images, ``target_share`` (default 50 %) of the
normalised soft-map mass lies within ``radius_deg`` of the true pose or one of its symmetry
mates; ``radius_deg`` defaults to ``max(15°, grid spacing)`` (15° at level 2 and finer, 30° at
level 1, 60° at level 0) so the ball always holds grid cells. The share grows with λ (from the
uniform share at λ → 0 to the share of the best cell at λ → ∞); λ is found by bisection in
``log λ`` (fixed bracket expansion and 32 halvings: deterministic). A blurrier map has smaller
MSE differences between neighbouring cells and so needs a larger λ.

Run-folder cache (``run_dir/labels/``)
--------------------------------------
``templates_L{level}.npy`` + ``templates_L{level}.json`` (level, blur_sigma, image size, pixel
size, oversampling, SHA-256 of the volume bytes) and ``labels.npz`` + ``labels.json`` (the
parameters and a hash of the dataset). Each is reused only when its record matches.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cryosphere import io
from cryosphere.geometry import distributions, so3
from cryosphere.imaging.projection import gaussian_blur, project_volume, volume_spectrum

__all__ = [
    "DEFAULT_MEMORY_LIMIT_BYTES",
    "PoseLabels",
    "LabelExplorerData",
    "volume_sha256",
    "template_bank",
    "dataset_templates",
    "labels_dir",
    "mse_landscape",
    "template_matching",
    "soft_labels",
    "top_fraction_mask",
    "mask_size",
    "default_radius_deg",
    "tune_lambda",
    "compute_labels",
    "load_or_make_labels",
    "label_explorer_data",
]

DEFAULT_MEMORY_LIMIT_BYTES = 512 * 2**20
_CHUNK_QUANTUM = 64  # image chunks are multiples of 64 rows (see mse_landscape)
_LABELS_VERSION = 1


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def _check_level(level: int) -> int:
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
        raise ValueError(f"grid level must be an int in 0..3, got {level!r}")
    if not 0 <= int(level) <= 3:
        raise ValueError(
            f"grid level must be in 0..3 for pose labels, got {level} "
            "(level 2, 4,608 rotations, is the default; level 3 has 36,864)"
        )
    return int(level)


def _check_q(q: float) -> float:
    if not (isinstance(q, (int, float, np.floating)) and 0 < float(q) <= 1):
        raise ValueError(f"q (mask fraction) must be in (0, 1], got {q!r}; e.g. q=0.05 for 5%")
    return float(q)


def _check_lam(lam: float) -> float:
    if not (isinstance(lam, (int, float, np.floating)) and math.isfinite(lam) and lam > 0):
        raise ValueError(f"λ (lam) must be a positive finite number, got {lam!r}")
    return float(lam)


def _check_mse(mse: np.ndarray) -> np.ndarray:
    array = np.asarray(mse)
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"mse must have shape (n images, G cells), got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("mse holds NaN or infinite values; check the images and templates")
    return array


def _as_image_matrix(images: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
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


def _squared_norms(matrix: np.ndarray, name: str) -> np.ndarray:
    """Row sums of squares ``(n,)`` in float64 (exact to float64 rounding); a row holding NaN
    or infinity gives a non-finite sum (finite float32 squares cannot overflow float64), which
    raises ValueError."""
    norms = np.einsum("ij,ij->i", matrix, matrix, dtype=np.float64)
    if not np.all(np.isfinite(norms)):
        bad = np.flatnonzero(~np.isfinite(norms))
        raise ValueError(
            f"{name} hold NaN or infinite values ({bad.size} of them, first index {bad[0]}); "
            "fix or drop those images first"
        )
    return norms


def volume_sha256(volume: np.ndarray) -> str:
    """SHA-256 hex digest of the volume's bytes as C-contiguous float32."""
    data = np.ascontiguousarray(np.asarray(volume, dtype=np.float32))
    return hashlib.sha256(data.tobytes()).hexdigest()


def _dataset_sha256(dataset: Any) -> str:
    digest = hashlib.sha256()
    for array, dtype in (
        (dataset.volume, np.float32),
        (dataset.clean_images, np.float32),
        (dataset.rotations, np.float64),
        (dataset.symmetry_ops, np.float64),
    ):
        digest.update(np.ascontiguousarray(np.asarray(array, dtype=dtype)).tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# templates
# --------------------------------------------------------------------------------------------
def template_bank(
    volume: np.ndarray,
    level: int = 2,
    blur_sigma: float = 1.0,
    *,
    pixel_size: float | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    oversampling: int = 2,
    batch_size: int = 1024,
    progress: bool = False,
) -> np.ndarray:
    """Blurred projections of ``volume`` at every rotation of the level-``level`` SO(3) grid.

    Args:
        volume: ``(N, N, N)`` map ``[z, y, x]``.
        level: grid level 0..3 (``G = 72 * 8**level`` templates).
        blur_sigma: Gaussian blur in pixels, the dataset's ``blur_sigma``.
        pixel_size: Å per pixel; only recorded in the cache record.
        cache_dir: when given, templates are read from / written to
            ``cache_dir/templates_L{level}.npy`` with a JSON record of the parameters that
            made them; a cached bank is reused only when the record matches exactly.
        oversampling, batch_size: passed to :func:`cryosphere.imaging.projection.project_volume`.
        progress: show a progress bar while projecting.

    Returns:
        ``(G, N, N)`` float32 templates ``[cell, y, x]`` in grid order.
    """
    level = _check_level(level)
    if not (blur_sigma >= 0 and math.isfinite(blur_sigma)):
        raise ValueError(f"blur_sigma must be >= 0 pixels, got {blur_sigma}")
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise ValueError(f"volume must be a cubic array (N, N, N), got shape {vol.shape}")
    record = {
        "version": _LABELS_VERSION,
        "level": level,
        "n_templates": so3.healpix_so3_grid_size(level),
        "blur_sigma": float(blur_sigma),
        "image_size": int(vol.shape[0]),
        "pixel_size": None if pixel_size is None else round(float(pixel_size), 6),
        "oversampling": int(oversampling),
        "volume_sha256": volume_sha256(vol),
    }
    if cache_dir is not None:
        folder = Path(cache_dir)
        npy_path = folder / f"templates_L{level}.npy"
        json_path = folder / f"templates_L{level}.json"
        if npy_path.is_file() and json_path.is_file() and _read_record(json_path) == record:
            cached = _read_cache(npy_path, lambda path: np.load(path))
            expected = (record["n_templates"], record["image_size"], record["image_size"])
            if cached is not None and _cache_is_whole(npy_path, cached, expected):
                return cached
    grid = so3.healpix_so3_grid(level)
    spectrum = volume_spectrum(vol, oversampling)
    projections = project_volume(
        vol, grid, batch_size=batch_size, progress=progress, spectrum=spectrum
    )
    templates = gaussian_blur(projections, blur_sigma).numpy()
    if cache_dir is not None:
        with io.atomic_path(npy_path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, templates)
        io.write_json(json_path, record)  # written last: the record marks a complete bank
    return templates


# --------------------------------------------------------------------------------------------
# MSE landscapes
# --------------------------------------------------------------------------------------------
def _block_sizes(
    n_images: int, n_cells: int, n_pixels: int, memory_limit_bytes: int
) -> tuple[int, int]:
    """``(images per chunk, templates per block)``: half the limit for the centred template
    block, half for the image chunk (its centred images and its rows of scores)."""
    half = int(memory_limit_bytes) // 2
    minimum = 4 * n_pixels + 4 * (n_pixels + 1)  # one template, one image and its score
    if half < minimum:
        raise ValueError(
            f"memory_limit_bytes={memory_limit_bytes} is too small for {n_pixels}-pixel images; "
            f"give at least {2 * minimum} bytes (a few MiB keeps the matrix products efficient)"
        )
    cells = half // (4 * n_pixels)
    if cells >= _CHUNK_QUANTUM:
        cells -= cells % _CHUNK_QUANTUM
    cells = max(1, min(cells, n_cells))
    rows = half // (4 * (n_pixels + cells))
    if rows >= _CHUNK_QUANTUM:
        rows -= rows % _CHUNK_QUANTUM
    return max(1, min(rows, n_images)), cells


def _prepare(
    images: np.ndarray | torch.Tensor,
    templates: np.ndarray | torch.Tensor,
    memory_limit_bytes: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Validated ``(n, P)`` images, ``(G, P)`` templates, their centre ``(P,)`` (the mean
    template, float32) and the block sizes."""
    a = _as_image_matrix(images, "images")
    b = _as_image_matrix(templates, "templates")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"images are {math.isqrt(a.shape[1])} px but templates are "
            f"{math.isqrt(b.shape[1])} px; make the templates from a map of the images' box size"
        )
    _squared_norms(a, "images")  # raises on NaN / infinity
    centre = b.mean(axis=0, dtype=np.float64)
    if not np.all(np.isfinite(centre)):
        _squared_norms(b, "templates")
    rows, cells = _block_sizes(a.shape[0], b.shape[0], a.shape[1], int(memory_limit_bytes))
    return a, b, centre.astype(np.float32), rows, cells


def _score_blocks(
    a: np.ndarray,
    b: np.ndarray,
    centre: np.ndarray,
    rows: int,
    cells: int,
    with_image_norms: bool,
    progress: bool,
    desc: str,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(row_start, cell_start, scores)`` with ``scores = ‖b−c‖² − 2 (a−c)·(b−c)``
    (+ ``‖a−c‖²`` when ``with_image_norms``) for each image chunk × template block, float32.

    Both sides are centred on the mean template ``c`` first: the MSE is unchanged, but the
    vectors are ~4x shorter, so the float32 cancellation error of the identity (relative to
    ``‖a‖²``) shrinks ~15x. Only whole dot products are ever split between calls.
    """
    n_pixels = a.shape[1]
    c = torch.from_numpy(centre)
    buffer = torch.empty((rows, cells), dtype=torch.float32)
    total = math.ceil(a.shape[0] / rows) * math.ceil(b.shape[0] / cells)
    bar = tqdm(total=total, desc=desc, disable=not progress, unit="chunk")
    for cell_start in range(0, b.shape[0], cells):
        bc = torch.from_numpy(b[cell_start : cell_start + cells]) - c
        norms_b = torch.from_numpy(
            np.einsum("ij,ij->i", bc.numpy(), bc.numpy(), dtype=np.float64).astype(np.float32)
        )
        for row_start in range(0, a.shape[0], rows):
            ac = torch.from_numpy(a[row_start : row_start + rows]) - c
            scores = buffer[: ac.shape[0], : bc.shape[0]]
            if scores.shape[1] != buffer.shape[1]:
                scores = torch.empty((ac.shape[0], bc.shape[0]), dtype=torch.float32)
            torch.matmul(ac, bc.T, out=scores)
            scores.mul_(-2.0).add_(norms_b[None, :])
            if with_image_norms:
                norms_a = np.einsum("ij,ij->i", ac.numpy(), ac.numpy(), dtype=np.float64)
                scores.add_(torch.from_numpy(norms_a.astype(np.float32))[:, None])
                scores.mul_(1.0 / n_pixels).clamp_(min=0.0)
            bar.update()
            yield row_start, cell_start, scores
    bar.close()


def dataset_templates(
    dataset: Any,
    level: int = 2,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> np.ndarray:
    """:func:`template_bank` of a dataset's map on grid ``level``, blurred like its images.

    Args:
        dataset: needs ``volume``, ``pixel_size`` and ``parameters.blur_sigma``.
        cache_dir: cache folder, normally ``labels_dir(run_dir)``; None: no cache.

    Returns:
        ``(G, N, N)`` float32 templates in grid order.
    """
    return template_bank(
        dataset.volume,
        level,
        float(dataset.parameters.blur_sigma),
        pixel_size=dataset.pixel_size,
        cache_dir=cache_dir,
        progress=progress,
    )


def labels_dir(run_dir: str | os.PathLike[str]) -> Path:
    """``run_dir/labels/``: where labels and templates of a run are cached."""
    return Path(run_dir) / "labels"


def mse_landscape(
    images: np.ndarray | torch.Tensor,
    templates: np.ndarray | torch.Tensor,
    *,
    memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
    progress: bool = False,
) -> np.ndarray:
    """Mean squared error between every image and every template.

    ``MSE_ig = (‖a_i−c‖² + ‖b_g−c‖² − 2 (a_i−c)·(b_g−c)) / n_pixels`` with ``c`` the mean
    template (centring leaves the MSE unchanged and cuts float32 cancellation error), one
    float32 matrix product per block (squared norms summed in float64), clamped at 0. Absolute
    error ≈ 1e-7 · (‖a−c‖² + ‖b−c‖²) / n_pixels.

    Memory: the work arrays (a centred copy of a block of templates, a centred chunk of
    images and its scores) stay below ``memory_limit_bytes``; the inputs and the returned
    ``(n, G)`` array are not counted. Blocks are multiples of 64 rows and the template axis is
    split only when the centred templates alone exceed half the limit. Every output element
    is one whole dot product whatever the block sizes, but BLAS libraries (MKL included) may
    sum it in another order for another block height or thread count, so chunked and
    unchunked results agree within ``2·eps·‖a−c‖·‖b−c‖`` (float32 eps), not bit for bit;
    the same call with the same inputs and thread count repeats exactly.

    Args:
        images: ``(n, N, N)`` images (clean for labels, noisy for template matching).
        templates: ``(G, N, N)`` templates (:func:`template_bank`).
        memory_limit_bytes: bound on the work space (default 512 MiB).
        progress: progress bar over blocks.

    Returns:
        ``(n, G)`` float32.
    """
    a, b, centre, rows, cells = _prepare(images, templates, memory_limit_bytes)
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.float32)
    for r, g, scores in _score_blocks(a, b, centre, rows, cells, True, progress, "MSE"):
        out[r : r + scores.shape[0], g : g + scores.shape[1]] = scores.numpy()
    return out


def template_matching(
    noisy_images: np.ndarray | torch.Tensor,
    templates: np.ndarray | torch.Tensor,
    *,
    memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
    progress: bool = False,
) -> np.ndarray:
    """Grid index of the template with the smallest MSE for each image: ``(n,)`` int64.

    Same blocked matrix product as :func:`mse_landscape`, without keeping the ``(n, G)`` array
    (``‖a_i−c‖²`` is constant per image, so the argmin is that of ``‖b_g−c‖² − 2 (a_i−c)·(b_g−c)``).
    Ties go to the lower grid index.
    """
    a, b, centre, rows, cells = _prepare(noisy_images, templates, memory_limit_bytes)
    best = np.zeros(a.shape[0], dtype=np.int64)
    best_score = np.full(a.shape[0], np.inf, dtype=np.float32)
    for r, g, scores in _score_blocks(a, b, centre, rows, cells, False, progress, "matching"):
        index = _first_argmin(scores)
        value = scores.gather(1, index[:, None])[:, 0].numpy()
        better = value < best_score[r : r + len(value)]
        best[r : r + len(value)][better] = index.numpy()[better] + g
        best_score[r : r + len(value)][better] = value[better]
    return best


def _first_argmin(scores: torch.Tensor) -> torch.Tensor:
    """Row-wise argmin taking the lowest index among equal minima."""
    minima = scores.min(dim=1, keepdim=True).values
    index = torch.arange(scores.shape[1]).expand_as(scores)
    return torch.where(scores == minima, index, scores.shape[1]).min(dim=1).values


# --------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------
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
    lam = _check_lam(lam)
    array = _check_mse(mse).astype(np.float64)
    if not normalize:
        return np.exp(-2.0 * lam * array).astype(np.float32)
    weights = np.exp(-2.0 * lam * (array - array.min(axis=1, keepdims=True)))
    weights /= weights.sum(axis=1, keepdims=True)
    return weights.astype(np.float32)


def mask_size(n_cells: int, q: float) -> int:
    """``⌈q · G⌉`` (at least 1), the number of cells a top-``q`` mask holds."""
    q = _check_q(q)
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
    array = _check_mse(mse)
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
    return max(15.0, 60.0 / 2 ** _check_level(level))


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
    array = _check_mse(mse)[:max_images].astype(np.float64)
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


@dataclass(frozen=True)
class PoseLabels:
    """Pose labels of a dataset on the level-``level`` HEALPix SO(3) grid.

    Attributes:
        mse: ``(n, G)`` float32 noise-free MSE landscape.
        soft: ``(n, G)`` float32 normalised soft map ``∝ exp(−λ·MSE)²``.
        mask: ``(n, G)`` bool, ``⌈q·G⌉`` smallest-MSE cells per row.
        lam: λ used (image units⁻²).
        q: mask fraction.
        level: grid level.
        lam_tuned: whether λ came from :func:`tune_lambda`.
        target_share, radius_deg: the tuning criterion's parameters.
    """

    mse: np.ndarray
    soft: np.ndarray
    mask: np.ndarray
    lam: float
    q: float
    level: int
    lam_tuned: bool = False
    target_share: float = 0.5
    radius_deg: float = 15.0

    @property
    def grid(self) -> np.ndarray:
        """``(G, 3, 3)`` grid rotations (read-only cached array)."""
        return so3.healpix_so3_grid(self.level)

    @property
    def n_cells(self) -> int:
        """``G``."""
        return int(self.mse.shape[1])

    def __len__(self) -> int:
        return int(self.mse.shape[0])


def compute_labels(
    dataset: Any,
    level: int = 2,
    q: float = 0.05,
    lam: float | None = None,
    progress: bool = True,
    templates: np.ndarray | None = None,
    *,
    target_share: float = 0.5,
    radius_deg: float | None = None,
    memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
    cache_dir: str | os.PathLike[str] | None = None,
) -> PoseLabels:
    """Labels of a :class:`cryosphere.imaging.simulate.ParticleDataset` from its clean images.

    Args:
        dataset: needs ``volume``, ``clean_images``, ``rotations``, ``symmetry_ops``,
            ``pixel_size`` and ``parameters.blur_sigma``.
        level: grid level 0..3.
        q: mask fraction in (0, 1].
        lam: λ > 0, or None to tune it (:func:`tune_lambda`, ``target_share`` within
            ``radius_deg``, default :func:`default_radius_deg`).
        progress: progress bars.
        templates: precomputed ``(G, N, N)`` templates (else :func:`template_bank`, cached in
            ``cache_dir`` when given).
        memory_limit_bytes: MSE work-space bound.
    """
    level = _check_level(level)
    q = _check_q(q)
    if getattr(dataset, "ctf", None) is not None or getattr(dataset, "shifts_px", None) is not None:
        raise ValueError(
            "this dataset's clean images carry a CTF or shifts but the templates do not; make "
            "labels from the projections at its true poses instead "
            "(cryosphere.runs.refinement.refinement_data on its run folder)"
        )
    if lam is not None:
        lam = _check_lam(lam)
    radius = default_radius_deg(level) if radius_deg is None else float(radius_deg)
    if templates is None:
        templates = dataset_templates(dataset, level, cache_dir=cache_dir, progress=progress)
    n_cells = so3.healpix_so3_grid_size(level)
    if np.asarray(templates).shape[0] != n_cells:
        raise ValueError(
            f"templates hold {np.asarray(templates).shape[0]} projections but the level-{level} "
            f"grid has {n_cells} cells; make them with template_bank(volume, level={level})"
        )
    mse = mse_landscape(
        dataset.clean_images, templates, memory_limit_bytes=memory_limit_bytes, progress=progress
    )
    tuned = lam is None
    if tuned:
        lam = tune_lambda(
            mse,
            so3.healpix_so3_grid(level),
            dataset.rotations,
            dataset.symmetry_ops,
            target_share=target_share,
            radius_deg=radius,
        )
    return PoseLabels(
        mse=mse,
        soft=soft_labels(mse, lam),
        mask=top_fraction_mask(mse, q),
        lam=float(lam),
        q=q,
        level=level,
        lam_tuned=tuned,
        target_share=float(target_share),
        radius_deg=radius,
    )


def _read_record(path: Path) -> dict[str, Any] | None:
    """A cache's JSON record, or None (with a warning) when it is unreadable."""
    try:
        return io.read_json(path)
    except ValueError as error:
        warnings.warn(f"ignoring a damaged cache record: {error}", RuntimeWarning, stacklevel=3)
        return None


def _load_label_arrays(path: Path) -> tuple[np.ndarray, np.ndarray, float]:
    with np.load(path) as data:
        return data["mse"], data["mask"], float(data["lam"])


def _read_cache(path: Path, reader: Any) -> Any:
    """``reader(path)``, or None with a warning when the file is truncated or damaged."""
    try:
        return reader(path)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        warnings.warn(
            f"{path} is damaged ({type(error).__name__}: {error}); recomputing it",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _cache_is_whole(path: Path, values: np.ndarray, shape: tuple, mask: Any = None) -> bool:
    """Whether cached arrays have the recorded shape and finite values (else warn)."""
    whole = values.shape == shape and bool(np.all(np.isfinite(values)))
    if mask is not None:
        whole = whole and mask.shape == shape and mask.dtype == bool
    if not whole:
        warnings.warn(
            f"{path} does not hold the recorded arrays (shape {values.shape}, expected {shape}, "
            "or non-finite values); recomputing it",
            RuntimeWarning,
            stacklevel=3,
        )
    return whole


def load_or_make_labels(
    run_dir: str | os.PathLike[str],
    dataset: Any,
    level: int = 2,
    q: float = 0.05,
    lam: float | None = None,
    progress: bool = True,
    *,
    target_share: float = 0.5,
) -> PoseLabels:
    """Labels cached in ``run_dir/labels/labels.npz`` (+ ``labels.json``), recomputed when the
    parameters (level, q, requested λ, tuning target, dataset hash) differ.

    Templates are cached beside them (:func:`template_bank`). The npz holds ``mse``, ``mask``
    and ``lam``; the soft map is recomputed from them on load (it is a pure function).
    """
    level = _check_level(level)
    q = _check_q(q)
    if lam is not None:
        lam = _check_lam(lam)
    folder = labels_dir(run_dir)
    record = {
        "version": _LABELS_VERSION,
        "level": level,
        "q": q,
        "lam_requested": lam,
        "target_share": float(target_share),
        "radius_deg": default_radius_deg(level),
        "blur_sigma": float(dataset.parameters.blur_sigma),
        "n_images": len(dataset.rotations),
        "dataset_sha256": _dataset_sha256(dataset),
    }
    npz_path, json_path = folder / "labels.npz", folder / "labels.json"
    stored = _read_record(json_path) if json_path.is_file() and npz_path.is_file() else None
    if stored is not None and stored.get("parameters") == record:
        cached = _read_cache(npz_path, _load_label_arrays)
        shape = (record["n_images"], so3.healpix_so3_grid_size(level))
        if cached is not None and _cache_is_whole(npz_path, cached[0], shape, cached[1]):
            mse, mask, lam_used = cached
            return PoseLabels(
                mse=mse,
                soft=soft_labels(mse, lam_used),
                mask=mask,
                lam=lam_used,
                q=q,
                level=level,
                lam_tuned=lam is None,
                target_share=float(target_share),
                radius_deg=default_radius_deg(level),
            )
    labels = compute_labels(
        dataset, level, q, lam, progress, target_share=target_share, cache_dir=folder
    )
    io.write_npz(npz_path, mse=labels.mse, mask=labels.mask, lam=np.float64(labels.lam))
    io.write_json(
        json_path,
        {"parameters": record, "lam": labels.lam, "mask_size": mask_size(labels.n_cells, q)},
    )
    return labels


# --------------------------------------------------------------------------------------------
# explorer
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelExplorerData:
    """What the label explorer shows for one image (arrays named as
    :func:`cryosphere.figures.viz.plot_label_explorer`'s arguments; see :meth:`plot_arguments`).

    Attributes:
        mse: ``(G,)`` the image's MSE landscape.
        threshold: largest MSE inside the mask.
        soft_marginal, mask_marginal: ``(P,)`` viewing-direction marginals (masses summing 1)
            of the normalised soft map and of the mask (uniform over its cells).
        pixel_directions: ``(P, 3)`` HEALPix pixel centres.
        true_directions: ``(K, 3)`` viewing directions of the true pose (row 0) and its mates.
        soft_mass_within, mask_mass_within: share of mass within ``radius_deg`` of a mate.
        lam, q, radius_deg, level: parameters.
    """

    mse: np.ndarray
    threshold: float
    soft_marginal: np.ndarray
    mask_marginal: np.ndarray
    pixel_directions: np.ndarray
    true_directions: np.ndarray
    soft_mass_within: float
    mask_mass_within: float
    lam: float
    q: float
    radius_deg: float
    level: int

    def plot_arguments(self) -> dict[str, Any]:
        """Keyword arguments for :func:`cryosphere.figures.viz.plot_label_explorer`."""
        return {
            "mse": self.mse,
            "threshold": self.threshold,
            "soft_marginal": self.soft_marginal,
            "mask_marginal": self.mask_marginal,
            "pixel_directions": self.pixel_directions,
            "true_directions": self.true_directions,
            "soft_mass_within": self.soft_mass_within,
            "mask_mass_within": self.mask_mass_within,
            "lam": self.lam,
            "q": self.q,
            "radius_deg": self.radius_deg,
        }


def label_explorer_data(
    mse_row: np.ndarray,
    level: int,
    true_rotation: np.ndarray,
    symmetry_ops: np.ndarray | None,
    lam: float,
    q: float,
    radius_deg: float = 15.0,
) -> LabelExplorerData:
    """Gather the explorer's data for one image.

    Args:
        mse_row: ``(G,)`` MSE of the image against the level-``level`` templates.
        level: grid level.
        true_rotation: ``(3, 3)`` true pose.
        symmetry_ops: ``(K, 3, 3)`` or None.
        lam: λ for the soft map; q: mask fraction; radius_deg: ball radius for the shares.
    """
    level = _check_level(level)
    row = _check_mse(np.asarray(mse_row)[None])
    soft = soft_labels(row, lam)
    mask = top_fraction_mask(row, q)
    grid = so3.healpix_so3_grid(level)
    if row.shape[1] != grid.shape[0]:
        raise ValueError(
            f"mse_row has {row.shape[1]} cells; the level-{level} grid has {len(grid)}"
        )
    rotation = np.asarray(true_rotation, dtype=np.float64).reshape(1, 3, 3)
    ops = np.eye(3)[None] if symmetry_ops is None else np.asarray(symmetry_ops, np.float64)
    mates = so3.symmetry_mates(rotation[0], ops)
    shares = distributions.mass_within_deg(
        np.concatenate([soft, mask.astype(np.float64)]),
        grid,
        np.repeat(rotation, 2, axis=0),
        ops,
        radius_deg,
    )
    return LabelExplorerData(
        mse=row[0].astype(np.float32),
        threshold=float(row[0][mask[0]].max()),
        soft_marginal=distributions.viewing_direction_marginal(soft[0], level),
        mask_marginal=distributions.viewing_direction_marginal(mask[0].astype(np.float64), level),
        pixel_directions=distributions.healpix_pixel_directions(level),
        true_directions=so3.viewing_directions(mates),
        soft_mass_within=float(shares[0]),
        mask_mass_within=float(shares[1]),
        lam=float(lam),
        q=float(q),
        radius_deg=float(radius_deg),
        level=level,
    )
