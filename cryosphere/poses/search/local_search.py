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
* :mod:`cryosphere.poses.search.map_search` — the same for a user's particle set and consensus map
  (``cryosphere predict --map``);
* :func:`local_template_matching` — the best candidate and shift per image, with the score of
  :mod:`cryosphere.poses.search.matching` (``mode="ctf_templates"`` when CTFs are given, the plain
  squared error otherwise), or, for images whose scale relative to the map is unknown (real
  particles, normalised), the squared error after the best scale ``a`` per image and
  candidate: ``min_a ‖F − a·C·T‖²``, i.e. the largest ``⟨F, C·T⟩ / ‖C·T‖`` (zero frequency
  left out, since a normalised image's mean says nothing about the pose).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from cryosphere.geometry import grids
from cryosphere.imaging import ctf as ctf_module
from cryosphere.imaging import microscope
from cryosphere.poses.search.matching import MatchResult, TemplateSpectra, shift_grid_px

__all__ = [
    "SCORES",
    "child_cells",
    "candidate_cells",
    "local_template_matching",
    "search_fraction",
    "search_top_cells",
    "best_of_top_cells",
    "candidate_scores",
    "candidate_posterior",
    "fitted_scale",
    "SearchResult",
    "search_candidates",
]

SCORES = ("mse", "scaled", "fitted")
#: Scores that leave the zero frequency out (the particles' scale against the map is unknown).
SCALE_FREE_SCORES = ("scaled", "fitted")


@functools.cache
def _children(coarse_level: int, fine_level: int) -> np.ndarray:
    parent = grids.parent_cells(coarse_level, fine_level)  # the one partition
    n_coarse = grids.healpix_so3_grid_size(coarse_level)
    order = np.argsort(parent, kind="stable")
    counts = np.bincount(parent, minlength=n_coarse)
    width = int(counts.max())
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    table = np.empty((n_coarse, width), np.int64)
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
        return np.arange(grids.healpix_so3_grid_size(coarse_level), dtype=np.int64)[:, None]
    return _children(int(coarse_level), int(fine_level))


def candidate_cells(top_index: np.ndarray, coarse_level: int, fine_level: int) -> np.ndarray:
    """Candidates ``(n, k · m)`` int64 on the level-``fine_level`` grid: the children
    (:func:`child_cells`) of each image's top cells ``top_index`` ``(n, k)`` (level
    ``coarse_level``, e.g. the side file of ``cryosphere predict``)."""
    top = np.asarray(top_index, dtype=np.int64)
    size = grids.healpix_so3_grid_size(coarse_level)
    if top.ndim != 2 or top.shape[1] < 1:
        raise ValueError(f"top_index must have shape (n, k) with k >= 1, got {top.shape}")
    if top.size and (top.min() < 0 or top.max() >= size):
        raise ValueError(f"top_index must hold level-{coarse_level} cells in 0..{size - 1}")
    return child_cells(coarse_level, fine_level)[top].reshape(top.shape[0], -1)


def _check_inputs(images, candidates, spectra, ctf) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    cells = np.asarray(candidates, dtype=np.int64)
    c = torch.as_tensor(cells if cells.flags.writeable else cells.copy())  # cached: read-only
    n_pix = spectra.image_size
    if a.ndim != 3 or tuple(a.shape[1:]) != (n_pix, n_pix):
        raise ValueError(f"images must have shape (n, {n_pix}, {n_pix}), got {tuple(a.shape)}")
    if c.ndim != 2 or c.shape[0] != a.shape[0] or c.shape[1] < 1:
        raise ValueError(
            f"candidates must have shape (n, c) with n = {a.shape[0]} images, got {tuple(c.shape)}"
        )
    n_templates = spectra.spectra.shape[0]
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= n_templates):
        raise ValueError(
            f"candidates must index the {n_templates} templates (0..{n_templates - 1})"
        )
    if ctf is not None and len(ctf) != a.shape[0]:
        raise ValueError(f"{len(ctf)} CTFs given for {a.shape[0]} images")
    return a, c


