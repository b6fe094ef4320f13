"""The map search of ``cryosphere predict --map``: a consensus map prepared for one particle set.

:class:`MapRefinement` says what to search (map, grid level, shifts, blur, coarse to fine, the
resolution limit); :class:`MapSearch` holds it prepared: the map checked against the particles,
Fourier-cropped to the network's box and projected once on the search grid, its template
spectra cut to the search band. Calling it searches a batch of particles around their network
top cells (:mod:`cryosphere.poses.search.local_search`).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryosphere import io
from cryosphere.geometry.grids import healpix_so3_grid, parent_cells
from cryosphere.imaging import ctf as ctf_module
from cryosphere.imaging import preprocess
from cryosphere.imaging.projection import gaussian_blur, project_volume
from cryosphere.poses.labels.templates import template_bank
from cryosphere.poses.search.local_search import (
    SearchResult,
    best_of_top_cells,
    candidate_cells,
    child_cells,
    fitted_scale,
    search_candidates,
)
from cryosphere.poses.search.matching import template_spectra
from cryosphere.poses.search.noise import NoiseSpectrum, background_noise_spectrum
from cryosphere.poses.search.posterior import search_candidates_whitened

__all__ = [
    "DEFAULT_SEARCH_RESOLUTION_PX",
    "MapRefinement",
    "MapSearch",
    "band_max_frequency",
    "record_map_envelope",
    "recorded_map_envelope",
]

_ENVELOPE_KEY = "map_envelope"

#: The map search's default band: details down to 3 px of the network's box (two thirds of its
#: Nyquist frequency). Measured as accurate as the whole half-plane on realistic particles and
#: 1.5x faster at 100 cells (README "Real particles").
DEFAULT_SEARCH_RESOLUTION_PX = 3.0


#: Particles the first batch needs for ``scale="fitted"`` to fit the scale and the noise
#: spectrum on; fewer (a small STAR file, a small ``--batch-size``): the free scale.
MIN_FIT_PARTICLES = 64

#: Templates of the search level :class:`MapSearch` keeps until its first batch's fit (level 2:
#: 4,608), which then takes each particle's modelled signal from them instead of projecting
#: the map again (~0.1 s of ~0.2 s per run at 64 px); a level-3 bank (36,864) is not kept.
MAX_KEPT_TEMPLATES = 4608


def band_max_frequency(resolution_px: float) -> float | None:
    """The search band's radius in cycles/px for a resolution limit of ``resolution_px``
    pixels; None at or below Nyquist (2 px): the whole half-plane."""
    frequency = 1.0 / float(resolution_px)
    return None if frequency >= 0.5 else frequency


@dataclass(frozen=True)
class MapRefinement:
    """What ``cryosphere predict --map`` searches around the network's top cells.

    Attributes:
        map_path: the consensus map (MRC) of the particles' refinement, at their box and pixel
            size (:func:`cryosphere.imaging.preprocess.reference_map`).
        level: grid level of the search; None: the network's own level (its top cells are
            re-ranked); one level finer: their children (:func:`child_cells`, ~7.4° apart at 3).
        max_shift_px: translation search in px of the network's box (0: the particles are
            taken as centred); the shift found is written as the particle's origin.
        blur_sigma_px: Gaussian blur of the templates in px of the network's box (0 for a
            reconstruction, whose resolution is already that of the data).
        keep: with a finer search level, coarse to fine: score the top cells at the network's
            level first and search the children of only the best ``keep`` of them (None: the
            children of every top cell).
        resolution_angstrom: the finest detail (Å) the search compares, as refinement
            programs limit their searches: the images and templates are low-passed there
            (:meth:`~cryosphere.poses.search.matching.TemplateSpectra.low_passed`; fewer Fourier
            coefficients, a faster search). None: :data:`DEFAULT_SEARCH_RESOLUTION_PX` px of
            the network's box; at or below its Nyquist (2 px): every frequency.
        classical_cells: a classical coarse stage beside the network (0: none): every cell one
            level coarser than the network's (level 1 for a level-2 network; level 1 itself for
            a level-1 network, whose level-0 cells are too coarse to rank) is scored on the low-pass band of ``classical_resolution_px`` px,
            and the children of the best ``classical_cells`` at the network's level join the
            network's top cells as candidates. The search then finds what a coarse-to-fine
            search finds where the network's top cells miss the pose, at the cost of the
            coarse stage (:mod:`cryosphere.poses.search.coarse_to_fine`).
        classical_resolution_px: the coarse stage's band (px of the network's box).
        prescreen_keep: a low-pass pre-screen of the network's top cells (None: none): every
            top cell (and classical candidate) is scored at the network's level on the band of
            ``prescreen_resolution_px`` px, a few Fourier coefficients each, and only the best
            ``prescreen_keep`` go on to the search band: the accuracy of searching many of the
            network's cells at the cost of searching few (``predict --map --top-k 100
            --prescreen 10``; docs/benchmarks_search.md).
        prescreen_resolution_px: the pre-screen's band (px of the network's box).
        box: the search's box (px; None: the network's): the particles are Fourier-cropped to
            it for the search alone, so a network at a small box (e.g. 32 px for 64-px
            particles: a quarter of the encoder's cost) proposes cells that the map decides at
            this one. Every "px of the network's box" above is then px of this box. Even, and
            at most the particles' (cropped) box.
        ctf_field: where the candidates' CTF acts: ``"box"`` (default: in the particle box)
            or ``"padded"`` (in a padded field, then boxed, as the microscope imaged the
            particles, :func:`~cryosphere.poses.search.local_search.candidate_scores`). Measured:
            exhaustive matching with the padded model finds 1UBI at 64 px, SNR 0.05 with a
            median error of 15.6° against 32.4° (particles imaged in a padded field), but at
            32 px it does no better (15.4° against 14.3°) and the 16-px search of
            ``tests/test_inference.py`` does worse, so the default stays ``"box"``.
        scale: the particles' amplitude against the map's templates in the final scoring:
            ``"fitted"`` (default): one scale for every particle and candidate, fitted by
            least squares on the first batch searched with a free scale (at least
            :data:`MIN_FIT_PARTICLES` particles, else the free scale throughout)
            (:func:`~cryosphere.poses.search.local_search.fitted_scale`; :attr:`MapSearch.data_scale`),
            as refinement programs correct an image group's intensity scale; ``"free"``: the
            best positive scale of each candidate (a normalised cross-correlation). Measured
            (docs/training_on_a_refinement.md): on 1UBI at SNR 0.05 a free scale lets
            low-contrast views win by chance: every-cell search 30.8°, 19.5° fitted (with the noise
            below).
            The coarse stages (``keep``, ``classical_cells``) always use a free scale.
    """

    map_path: str | os.PathLike[str]
    level: int | None = None
    max_shift_px: float = 0.0
    blur_sigma_px: float = 0.0
    keep: int | None = None
    resolution_angstrom: float | None = None
    ctf_field: str = "box"
    classical_cells: int = 0
    classical_resolution_px: float = 8.0
    scale: str = "fitted"
    prescreen_keep: int | None = None
    prescreen_resolution_px: float = 12.0
    box: int | None = None

    def __post_init__(self) -> None:
        if self.scale not in ("fitted", "free"):
            raise ValueError(f"scale must be 'fitted' or 'free', got {self.scale!r}")
        if int(self.classical_cells) < 0 or not self.classical_resolution_px > 2:
            raise ValueError(
                f"classical_cells must be >= 0 and classical_resolution_px > 2 px, got "
                f"{self.classical_cells}, {self.classical_resolution_px}"
            )
        if self.prescreen_keep is not None and int(self.prescreen_keep) < 1:
            raise ValueError(f"prescreen_keep must be >= 1 top cells, got {self.prescreen_keep}")
        if not self.prescreen_resolution_px > 2:
            raise ValueError(
                f"prescreen_resolution_px must be > 2 px (a low-pass band), got "
                f"{self.prescreen_resolution_px}"
            )
        if self.ctf_field not in ("padded", "box"):
            raise ValueError(f"ctf_field must be 'padded' or 'box', got {self.ctf_field!r}")
        if not self.max_shift_px >= 0 or not self.blur_sigma_px >= 0:
            raise ValueError(
                f"max_shift_px and blur_sigma_px must be >= 0, got {self.max_shift_px}, "
                f"{self.blur_sigma_px}"
            )
        if self.keep is not None and int(self.keep) < 1:
            raise ValueError(f"keep must be >= 1 top cells, got {self.keep}")
        if self.box is not None and (int(self.box) < 2 or int(self.box) % 2):
            raise ValueError(f"the search box must be an even number of px, got {self.box}")
        if self.resolution_angstrom is not None and not self.resolution_angstrom > 0:
            raise ValueError(
                f"resolution_angstrom must be > 0 Å (or None: no limit), got {self.resolution_angstrom}"
            )

    def search_box(self, network_box: int, particles_box: int) -> int:
        """The box (px) the search runs at (:attr:`box`, else ``network_box``) for particles
        of ``particles_box`` px (after any real-space crop); ValueError when it is larger."""
        box = int(network_box) if self.box is None else int(self.box)
        if box > int(particles_box):
            raise ValueError(
                f"the map search's box ({box} px) is larger than the particles' "
                f"({particles_box} px): it cannot upsample; pass a smaller --search-box"
            )
        return box

    def max_frequency(self, pixel_size_angstrom: float) -> float | None:
        """The search band's radius in cycles/px of a box with this pixel size (Å)
        (:func:`band_max_frequency`)."""
        if self.resolution_angstrom is None:
            return band_max_frequency(DEFAULT_SEARCH_RESOLUTION_PX)
        return band_max_frequency(float(self.resolution_angstrom) / float(pixel_size_angstrom))


class MapSearch:
    """A :class:`MapRefinement` prepared for one particle set and network: the map at the
    search's box (``image_size``: :meth:`MapRefinement.search_box`; ``volume``, ``(M, M, M)``) and the spectra of its templates on the search
    grid (level 2: ~120 MB, level 3: ~1 GB of float32). With ``crop_size`` (``predict --crop``) the map is cropped
    as the images are (:func:`cryosphere.imaging.preprocess.reference_map`), so its templates
    have the images' pixel size."""

    def __init__(
        self,
        refinement: MapRefinement,
        particles,
        image_size: int,
        coarse_level: int,
        progress: bool = False,
        crop_size: int | None = None,
    ):
        level = coarse_level if refinement.level is None else int(refinement.level)
        if not coarse_level <= level <= 3:
            raise ValueError(
                f"the search level must lie in {coarse_level}..3 (the network's level up to "
                f"36,864 cells), got {level}"
            )
        box = particles.image_size if crop_size is None else int(crop_size)
        volume = preprocess.reference_map(refinement.map_path, particles, image_size, crop_size)
        pixel = particles.pixel_size_angstrom * box / int(image_size)
        band = refinement.max_frequency(pixel)
        bank = template_bank(volume, level, refinement.blur_sigma_px, progress=progress)
        self.spectra = template_spectra(bank, band)
        self.coarse_spectra = None
        coarse = bank if level == coarse_level else None
        if refinement.keep is not None and level > coarse_level:
            coarse = template_bank(volume, coarse_level, refinement.blur_sigma_px)
            self.coarse_spectra = template_spectra(coarse, band)
        self.prescreen_spectra = None  # the network's level on the pre-screen's band
        if refinement.prescreen_keep is not None:
            if coarse is None:
                coarse = template_bank(volume, coarse_level, refinement.blur_sigma_px)
            self.prescreen_spectra = template_spectra(
                coarse, band_max_frequency(refinement.prescreen_resolution_px)
            )
        self.classical_spectra = None  # the coarse stage: one level coarser, not below 1
        self.classical_level = max(int(coarse_level) - 1, min(int(coarse_level), 1))
        if refinement.classical_cells > 0:
            classical = template_bank(volume, self.classical_level, refinement.blur_sigma_px)
            self.classical_spectra = template_spectra(
                classical, band_max_frequency(refinement.classical_resolution_px)
            )
        self.volume = volume
        self.refinement = refinement
        # the search level's blurred templates, kept until the first batch's fit models the
        # particles' signal from them (no projection); not above level 2 (~75 MB at 64 px)
        fits = refinement.scale == "fitted" and bank.shape[0] <= MAX_KEPT_TEMPLATES
        self._fit_templates = bank if fits else None
        #: the particles' scale against the templates (``scale="fitted"``), fitted on the
        #: first batch searched; None until then
        self.data_scale: float | None = None
        #: the noise spectrum of the final scoring with ``scale="fitted"``: the first batch's
        #: backgrounds less the modelled signal's share (:func:`background_noise_spectrum`)
        self.noise: NoiseSpectrum | None = None
        self.coarse_level, self.level = int(coarse_level), level
        self.particles_box = (int(box), float(particles.pixel_size_angstrom))

    def check_fits(
        self, particles, image_size: int, coarse_level: int, crop_size: int | None = None
    ) -> None:
        """ValueError unless this search was prepared for such particles (cropped to
        ``crop_size`` px) and network."""
        side = particles.image_size if crop_size is None else int(crop_size)
        box = (int(side), float(particles.pixel_size_angstrom))
        mine = (self.particles_box, self.spectra.image_size, self.coarse_level)
        if mine != (box, int(image_size), int(coarse_level)):
            raise ValueError(
                f"this map search was prepared for {self.particles_box[0]}-px particles of "
                f"{self.particles_box[1]:g} Å and a {self.spectra.image_size}-px level-"
                f"{self.coarse_level} network, not {box[0]} px of {box[1]:g} Å and a "
                f"{image_size}-px level-{coarse_level} one; prepare another MapSearch"
            )

    def __call__(
        self, images: torch.Tensor, ctf, pixel_size_angstrom: float, top_index: np.ndarray
    ) -> SearchResult:
        """Every candidate scored for images ``(n, M, M)`` (the network's box, not
        CTF-corrected) given their network top cells ``(n, k)`` (``MapRefinement.scale``): the most
        probable candidate and its shift (``.match``) and the posterior of all of them, with
        the noise spectrum estimated from these images' backgrounds
        (:func:`~cryosphere.poses.search.noise.background_noise_spectrum`). With
        ``scale="fitted"`` the first call searches with a free scale, fits the particles'
        scale (:attr:`data_scale`) and the noise spectrum (the backgrounds less the signal of
        the poses found, :attr:`noise`) and searches again with both, which every later call
        reuses: results depend on which particles come first (``predict``: the STAR file's
        first batch, on each rank its own)."""
        images = images.detach().cpu()
        noise = self.noise if self.noise is not None else background_noise_spectrum(images)
        search = dict(
            ctf=ctf,
            pixel_size_angstrom=pixel_size_angstrom,
            max_shift_px=self.refinement.max_shift_px,
            score="scaled",
            ctf_field=self.refinement.ctf_field,
        )
        top = np.asarray(top_index, dtype=np.int64)
        if self.classical_spectra is not None:
            top = np.concatenate([top, self.classical_candidates(images, **search)], axis=1)
        if self.prescreen_spectra is not None:
            keep = min(int(self.refinement.prescreen_keep), top.shape[1])
            top = best_of_top_cells(images, top, self.prescreen_spectra, keep, **search)
        if self.coarse_spectra is not None:
            keep = min(int(self.refinement.keep), top.shape[1])
            top = best_of_top_cells(images, top, self.coarse_spectra, keep, **search)
        candidates = candidate_cells(top, self.coarse_level, self.level)
        if self.refinement.scale == "fitted" and self.data_scale is None:
            first = self._final(images, candidates, noise, search)  # free scale
            if images.shape[0] < MIN_FIT_PARTICLES:
                return first  # too few to fit a scale and a spectrum: the free scale's answer
            scale = fitted_scale(images, first.match.best_index, self.spectra, **search)
            if not (math.isfinite(scale) and scale > 0):
                return first  # nothing correlates with the map: the free scale's answer
            self.data_scale = scale
            model = self._modelled_signal(first.match, ctf, pixel_size_angstrom)
            self.noise = background_noise_spectrum(images, signal=model)
            self._fit_templates = None  # fitted: the templates are not needed again
        if self.refinement.scale == "fitted":
            search = search | {"score": "fitted", "scale": self.data_scale}
        final_noise = self.noise if self.noise is not None else noise
        return self._final(images, candidates, final_noise, search)

    def _modelled_signal(self, match, ctf, pixel_size_angstrom: float) -> torch.Tensor:
        """``(n, M, M)`` each image's best template (``match``), blurred, with its CTF (in the
        box), its shift and the fitted scale: the signal part of the image. The templates
        kept from :meth:`__init__` when there are any, else projected anew (the same
        projections, blurred alike)."""
        if self._fit_templates is not None:
            projections = torch.from_numpy(self._fit_templates[np.asarray(match.best_index)])
        else:
            rotations = healpix_so3_grid(self.level)[match.best_index]
            projections = project_volume(self.volume, rotations, progress=False)
            projections = gaussian_blur(projections, self.refinement.blur_sigma_px)
        size = projections.shape[-1]
        if ctf is not None:
            transfer = ctf_module.ctf_2d(ctf, size, pixel_size_angstrom)
            projections = ctf_module.apply_ctf(projections, transfer)
        # the found shift centres the particle: the particle sits at minus it
        return ctf_module.shift_images(projections, -match.shift_px) * float(self.data_scale)

    def _final(self, images, candidates, noise, search) -> SearchResult:
        """The last stage: ``candidates`` ``(n, c)`` scored on the search band (with a noise
        spectrum, the best candidate's ``best_mse`` is not scored: nothing reads it)."""
        if noise is None:
            return search_candidates(images, candidates, self.spectra, **search)
        return search_candidates_whitened(
            images, candidates, self.spectra, noise, score_best_mse=False, **search
        )

    def classical_candidates(self, images: torch.Tensor, **search) -> np.ndarray:
        """The coarse classical stage (``MapRefinement.classical_cells``): every cell of the
        classical level scored on its low-pass band, the best ``classical_cells`` of each
        image, as their children at the network's level ``(n, classical_cells · c)``."""
        n, cells = images.shape[0], self.classical_spectra.spectra.shape[0]
        every = np.tile(np.arange(cells, dtype=np.int64), (n, 1))
        keep = min(int(self.refinement.classical_cells), cells)
        best = best_of_top_cells(images, every, self.classical_spectra, keep, **search)
        return candidate_cells(best, self.classical_level, self.coarse_level)

    def candidate_count(self, top_k: int) -> int:
        """Candidates per image when the network gives ``top_k`` cells (repeats included)."""
        width = child_cells(self.coarse_level, self.level).shape[1]
        top_k = int(top_k) + self._classical_width()
        if self.prescreen_spectra is not None:
            top_k = min(top_k, int(self.refinement.prescreen_keep))
        cells = top_k if self.coarse_spectra is None else min(top_k, int(self.refinement.keep))
        return cells * width

    def _classical_width(self) -> int:
        if self.classical_spectra is None:
            return 0
        keep = min(int(self.refinement.classical_cells), self.classical_spectra.spectra.shape[0])
        return keep * child_cells(self.classical_level, self.coarse_level).shape[1]

    def parent_cells(self, fine_index: np.ndarray) -> np.ndarray:
        """``(n,)`` the network's cell (coarse level) that holds each search-grid cell."""
        if self.level == self.coarse_level:
            return np.asarray(fine_index, dtype=np.int64)
        return parent_cells(self.coarse_level, self.level)[np.asarray(fine_index)]


def _map_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a map's voxels (float32, ``[z, y, x]``), shape and voxel size: the same map
    re-written (mrcfile stamps the time into the header's label) keeps its digest."""
    volume, voxel = io.read_map(path)
    digest = hashlib.sha256(np.ascontiguousarray(volume, dtype=np.float32).tobytes())
    digest.update(f"{volume.shape}|{float(voxel):.6g}".encode())
    return digest.hexdigest()


def record_map_envelope(
    checkpoint: str | os.PathLike[str], map_path: str | os.PathLike[str], blur_sigma_px: float
) -> None:
    """Write into a checkpoint (atomically) the Gaussian envelope ``blur_sigma_px`` (px of the
    network's box) that training measured between its particles and the map at ``map_path``
    (:mod:`cryosphere.imaging.refinement_statistics`), with the map's digest (its voxels and voxel size), so that
    ``predict --map`` with the same map blurs its templates alike (:func:`recorded_map_envelope`)."""
    import torch

    path = Path(checkpoint)
    record = torch.load(path, map_location="cpu", weights_only=True)
    record[_ENVELOPE_KEY] = {
        "blur_sigma_px": float(blur_sigma_px),
        "map_data_sha256": _map_digest(map_path),
    }
    with io.atomic_path(path) as tmp:
        torch.save(record, tmp)


def recorded_map_envelope(
    checkpoint: str | os.PathLike[str],
    map_path: str | os.PathLike[str],
    search_box: int | None = None,
) -> float | None:
    """The envelope a checkpoint's training measured against this very map (same voxels and
    voxel size, whatever the file's header says), in px of the network's box, or of ``search_box`` (px) when given
    (:attr:`MapRefinement.box`: the same width in Å); None: not recorded (a poster or
    fixed-set model), or another map."""
    import torch

    if not (Path(checkpoint).is_file() and Path(map_path).is_file()):
        return None  # predict itself reports a missing file
    record = torch.load(Path(checkpoint), map_location="cpu", weights_only=True)
    entry = record.get(_ENVELOPE_KEY) if isinstance(record, dict) else None
    if not isinstance(entry, dict) or entry.get("map_data_sha256") != _map_digest(map_path):
        return None
    if search_box is None:
        return float(entry["blur_sigma_px"])
    network_box = int(record["model_config"]["image_size"])
    return float(entry["blur_sigma_px"]) * int(search_box) / network_box
