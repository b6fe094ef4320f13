"""A search posterior over candidate poses that means what it says: whitened noise, shifts
summed, cells integrated over their children.

Model
-----
An image ``I`` (``N × N`` px) is a candidate template ``T_c`` carrying the image's CTF ``C``,
moved by an unknown shift ``s``, plus stationary Gaussian noise of power spectrum ``S(k)``
(image units² per pixel, so white noise of variance ``σ²`` has ``S = σ²``). With ``F``, ``T`` the
``rfft2`` spectra, ``w_k`` the half-plane Parseval weights (:meth:`TemplateSpectra.weights`:
the search band; 0 outside it) and ``e_s(k) = e^{2πi k·s}``::

    χ²(c, s) = Σ_k w_k |F_k − a · C_k T_c,k e_s(k)|² / (N² S(k))
    log L(c) = log Σ_s exp(−χ²(c, s) / 2) − log |shifts|

(``a = 1`` for ``score="mse"``; for ``"scaled"`` — real particles, whose scale against the map
is unknown — ``a`` is the best positive scale of each candidate and shift; for ``"fitted"`` it
is one scale for every particle and candidate, fitted beforehand
(:func:`cryosphere.poses.search.local_search.fitted_scale`); with either the zero frequency is
left out). The
posterior over the candidates of an image is ``p(c) ∝ L(c)`` (uniform prior), i.e. the shift
is *summed* over the shift grid rather than maximised, and the noise is *whitened per
frequency* instead of taken white with a variance read off the best residual. The noise
spectrum comes from the particles themselves (:func:`~cryosphere.poses.search.noise.background_noise_spectrum`): the pixels
outside a circular mask hold noise only, as refinement programs estimate σ²(k).

Cells, not points
-----------------
A grid cell stands for every pose nearer its centre than any other; scoring it at its centre
alone makes the posterior overconfident when the truth lies between centres. Searching the
cell's children on a finer grid and summing their masses
(:func:`~cryosphere.geometry.distributions.integrate_over_parents`) integrates the likelihood
over the cell.

:func:`refined_grid_posterior` goes further where it matters: the most probable cells are
split again into their children on the next grids (projected on the fly), each child weighing
its share of the parent's volume, and the most probable level-4 cells are scored at 8
sub-cube points each (a midpoint rule inside the cell; each point's mass goes to its own
nearest cell), so a posterior narrower than the search grid is still integrated (measured in
docs/calibration.md).

No temperature: measured with ``benchmarks/bench_calibration.py`` (docs/calibration.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from cryosphere.geometry.distributions import integrate_over_parents
from cryosphere.geometry.grids import (
    cell_edge_rad,
    healpix_so3_grid,
    healpix_so3_grid_size,
    nearest_grid_indices,
    parent_cells,
    subcell_rotations,
)
from cryosphere.imaging import ctf as ctf_module
from cryosphere.imaging.projection import gaussian_blur, project_volume
from cryosphere.poses.search.local_search import (
    SCALE_FREE_SCORES,
    SCORES,
    SearchResult,
    _first_occurrences,
    candidate_scores,
    child_cells,
)
from cryosphere.poses.search.matching import (
    MatchResult,
    TemplateSpectra,
    shift_grid_px,
    template_spectra,
)
from cryosphere.poses.search.noise import NoiseSpectrum

__all__ = [
    "SearchLikelihood",
    "search_log_likelihood",
    "posterior_from_log_likelihood",
    "grid_posterior",
    "refined_grid_posterior",
    "search_candidates_whitened",
]


@dataclass(frozen=True)
class SearchLikelihood:
    """Shift-marginal log-likelihoods of every candidate.

    Attributes:
        log_likelihood: ``(n, c)`` float64 ``log L(c)`` (module docstring), up to a constant
            per image.
        best_shift_px: ``(n, c, 2)`` float64 the shift ``(sx, sy)`` px of each candidate's
            largest term (the shift that centres the particle, as
            :func:`cryosphere.poses.search.local_search.candidate_scores` reports it).
        best_chi2: ``(n, c)`` float64 ``min_s χ²(c, s)``.
    """

    log_likelihood: np.ndarray
    best_shift_px: np.ndarray
    best_chi2: np.ndarray


@functools.lru_cache(maxsize=8)
def _phase_ramps(
    image_size: int, max_frequency: float | None, max_shift_px: float, shift_step_px: float
) -> torch.Tensor:
    """``(K, S)`` complex64 ``e^{+2πi k·s}`` on the band of ``max_frequency`` (the
    :class:`TemplateSpectra` of ``image_size`` px) for the shifts of
    :func:`shift_grid_px`, evaluated on the band's rows and columns only. Cached: every
    batch of a search reuses them (read-only: never modify)."""
    band = TemplateSpectra(torch.zeros(0, 1, dtype=torch.complex64), torch.zeros(0, 1),
                           int(image_size), max_frequency)  # fmt: skip
    ky = torch.fft.fftfreq(int(image_size), dtype=torch.float64)[band.rows][:, None]
    kx = torch.fft.rfftfreq(int(image_size), dtype=torch.float64)[: band.columns][None, :]
    s = torch.as_tensor(shift_grid_px(max_shift_px, shift_step_px), dtype=torch.float64)
    phase = 2 * np.pi * (s[:, 0, None, None] * kx + s[:, 1, None, None] * ky)  # (S, R, C)
    ramps = torch.polar(torch.ones_like(phase), phase).reshape(len(s), -1)  # (S, K)
    return ramps.T.contiguous().to(torch.complex64)


def search_log_likelihood(
    images: np.ndarray | torch.Tensor,
    candidates: np.ndarray,
    spectra: TemplateSpectra,
    noise: NoiseSpectrum,
    *,
    ctf: ctf_module.CTFParameters | None = None,
    pixel_size_angstrom: float | None = None,
    max_shift_px: float = 0.0,
    shift_step_px: float = 1.0,
    score: str = "mse",
    scale: float = 1.0,
    batch_size: int | None = None,
    progress: bool = False,
) -> SearchLikelihood:
    """``log L(c)`` of every candidate template of each image (module docstring).

    Args:
        images: ``(n, N, N)`` particle images (raw: CTF-modulated, shifted, noisy).
        candidates: ``(n, c)`` template indices into ``spectra`` per image.
        spectra: the CTF-free templates' spectra
            (:func:`cryosphere.poses.search.matching.template_spectra`).
        noise: the images' noise spectrum (:func:`~cryosphere.poses.search.noise.background_noise_spectrum`).
        ctf, pixel_size_angstrom: the images' CTFs (every candidate carries its image's).
        max_shift_px, shift_step_px: the shift grid summed over
            (:func:`cryosphere.poses.search.matching.shift_grid_px`; 0: the particles are centred).
        score: ``"mse"`` (images on the templates' scale), ``"scaled"`` (best positive
            scale per candidate and shift) or ``"fitted"`` (the one ``scale`` ``a``); zero
            frequency left out with the last two.
        batch_size: images per block (None: about 512 image-candidate pairs per block).
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    a = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    cand = torch.as_tensor(np.array(candidates, dtype=np.int64))
    n_pix = spectra.image_size
    if a.ndim != 3 or tuple(a.shape[1:]) != (n_pix, n_pix):
        raise ValueError(f"images must have shape (n, {n_pix}, {n_pix}), got {tuple(a.shape)}")
    if cand.ndim != 2 or cand.shape[0] != a.shape[0] or cand.shape[1] < 1:
        raise ValueError(f"candidates must have shape (n, c) with n = {a.shape[0]} images")
    if int(cand.min()) < 0 or int(cand.max()) >= spectra.spectra.shape[0]:
        raise ValueError(f"candidates must index the {spectra.spectra.shape[0]} templates")
    if noise.image_size != n_pix:
        raise ValueError(f"the noise spectrum is for {noise.image_size} px, the images {n_pix} px")
    if ctf is not None and (len(ctf) != a.shape[0] or pixel_size_angstrom is None):
        raise ValueError("ctf needs one entry per image and pixel_size_angstrom")
    shifts = shift_grid_px(max_shift_px, shift_step_px)
    ramps = _phase_ramps(n_pix, spectra.max_frequency, float(max_shift_px), float(shift_step_px))
    whitened = spectra.weights().double() / (
        float(n_pix) ** 2 * spectra.restrict(noise.half_plane())
    )
    if score in SCALE_FREE_SCORES:
        whitened[0] = 0.0  # the zero frequency comes first on every band
    n, c = cand.shape
    shared = bool((cand == cand[:1]).all())  # every image the same candidates: matrix products
    block = max(1, int(batch_size) if batch_size is not None else (64 if shared else 512 // c))
    log_l = np.empty((n, c))
    best_chi2 = np.empty((n, c))
    best_shift = np.empty((n, c), np.int64)
    # the products over the band in single precision, as the cross term's matrix product; the
    # terms are combined in double precision (each is ~K, their differences matter)
    whitened_single = whitened.float()
    if shared:
        shared_t = spectra.spectra[cand[0]]  # (c, K) complex64
        shared_power = spectra.power[cand[0]]  # (c, K)
    for start in tqdm(range(0, n, block), desc="search posterior", disable=not progress):
        stop = min(start + block, n)
        f = spectra.restrict(torch.fft.rfft2(a[start:stop]))  # (b, K) complex64
        if ctf is not None:
            part = ctf.subset(np.arange(start, stop))
            model = spectra.band_ctf(part, pixel_size_angstrom)
        else:
            model = torch.ones(stop - start, f.shape[1])
        h = (whitened_single * model * f).conj()  # (b, K)
        model_power = whitened_single * model**2  # (b, K)
        if shared:  # cross[b, c, s] = Re Σ_k h_bk e_s(k) T_ck
            shifted = h[:, :, None] * ramps[None]  # (b, K, S)
            cross = torch.einsum("bks,ck->bcs", shifted, shared_t).real.double()
            norms = (model_power @ shared_power.T).double()[:, :, None]  # (b, c, 1)
        else:
            templates = spectra.spectra[cand[start:stop]]  # (b, c, K) complex64
            cross = ((h[:, None] * templates) @ ramps).real.double()  # (b, c, S)
            power = spectra.power[cand[start:stop]]  # (b, c, K)
            norms = (power * model_power[:, None]).sum(-1, keepdim=True).double()
        spectrum_power = (f.real**2 + f.imag**2).double()
        image_power = (whitened * spectrum_power).sum(-1)[:, None, None]  # (b, 1, 1)
        if score == "mse":
            chi2 = image_power + norms - 2.0 * cross
        elif score == "fitted":
            chi2 = image_power + float(scale) ** 2 * norms - 2.0 * float(scale) * cross
        else:
            chi2 = image_power - cross.clamp(min=0.0) ** 2 / norms.clamp(min=1e-300)
        log_l[start:stop] = (torch.logsumexp(-0.5 * chi2, dim=-1) - np.log(len(shifts))).numpy()
        value, where = chi2.min(dim=-1)
        best_chi2[start:stop] = value.numpy()
        best_shift[start:stop] = where.numpy()
    return SearchLikelihood(log_l, shifts[best_shift].astype(np.float64), best_chi2)


def posterior_from_log_likelihood(log_likelihood: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """``(n, c)`` float64 posterior ``p(c) ∝ L(c)`` over each image's candidates (uniform
    prior); a template repeated in a row (padding) counts once (0 at its repeats)."""
    logits = np.array(log_likelihood, dtype=np.float64)
    if not np.all(np.isfinite(logits)):
        raise ValueError("log-likelihoods hold NaN or infinite values")
    logits[~_first_occurrences(np.asarray(candidates))] = -np.inf
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def grid_posterior(
    images: np.ndarray | torch.Tensor,
    spectra: TemplateSpectra,
    noise: NoiseSpectrum,
    level: int,
    search_level: int | None = None,
    **search,
) -> np.ndarray:
    """Exhaustive search posterior ``(n, G)`` over every level-``level`` cell: every template
    of ``spectra`` (the level-``search_level`` grid, default ``level``) scored with
    :func:`search_log_likelihood` (keywords ``ctf``, ``max_shift_px``... as there), each
    cell's mass summed over its children
    (:func:`~cryosphere.geometry.distributions.integrate_over_parents`). Rows sum to 1."""
    search_level = int(level) if search_level is None else int(search_level)
    n, g = len(images), spectra.spectra.shape[0]
    if g != healpix_so3_grid_size(search_level):
        raise ValueError(
            f"spectra hold {g} templates, not the {healpix_so3_grid_size(search_level)} of "
            f"level {search_level}"
        )
    candidates = np.broadcast_to(np.arange(g), (n, g))
    likelihood = search_log_likelihood(images, candidates, spectra, noise, **search)
    p = posterior_from_log_likelihood(likelihood.log_likelihood, candidates)
    return integrate_over_parents(p, candidates, int(level), search_level)


def _score_rotations(images, volume, blur_sigma_px, spectra, noise, rotations, search):
    """``log L`` ``(n, k)`` of each image's own poses ``rotations`` ``(n, k, 3, 3)``, templates
    projected from ``volume`` on the fly (blurred, band as ``spectra``), 64 images at a time."""
    n, k = rotations.shape[:2]
    templates = gaussian_blur(project_volume(volume, rotations.reshape(-1, 3, 3)), blur_sigma_px)
    own_spectra = template_spectra(templates, spectra.max_frequency)
    ctf = search.pop("ctf", None)
    log_l = np.empty((n, k))
    for start in range(0, n, 64):  # bounded memory: 64 images' poses at a time
        stop = min(start + 64, n)
        own = np.arange(start * k, stop * k).reshape(stop - start, k)
        part = None if ctf is None else ctf.subset(np.arange(start, stop))
        log_l[start:stop] = search_log_likelihood(
            images[start:stop], own, own_spectra, noise, ctf=part, **search
        ).log_likelihood
    return log_l


def _split_cells(images, volume, blur_sigma_px, spectra, noise, level, cells, log_volume, search):
    """Children on level ``level + 1`` of ``cells`` ``(n, k)``: their cells ``(n, k·m)``, log
    likelihoods and log volumes (the parent's volume over its children; padding repeats get
    ``−inf``). Templates are projected for these children only."""
    kids = child_cells(level, level + 1)[cells]  # (n, k, m)
    n, k, m = kids.shape
    fresh = np.ones(kids.shape, bool)
    fresh[:, :, 1:] = kids[:, :, 1:] != kids[:, :, :-1]
    log_vol = log_volume[:, :, None] - np.log(fresh.sum(axis=-1, keepdims=True))
    rotations = healpix_so3_grid(level + 1)[kids.reshape(n, -1)]
    log_l = _score_rotations(images, volume, blur_sigma_px, spectra, noise, rotations, search)
    log_l = np.where(fresh.reshape(n, -1), log_l, -np.inf)
    return kids.reshape(n, -1), log_l, np.broadcast_to(log_vol, kids.shape).reshape(n, -1)


def _top(log_mass: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``keep`` largest entries ``(n, keep)``, and ``log_mass`` with them at −inf."""
    top = np.argsort(-log_mass, axis=1, kind="stable")[:, : int(keep)]
    rest = np.array(log_mass, dtype=np.float64)
    rest[np.arange(len(rest))[:, None], top] = -np.inf
    return top, rest


def refined_grid_posterior(
    images: np.ndarray | torch.Tensor,
    volume: np.ndarray,
    spectra: TemplateSpectra,
    noise: NoiseSpectrum,
    level: int,
    search_level: int,
    *,
    blur_sigma_px: float = 0.0,
    refine: tuple[int, ...] = (16, 8),
    quadrature: tuple[int, ...] = (16,),
    **search,
) -> np.ndarray:
    """:func:`grid_posterior` with the most probable cells integrated on finer grids.

    Every level-``search_level`` template of ``spectra`` is scored; then, for each entry
    ``k`` of ``refine``, each image's ``k`` most probable cells of the current finest level
    are replaced by their children one level finer (projected from ``volume`` ``(N, N, N)``
    with ``blur_sigma_px``, as the templates), each carrying ``L(child) · vol(parent) / m``
    (``m`` children). Then, for each entry ``k`` of ``quadrature``, the ``k`` most probable
    pieces are each cut into 8 sub-cubes (:func:`cryosphere.geometry.grids.subcell_rotations`,
    cube edge :func:`~cryosphere.geometry.grids.cell_edge_rad` of the finest level, halved
    per round), each scored at its centre and carrying an eighth of the piece's volume: a
    midpoint rule inside the cell, beyond the grid's level 4. Every piece's mass goes to the
    level-``level`` cell nearest its own centre. Returns ``(n, G_level)`` rows summing to 1.
    ``search``: keywords of :func:`search_log_likelihood` (``ctf``, ``max_shift_px``...).

    Measured (``tests/test_search_posterior.py``, truths on level-1 boundaries, SNR 1): the
    sub-cubes bring the total-variation distance to a far finer integration (refine 32 32,
    quadrature 32 32 32: 0.5° cubes) from 0.045 to 0.014; the calibration they give is in
    docs/calibration.md.
    """
    imgs = np.asarray(images, dtype=np.float32)
    n, g = imgs.shape[0], spectra.spectra.shape[0]
    if g != healpix_so3_grid_size(search_level) or search_level + len(refine) > 4:
        raise ValueError(
            f"spectra must hold the level-{search_level} templates and search_level + "
            f"len(refine) must be <= 4 (level 4: 294,912 cells), got {g} templates, "
            f"{search_level} + {len(refine)}"
        )
    rows = np.arange(n)[:, None]
    cells = np.broadcast_to(np.arange(g), (n, g))
    log_l = search_log_likelihood(imgs, cells, spectra, noise, **search).log_likelihood
    log_vol = np.zeros_like(log_l)
    pieces, current = [], int(search_level)  # (level-`level` cell (n, c), log mass (n, c))
    for keep in refine:
        top, rest = _top(log_l + log_vol, keep)
        pieces.append((parent_cells(level, current)[cells] if current != level else cells, rest))
        cells, log_l, log_vol = _split_cells(
            imgs, volume, blur_sigma_px, spectra, noise, current,
            cells[rows, top], log_vol[rows, top], dict(search),
        )  # fmt: skip
        current += 1
    centres = healpix_so3_grid(current)[cells]  # (n, c, 3, 3)
    coarse = parent_cells(level, current)[cells] if current != level else cells
    edge = cell_edge_rad(current)
    for keep in quadrature:
        top, rest = _top(log_l + log_vol, keep)
        pieces.append((coarse, rest))
        centres = subcell_rotations(centres[rows, top], edge).reshape(n, -1, 3, 3)
        log_vol = np.repeat(log_vol[rows, top], 8, axis=1) - np.log(8.0)
        log_l = _score_rotations(
            imgs, volume, blur_sigma_px, spectra, noise, centres, dict(search)
        )  # fmt: skip
        grid = healpix_so3_grid(level)
        coarse = nearest_grid_indices(centres.reshape(-1, 3, 3), grid).reshape(n, -1)
        edge /= 2.0
    pieces.append((coarse, log_l + log_vol))
    peak = np.max(np.stack([np.max(p[1], axis=1) for p in pieces]), axis=0)[:, None]
    out = np.zeros((n, healpix_so3_grid_size(level)))
    for piece_cells, log_mass in pieces:
        rows_b = np.broadcast_to(rows, piece_cells.shape)
        np.add.at(out, (rows_b, piece_cells), np.exp(log_mass - peak))
    return out / out.sum(axis=1, keepdims=True)


def search_candidates_whitened(
    images: np.ndarray | torch.Tensor,
    candidates: np.ndarray | torch.Tensor,
    spectra: TemplateSpectra,
    noise: NoiseSpectrum,
    *,
    score_best_mse: bool = True,
    **search,
) -> SearchResult:
    """:func:`cryosphere.poses.search.local_search.search_candidates` with this module's
    posterior: ``noise`` the images' :class:`NoiseSpectrum` (e.g.
    :func:`~cryosphere.poses.search.noise.background_noise_spectrum` of the particles), noise whitened per frequency shell,
    shifts summed; the best candidate is the most probable one, at its most likely shift.
    Its ``best_mse`` is scored alone afterwards (one candidate per image, not every one;
    ~0.03 ms per 64-px image with ±3 px shifts); ``score_best_mse=False`` skips that and
    leaves ``match.best_mse`` None (``predict --map`` ranks by probability and never reads it)."""
    cand = np.asarray(candidates, dtype=np.int64)
    keys = ("ctf", "pixel_size_angstrom", "max_shift_px", "shift_step_px", "score", "scale")
    likelihood = search_log_likelihood(
        images, cand, spectra, noise, **{k: search[k] for k in keys if k in search}
    )
    probability = posterior_from_log_likelihood(likelihood.log_likelihood, cand)
    rows, column = np.arange(cand.shape[0]), probability.argmax(axis=1)
    best = cand[rows, column]
    best_mse = None
    if score_best_mse:
        scores, _ = candidate_scores(images, best[:, None], spectra, **search)
        best_mse = np.maximum(scores[:, 0], 0.0)
    match = MatchResult(
        best_index=best, shift_px=likelihood.best_shift_px[rows, column], best_mse=best_mse
    )
    return SearchResult(match, cand, probability, likelihood.best_shift_px)
