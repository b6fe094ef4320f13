"""CTF, shifts and CTF correction (cryosphere.imaging.ctf) and their use in simulation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cryosphere import io
from cryosphere.imaging import ctf
from cryosphere.imaging.datasets import SimulationParameters
from cryosphere.imaging.simulate import REALISM_FILE, load_dataset, save_dataset, simulate_dataset


def _one(u=20000.0, v=10000.0, angle=30.0, b=0.0) -> ctf.CTFParameters:
    return ctf.CTFParameters(
        defocus_u_angstrom=[u],
        defocus_v_angstrom=[v],
        defocus_angle_deg=[angle],
        voltage_kv=[300.0],
        spherical_aberration_mm=[2.7],
        amplitude_contrast=[0.1],
        b_factor=[b],
    )


def _closed_form(u, v, angle_deg, size, pixel, b=0.0):
    """RELION's CTF written out independently (float64): sin(chi) exp(-B k^2 / 4)."""
    ky = np.fft.fftfreq(size)[:, None] / pixel
    kx = np.fft.rfftfreq(size)[None, :] / pixel
    k2 = kx**2 + ky**2
    phi = np.arctan2(ky, kx)
    defocus = (u + v) / 2 + (u - v) / 2 * np.cos(2 * (phi - np.deg2rad(angle_deg)))
    volts = 300e3
    lam = 12.2643247 / np.sqrt(volts * (1 + 0.978466e-6 * volts))  # Å
    chi = np.pi * lam * defocus * k2 - np.pi / 2 * 2.7e7 * lam**3 * k2**2 + np.arcsin(0.1)
    return np.sin(chi) * np.exp(-b * k2 / 4)


@pytest.mark.parametrize("angle", [0.0, 30.0, 125.0])
def test_ctf_matches_relion_closed_form_with_astigmatism(angle):
    got = ctf.ctf_2d(_one(angle=angle, b=50.0), 64, 1.5).numpy()[0]
    expected = _closed_form(20000.0, 10000.0, angle, 64, 1.5, b=50.0)
    # float32 phase of up to ~100 rad: error ~ 100 * 1e-7 * derivative; 0.005 covers it
    assert np.abs(got - expected).max() < 5e-3
    assert got[0, 0] == pytest.approx(0.1, abs=1e-5)  # CTF(0) = amplitude contrast
    # the wrong angle convention (measured from y) fails the same comparison
    wrong = _closed_form(20000.0, 10000.0, 90.0 - angle, 64, 1.5, b=50.0)
    assert angle == 45.0 or np.abs(got - wrong).max() > 0.5


