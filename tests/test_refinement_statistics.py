"""Statistics of a refinement measured from its particles (imaging.refinement_statistics)."""

from __future__ import annotations

import numpy as np
import pytest

from cryosphere import io
from cryosphere.imaging import microscope
from cryosphere.imaging.datasets import SimulationParameters
from cryosphere.imaging.particles import read_particle_set
from cryosphere.imaging.refinement_statistics import estimate_statistics
from cryosphere.imaging.simulate import save_dataset, simulate_dataset

PARAMETERS = SimulationParameters(
    structure="1ubi",
    n_projections=300,
    image_size=32,
    snr=0.1,
    blur_sigma=1.0,
    seed=4,
    ctf=True,
    defocus_min_angstrom=8000.0,
    defocus_max_angstrom=20000.0,
    max_shift_px=3.0,
    noise_spectrum="mtf",
)


@pytest.fixture(scope="module")
def refinement(tmp_path_factory):
    """A simulated refinement written as RELION 3.1 files (STAR + stack) and its map."""
    folder = tmp_path_factory.mktemp("refinement")
    dataset = simulate_dataset(PARAMETERS, progress=False)
    save_dataset(dataset, folder)
    return dataset, folder


def test_statistics_match_the_simulation(refinement):
    dataset, folder = refinement
    pset = read_particle_set(folder / "particles.star", require_angles=True)
    stats = estimate_statistics(pset, dataset.volume, max_images=200, seed=0)
    # defocus and shifts: the rows and origins as written
    mean_defocus = (stats.ctf.defocus_u_angstrom + stats.ctf.defocus_v_angstrom) / 2
    assert 8000 <= mean_defocus.min() < 9000 and 19000 < mean_defocus.max() <= 20000
    np.testing.assert_allclose(stats.shifts_px, dataset.shifts_px, atol=1e-4)
    assert abs(stats.shifts_px.std() - 6.0 / np.sqrt(12)) < 0.15  # uniform in ±3 px
    # noise level within 10 %, spectrum falling as the MTF model, signal fit
    assert abs(stats.noise_sigma / dataset.noise_sigma - 1) < 0.10
    power = microscope.pixel_mtf_power(32)
    assert abs(stats.noise_power[14] / stats.noise_power[3] - power[14] / power[3]) < 0.15
    # the low shells too, once the signal the CTF carried into the background is taken out
    # (measured within 0.04 of the model; 0.28 above it in the first shells without)
    shape = stats.noise_power[1:10] / stats.noise_power[10]
    np.testing.assert_allclose(shape, power[1:10] / power[10], atol=0.08)
    assert stats.contrast > 0
    assert abs(stats.blur_sigma_px - PARAMETERS.blur_sigma) <= 0.3
    assert abs(stats.snr / PARAMETERS.snr - 1) < 0.25
    summary = stats.summary()
    assert summary["contrast_sign"] == 1 and summary["n_measured"] == 200
    # drawn particles take whole rows of the refinement
    ctf, shifts = stats.draw(np.random.default_rng(0), 50)
    rows = [np.flatnonzero(stats.ctf.defocus_u_angstrom == u)[0] for u in ctf.defocus_u_angstrom]
    np.testing.assert_allclose(ctf.defocus_v_angstrom, stats.ctf.defocus_v_angstrom[rows])
    assert shifts.shape == (50, 2)


def test_inverted_contrast_is_detected(refinement, tmp_path):
    dataset, folder = refinement
    stack, pixel = io.read_stack(folder / "particles.mrcs")
    io.write_stack(folder / "particles.mrcs", -stack, pixel)
    try:
        pset = read_particle_set(folder / "particles.star", require_angles=True)
        stats = estimate_statistics(pset, dataset.volume, max_images=100)
    finally:
        io.write_stack(folder / "particles.mrcs", stack, pixel)
    assert stats.contrast < 0 and stats.summary()["contrast_sign"] == -1
    assert abs(stats.noise_sigma / dataset.noise_sigma - 1) < 0.10
