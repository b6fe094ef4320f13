"""The map search's fitted scale and leak-corrected noise spectrum
(``MapRefinement.scale="fitted"``, :func:`cryosphere.poses.search.local_search.fitted_scale`,
``background_noise_spectrum(signal=...)``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryosphere.geometry import grids
from cryosphere.imaging.datasets import SimulationParameters
from cryosphere.imaging.simulate import save_dataset, simulate_dataset
from cryosphere.poses.labels.templates import template_bank
from cryosphere.poses.prediction import predictions
from cryosphere.poses.search import local_search, map_search
from cryosphere.poses.search import noise as search_noise
from cryosphere.poses.search.matching import template_spectra


def test_fitted_scale_is_the_least_squares_scale_of_the_images(ubi_map_32, ctf_particles):
    """Noise-free grid templates with their CTF and a shift, times 0.7: the fit gives 0.7;
    with noise, within 3 %."""
    volume, pixel = ubi_map_32
    templates = template_bank(volume, 1, 1.0)
    spectra = template_spectra(templates)
    rng = np.random.default_rng(4)
    cells = rng.choice(len(templates), size=80, replace=False)
    shifts = rng.integers(-2, 3, size=(80, 2)).astype(np.float64)
    clean, params = ctf_particles(templates, pixel, cells, shifts, 1e9, 5)
    search = dict(ctf=params, pixel_size_angstrom=pixel, max_shift_px=2.0)
    fitted = local_search.fitted_scale(0.7 * clean, cells, spectra, **search)
    assert fitted == pytest.approx(0.7, rel=1e-3)
    noisy, params = ctf_particles(templates, pixel, cells, shifts, 0.5, 5)
    assert local_search.fitted_scale(0.7 * noisy, cells, spectra, **search) == pytest.approx(
        0.7, rel=0.03
    )
    # the score it fits for: a · norms - 2 · cross is least at the fitted scale
    scores = [
        local_search.candidate_scores(
            0.7 * clean, cells[:, None], spectra, score="fitted", scale=a, **search
        )[0].sum()
        for a in (0.6, 0.7, 0.8)
    ]
    assert scores[1] < min(scores[0], scores[2])


@pytest.fixture(scope="module")
def delocalised():
    """200 particles imaged as a microscope does (padded field, 1.5-2.5 µm), white noise."""
    return simulate_dataset(
        SimulationParameters(
            n_projections=200, image_size=32, seed=12, ctf=True, snr=0.2, max_shift_px=2.0,
            defocus_min_angstrom=15000.0, defocus_max_angstrom=25000.0,
        ),
        progress=False,
    )  # fmt: skip


def test_background_spectrum_less_the_signal_leaked_into_it(delocalised):
    """The CTF spreads a particle's signal into the background ring: the raw estimate is too
    high in the low shells; less the modelled signal's own background power it is the noise
    (white, σ² in every shell)."""
    data = delocalised
    variance = data.noise_sigma**2
    raw = search_noise.background_noise_spectrum(data.noisy_images).power / variance
    corrected = search_noise.background_noise_spectrum(data.noisy_images, signal=data.clean_images)
    corrected = corrected.power / variance
    assert raw[1:4].mean() > 1.2  # the leak (measured 1.27)
    # what is left is the noise, up to the signal-noise cross terms of 200 particles
    # (measured 0.87-1.02 per shell, 0.96 on average over shells 1-6)
    assert np.all(np.abs(corrected[1:12] - 1.0) < 0.2), corrected[1:12]
    assert abs(corrected[1:7].mean() - 1.0) < 0.07
    with pytest.raises(ValueError, match="shape"):
        search_noise.background_noise_spectrum(data.noisy_images, signal=data.clean_images[:5])


def test_pure_white_noise_spectrum_is_unbiased_in_the_lowest_shells():
    """Removing each background's mean takes power from the lowest shells (0.90 of the
    truth); solving for the mask's shell response restores it."""
    noise = torch.randn(1000, 32, 32, generator=torch.Generator().manual_seed(2)) * 1.5
    power = search_noise.background_noise_spectrum(noise.double()).power / 1.5**2
    assert np.all(np.abs(power[:6] - 1.0) < 0.05), power[:6]


