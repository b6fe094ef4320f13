"""Reading real particle sets (cryosphere.imaging.particles) and preprocessing them."""

from __future__ import annotations

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryosphere import io
from cryosphere.imaging import preprocess
from cryosphere.imaging.datasets import SimulationParameters
from cryosphere.imaging.particles import StackReader, read_particle_set
from cryosphere.imaging.simulate import save_dataset, simulate_dataset


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("realistic")
    params = SimulationParameters(
        n_projections=10, image_size=32, seed=4, ctf=True, max_shift_px=2.0, snr=0.5
    )
    data = simulate_dataset(params, progress=False)
    save_dataset(data, folder)
    return data, folder


def test_cryosphere_star_reads_back_with_angles_shifts_defocus(realistic):
    data, folder = realistic
    pset = read_particle_set(folder / "particles.star", require_angles=True)
    assert pset.relion_format == "3.1" and len(pset) == 10 and pset.image_size == 32
    assert pset.pixel_size_angstrom == pytest.approx(data.pixel_size, rel=1e-6)
    from cryosphere.geometry import rotations

    assert rotations.geodesic_distance_deg(pset.rotations(), data.rotations).max() < 1e-3
    np.testing.assert_allclose(pset.origins_angstrom, -data.shifts_px * data.pixel_size, atol=1e-5)
    np.testing.assert_allclose(pset.ctf.defocus_u_angstrom, data.ctf.defocus_u_angstrom, atol=1e-5)
    np.testing.assert_allclose(pset.ctf.defocus_v_angstrom, data.ctf.defocus_v_angstrom, atol=1e-5)
    np.testing.assert_allclose(pset.ctf.defocus_angle_deg, data.ctf.defocus_angle_deg, atol=1e-5)
    assert pset.ctf.voltage_kv[0] == 300.0
    with StackReader(pset) as reader:
        np.testing.assert_array_equal(
            reader.read(np.array([7, 2, 3])), data.noisy_images[[7, 2, 3]]
        )
        batches = list(reader.batches(batch_size=4))
    assert [len(i) for i, _ in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b for _, b in batches]), data.noisy_images)


def _relion30(folder, images_a, images_b, pixel=2.0):
    """A RELION 3.0 file (no optics) over two stacks, one in a subfolder."""
    (folder / "Extract").mkdir()
    io.write_stack(folder / "a.mrcs", images_a, pixel)
    io.write_stack(folder / "Extract" / "b.mrcs", images_b, pixel)
    n_a, n_b = len(images_a), len(images_b)
    names = [f"{i + 1}@a.mrcs" for i in range(n_a)] + [
        f"{i + 1:06d}@Extract/b.mrcs" for i in range(n_b)
    ]
    n = n_a + n_b
    rng = np.random.default_rng(0)
    table = pd.DataFrame(
        {
            "rlnImageName": names,
            "rlnAngleRot": rng.uniform(-180, 180, n),
            "rlnAngleTilt": rng.uniform(0, 180, n),
            "rlnAnglePsi": rng.uniform(-180, 180, n),
            "rlnOriginX": rng.uniform(-3, 3, n),
            "rlnOriginY": rng.uniform(-3, 3, n),
            "rlnDefocusU": rng.uniform(10000, 20000, n),
            "rlnDefocusV": rng.uniform(10000, 20000, n),
            "rlnDefocusAngle": rng.uniform(0, 180, n),
            "rlnVoltage": np.full(n, 200.0),
            "rlnSphericalAberration": np.full(n, 2.0),
            "rlnAmplitudeContrast": np.full(n, 0.07),
            "rlnMagnification": np.full(n, 10000.0),
            "rlnDetectorPixelSize": np.full(n, pixel),  # µm -> 2 Å at 10,000x
        }
    )
    starfile.write(table, folder / "relion30.star")
    return table


