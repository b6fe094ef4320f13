from __future__ import annotations

import dataclasses

import mrcfile
import numpy as np
import pytest
import starfile

from cryosphere import io
from cryosphere.geometry import rotations
from cryosphere.imaging.datasets import SimulationParameters
from cryosphere.imaging.projection import project_volume
from cryosphere.imaging.simulate import (
    SIMULATION_FILES,
    load_dataset,
    load_or_simulate,
    save_dataset,
    simulate_dataset,
)


def test_dataset_shapes_and_noise(small_dataset):
    ds = small_dataset
    assert ds.clean_images.shape == (40, 32, 32) == ds.noisy_images.shape
    assert ds.rotations.shape == (40, 3, 3)
    assert ds.volume.shape == (32, 32, 32)
    assert ds.point_group == "C1"
    np.testing.assert_allclose(
        ds.rotations @ ds.rotations.transpose(0, 2, 1), np.eye(3)[None].repeat(40, 0), atol=1e-10
    )
    measured_snr = ds.clean_images.var() / (ds.noisy_images - ds.clean_images).var()
    assert measured_snr == pytest.approx(1.0, rel=0.1)


def test_same_seed_same_dataset_and_other_seed_differs():
    params = SimulationParameters(n_projections=5, image_size=16, seed=7)
    a = simulate_dataset(params, progress=False)
    b = simulate_dataset(params, progress=False)
    c = simulate_dataset(dataclasses.replace(params, seed=8), progress=False)
    np.testing.assert_array_equal(a.noisy_images, b.noisy_images)
    np.testing.assert_array_equal(a.rotations, b.rotations)
    assert not np.allclose(a.rotations, c.rotations)


def test_save_and_load_round_trip_bit_identical(small_dataset, tmp_path):
    paths = save_dataset(small_dataset, tmp_path / "run")
    back = load_dataset(tmp_path / "run")
    np.testing.assert_array_equal(back.noisy_images, small_dataset.noisy_images)
    np.testing.assert_array_equal(back.clean_images, small_dataset.clean_images)
    np.testing.assert_array_equal(back.rotations, small_dataset.rotations)
    np.testing.assert_array_equal(back.volume, small_dataset.volume)
    np.testing.assert_array_equal(back.symmetry_ops, small_dataset.symmetry_ops)
    assert back.parameters == small_dataset.parameters
    assert back.pixel_size == small_dataset.pixel_size
    assert set(paths) == set(SIMULATION_FILES)


def test_files_open_with_mrcfile_and_starfile(small_dataset, tmp_path):
    save_dataset(small_dataset, tmp_path)
    with mrcfile.open(tmp_path / "volume.mrc") as mrc:
        assert mrc.voxel_size.x == pytest.approx(small_dataset.pixel_size, rel=1e-6)
        np.testing.assert_array_equal(mrc.data, small_dataset.volume)
    with mrcfile.open(tmp_path / "particles.mrcs") as mrc:
        assert mrc.is_image_stack()
        np.testing.assert_array_equal(mrc.data, small_dataset.noisy_images)
    tables = starfile.read(tmp_path / "particles.star", always_dict=True)
    assert set(tables) == {"optics", "particles"}
    assert tables["optics"]["rlnImagePixelSize"].iloc[0] == pytest.approx(small_dataset.pixel_size)
    assert tables["particles"]["rlnImageName"].iloc[0] == "000001@particles.mrcs"
    angles = tables["particles"][["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    np.testing.assert_allclose(
        rotations.matrices_from_relion_euler(angles), small_dataset.rotations, atol=1e-5
    )


def test_projection_from_exported_relion_angles_matches_the_matrix(small_dataset, tmp_path):
    save_dataset(small_dataset, tmp_path)
    star = io.read_particles_star(tmp_path / "particles.star")
    from_angles = project_volume(
        small_dataset.volume, rotations.matrices_from_relion_euler(star["angles_deg"])
    )
    from_matrices = project_volume(small_dataset.volume, small_dataset.rotations)
    np.testing.assert_allclose(
        from_angles.numpy(), from_matrices.numpy(), atol=1e-3 * float(from_matrices.abs().max())
    )


def test_a_folder_with_other_data_is_refused_and_left_untouched(small_dataset, tmp_path):
    save_dataset(small_dataset, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = SimulationParameters(n_projections=3, image_size=16, seed=1)
    with pytest.raises(FileExistsError, match="overwrite"):
        load_or_simulate(tmp_path, other, progress=False)
    different = dataclasses.replace(small_dataset, parameters=other)
    with pytest.raises(FileExistsError, match="other parameters"):
        save_dataset(different, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    remade = load_or_simulate(tmp_path, other, overwrite=True, progress=False)
    assert len(load_dataset(tmp_path)) == len(remade) == 3


def test_load_or_simulate_reuses_a_matching_folder(tmp_path):
    params = SimulationParameters(n_projections=4, image_size=16, seed=2)
    first = load_or_simulate(tmp_path, params, progress=False)
    stamp = (tmp_path / "particles.mrcs").stat().st_mtime_ns
    second = load_or_simulate(tmp_path, params, progress=False)
    assert (tmp_path / "particles.mrcs").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(first.noisy_images, second.noisy_images)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("image_size", 8, "at least 16"),
        ("snr", 0.0, "snr"),
        ("snr", -2.0, "snr"),
        ("blur_sigma", -1.0, "blur"),
        ("n_projections", 0, "n_projections"),
        ("pixel_size", -1.0, "pixel_size"),
    ],
)
def test_bad_parameters_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        SimulationParameters(**{field: value})


def test_missing_structure_file_writes_nothing(tmp_path):
    params = SimulationParameters(
        structure=str(tmp_path / "nope.pdb"), n_projections=2, image_size=16
    )
    with pytest.raises(FileNotFoundError):
        load_or_simulate(tmp_path / "run", params, progress=False)
    assert not (tmp_path / "run").exists()


def test_loading_a_folder_without_dataset_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="notebook 01"):
        load_dataset(tmp_path)
