"""MSE landscapes and exhaustive template matching: every image against every template.

``MSE_ig = mean_pixels (T_g - I_i)²`` (float32) for all pairs, computed as
``(‖a‖² + ‖b‖² − 2 a·b) / n_pixels`` (both sides centred on the mean template first) with one
float32 matrix product per block, blocks sized to a stated memory bound
(:data:`DEFAULT_MEMORY_LIMIT_BYTES`). Template matching keeps only each image's best cell.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from cryosphere._checks import as_image_matrix

__all__ = ["DEFAULT_MEMORY_LIMIT_BYTES", "mse_landscape", "template_matching"]

DEFAULT_MEMORY_LIMIT_BYTES = 512 * 2**20
_CHUNK_QUANTUM = 64  # image chunks are multiples of 64 rows (see mse_landscape)


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
    a = as_image_matrix(images, "images")
    b = as_image_matrix(templates, "templates")
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
    device: torch.device,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(row_start, cell_start, scores)`` with ``scores = ‖b−c‖² − 2 (a−c)·(b−c)``
    (+ ``‖a−c‖²`` when ``with_image_norms``) for each image chunk × template block, float32.

    Both sides are centred on the mean template ``c`` first: the MSE is unchanged, but the
    vectors are ~4x shorter, so the float32 cancellation error of the identity (relative to
    ``‖a‖²``) shrinks ~15x. Only whole dot products are ever split between calls.

    The matrix products and the scores live on ``device`` (the norms are summed on the CPU in
    float64); on the CPU every step is the same as without a device.
    """
    n_pixels = a.shape[1]
    c = torch.from_numpy(centre)
    buffer = torch.empty((rows, cells), dtype=torch.float32, device=device)
    total = math.ceil(a.shape[0] / rows) * math.ceil(b.shape[0] / cells)
    bar = tqdm(total=total, desc=desc, disable=not progress, unit="chunk")
    for cell_start in range(0, b.shape[0], cells):
        bc = torch.from_numpy(b[cell_start : cell_start + cells]) - c
        norms_b = torch.from_numpy(
            np.einsum("ij,ij->i", bc.numpy(), bc.numpy(), dtype=np.float64).astype(np.float32)
        ).to(device)
        bc_device = bc.to(device)
        for row_start in range(0, a.shape[0], rows):
            ac = torch.from_numpy(a[row_start : row_start + rows]) - c
            scores = buffer[: ac.shape[0], : bc.shape[0]]
            if scores.shape[1] != buffer.shape[1]:
                scores = torch.empty((ac.shape[0], bc.shape[0]), dtype=torch.float32, device=device)
            torch.matmul(ac.to(device), bc_device.T, out=scores)
            scores.mul_(-2.0).add_(norms_b[None, :])
            if with_image_norms:
                norms_a = np.einsum("ij,ij->i", ac.numpy(), ac.numpy(), dtype=np.float64)
                scores.add_(torch.from_numpy(norms_a.astype(np.float32)).to(device)[:, None])
                scores.mul_(1.0 / n_pixels).clamp_(min=0.0)
            bar.update()
            yield row_start, cell_start, scores
    bar.close()


def mse_landscape(
    images: np.ndarray | torch.Tensor,
    templates: np.ndarray | torch.Tensor,
    *,
    memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
    progress: bool = False,
    device: str | torch.device | None = None,
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
        device: torch device of the matrix products (default: CPU).

    Returns:
        ``(n, G)`` float32.
    """
    a, b, centre, rows, cells = _prepare(images, templates, memory_limit_bytes)
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.float32)
    blocks = _score_blocks(a, b, centre, rows, cells, True, progress, "MSE", _device(device))
    for r, g, scores in blocks:
        out[r : r + scores.shape[0], g : g + scores.shape[1]] = scores.cpu().numpy()
    return out


def template_matching(
    noisy_images: np.ndarray | torch.Tensor,
    templates: np.ndarray | torch.Tensor,
    *,
    memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Grid index of the template with the smallest MSE for each image: ``(n,)`` int64.

    Same blocked matrix product as :func:`mse_landscape`, without keeping the ``(n, G)`` array
    (``‖a_i−c‖²`` is constant per image, so the argmin is that of ``‖b_g−c‖² − 2 (a_i−c)·(b_g−c)``).
    Ties go to the lower grid index. ``device``: as :func:`mse_landscape`.
    """
    a, b, centre, rows, cells = _prepare(noisy_images, templates, memory_limit_bytes)
    best = np.zeros(a.shape[0], dtype=np.int64)
    best_score = np.full(a.shape[0], np.inf, dtype=np.float32)
    blocks = _score_blocks(a, b, centre, rows, cells, False, progress, "matching", _device(device))
    for r, g, scores in blocks:
        index = _first_argmin(scores)
        value = scores.gather(1, index[:, None])[:, 0].cpu().numpy()
        index = index.cpu().numpy()
        better = value < best_score[r : r + len(value)]
        best[r : r + len(value)][better] = index[better] + g
        best_score[r : r + len(value)][better] = value[better]
    return best


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def _first_argmin(scores: torch.Tensor) -> torch.Tensor:
    """Row-wise argmin taking the lowest index among equal minima."""
    minima = scores.min(dim=1, keepdim=True).values
    index = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    return torch.where(scores == minima, index, scores.shape[1]).min(dim=1).values