def test_map_search_fits_the_scale_and_noise_then_keeps_them(delocalised, tmp_path):
    """On the first batch (>= 64 particles) the search fits the particles' scale against the
    map (1 here: raw images, templates blurred as the data) and the noise spectrum, and keeps
    both for the next batches; a smaller first batch keeps the free scale."""
    from cryosphere.imaging.particles import read_particle_set

    data = delocalised
    save_dataset(data, tmp_path)
    pset = read_particle_set(tmp_path / "particles.star")
    refinement = map_search.MapRefinement(
        tmp_path / "volume.mrc", level=2, max_shift_px=2.0, blur_sigma_px=1.0
    )
    images = torch.as_tensor(data.noisy_images)
    every = np.tile(np.arange(grids.healpix_so3_grid_size(1)), (len(images), 1))
    search = map_search.MapSearch(refinement, pset, 32, 1)
    first = search(images[:100], data.ctf.subset(np.arange(100)), data.pixel_size, every[:100])
    assert search.data_scale == pytest.approx(1.0, rel=0.1)
    assert np.all(np.abs(search.noise.power[1:12] / data.noise_sigma**2 - 1.0) < 0.2)
    scale, noise = search.data_scale, search.noise
    rest = np.arange(100, 200)
    second = search(images[100:], data.ctf.subset(rest), data.pixel_size, every[100:])
    assert search.data_scale == scale and search.noise is noise
    grid = grids.healpix_so3_grid(2)
    found = np.concatenate([first.match.best_index, second.match.best_index])
    errors = predictions.pose_errors_deg(grid[found], data.rotations, data.symmetry_ops)
    free = map_search.MapSearch(
        map_search.MapRefinement(
            tmp_path / "volume.mrc", level=2, max_shift_px=2.0, blur_sigma_px=1.0, scale="free"
        ),
        pset, 32, 1,
    )  # fmt: skip
    loose = free(images, data.ctf, data.pixel_size, every).match.best_index
    free_errors = predictions.pose_errors_deg(grid[loose], data.rotations, data.symmetry_ops)
    # hard particles (32 px, 1.5-2.5 µm, SNR 0.2): measured 92.4° fitted, 101.7° free
    assert np.median(errors) <= np.median(free_errors) + 0.5
    small = map_search.MapSearch(refinement, pset, 32, 1)
    small(images[:20], data.ctf.subset(np.arange(20)), data.pixel_size, every[:20])
    assert small.data_scale is None and small.noise is None
    # the templates kept for the fit are released once it is done, not before
    assert search._fit_templates is None and small._fit_templates is not None  # noqa: SLF001


def test_modelled_signal_from_the_kept_templates_is_the_map_projected_anew(delocalised, tmp_path):
    """The first batch's fit models each particle's signal from the search level's templates
    kept from the search's set-up: the same as projecting the map at the cells and blurring
    alike, with each particle's CTF, shift and the scale."""
    from cryosphere.imaging.particles import read_particle_set
    from cryosphere.poses.search.matching import MatchResult

    data = delocalised
    save_dataset(data, tmp_path)
    pset = read_particle_set(tmp_path / "particles.star")
    refinement = map_search.MapRefinement(
        tmp_path / "volume.mrc", level=2, max_shift_px=2.0, blur_sigma_px=1.0
    )
    search = map_search.MapSearch(refinement, pset, 32, 1)
    search.data_scale = 0.8
    match = MatchResult(
        best_index=np.array([5, 100, 4000]),
        shift_px=np.array([[0.0, 0.0], [1.0, -2.0], [-1.5, 0.5]]),
        best_mse=None,
    )
    ctf = data.ctf.subset(np.arange(3))
    kept = search._modelled_signal(match, ctf, data.pixel_size)  # noqa: SLF001
    search._fit_templates = None  # noqa: SLF001
    projected = search._modelled_signal(match, ctf, data.pixel_size)  # noqa: SLF001
    assert float(projected.abs().max()) > 0
    np.testing.assert_allclose(kept, projected, atol=1e-5 * float(projected.abs().max()))