def _shift_axes(max_shift_px: float, shift_step_px: float, spectra: TemplateSpectra):
    """The square shift grid split into its two axes: the conjugate phase ramps along the
    band's ``rfft2`` columns ``(columns, A)`` and rows ``(A, R)`` (complex64, ``e^{+2πi k s}``
    for the ``A`` shifts of an axis), the shifts ``(S, 2)`` px of :func:`shift_grid_px` and
    ``order`` ``(S,)``: the position ``iy · A + ix`` of each (its order, so ties still go to
    the smaller shift)."""
    shifts = shift_grid_px(max_shift_px, shift_step_px)
    half = int(round(np.abs(shifts).max() / float(shift_step_px)))
    axis = torch.as_tensor(np.arange(-half, half + 1) * float(shift_step_px))
    steps = np.rint(shifts / float(shift_step_px)).astype(np.int64) + half
    order = torch.as_tensor(steps[:, 1] * len(axis) + steps[:, 0])
    n_pix = spectra.image_size
    kx = torch.fft.rfftfreq(n_pix, dtype=torch.float64)[: spectra.columns]
    ky = torch.fft.fftfreq(n_pix, dtype=torch.float64)[spectra.rows]
    along_x = torch.polar(
        torch.ones(len(kx), len(axis), dtype=torch.float64), 2 * np.pi * kx[:, None] * axis
    )
    along_y = torch.polar(
        torch.ones(len(axis), len(ky), dtype=torch.float64), 2 * np.pi * axis[:, None] * ky
    )
    return along_x.to(torch.complex64), along_y.to(torch.complex64), shifts, order


