"""The classical pose searches against a map: exhaustive, and coarse to fine.

Refinement programs do not compare every particle with every template of a fine grid. They
search coarse to fine: every cell of a coarse HEALPix level on low frequencies only (a
low-pass band, with the translation search), then only the children of the best few cells at
the next level, on more frequencies. This module gives both classical searches on the
project's own scoring kernel (:func:`cryosphere.poses.search.local_search.candidate_scores`: each
candidate carries its particle's CTF, the shifts are searched with separable phase ramps):

* :func:`exhaustive_search` — every cell of one level, on one band (the oracle: with the
  whole half-plane it is :func:`cryosphere.poses.search.matching.ctf_template_matching`'s answer);
* :func:`coarse_to_fine_search` — a :class:`CoarseToFine` schedule: all cells of
  ``coarse_level`` on the band of ``coarse_resolution_px``, keep the best ``keep[0]``, score
  their children (:func:`~cryosphere.poses.search.local_search.child_cells`) one level finer, keep
  the best ``keep[1]``… and score the last children at ``fine_level`` on the band of
  ``fine_resolution_px``;
* :func:`band_spectra` — the templates of one level, projected from the map in chunks and cut
  to one band (the whole level-3 bank of a 128-px box is never held in memory).

Both searches return the map search's :class:`~cryosphere.poses.search.local_search.SearchResult`
(the best cell and shift of each image in ``.match``, the posterior of the searched
candidates), so that they drop in wherever ``cryosphere predict --map``'s search does.

Cost per image (``K_b``: Fourier coefficients of band ``b``, ``∝ (box · pixel / resolution)²``;
``S``: trial shifts): exhaustive ``≈ G_L · K · (1 + √S)``; coarse to fine
``≈ G_{L0} · K_coarse + Σ_i keep_i · 8 · K_fine`` (times the same shift factor), i.e. it no
longer grows with the fine grid's size, only with the cells kept. Measured (1UBI, realistic
particles at SNR 0.05, one thread; docs/benchmarks_search.md): level 2, exhaustive 30.6
images/s, coarse to fine from level 1 (8-px band, 16 cells kept) 217 images/s at 1.06× its
median error; level 3, exhaustive 4.4 images/s, coarse to fine 183-346 images/s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from cryosphere.geometry import grids
from cryosphere.imaging.projection import gaussian_blur, project_volume, volume_spectrum
from cryosphere.poses.search import local_search
from cryosphere.poses.search.local_search import SearchResult
from cryosphere.poses.search.map_search import DEFAULT_SEARCH_RESOLUTION_PX, band_max_frequency
from cryosphere.poses.search.matching import MatchResult, TemplateSpectra, template_spectra

__all__ = [
    "CoarseToFine",
    "band_spectra",
    "exhaustive_scores",
    "exhaustive_search",
    "best_cells",
    "refine_cells",
    "coarse_to_fine_search",
]


@dataclass(frozen=True)
class CoarseToFine:
    """A coarse-to-fine schedule (the knobs a fair classical baseline is tuned on).

    Attributes:
        coarse_level: the HEALPix SO(3) level whose every cell is scored first
            (1: 576 cells, ~30° apart).
        fine_level: the level of the answer (>= ``coarse_level``); every level in between is
            a stage that scores the children of the cells kept by the stage before.
        coarse_resolution_px: the band of every stage but the last: details down to this many
            pixels of the image box (:func:`~cryosphere.poses.search.map_search.band_max_frequency`;
            e.g. 8 px). An intermediate stage only ranks cells whose templates are still
            ~15° apart, so it stays on the coarse band.
        keep: cells kept after each stage but the last: one int for every stage, or one per
            stage (``fine_level − coarse_level`` values).
        fine_resolution_px: the band of the last stage (default: ``predict --map``'s).
    """

    coarse_level: int = 1
    fine_level: int = 2
    coarse_resolution_px: float = 8.0
    keep: int | tuple[int, ...] = 16
    fine_resolution_px: float = DEFAULT_SEARCH_RESOLUTION_PX

    def __post_init__(self) -> None:
        if not 0 <= int(self.coarse_level) <= int(self.fine_level) <= 3:
            raise ValueError(
                f"need 0 <= coarse_level <= fine_level <= 3, got {self.coarse_level} and "
                f"{self.fine_level}"
            )
        if not (self.coarse_resolution_px >= 2 and self.fine_resolution_px >= 2):
            raise ValueError(
                "resolutions are in pixels of the image box and must be >= 2 (Nyquist), got "
                f"{self.coarse_resolution_px} and {self.fine_resolution_px}"
            )
        keeps = self.keeps
        if len(keeps) != self.fine_level - self.coarse_level:
            raise ValueError(
                f"keep needs one value per refining stage ({self.fine_level - self.coarse_level}),"
                f" got {len(keeps)}"
            )
        for stage, kept in enumerate(keeps):
            cells = grids.healpix_so3_grid_size(self.coarse_level + stage)
            if not 1 <= kept <= cells:
                raise ValueError(f"keep must lie in 1..{cells} at stage {stage}, got {kept}")

    @property
    def levels(self) -> tuple[int, ...]:
        """The level of each stage, coarse first."""
        return tuple(range(int(self.coarse_level), int(self.fine_level) + 1))

    @property
    def keeps(self) -> tuple[int, ...]:
        """Cells kept after each stage but the last (one per refining stage)."""
        stages = int(self.fine_level) - int(self.coarse_level)
        if isinstance(self.keep, int | np.integer):
            return (int(self.keep),) * stages
        return tuple(int(k) for k in self.keep)

    @property
    def resolutions_px(self) -> tuple[float, ...]:
        """The band of each stage in px of the image box: the coarse band for every stage
        but the last, the fine band for the last (with one stage only, i.e. exhaustive,
        the fine band)."""
        coarse = (float(self.coarse_resolution_px),) * (len(self.levels) - 1)
        return (*coarse, float(self.fine_resolution_px))


def band_spectra(
    volume: np.ndarray,
    level: int,
    resolution_px: float | None,
    blur_sigma_px: float = 0.0,
    *,
    chunk: int = 4096,
    progress: bool = False,
) -> TemplateSpectra:
    """The templates of a map at every cell of the level-``level`` grid, on the band of
    ``resolution_px`` (px of the map's box; None or <= 2: the whole half-plane).

    Same templates as :func:`cryosphere.poses.labels.templates.template_bank` (projection, then a
    Gaussian blur of ``blur_sigma_px`` px), projected ``chunk`` at a time and cut to the band
    as they come, so memory holds only the band: ``G · K_band · 12`` bytes.

    Args:
        volume: ``(N, N, N)`` map ``[z, y, x]`` at the particles' box and pixel size.
    """
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise ValueError(f"volume must be a cubic array (N, N, N), got shape {vol.shape}")
    band = None if resolution_px is None else band_max_frequency(resolution_px)
    grid = grids.healpix_so3_grid(int(level))
    spectrum = volume_spectrum(vol, 2, None)
    parts = []
    starts = range(0, len(grid), int(chunk))
    for start in tqdm(starts, desc=f"templates L{level}", disable=not progress, unit="chunk"):
        projections = project_volume(vol, grid[start : start + int(chunk)], spectrum=spectrum)
        parts.append(template_spectra(gaussian_blur(projections, blur_sigma_px).cpu(), band))
    return TemplateSpectra(
        torch.cat([p.spectra for p in parts]),
        torch.cat([p.power for p in parts]),
        vol.shape[0],
        band,
    )


def exhaustive_scores(
    images: np.ndarray | torch.Tensor,
    spectra: TemplateSpectra,
    *,
    images_per_block: int = 16,
    **search,
) -> tuple[np.ndarray, np.ndarray]:
    """Score ``(n, G)`` and best shift ``(n, G, 2)`` px of every template of ``spectra`` for
    each image (:func:`~cryosphere.poses.search.local_search.candidate_scores` with every cell as a
    candidate; ``search``: its keywords ``ctf``, ``pixel_size_angstrom``, ``max_shift_px``,
    ``shift_step_px``, ``score``)."""
    a = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    n, g = a.shape[0], spectra.spectra.shape[0]
    ctf = search.pop("ctf", None)
    scores = np.empty((n, g), np.float64)
    shifts = np.empty((n, g, 2), np.float64)
    block = max(1, int(images_per_block))
    cells = np.arange(g, dtype=np.int64)
    for start in range(0, n, block):
        stop = min(start + block, n)
        part_ctf = None if ctf is None else ctf.subset(np.arange(start, stop))
        scores[start:stop], shifts[start:stop] = local_search.candidate_scores(
            a[start:stop], np.tile(cells, (stop - start, 1)), spectra, ctf=part_ctf, **search
        )
    return scores, shifts


def _top_of(scores: np.ndarray, candidates: np.ndarray, keep: int) -> np.ndarray:
    """The ``keep`` best distinct candidates of each row ``(n, keep)``, best first."""
    s = np.where(local_search._first_occurrences(candidates), scores, np.inf)
    keep = min(int(keep), s.shape[1])
    part = np.argpartition(s, keep - 1, axis=1)[:, :keep]
    order = np.argsort(np.take_along_axis(s, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(candidates, np.take_along_axis(part, order, axis=1), axis=1)


def _result(scores, candidates, shifts, spectra, keep_top: int | None, score: str):
    probability = local_search.candidate_posterior(scores, candidates, spectra, score)
    match = local_search._best_match(candidates, scores, shifts)
    if keep_top is not None and keep_top < candidates.shape[1]:
        order = np.argsort(-probability, axis=1, kind="stable")[:, : int(keep_top)]
        candidates = np.take_along_axis(candidates, order, axis=1)
        probability = np.take_along_axis(probability, order, axis=1)
        shifts = np.take_along_axis(shifts, order[:, :, None], axis=1)
    return SearchResult(match, candidates, probability, shifts)


def exhaustive_search(
    images: np.ndarray | torch.Tensor,
    spectra: TemplateSpectra,
    *,
    keep_top: int | None = 10,
    images_per_block: int = 16,
    progress: bool = False,
    **search,
) -> SearchResult:
    """Every template of ``spectra`` (one grid level, in grid order) scored for each image
    ``(n, N, N)``: the best cell and shift, and the posterior over all cells
    (:func:`~cryosphere.poses.search.local_search.candidate_posterior`) of which the ``keep_top``
    most probable are kept (probabilities not renormalised; None: all ``G``).

    ``search``: the keywords of :func:`~cryosphere.poses.search.local_search.candidate_scores`."""
    a = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    n, g = a.shape[0], spectra.spectra.shape[0]
    ctf, score = search.pop("ctf", None), search.get("score", "mse")
    parts = []
    block = max(1, int(images_per_block))
    for start in tqdm(range(0, n, block), desc="exhaustive", disable=not progress, unit="block"):
        stop = min(start + block, n)
        part_ctf = None if ctf is None else ctf.subset(np.arange(start, stop))
        scores, shifts = exhaustive_scores(
            a[start:stop], spectra, images_per_block=block, ctf=part_ctf, **search
        )
        cells = np.tile(np.arange(g, dtype=np.int64), (stop - start, 1))
        parts.append(_result(scores, cells, shifts, spectra, keep_top, score))
    if not parts:
        raise ValueError("no images to search")
    match = MatchResult(
        best_index=np.concatenate([p.match.best_index for p in parts]),
        shift_px=np.concatenate([p.match.shift_px for p in parts]),
        best_mse=np.concatenate([p.match.best_mse for p in parts]),
    )
    return SearchResult(
        match,
        np.concatenate([p.candidates for p in parts]),
        np.concatenate([p.probability for p in parts]),
        np.concatenate([p.shift_px for p in parts]),
    )


def best_cells(
    images: np.ndarray | torch.Tensor, spectra: TemplateSpectra, keep: int, **search
) -> np.ndarray:
    """The first stage of a coarse-to-fine search: every template of ``spectra`` scored (on
    its band), the ``keep`` best cells of each image ``(n, keep)``, best first."""
    scores, _ = exhaustive_scores(images, spectra, **search)
    cells = np.broadcast_to(np.arange(scores.shape[1], dtype=np.int64), scores.shape)
    return _top_of(scores, np.ascontiguousarray(cells), keep)


def refine_cells(
    images: np.ndarray | torch.Tensor,
    cells: np.ndarray,
    levels: Sequence[int],
    spectra: Sequence[TemplateSpectra],
    keeps: Sequence[int],
    **search,
) -> SearchResult:
    """The later stages of a coarse-to-fine search: the children of ``cells`` ``(n, k)``
    (level ``levels[0]``) scored at ``levels[1]`` with ``spectra[0]``, the best ``keeps[0]``
    of them kept, their children scored at ``levels[2]`` with ``spectra[1]``…; the last
    stage's candidates, all scored, make the result.

    Args:
        levels: ``m + 1`` grid levels, each one finer than the one before.
        spectra: ``m`` template spectra, of ``levels[1:]`` in grid order.
        keeps: ``m − 1`` cells kept between stages.
    """
    levels = [int(x) for x in levels]
    if len(spectra) != len(levels) - 1 or len(keeps) != len(levels) - 2:
        raise ValueError(
            f"{len(levels)} levels need {len(levels) - 1} spectra and {len(levels) - 2} keeps, "
            f"got {len(spectra)} and {len(keeps)}"
        )
    if len(spectra) == 0:
        raise ValueError("refine_cells needs at least one finer level")
    for level, templates in zip(levels[1:], spectra, strict=True):
        if templates.spectra.shape[0] != grids.healpix_so3_grid_size(level):
            raise ValueError(
                f"the level-{level} stage needs the {grids.healpix_so3_grid_size(level)} "
                f"templates of that level, got {templates.spectra.shape[0]}"
            )
    top = np.asarray(cells, dtype=np.int64)
    for stage, keep in enumerate(keeps):
        candidates = local_search.candidate_cells(top, levels[stage], levels[stage + 1])
        scores, _ = local_search.candidate_scores(images, candidates, spectra[stage], **search)
        top = _top_of(scores, candidates, keep)
    candidates = local_search.candidate_cells(top, levels[-2], levels[-1])
    return local_search.search_candidates(images, candidates, spectra[-1], **search)


def coarse_to_fine_search(
    images: np.ndarray | torch.Tensor,
    spectra: Sequence[TemplateSpectra],
    schedule: CoarseToFine,
    **search,
) -> SearchResult:
    """The classical coarse-to-fine search of ``schedule`` for images ``(n, N, N)``.

    Args:
        spectra: one template spectra per stage (:attr:`CoarseToFine.levels`), each on its
            stage's band (:attr:`CoarseToFine.resolutions_px`, e.g. :func:`band_spectra`).
        search: the keywords of :func:`~cryosphere.poses.search.local_search.candidate_scores`
            (``ctf``, ``pixel_size_angstrom``, ``max_shift_px``, ``shift_step_px``,
            ``score``).

    Returns:
        :class:`~cryosphere.poses.search.local_search.SearchResult` on the ``fine_level`` grid: the
        best cell and shift, and the posterior over the last stage's candidates. With
        ``coarse_level == fine_level``: :func:`exhaustive_search` with every cell kept.
    """
    levels = schedule.levels
    if len(spectra) != len(levels):
        raise ValueError(f"the schedule has {len(levels)} stages, got {len(spectra)} spectra")
    if len(levels) == 1:
        return exhaustive_search(images, spectra[0], keep_top=None, **search)
    coarse = best_cells(images, spectra[0], schedule.keeps[0], **search)
    return refine_cells(images, coarse, levels, spectra[1:], schedule.keeps[1:], **search)
