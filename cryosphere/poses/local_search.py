"""Local template search around the network's most probable cells (network + map refinement).

The pose network gives, per image, a distribution over the grid; exhaustive template matching
compares every image with every grid template. Between the two sits what real-data tools do
with a reference map: keep the network's ``k`` most probable cells of the level-``L`` grid,
optionally descend to their children on a finer grid ``L' > L``, and score only those
candidates against projections of the map (with each image's CTF and a translation search
when the particles carry them). The work per image drops from ``G`` templates to
``k · 8^(L'−L)``, and the answer is the template matcher's whenever its best cell lies among
the candidates.

* :func:`child_cells` — the level-``L'`` cells whose nearest level-``L`` cell is each coarse
  cell (a Voronoi partition of the fine grid; 8 per cell on average);
* :func:`candidate_cells` — the candidates ``(n, c)`` of each image from its top cells;
* :func:`local_template_matching` — the best candidate and shift per image, with the score of
  :mod:`cryosphere.poses.matching` (``mode="ctf_templates"`` when CTFs are given, the plain
  squared error otherwise).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from tqdm.auto import tqdm

from cryosphere.geometry import so3
from cryosphere.imaging import ctf as ctf_module
from cryosphere.poses.matching import (
    MatchResult,
    TemplateSpectra,
    _half_plane_weights,
    _ramps,
    _real_pair,
    shift_grid_px,
)

__all__ = ["child_cells", "candidate_cells", "local_template_matching", "search_fraction"]


@functools.cache
def _children(coarse_level: int, fine_level: int) -> np.ndarray:
    coarse = so3.healpix_so3_grid(coarse_level)
    fine = so3.healpix_so3_grid(fine_level)
    parent = so3.nearest_grid_indices(fine, coarse)
    order = np.argsort(parent, kind="stable")
    counts = np.bincount(parent, minlength=coarse.shape[0])
    width = int(counts.max())
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    table = np.empty((coarse.shape[0], width), np.int64)
    for column in range(width):
        # cells with fewer children repeat their last one (a repeated candidate changes nothing)
        table[:, column] = order[starts + np.minimum(column, counts - 1)]
    table.flags.writeable = False
    return table


def child_cells(coarse_level: int, fine_level: int) -> np.ndarray:
    """``(G_coarse, m)`` int64: the level-``fine_level`` cells whose nearest level-
    ``coarse_level`` cell is each coarse cell (rows with fewer than ``m`` children repeat
    their last child). Every fine cell appears in exactly one row. ``fine_level ==
    coarse_level`` gives ``(G, 1)`` = the cells themselves. Read-only, cached."""
    if int(fine_level) < int(coarse_level):
        raise ValueError(
            f"the fine level must be >= the coarse level, got {fine_level} < {coarse_level}"
        )
    if int(fine_level) == int(coarse_level):
        return np.arange(so3.healpix_so3_grid_size(coarse_level), dtype=np.int64)[:, None]
    return _children(int(coarse_level), int(fine_level))


def candidate_cells(top_index: np.ndarray, coarse_level: int, fine_level: int) -> np.ndarray:
    """Candidates ``(n, k · m)`` int64 on the level-``fine_level`` grid: the children
    (:func:`child_cells`) of each image's top cells ``top_index`` ``(n, k)`` (level
    ``coarse_level``, e.g. the side file of ``cryosphere predict``)."""
    top = np.asarray(top_index, dtype=np.int64)
    size = so3.healpix_so3_grid_size(coarse_level)
    if top.ndim != 2 or top.shape[1] < 1:
        raise ValueError(f"top_index must have shape (n, k) with k >= 1, got {top.shape}")
    if top.size and (top.min() < 0 or top.max() >= size):
        raise ValueError(f"top_index must hold level-{coarse_level} cells in 0..{size - 1}")
    return child_cells(coarse_level, fine_level)[top].reshape(top.shape[0], -1)


def _check_inputs(images, candidates, spectra, ctf) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    c = torch.as_tensor(np.asarray(candidates), dtype=torch.int64)
    n_pix = spectra.image_size
    if a.ndim != 3 or tuple(a.shape[1:]) != (n_pix, n_pix):
        raise ValueError(f"images must have shape (n, {n_pix}, {n_pix}), got {tuple(a.shape)}")
    if c.ndim != 2 or c.shape[0] != a.shape[0] or c.shape[1] < 1:
        raise ValueError(
            f"candidates must have shape (n, c) with n = {a.shape[0]} images, got {tuple(c.shape)}"
        )
    n_templates = spectra.pairs.shape[0]
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= n_templates):
        raise ValueError(
            f"candidates must index the {n_templates} templates (0..{n_templates - 1})"
        )
    if ctf is not None and len(ctf) != a.shape[0]:
        raise ValueError(f"{len(ctf)} CTFs given for {a.shape[0]} images")
    return a, c


def local_template_matching(
    images: np.ndarray | torch.Tensor,
    candidates: np.ndarray | torch.Tensor,
    spectra: TemplateSpectra,
    *,
    ctf: ctf_module.CTFParameters | None = None,
    pixel_size_angstrom: float | None = None,
    max_shift_px: float = 0.0,
    shift_step_px: float = 1.0,
    batch_size: int = 64,
    progress: bool = False,
) -> MatchResult:
    """Best candidate template and centring shift of each image.

    Args:
        images: ``(n, N, N)`` particle images (raw: CTF-modulated, shifted, noisy).
        candidates: ``(n, c)`` template indices per image (e.g. :func:`candidate_cells`).
        spectra: the templates' spectra (:func:`cryosphere.poses.matching.template_spectra`
            of a CTF-free template bank, in grid order).
        ctf: the images' CTF parameters; every candidate then carries its image's CTF
            (``"ctf_templates"`` of :mod:`cryosphere.poses.matching`). None: plain MSE.
        pixel_size_angstrom: Å per pixel (needed with ``ctf``).
        max_shift_px, shift_step_px: translation search (:func:`shift_grid_px`); 0: none.
        batch_size: images per block; work memory ~``batch_size · c · N² · 6`` bytes.

    Returns:
        :class:`~cryosphere.poses.matching.MatchResult` with ``best_index`` a template index
        (one of the image's candidates), ``shift_px`` and ``best_mse`` per pixel, the same
        score as exhaustive matching restricted to the candidates.
    """
    a, cand = _check_inputs(images, candidates, spectra, ctf)
    if ctf is not None and pixel_size_angstrom is None:
        raise ValueError("pixel_size_angstrom is needed to evaluate the images' CTF")
    n, n_pix = a.shape[0], spectra.image_size
    shifts = shift_grid_px(max_shift_px, shift_step_px)
    ramps = _ramps(shifts, n_pix).reshape(len(shifts), -1)
    weights = _half_plane_weights(n_pix).reshape(-1)
    best_index = np.empty(n, np.int64)
    best_shift = np.empty(n, np.int64)
    best_mse = np.empty(n, np.float64)
    starts = range(0, n, max(1, int(batch_size)))
    for start in tqdm(starts, desc="local search", disable=not progress, unit="batch"):
        stop = min(start + max(1, int(batch_size)), n)
        f = torch.fft.rfft2(a[start:stop]).reshape(stop - start, -1)
        image_power = (weights * (f.real**2 + f.imag**2)).sum(1, dtype=torch.float64)
        if ctf is not None:
            model = ctf_module.ctf_2d(
                ctf.subset(np.arange(start, stop)), n_pix, pixel_size_angstrom
            ).reshape(stop - start, -1)
            model = model.to(torch.float32)
        else:
            model = torch.ones(stop - start, f.shape[1])
        block = cand[start:stop]  # (b, c)
        shifted = _real_pair((weights * model * f)[:, None] * ramps[None])  # (b, S, 2K)
        pairs = spectra.pairs[block]  # (b, c, 2K)
        cross = torch.bmm(shifted, pairs.transpose(1, 2))  # (b, S, c)
        norms = torch.bmm((weights * model**2)[:, None], spectra.power[block].transpose(1, 2))
        scores = norms.double() - 2.0 * cross.double()  # (b, S, c)
        value, where = scores.reshape(stop - start, -1).min(dim=1)
        column = (where % block.shape[1]).numpy()
        best_index[start:stop] = block.numpy()[np.arange(stop - start), column]
        best_shift[start:stop] = (where // block.shape[1]).numpy()
        best_mse[start:stop] = ((image_power + value) / float(n_pix) ** 4).numpy()
    return MatchResult(
        best_index=best_index,
        shift_px=shifts[best_shift].astype(np.float64),
        best_mse=np.maximum(best_mse, 0.0),
    )


def search_fraction(coarse_level: int, fine_level: int, top_k: int) -> float:
    """Fraction of the level-``fine_level`` templates that :func:`candidate_cells` scores per
    image for ``top_k`` coarse cells (the saving against exhaustive matching)."""
    width = child_cells(coarse_level, fine_level).shape[1]
    return min(1.0, int(top_k) * width / so3.healpix_so3_grid_size(fine_level))
