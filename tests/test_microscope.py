"""Particles imaged as a microscope images them (cryosphere.imaging.microscope)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryosphere.geometry import grids, rotations
from cryosphere.imaging import ctf, microscope
from cryosphere.imaging.datasets import SimulationParameters
from cryosphere.imaging.projection import gaussian_blur, project_volume
from cryosphere.imaging.simulate import simulate_dataset

SEARCH_BAND = 1.0 / 3.0  # cycles/px: the default search band (3 px)


def _ctfs(n: int, defocus: float) -> ctf.CTFParameters:
    return ctf.CTFParameters(
        defocus_u_angstrom=np.full(n, defocus + 150.0),
        defocus_v_angstrom=np.full(n, defocus - 150.0),
        defocus_angle_deg=np.linspace(0.0, 170.0, n),
        voltage_kv=[300.0],
        spherical_aberration_mm=[2.7],
        amplitude_contrast=[0.1],
        b_factor=[0.0],
    )


def _shell_correlation(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Correlation per Fourier shell of two stacks (n, N, N), pooled over the images."""
    size = a.shape[-1]
    shells = microscope.shell_index(size).reshape(-1)
    fa, fb = torch.fft.rfft2(a.double()), torch.fft.rfft2(b.double())

    def per_shell(values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(size // 2 + 1, dtype=torch.float64)
        return out.index_add_(0, shells, values.sum(0).reshape(-1))

    cross = per_shell((fa * fb.conj()).real)
    return (cross / torch.sqrt(per_shell(fa.abs() ** 2) * per_shell(fb.abs() ** 2))).numpy()


@pytest.fixture(scope="module")
def projections(ubi_map_64):
    volume, pixel = ubi_map_64
    return project_volume(volume, rotations.random_rotations(6, 3), progress=False), pixel


@pytest.mark.parametrize("defocus", [15000.0, 25000.0])
def test_padded_field_matches_a_large_field_and_the_box_does_not(projections, defocus):
    images, pixel = projections
    params = _ctfs(len(images), defocus)
    shifts = np.random.default_rng(0).uniform(-3, 3, (len(images), 2))
    reference = microscope.image_in_field(images, params, pixel, shifts_px=shifts, field_size=1024)
    padded = microscope.image_in_field(images, params, pixel, shifts_px=shifts)
    in_box = ctf.shift_images(ctf.apply_ctf(images, ctf.ctf_2d(params, 64, pixel)), shifts)
    band = np.arange(1, int(SEARCH_BAND * 64) + 1)
    high = np.arange(int(0.1 * 64) + 1, int(SEARCH_BAND * 64) + 1)
    assert microscope.field_size_px(64, params, pixel) < 1024
    assert _shell_correlation(padded, reference)[band].min() > 0.9
    assert np.median(_shell_correlation(in_box, reference)[high]) < 0.5


def test_each_particle_gets_its_own_field_and_the_same_image(projections):
    """A batch of mixed defocus (0.5-2.5 µm): each particle is imaged in the field its own
    defocus needs (a few sizes), and comes out as in one 1024-px field for all."""
    images, pixel = projections
    params = _ctfs(len(images), 15000.0)
    defocus = np.linspace(5000.0, 25000.0, len(images))
    params = ctf.CTFParameters(
        defocus_u_angstrom=defocus + 150.0, defocus_v_angstrom=defocus - 150.0,
        defocus_angle_deg=params.defocus_angle_deg, voltage_kv=[300.0],
        spherical_aberration_mm=[2.7], amplitude_contrast=[0.1], b_factor=[0.0],
    )  # fmt: skip
    shifts = np.random.default_rng(1).uniform(-3, 3, (len(images), 2))
    each = microscope.image_in_field(images, params, pixel, shifts_px=shifts)
    reference = microscope.image_in_field(images, params, pixel, shifts_px=shifts, field_size=1024)
    band = np.arange(1, int(SEARCH_BAND * 64) + 1)
    for i in range(len(images)):  # every particle, not only the batch's most defocused
        assert _shell_correlation(each[i : i + 1], reference[i : i + 1])[band].min() > 0.9
    spreads = microscope._delocalisation_each_px(params, pixel, 0.5)
    assert spreads[0] < 0.3 * spreads[-1]  # the fields differ: 128 px against 320 px


def test_field_rule_is_needed_and_grows_with_defocus(projections):
    images, pixel = projections
    params = _ctfs(len(images), 25000.0)
    spread = microscope.delocalisation_px(params, pixel)
    size = microscope.field_size_px(64, params, pixel)
    assert 64 + spread <= size < 64 + spread + 20
    assert microscope.field_size_px(64, _ctfs(2, 5000.0), pixel) < size
    reference = microscope.image_in_field(images, params, pixel, field_size=1024)
    short = microscope.image_in_field(images, params, pixel, field_size=64 + int(spread / 2))
    band = np.arange(1, int(SEARCH_BAND * 64) + 1)
    assert _shell_correlation(short, reference)[band].min() < 0.5


def test_padded_field_without_defocus_spread_is_the_box(projections):
    images, pixel = projections
    params = _ctfs(len(images), 25000.0)
    boxed = ctf.apply_ctf(images, ctf.ctf_2d(params, 64, pixel))
    assert not torch.allclose(microscope.image_in_field(images, params, pixel), boxed, atol=1e-3)
    # a field equal to the box is the in-box CTF itself
    same = microscope.image_in_field(images, params, pixel, field_size=64)
    assert torch.allclose(same, boxed, atol=1e-5)


def test_coloured_noise_keeps_variance_and_has_the_spectrum():
    white = torch.randn(400, 32, 32, generator=torch.Generator().manual_seed(0))
    power = microscope.pixel_mtf_power(32)
    coloured = microscope.colour_noise(white, power)
    assert torch.allclose(coloured.std(dim=(1, 2)), white.std(dim=(1, 2)), rtol=1e-4)
    measured = microscope.radial_power_spectrum(coloured)
    ratio = measured[1:] / power[1:]
    assert np.std(ratio) / np.mean(ratio) < 0.05
    assert measured[16] / measured[2] < 0.5  # falls towards Nyquist
    flat = microscope.radial_power_spectrum(white)
    assert abs(flat[16] / flat[2] - 1) < 0.1
    with pytest.raises(ValueError, match="one per shell"):
        microscope.colour_noise(white, power[:-1])


def test_simulation_uses_the_padded_field_by_default():
    common = dict(structure="1ubi", n_projections=4, image_size=32, snr=1.0, ctf=True, seed=1)
    common |= dict(defocus_min_angstrom=20000.0, defocus_max_angstrom=25000.0, max_shift_px=2.0)
    padded = simulate_dataset(SimulationParameters(**common), progress=False)
    in_box = simulate_dataset(SimulationParameters(**common, ctf_field="box"), progress=False)
    assert SimulationParameters(**common).ctf_field == "padded"
    np.testing.assert_allclose(padded.rotations, in_box.rotations)
    blurred = microscope.image_in_field(
        gaussian_blur(project_volume(padded.volume, padded.rotations, progress=False), 1.0),
        padded.ctf,
        padded.pixel_size,
        shifts_px=padded.shifts_px,
    )
    np.testing.assert_allclose(padded.clean_images, blurred.numpy(), atol=1e-4)
    assert (
        np.abs(padded.clean_images - in_box.clean_images).max()
        > 0.1 * np.abs(in_box.clean_images).max()
    )
    # a record written before the padded field existed (ctf on, no ctf_field) reads as "box"
    record = SimulationParameters(**common).to_dict()
    del record["ctf_field"]
    assert SimulationParameters.from_dict(record).ctf_field == "box"


def test_matching_with_the_padded_model_finds_padded_particles_at_high_defocus():
    from cryosphere.poses.labels.templates import template_bank
    from cryosphere.poses.prediction import predictions
    from cryosphere.poses.search import matching

    params = SimulationParameters(
        structure="1ubi", n_projections=60, image_size=64, snr=0.15, seed=2, ctf=True,
        defocus_min_angstrom=20000.0, defocus_max_angstrom=25000.0, max_shift_px=2.0,
    )  # fmt: skip
    data = simulate_dataset(params, progress=False)
    templates = template_bank(data.volume, 1, 1.0)
    grid = grids.healpix_so3_grid(1)
    medians = {}
    for mode in ("ctf_templates", "padded_ctf"):
        found = matching.ctf_template_matching(
            data.noisy_images, templates, ctf=data.ctf, pixel_size_angstrom=data.pixel_size,
            max_shift_px=2.0, mode=mode,
        )  # fmt: skip
        errors = predictions.pose_errors_deg(
            grid[found.best_index], data.rotations, data.symmetry_ops
        )
        medians[mode] = float(np.median(errors))
    # measured: 106° with in-box CTF templates, 73° with the padded model (level 1: 30° cells)
    assert medians["ctf_templates"] > medians["padded_ctf"] + 20.0, medians


def test_noise_power_less_signal_recovers_the_noise_of_a_background_holding_signal():
    """Background = noise + a leaked smooth signal: taking the signal's own masked power out
    leaves the noise's (within sampling), and never less than the floor's share."""
    rng = np.random.default_rng(5)
    size = 32
    yy, xx = np.mgrid[:size, :size] - size // 2
    mask = (np.hypot(yy, xx) > 0.375 * size).astype(np.float64)
    shells = microscope.shell_index(size)
    blob = np.exp(-(yy**2 + xx**2) / (2 * 9.0**2))  # reaches well outside the disc
    signal = np.stack([blob * a for a in rng.uniform(2.0, 4.0, 400)])
    noise = rng.standard_normal((400, size, size))
    measured = microscope.masked_shell_power(signal + noise, mask, shells)
    noise_only = microscope.masked_shell_power(noise, mask, shells)
    assert measured[1] > 3 * noise_only[1]  # the low shells are mostly signal
    corrected = microscope.noise_power_less_signal(measured, signal, mask, shells)
    np.testing.assert_allclose(corrected[1:6], noise_only[1:6], rtol=0.25)
    floor = microscope.noise_power_less_signal(measured, 10 * signal, mask, shells)
    np.testing.assert_allclose(floor[1:3], microscope.LEAKED_SIGNAL_FLOOR * measured[1:3])


def test_masked_shell_power_in_single_precision_matches_a_double_reference():
    """The shell power is transformed in single precision: against numpy in double precision,
    on images far from zero mean (RELION stacks are not normalised), within 1e-5."""
    rng = np.random.default_rng(11)
    size = 48
    images = 500.0 + 3.0 * rng.standard_normal((40, size, size))
    images[:, 10:20, 5:30] += 40.0  # structure, so the shells differ
    yy, xx = np.mgrid[:size, :size] - size // 2
    mask = np.clip((np.hypot(yy, xx) - 0.375 * size) / 3.0, 0.0, 1.0)
    shells = microscope.shell_index(size)
    mean = (images * mask).sum(axis=(1, 2)) / mask.sum()
    power = np.abs(np.fft.rfft2((images - mean[:, None, None]) * mask)) ** 2
    sums = np.bincount(shells.ravel(), power.mean(axis=0).ravel())
    expected = sums / np.bincount(shells.ravel())
    expected[0] = expected[1]
    got = microscope.masked_shell_power(images, mask, shells)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