def test_relion30_star_without_optics_reads_back(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3, 16, 16)).astype(np.float32)
    b = rng.normal(size=(4, 16, 16)).astype(np.float32)
    table = _relion30(tmp_path, a, b)
    pset = read_particle_set(tmp_path / "relion30.star", require_angles=True)
    assert pset.relion_format == "3.0" and len(pset.stacks) == 2
    assert pset.pixel_size_angstrom == pytest.approx(2.0)
    np.testing.assert_allclose(
        pset.angles_deg, table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]], atol=1e-5
    )
    np.testing.assert_allclose(
        pset.origins_angstrom, table[["rlnOriginX", "rlnOriginY"]].to_numpy() * 2.0, atol=1e-5
    )
    np.testing.assert_allclose(pset.ctf.defocus_v_angstrom, table["rlnDefocusV"], atol=1e-4)
    assert pset.ctf.amplitude_contrast[0] == pytest.approx(0.07)
    with StackReader(pset, max_open=1) as reader:
        np.testing.assert_array_equal(reader.read(np.arange(7)), np.concatenate([a, b]))
        np.testing.assert_array_equal(
            reader.read(np.array([5, 0, 4])), np.stack([b[2], a[0], b[1]])
        )


def test_bad_particle_sets_get_clear_errors(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.normal(size=(3, 16, 16)).astype(np.float32)
    table = _relion30(tmp_path, a, a)
    star = tmp_path / "relion30.star"

    def write(t, name="bad.star"):
        starfile.write(t, tmp_path / name)
        return tmp_path / name

    no_angles = write(table.drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]))
    assert read_particle_set(no_angles).angles_deg is None
    with pytest.raises(ValueError, match="no rlnAngleRot"):
        read_particle_set(no_angles, require_angles=True)
    missing = table.copy()
    missing.loc[0, "rlnImageName"] = "1@nowhere.mrcs"
    with pytest.raises(FileNotFoundError, match="nowhere.mrcs"):
        read_particle_set(write(missing))
    past = table.copy()
    past.loc[1, "rlnImageName"] = "4@a.mrcs"
    with pytest.raises(ValueError, match="image 4 of .*holds 3 images"):
        read_particle_set(write(past))
    io.write_stack(tmp_path / "big.mrcs", np.zeros((2, 20, 20), np.float32), 2.0)
    mixed = table.copy()
    mixed.loc[2, "rlnImageName"] = "1@big.mrcs"
    with pytest.raises(ValueError, match="mixed box sizes"):
        read_particle_set(write(mixed))
    wrong_pixel = table.copy()
    wrong_pixel["rlnMagnification"] = 5000.0
    with pytest.warns(UserWarning, match="pixel size of 4 Å but the stack header says 2 Å"):
        assert read_particle_set(write(wrong_pixel)).pixel_size_angstrom == 4.0  # STAR wins
    with mrcfile.new(tmp_path / "rect.mrcs") as mrc:
        mrc.set_data(np.zeros((2, 16, 18), np.float32))
    rect = table.copy()
    rect.loc[0, "rlnImageName"] = "1@rect.mrcs"
    with pytest.raises(ValueError, match="square"):
        read_particle_set(write(rect))
    bad_name = table.copy()
    bad_name.loc[0, "rlnImageName"] = "a.mrcs"
    with pytest.raises(ValueError, match="index@stack"):
        read_particle_set(write(bad_name))
    assert read_particle_set(star).image_size == 16  # the good file still reads