def _torch_ctf_reference(params: ctf.CTFParameters, size: int, pixel: float) -> np.ndarray:
    """The same CTF from the peer library ``torch_ctf`` (float32)."""
    import torch_ctf

    def t(values):
        return torch.as_tensor(values, dtype=torch.float32)

    u, v = params.defocus_u_angstrom, params.defocus_v_angstrom
    return (
        torch_ctf.calculate_ctf_2d(
            defocus=t((u + v) / 2e4),
            astigmatism=t((u - v) / 2e4),
            astigmatism_angle=t(params.defocus_angle_deg),
            voltage=t(params.voltage_kv),
            spherical_aberration=t(params.spherical_aberration_mm),
            amplitude_contrast=t(params.amplitude_contrast),
            phase_shift=t(np.zeros(len(params))),
            pixel_size=pixel,
            image_shape=(size, size),
            rfft=True,
            fftshift=False,
        )
        .reshape(len(params), size, size // 2 + 1)
        .numpy()
    )


def _max_phase_rad(params: ctf.CTFParameters, size: int, pixel: float) -> float:
    """Largest |χ| (rad) on the grid: at the corner frequency, largest defocus."""
    lam = ctf.electron_wavelength_angstrom(params.voltage_kv)
    k2 = 2 * (0.5 / pixel) ** 2
    cs = params.spherical_aberration_mm * 1e7
    chi = np.pi * lam * params.defocus_u_angstrom * k2 + np.pi / 2 * cs * lam**3 * k2**2
    return float(np.max(chi)) + np.pi / 2


@pytest.mark.parametrize(("size", "pixel"), [(64, 1.0), (65, 0.8), (32, 2.3)])
def test_own_ctf_formula_matches_torch_ctf_and_float64(size, pixel):
    params = ctf.random_ctf_parameters(
        32,
        np.random.default_rng(size),
        defocus_range_angstrom=(3000.0, 40000.0),
        max_astigmatism_angstrom=3000.0,
    )
    got = ctf.ctf_2d(params, size, pixel).numpy()
    # float32 rounding of a phase |χ| <= chi_max: each of the few float32 operations errs by
    # at most eps32 · chi_max, so |Δ sin χ| <= |Δχ| <= c · eps32 · chi_max; c = 16 for our
    # one pass, c = 128 against torch_ctf, which evaluates more float32 operations (measured:
    # 0.0084 at chi_max = 1750 rad, i.e. c ≈ 80).
    eps_chi = np.finfo(np.float32).eps * _max_phase_rad(params, size, pixel)
    expected = np.stack(
        [
            _closed_form(u, v, a, size, pixel)
            for u, v, a in zip(
                params.defocus_u_angstrom,
                params.defocus_v_angstrom,
                params.defocus_angle_deg,
                strict=True,
            )
        ]
    )
    assert np.abs(got - expected).max() < 16 * eps_chi
    assert np.abs(got - _torch_ctf_reference(params, size, pixel)).max() < 128 * eps_chi
    # cached grids are not modified by a call: a second call gives the same values
    np.testing.assert_array_equal(ctf.ctf_2d(params, size, pixel).numpy(), got)


@pytest.mark.parametrize("resolution_px", [None, 12.0, 3.0])
def test_ctf_on_a_search_band_is_the_whole_grid_there(resolution_px):
    """The search's band CTF (rows and columns of the band only) against the RELION closed form
    on the whole grid, cut to the band: astigmatic, so rows and columns must not be swapped."""
    from cryosphere.poses.search.matching import TemplateSpectra

    size, pixel = 64, 1.4
    max_frequency = None if resolution_px is None else 1.0 / resolution_px
    spectra = TemplateSpectra(torch.zeros(0, 1, dtype=torch.complex64), torch.zeros(0, 1), size,
                              max_frequency)  # fmt: skip
    two = ctf.CTFParameters(
        defocus_u_angstrom=[21000.0, 9000.0], defocus_v_angstrom=[15000.0, 8000.0],
        defocus_angle_deg=[30.0, 115.0], voltage_kv=[300.0] * 2,
        spherical_aberration_mm=[2.7] * 2, amplitude_contrast=[0.1] * 2, b_factor=[0.0, 40.0],
    )  # fmt: skip
    band = spectra.band_ctf(two, pixel)
    expected = np.stack([
        _closed_form(21000.0, 15000.0, 30.0, size, pixel),
        _closed_form(9000.0, 8000.0, 115.0, size, pixel, b=40.0),
    ])  # fmt: skip
    cut = spectra.restrict(torch.from_numpy(expected)).numpy()
    assert band.shape == cut.shape == (2, spectra.weights().shape[0])
    np.testing.assert_allclose(band.numpy(), cut, atol=2e-4)
    whole = ctf.ctf_2d(two, size, pixel)
    assert torch.equal(band, spectra.restrict(whole))  # the same float32 pass, on fewer points


def test_phase_flip_and_wiener_restore_contrast(ubi_map_32):
    from cryosphere.geometry import rotations as geometry_rotations
    from cryosphere.imaging.projection import project_volume

    volume, pixel = ubi_map_32
    clean = project_volume(volume, geometry_rotations.random_rotations(4, seed=0))
    params = ctf.random_ctf_parameters(4, np.random.default_rng(0))
    transfer = ctf.ctf_2d(params, 32, pixel)
    modulated = ctf.apply_ctf(clean, transfer)

    def corr(a, b):
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return float(a @ b / (a.norm() * b.norm()))

    raw = np.mean([corr(modulated[i], clean[i]) for i in range(4)])
    flipped = ctf.phase_flip(modulated, transfer)
    wiener = ctf.wiener_filter(modulated, transfer, 0.1)
    assert np.mean([corr(flipped[i], clean[i]) for i in range(4)]) > raw + 0.2
    assert np.mean([corr(wiener[i], clean[i]) for i in range(4)]) > raw + 0.2
    # phase flipping twice is the identity where the CTF is not zero
    twice = ctf.phase_flip(flipped, transfer)
    assert torch.allclose(twice, modulated, atol=1e-4 * float(modulated.abs().max()))


def test_shift_moves_content_and_integer_shifts_are_exact():
    image = torch.zeros(1, 16, 16)
    image[0, 8, 8] = 1.0
    moved = ctf.shift_images(image, np.array([[3.0, -2.0]]))
    assert np.unravel_index(int(moved[0].argmax()), (16, 16)) == (6, 11)  # [y, x]
    assert float(moved[0, 6, 11]) == pytest.approx(1.0, abs=1e-5)
    back = ctf.shift_images(moved, np.array([[-3.0, 2.0]]))
    assert torch.allclose(back, image, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        ctf.shift_images(image, np.zeros((2, 2)))


def test_relion_origin_convention_recentres_a_shifted_particle(ubi_map_32):
    """A particle moved by s px is written with origin -s * pixel; shifting the image by
    +origin / pixel (RELION's centring) gives back the centred projection."""
    from cryosphere.geometry import rotations as geometry_rotations
    from cryosphere.imaging.projection import project_volume

    volume, pixel = ubi_map_32
    centred = project_volume(volume, geometry_rotations.random_rotations(3, seed=2))
    shifts = np.array([[2.3, -1.7], [-3.0, 0.5], [0.0, 2.75]])
    particles = ctf.shift_images(centred, shifts)
    origins = ctf.origin_angstrom_from_shift_px(shifts, pixel)
    np.testing.assert_allclose(origins, -shifts * pixel)
    recentred = ctf.shift_images(particles, ctf.centring_shift_px(origins, pixel))
    scale = float(centred.abs().max())
    # band-limited projections: only the unpaired Nyquist terms differ (small)
    assert float((recentred - centred).abs().max()) < 0.02 * scale
    assert float((particles - centred).abs().max()) > 0.2 * scale


def test_ctf_parameters_validate():
    with pytest.raises(ValueError, match="amplitude_contrast"):
        dataclasses.replace(_one(), amplitude_contrast=np.array([1.5]))
    with pytest.raises(ValueError, match="shape"):
        dataclasses.replace(_one(), voltage_kv=np.array([300.0, 200.0, 100.0]))
    with pytest.raises(ValueError, match="defocus range"):
        ctf.random_ctf_parameters(3, np.random.default_rng(0), defocus_range_angstrom=(2, 1))


def test_default_simulation_is_unchanged_by_realism_fields():
    base = SimulationParameters(n_projections=6, image_size=32, seed=5)
    assert "ctf" not in base.to_dict()  # old records still match
    plain = simulate_dataset(base, progress=False)
    assert plain.ctf is None and plain.shifts_px is None and plain.contrast is None
    on = simulate_dataset(dataclasses.replace(base, ctf=True, max_shift_px=2.0), progress=False)
    np.testing.assert_array_equal(on.rotations, plain.rotations)
    assert not np.allclose(on.clean_images, plain.clean_images)
    with pytest.raises(ValueError, match="max_shift_px"):
        SimulationParameters(image_size=32, max_shift_px=10.0)


def test_simulation_with_ctf_and_shifts_writes_relion_star(tmp_path):
    params = SimulationParameters(
        n_projections=8,
        image_size=32,
        seed=1,
        ctf=True,
        voltage_kv=200.0,
        max_shift_px=3.0,
        contrast_sigma=0.1,
        ctf_field="box",  # the in-box CTF; the padded field: tests/test_microscope.py
    )
    data = simulate_dataset(params, progress=False)
    assert 5000 <= data.ctf.defocus_v_angstrom.min() and data.ctf.defocus_u_angstrom.max() <= 25500
    assert np.abs(data.shifts_px).max() <= 3.0
    # the clean images are the CTF-modulated, shifted, scaled projections
    from cryosphere.imaging.projection import gaussian_blur, project_volume

    expected = gaussian_blur(project_volume(data.volume, data.rotations), 1.0)
    expected = ctf.apply_ctf(expected, ctf.ctf_2d(data.ctf, 32, data.pixel_size))
    expected = (
        ctf.shift_images(expected, data.shifts_px)
        * torch.tensor(data.contrast)[:, None, None].float()
    )
    np.testing.assert_allclose(
        data.clean_images, expected.numpy(), atol=1e-4 * np.abs(expected.numpy()).max()
    )

    save_dataset(data, tmp_path)
    star = io.read_particles_star(tmp_path / "particles.star")
    table = star["particles"]
    np.testing.assert_allclose(table["rlnDefocusU"], data.ctf.defocus_u_angstrom, atol=1e-5)
    np.testing.assert_allclose(table["rlnDefocusAngle"], data.ctf.defocus_angle_deg, atol=1e-5)
    np.testing.assert_allclose(
        table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(),
        -data.shifts_px * data.pixel_size,
        atol=1e-5,
    )
    import starfile

    optics = starfile.read(tmp_path / "particles.star", always_dict=True)["optics"]
    assert float(optics["rlnVoltage"].iloc[0]) == 200.0
    back = load_dataset(tmp_path)
    np.testing.assert_array_equal(back.shifts_px, data.shifts_px)
    np.testing.assert_array_equal(back.ctf.defocus_u_angstrom, data.ctf.defocus_u_angstrom)
    np.testing.assert_array_equal(back.contrast, data.contrast)

    # as picked: zero origins in the STAR file, so predict sees the particles uncentred
    from cryosphere.imaging.loader import centred_images
    from cryosphere.imaging.particles import StackReader, read_particle_set

    picked = tmp_path / "picked"
    save_dataset(data, picked, write_origins=False)
    table = io.read_particles_star(picked / "particles.star")["particles"]
    assert not np.any(table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy())
    assert "rlnDefocusU" in table.columns
    pset = read_particle_set(picked / "particles.star")
    assert not np.any(pset.origins_angstrom)
    rows = np.arange(len(pset))
    with StackReader(pset) as reader:
        raw = reader.read(rows)
    np.testing.assert_array_equal(centred_images(pset, rows, raw).numpy(), raw)
    np.testing.assert_array_equal(load_dataset(picked).shifts_px, data.shifts_px)  # for scoring
    # overwriting with a plain dataset removes the stale CTF file
    plain = simulate_dataset(SimulationParameters(n_projections=8, image_size=32), progress=False)
    save_dataset(plain, tmp_path, overwrite=True)
    assert not (tmp_path / REALISM_FILE).exists()
    assert load_dataset(tmp_path).ctf is None


def test_backprojection_corrects_the_ctf(ubi_map_32):
    """CTF-modulated projections: the Wiener ratio with each image's CTF recovers the map far
    better than ignoring the CTF (FSC against the map)."""
    from cryosphere.geometry import rotations as geometry_rotations
    from cryosphere.imaging.projection import project_volume
    from cryosphere.reconstruction import backprojection, fsc

    volume, pixel = ubi_map_32
    rotations = geometry_rotations.random_rotations(400, seed=3)
    params = ctf.random_ctf_parameters(400, np.random.default_rng(3))
    images = ctf.apply_ctf(project_volume(volume, rotations), ctf.ctf_2d(params, 32, pixel))
    kwargs = dict(regularisation=0.05, batch_size=512)
    corrected = backprojection.backproject(
        images, rotations, ctf=params, pixel_size_angstrom=pixel, **kwargs
    )
    ignored = backprojection.backproject(images, rotations, **kwargs)
    good = fsc.fourier_shell_correlation(corrected, volume, pixel)
    bad = fsc.fourier_shell_correlation(ignored, volume, pixel)
    print("FSC-0.5 (Å) with / without CTF correction:", good.resolution(0.5), bad.resolution(0.5))
    assert good.resolution(0.5) < 0.8 * bad.resolution(0.5)
    assert float(np.mean(good.fsc[1:12])) > 0.9
    with pytest.raises(ValueError, match="pixel_size_angstrom"):
        backprojection.backproject(images, rotations, ctf=params)