def candidate_scores(
    images: np.ndarray | torch.Tensor,
    candidates: np.ndarray | torch.Tensor,
    spectra: TemplateSpectra,
    *,
    ctf: ctf_module.CTFParameters | None = None,
    pixel_size_angstrom: float | None = None,
    max_shift_px: float = 0.0,
    shift_step_px: float = 1.0,
    batch_size: int | None = None,
    score: str = "mse",
    scale: float = 1.0,
    ctf_field: str = "box",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Score of every candidate template of each image, at its best centring shift.

    The cross term ``Re Σ_k w C F e_s conj(T)`` of every (image, candidate) pair is evaluated
    for all shifts at once by splitting the phase ramp ``e_s`` into its column and row factors:
    two small matrix products of ``H = conj(w C F) · T`` instead of one product per shift.
    The work buffers are allocated once per call and reused for every block of images.

    Args:
        images: ``(n, N, N)`` particle images (raw: CTF-modulated, shifted, noisy).
        candidates: ``(n, c)`` template indices per image (e.g. :func:`candidate_cells`).
        spectra: the templates' spectra (:func:`cryosphere.poses.search.matching.template_spectra`
            of a CTF-free template bank, in grid order).
        ctf: the images' CTF parameters; every candidate then carries its image's CTF
            (``"ctf_templates"`` of :mod:`cryosphere.poses.search.matching`). None: plain MSE.
        pixel_size_angstrom: Å per pixel (needed with ``ctf``).
        max_shift_px, shift_step_px: translation search (:func:`shift_grid_px`); 0: none.
        batch_size: images per block; None: about 1,024 (image, candidate) pairs per block.
            Work memory ~``batch_size · c · N² · 6`` bytes.
        score: ``"mse"`` (images on the templates' scale, as simulated) or ``"scaled"`` (a
            free positive scale per image and candidate, no zero frequency; real particles,
            which must have RELION's contrast: protein white, as the map) or ``"fitted"``
            (one positive ``scale`` for every image and candidate, the data's scale against
            the map fitted beforehand, :func:`fitted_scale`, as refinement programs correct
            a group's intensity scale; no zero frequency).
        scale: the images' scale ``a`` against the templates with ``score="fitted"``.
        ctf_field: ``"box"``: every candidate carries the image's CTF applied in the box;
            ``"padded"``: the CTF acts in a padded field and the template is boxed afterwards,
            as a microscope images a particle (:mod:`cryosphere.imaging.microscope`); the
            cross term is then exact, ``⟨I, B C P T⟩ = ⟨B C P I, T⟩``: the image is imaged in
            the field once (:func:`cryosphere.poses.search.matching.padded_ctf_mse_landscape`), and
            the shifted cross term takes the shift outside (exact up to the box edges).

    Returns:
        ``(n, c)`` float64 mean squared error per pixel of each candidate at its best shift
        (``"scaled"``: after the best scale), the score of exhaustive matching restricted to
        the candidates; and ``(n, c, 2)`` float64 that shift ``(sx, sy)`` in px.
    """
    a, cand = _check_inputs(images, candidates, spectra, ctf)
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if ctf_field not in ("box", "padded"):
        raise ValueError(f"ctf_field must be 'box' or 'padded', got {ctf_field!r}")
    if ctf is not None and pixel_size_angstrom is None:
        raise ValueError("pixel_size_angstrom is needed to evaluate the images' CTF")
    n, n_pix, c = a.shape[0], spectra.image_size, cand.shape[1]
    n_rows, width = len(spectra.rows), spectra.columns
    along_x, along_y, shifts, order = _shift_axes(max_shift_px, shift_step_px, spectra)
    weights = spectra.weights()
    if score in SCALE_FREE_SCORES:
        weights[0] = 0.0  # the zero frequency comes first on every band
    if score == "fitted" and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"the fitted scale must be a positive number, got {scale}")
    block = max(1, int(batch_size) if batch_size is not None else 1024 // c)
    work = min(block, n) * c  # (image, candidate) pairs per block
    gathered = torch.empty(work, n_rows * width, dtype=torch.complex64)
    gathered_power = torch.empty(work, n_rows * width)
    along_columns = torch.empty(work * n_rows, along_x.shape[1], dtype=torch.complex64)
    out_scores = np.empty(cand.shape, np.float64)
    out_shift = np.empty(cand.shape, np.int64)
    for start in tqdm(range(0, n, block), desc="local search", disable=not progress, unit="batch"):
        stop = min(start + block, n)
        b, m = stop - start, (stop - start) * c
        f = spectra.restrict(torch.fft.rfft2(a[start:stop]))
        image_power = (weights * (f.real**2 + f.imag**2)).sum(1, dtype=torch.float64)
        if ctf is not None:
            part = ctf.subset(np.arange(start, stop))
            model = spectra.band_ctf(part, pixel_size_angstrom)
            if ctf_field == "padded":  # B C P I: the image imaged in the padded field
                imaged = microscope.image_in_field(a[start:stop], part, pixel_size_angstrom)
                filtered = spectra.restrict(torch.fft.rfft2(imaged))
            else:
                filtered = model * f
        else:
            model = torch.ones(b, f.shape[1])
            filtered = f
        index = cand[start:stop].reshape(-1)
        h = torch.index_select(spectra.spectra, 0, index, out=gathered[:m])
        h.view(b, c, -1).mul_((weights * filtered).conj()[:, None])  # conj(w C F) · T
        torch.matmul(h.view(m * n_rows, width), along_x, out=along_columns[: m * n_rows])
        cross = torch.matmul(along_y, along_columns[: m * n_rows].view(m, n_rows, -1)).real
        cross = cross.reshape(b, c, -1)[:, :, order]  # (b, c, S), shift_grid_px order
        power = torch.index_select(spectra.power, 0, index, out=gathered_power[:m])
        norms = torch.bmm((weights * model**2)[:, None], power.view(b, c, -1).transpose(1, 2))
        norms = norms.transpose(1, 2).double()  # (b, c, 1)
        if score == "mse":
            scores = norms - 2.0 * cross.double()  # (b, c, S)
        elif score == "fitted":  # ‖F − a·C T e_s‖² − ‖F‖²
            scores = float(scale) ** 2 * norms - 2.0 * float(scale) * cross.double()
        else:  # min over a > 0 of ‖F‖² − 2a·cross + a²·norms = ‖F‖² − max(cross, 0)² / norms
            scores = -(cross.double().clamp(min=0.0) ** 2) / norms.clamp(min=1e-30)
        value, where = scores.min(dim=2)  # (b, c): the best shift of each candidate
        out_scores[start:stop] = ((image_power[:, None] + value) / float(n_pix) ** 4).numpy()
        out_shift[start:stop] = where.numpy()
    return out_scores, shifts[out_shift].astype(np.float64)


def local_template_matching(
    images: np.ndarray | torch.Tensor,
    candidates: np.ndarray | torch.Tensor,
    spectra: TemplateSpectra,
    **search,
) -> MatchResult:
    """Best candidate template and centring shift of each image.

    Arguments as in :func:`candidate_scores` (``images`` ``(n, N, N)``, ``candidates``
    ``(n, c)`` template indices, ``spectra``; keywords ``ctf``, ``pixel_size_angstrom``,
    ``max_shift_px``, ``shift_step_px``, ``batch_size``, ``score``, ``progress``).

    Returns:
        :class:`~cryosphere.poses.search.matching.MatchResult` with ``best_index`` a template index
        (one of the image's candidates), ``shift_px`` and ``best_mse`` per pixel, the same
        score as exhaustive matching restricted to the candidates.
    """
    cand = np.asarray(candidates, dtype=np.int64)
    return _best_match(cand, *candidate_scores(images, cand, spectra, **search))


def fitted_scale(
    images: np.ndarray | torch.Tensor,
    best_index: np.ndarray,
    spectra: TemplateSpectra,
    **search,
) -> float:
    """The images' one scale ``a`` against the templates: least squares over every image at
    its best template ``best_index`` ``(n,)`` (e.g. a ``score="scaled"`` search's) and best
    shift, ``a = Σ_i C_i / Σ_i N_i`` with ``C_i = Re⟨F_i, C_i T e_s⟩`` and ``N_i = ‖C_i T‖²`` on
    the band without its zero frequency (keywords as :func:`candidate_scores`: ``ctf``,
    ``pixel_size_angstrom``, ``max_shift_px``…). The ``score="fitted"`` residual
    ``r(a) = ‖F‖² + a²N − 2aC`` is evaluated at ``a`` = 1, 2, 3 (the best shift maximises
    ``C`` whatever ``a``), which gives ``N`` and ``C`` exactly. NaN when no image correlates."""
    best = np.asarray(best_index, dtype=np.int64).reshape(-1, 1)
    keywords = {k: v for k, v in search.items() if k not in ("score", "scale")}
    r1, r2, r3 = (
        candidate_scores(images, best, spectra, score="fitted", scale=a, **keywords)[0][:, 0]
        for a in (1.0, 2.0, 3.0)
    )
    norms = (r3 - 2.0 * r2 + r1) / 2.0
    cross = (3.0 * norms - (r2 - r1)) / 2.0
    total = float(norms.sum())
    return float(cross.sum()) / total if total > 0 else float("nan")


def _best_match(candidates: np.ndarray, scores: np.ndarray, shifts: np.ndarray) -> MatchResult:
    """The lowest-scoring candidate of each row of ``scores`` ``(n, c)``, its shift and score."""
    rows = np.arange(scores.shape[0])
    column = scores.argmin(axis=1)
    return MatchResult(
        best_index=candidates[rows, column],
        shift_px=shifts[rows, column],
        best_mse=np.maximum(scores[rows, column], 0.0),
    )


def _first_occurrences(candidates: np.ndarray) -> np.ndarray:
    """``(n, c)`` bool: True at the first occurrence of each template in its image's row
    (rows of :func:`candidate_cells` repeat a cell's last child as padding)."""
    order = np.argsort(candidates, axis=1, kind="stable")
    ranked = np.take_along_axis(candidates, order, axis=1)
    first = np.ones(candidates.shape, bool)
    first[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    mask = np.empty_like(first)
    np.put_along_axis(mask, order, first, axis=1)
    return mask


def candidate_posterior(
    scores: np.ndarray, candidates: np.ndarray, spectra: TemplateSpectra, score: str = "mse"
) -> np.ndarray:
    """Posterior probability ``(n, c)`` float64 of each image's candidates given their scores
    (:func:`candidate_scores`, each at its best shift), as a maximum-likelihood refinement
    weighs orientations: white Gaussian noise on the band's ``W`` real Fourier degrees of
    freedom (``W = Σ w_k``; the zero frequency left out with ``"scaled"`` and ``"fitted"``), with the
    noise variance estimated from the best candidate's residual, so that

        log p_c = −W · (s_c − s_min) / (2 s_min) + const.

    Rows sum to 1; a template repeated in a row (padding) counts once (0 at its repeats).
    The candidates are the only poses considered (a posterior over the searched cells, not
    over SO(3)), and the shift is maximised, not integrated.
    """
    s = np.asarray(scores, dtype=np.float64)
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    weights = spectra.weights()
    dof = float(weights.sum()) - (float(weights[0]) if score in SCALE_FREE_SCORES else 0.0)
    best = s.min(axis=1, keepdims=True)
    logits = -dof * (s - best) / (2.0 * np.maximum(best, 1e-30))
    logits[~_first_occurrences(np.asarray(candidates))] = -np.inf
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class SearchResult:
    """Every candidate of a map search, scored.

    Attributes:
        match: the best candidate and shift of each image
            (:class:`~cryosphere.poses.search.matching.MatchResult`).
        candidates: ``(n, c)`` int64 template (search-grid cell) indices.
        probability: ``(n, c)`` float64 posterior of the candidates
            (:func:`candidate_posterior`).
        shift_px: ``(n, c, 2)`` float64 each candidate's best centring shift ``(sx, sy)``.
    """

    match: MatchResult
    candidates: np.ndarray
    probability: np.ndarray
    shift_px: np.ndarray

    def most_probable(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ``r`` most probable candidates of each image, most probable first: indices
        ``(n, r)``, probabilities ``(n, r)`` (not renormalised) and shifts ``(n, r, 2)``."""
        r = max(1, min(int(r), self.candidates.shape[1]))
        order = np.argsort(-self.probability, axis=1, kind="stable")[:, :r]
        return (
            np.take_along_axis(self.candidates, order, axis=1),
            np.take_along_axis(self.probability, order, axis=1),
            np.take_along_axis(self.shift_px, order[:, :, None], axis=1),
        )


def search_candidates(
    images: np.ndarray | torch.Tensor,
    candidates: np.ndarray | torch.Tensor,
    spectra: TemplateSpectra,
    **search,
) -> SearchResult:
    """:func:`local_template_matching` with every candidate's posterior
    (:func:`candidate_posterior`) and shift kept (arguments as there). For noise whitened per
    frequency shell and shifts summed, see
    :func:`cryosphere.poses.search.posterior.search_candidates_whitened`."""
    cand = np.asarray(candidates, dtype=np.int64)
    scores, shifts = candidate_scores(images, cand, spectra, **search)
    match = _best_match(cand, scores, shifts)
    probability = candidate_posterior(scores, cand, spectra, search.get("score", "mse"))
    return SearchResult(match, cand, probability, shifts)


def _top_cells(probabilities: np.ndarray, top_k: int, level: int) -> np.ndarray:
    p = np.asarray(probabilities)
    if p.ndim != 2 or p.shape[1] != grids.healpix_so3_grid_size(level):
        raise ValueError(
            f"probabilities must have shape (n, {grids.healpix_so3_grid_size(level)}) "
            f"(the level-{level} grid), got {p.shape}"
        )
    k = max(1, min(int(top_k), p.shape[1]))
    return np.argpartition(-p, k - 1, axis=1)[:, :k]


def best_of_top_cells(
    images: np.ndarray | torch.Tensor,
    top_index: np.ndarray,
    coarse_spectra: TemplateSpectra,
    keep: int,
    **search,
) -> np.ndarray:
    """The ``keep`` best of each image's top cells ``(n, k)`` by their templates' score
    (:func:`candidate_scores` with ``coarse_spectra``, same level): ``(n, keep)``, best first.
    The first stage of a coarse-to-fine search."""
    top = np.asarray(top_index, dtype=np.int64)
    if not 1 <= int(keep) <= top.shape[1]:
        raise ValueError(f"keep must lie in 1..{top.shape[1]} (the top cells), got {keep}")
    scores, _ = candidate_scores(images, top, coarse_spectra, **search)
    order = np.argsort(scores, axis=1, kind="stable")[:, : int(keep)]
    return np.take_along_axis(top, order, axis=1)


def search_top_cells(
    probabilities: np.ndarray,
    images: np.ndarray | torch.Tensor,
    spectra: TemplateSpectra,
    *,
    top_k: int = 10,
    coarse_level: int = 2,
    fine_level: int | None = None,
    keep: int | None = None,
    coarse_spectra: TemplateSpectra | None = None,
    **search,
) -> MatchResult:
    """The network's ``top_k`` cells of each image (probabilities ``(n, G)`` on the
    level-``coarse_level`` grid, e.g. ``train.predict(...).probabilities``), or their children
    on ``fine_level``, searched against the templates whose ``spectra`` are in that level's
    grid order. ``search``: the keywords of :func:`candidate_scores` (``ctf``,
    ``pixel_size_angstrom``, ``max_shift_px``, ``score``…).

    Coarse to fine (``keep`` and ``coarse_spectra``, the coarse level's templates): the top
    cells are scored first at their own level and only the children of the best ``keep`` are
    searched on ``fine_level`` (``keep · 8`` fine templates on average instead of
    ``top_k · 8``)."""
    top = _top_cells(probabilities, top_k, coarse_level)
    level = coarse_level if fine_level is None else int(fine_level)
    if keep is not None:
        if coarse_spectra is None:
            raise ValueError("a coarse-to-fine search (keep) needs the coarse level's spectra")
        top = best_of_top_cells(images, top, coarse_spectra, keep, **search)
    return local_template_matching(
        images, candidate_cells(top, coarse_level, level), spectra, **search
    )


def search_fraction(coarse_level: int, fine_level: int, top_k: int) -> float:
    """Fraction of the level-``fine_level`` templates that :func:`candidate_cells` scores per
    image for ``top_k`` coarse cells (the saving against exhaustive matching)."""
    width = child_cells(coarse_level, fine_level).shape[1]
    return min(1.0, int(top_k) * width / grids.healpix_so3_grid_size(fine_level))