def test_fourier_crop_keeps_the_field_of_view_and_values():
    n, m = 64, 32
    y, x = np.mgrid[:n, :n] - n // 2
    blob = np.exp(-(x**2 + (y - 6) ** 2) / (2 * 5.0**2)).astype(np.float32)[None]
    small, pixel = preprocess.fourier_crop(blob, m, 1.5)
    assert pixel == pytest.approx(3.0) and small.shape == (1, m, m)
    ys, xs = np.mgrid[:m, :m] - m // 2
    expected = np.exp(-((2 * xs) ** 2 + (2 * ys - 6) ** 2) / (2 * 5.0**2))
    assert np.abs(small[0].numpy() - expected).max() < 0.01
    cropped = preprocess.crop_images(blob, 40)
    assert cropped.shape == (1, 40, 40) and float(cropped[0, 20 + 6, 20]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="even"):
        preprocess.fourier_crop(blob, 33, 1.5)


def test_background_normalisation_and_prepare(realistic):
    data, _ = realistic
    rng = np.random.default_rng(3)
    images = rng.normal(5.0, 3.0, size=(4, 32, 32)).astype(np.float32)
    out = preprocess.normalise_background(images)
    coords = np.arange(32) - 16
    outside = (coords[:, None] ** 2 + coords[None, :] ** 2) > (0.375 * 32) ** 2
    bg = out.numpy()[:, outside]
    np.testing.assert_allclose(bg.mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(bg.std(axis=1), 1, atol=1e-5)
    prepared, pixel = preprocess.prepare_images(
        data.noisy_images, data.pixel_size, target_size=16, ctf=data.ctf
    )
    assert prepared.shape == (10, 16, 16) and pixel == pytest.approx(2 * data.pixel_size)
    # phase flipping makes the downsampled clean images correlate better with the projections
    from cryosphere.imaging.ctf import shift_images
    from cryosphere.imaging.projection import gaussian_blur, project_volume

    truth = gaussian_blur(project_volume(data.volume, data.rotations), 1.0)
    truth = shift_images(truth, data.shifts_px)

    def corr(a, b):
        a = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(1, keepdim=True)
        b = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(1, keepdim=True)
        return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean())

    small_truth, _ = preprocess.fourier_crop(truth, 16, data.pixel_size)
    kwargs = dict(target_size=16, ctf=data.ctf, normalise=False)
    flipped, _ = preprocess.prepare_images(data.clean_images, data.pixel_size, **kwargs)
    raw, _ = preprocess.prepare_images(
        data.clean_images, data.pixel_size, **kwargs | {"ctf_correction": "none"}
    )
    assert corr(flipped, small_truth) > corr(raw, small_truth) + 0.04  # measured 0.91 vs 0.84
    assert torch.isfinite(prepared).all()


def test_mean_and_std_and_normalisation_hold_with_large_offsets():
    """Raw stacks can sit thousands of counts above zero: the two-pass statistics keep their
    precision there (a one-pass ``E[x²] − E[x]²`` in float32 is off by ~1 % at this offset)."""
    rng = np.random.default_rng(4)
    values = rng.normal(3000.0, 2.0, size=(6, 48, 48))
    tensor = torch.from_numpy(values.astype(np.float32))
    as_float32 = tensor.double().numpy()
    for unbiased in (False, True):
        mean, std = preprocess.mean_and_std(tensor, dim=(-2, -1), unbiased=unbiased)
        assert mean.shape == std.shape == (6,)
        ddof = 1 if unbiased else 0
        np.testing.assert_allclose(std.numpy(), as_float32.std(axis=(1, 2), ddof=ddof), rtol=1e-4)
        np.testing.assert_allclose(mean.numpy(), as_float32.mean(axis=(1, 2)), rtol=1e-6)
    kept, _ = preprocess.mean_and_std(tensor, dim=(-2, -1), keepdim=True)
    assert kept.shape == (6, 1, 1)
    out = preprocess.normalise_background(tensor).double().numpy()
    coords = np.arange(48) - 24
    outside = (coords[:, None] ** 2 + coords[None, :] ** 2) > (0.375 * 48) ** 2
    background = as_float32[:, outside]
    expected = (as_float32 - background.mean(1)[:, None, None]) / background.std(1)[:, None, None]
    np.testing.assert_allclose(out, expected, atol=2e-3)
