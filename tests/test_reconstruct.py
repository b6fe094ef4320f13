"""Tests for cryosphere.reconstruction: back-projection, symmetry, FSC, resolution experiments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryosphere.geometry import grids, point_groups
from cryosphere.geometry import rotations as geometry_rotations
from cryosphere.imaging.projection import gaussian_blur, project_volume, project_volume_real_space
from cryosphere.reconstruction import backprojection, experiments, fsc, symmetry


def _lowpass(volume: np.ndarray, fraction: float) -> np.ndarray:
    n = volume.shape[0]
    k = np.fft.fftfreq(n)
    radius = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    spectrum = np.fft.fftn(volume)
    spectrum[radius > 0.5 * fraction] = 0
    return np.fft.ifftn(spectrum).real


def _c2_about_z_symmetric(volume: np.ndarray) -> np.ndarray:
    """Exactly C2-symmetric (about z through voxel N//2) version of a map with empty edges."""
    v = np.array(volume, dtype=np.float32)
    v[:, 0, :] = 0
    v[:, :, 0] = 0
    rotated = np.zeros_like(v)
    rotated[:, 1:, 1:] = v[:, 1:, 1:][:, ::-1, ::-1]  # (x, y, z) -> (-x, -y, z)
    return 0.5 * (v + rotated)


@pytest.fixture(scope="module")
def c2_map(ubi_map_32):
    volume, pixel = ubi_map_32
    return _c2_about_z_symmetric(volume), pixel


# ----------------------------------------------------------------------------- FSC


def test_fsc_of_a_map_with_itself_is_one(ubi_map_32):
    volume, pixel = ubi_map_32
    curve = fsc.fourier_shell_correlation(volume, volume, pixel)
    assert curve.fsc.shape == (17,)
    np.testing.assert_allclose(curve.fsc, 1.0, atol=1e-9)
    assert curve.frequency_inv_angstrom[-1] == pytest.approx(1 / (2 * pixel))
    assert curve.resolution(0.143) == pytest.approx(2 * pixel)
    # A scaled copy is perfectly correlated too (FSC is per-shell normalised).
    np.testing.assert_allclose(fsc.fourier_shell_correlation(volume, 3 * volume, pixel).fsc, 1.0)


def test_fsc_of_independent_noise_is_near_zero():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 32, 32, 32))
    curve = fsc.fourier_shell_correlation(a, b, 1.0)
    assert abs(curve.fsc[2:].mean()) < 0.1
    assert np.abs(curve.fsc[4:]).max() < 0.25
    assert curve.n_voxels.sum() > 0.5 * 32**3


def test_resolution_is_interpolated_at_the_first_crossing():
    frequency = np.arange(17) / (32 * 1.5)  # shells s / (N * pixel), pixel 1.5 Å
    curve = 1.0 - np.arange(17) / 16.0
    # 0.5 is reached exactly at shell 8: 48 / 8 = 6 Å.
    assert fsc.resolution_at_threshold(frequency, curve, 0.5) == pytest.approx(6.0)
    # 0.143 between shells 13 and 14, at s = 16 * 0.857 = 13.712.
    assert fsc.resolution_at_threshold(frequency, curve, 0.143) == pytest.approx(48 / 13.712)
    # The first crossing counts, even if the curve recovers later.
    dip = np.ones(17)
    dip[5], dip[6] = 0.6, 0.4
    expected = 1 / (frequency[5] + 0.1 / 0.2 * (frequency[6] - frequency[5]))
    assert fsc.resolution_at_threshold(frequency, dip, 0.5) == pytest.approx(expected)
    # Never below: Nyquist (2 * pixel).
    assert fsc.resolution_at_threshold(frequency, np.ones(17), 0.143) == pytest.approx(3.0)


def test_fsc_rejects_mismatched_maps():
    with pytest.raises(ValueError, match="same shape"):
        fsc.fourier_shell_correlation(np.zeros((8, 8, 8)), np.zeros((10, 10, 10)), 1.0)
    with pytest.raises(ValueError, match="cubic"):
        fsc.fourier_shell_correlation(np.zeros((8, 8, 9)), np.zeros((8, 8, 9)), 1.0)


# ----------------------------------------------------------------------------- back-projection


def test_project_then_backproject_recovers_the_map_at_64_px(ubi_map_64):
    volume, pixel = ubi_map_64
    poses = geometry_rotations.random_rotations(1500, seed=1)
    images = project_volume(volume, poses)
    recon = backprojection.backproject(images, poses, regularisation=0.0).numpy()
    curve = fsc.fourier_shell_correlation(recon, volume, pixel)
    two_thirds = int(round(2 / 3 * 32))
    assert curve.fsc[1 : two_thirds + 1].min() >= 0.9
    # Real space, within the band the reconstruction covers: a few per cent error, right scale.
    ref, got = _lowpass(volume, 0.6), _lowpass(recon, 0.6)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.06
    assert recon.sum() == pytest.approx(float(volume.sum()), rel=0.03)


def test_random_poses_give_a_much_worse_fsc(ubi_map_32):
    volume, pixel = ubi_map_32
    poses = geometry_rotations.random_rotations(300, seed=2)
    images = project_volume(volume, poses)
    good = fsc.fourier_shell_correlation(backprojection.backproject(images, poses), volume, pixel)
    wrong_poses = geometry_rotations.random_rotations(300, seed=3)
    bad = fsc.fourier_shell_correlation(
        backprojection.backproject(images, wrong_poses), volume, pixel
    )
    assert good.resolution(0.5) < 0.5 * bad.resolution(0.5)
    assert good.fsc[4:12].mean() > 0.9 > 0.4 > bad.fsc[4:12].mean()


def test_peer_backprojector_needs_the_transposed_pose(ubi_map_32):
    from torch_fourier_slice import backproject_2d_to_3d

    volume, pixel = ubi_map_32
    poses = geometry_rotations.random_rotations(400, seed=4)
    images = project_volume(volume, poses)
    as_transposed = backproject_2d_to_3d(images, torch.as_tensor(poses.transpose(0, 2, 1)).float())
    as_is = backproject_2d_to_3d(images, torch.as_tensor(poses).float())
    good = fsc.fourier_shell_correlation(as_transposed, volume, pixel)
    bad = fsc.fourier_shell_correlation(as_is, volume, pixel)
    assert good.fsc[1:11].min() > 0.95
    assert bad.fsc[4:11].mean() < 0.6


def test_one_hot_weights_equal_the_plain_reconstruction(small_dataset):
    images, poses = small_dataset.noisy_images, small_dataset.rotations
    plain = backprojection.backproject(images, poses)
    others = geometry_rotations.random_rotations(2 * len(poses), seed=5).reshape(
        len(poses), 2, 3, 3
    )
    candidates = np.concatenate([others[:, :1], poses[:, None], others[:, 1:]], axis=1)
    one_hot = np.zeros((len(poses), 3))
    one_hot[:, 1] = 1.0
    weighted = backprojection.backproject(images, candidates, one_hot)
    torch.testing.assert_close(weighted, plain, rtol=1e-5, atol=1e-6 * float(plain.abs().max()))
    # Splitting a pose's weight over two copies of it changes nothing either.
    halves = backprojection.backproject(
        images, np.stack([poses, poses], 1), np.full((len(poses), 2), 0.5)
    )
    torch.testing.assert_close(halves, plain, rtol=1e-4, atol=1e-5 * float(plain.abs().max()))


def test_top_k_poses_feed_the_weighted_mode():
    grid = grids.healpix_so3_grid(0)
    probs = np.random.default_rng(0).dirichlet(np.ones(len(grid)), size=5)
    rotations, weights = backprojection.top_k_poses(probs, grid, k=3)
    assert rotations.shape == (5, 3, 3, 3) and weights.shape == (5, 3)
    np.testing.assert_allclose(weights.sum(1), 1.0)
    np.testing.assert_array_equal(rotations[:, 0], grid[probs.argmax(1)])
    assert np.all(np.diff(weights, axis=1) <= 0)
    with pytest.raises(ValueError, match="probabilities must have shape"):
        backprojection.top_k_poses(probs[:, :10], grid, 3)


def test_known_blur_is_deconvolved(ubi_map_32):
    volume, _ = ubi_map_32
    poses = geometry_rotations.random_rotations(400, seed=6)
    blurred = gaussian_blur(project_volume(volume, poses), 1.0)
    ref = _lowpass(volume, 0.6)
    errors = [
        np.linalg.norm(
            _lowpass(
                backprojection.backproject(
                    blurred, poses, blur_sigma_px=s, regularisation=1e-3
                ).numpy(),
                0.6,
            )
            - ref
        )
        for s in (0.0, 1.0)
    ]
    assert errors[1] < 0.5 * errors[0]


def test_bad_inputs_raise_clear_errors():
    images = np.zeros((4, 16, 16), dtype=np.float32)
    poses = geometry_rotations.random_rotations(4, seed=0)
    with pytest.raises(ValueError, match="4 images but 3 poses"):
        backprojection.backproject(images, poses[:3])
    with pytest.raises(ValueError, match="square"):
        backprojection.backproject(np.zeros((4, 16, 12)), poses)
    with pytest.raises(ValueError, match="pass weights"):
        backprojection.backproject(images, np.stack([poses, poses], 1))
    with pytest.raises(ValueError, match="weights must have shape"):
        backprojection.backproject(images, poses, np.ones(3))
    with pytest.raises(ValueError, match=">= 0"):
        backprojection.backproject(images, poses, -np.ones(4))
    with pytest.raises(ValueError, match="regularisation"):
        backprojection.backproject(images, poses, regularisation=-1.0)
    with pytest.raises(ValueError, match="proper rotations"):
        backprojection.backproject(images, poses, symmetry_ops=np.stack([np.eye(3), -np.eye(3)]))


# ----------------------------------------------------------------------------- symmetry


def test_symmetrizing_a_symmetric_map_leaves_it_unchanged(c2_map):
    volume, _ = c2_map
    c2_z = point_groups.point_group("C2")
    np.testing.assert_allclose(symmetry.symmetrize_map(volume, c2_z).numpy(), volume, atol=1e-6)
    assert symmetry.symmetry_correlation(volume, c2_z) == pytest.approx(1.0, abs=1e-4)
    # A map that is not symmetric changes.
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(volume.shape).astype(np.float32)
    assert np.abs(symmetry.symmetrize_map(noise, c2_z).numpy() - noise).max() > 0.5
    # Off-grid frame: symmetrizing twice equals once, to (trilinear) interpolation error,
    # small for a smooth map.
    frame = geometry_rotations.random_rotations(1, seed=1)[0]
    ops = point_groups.point_group("C2", frame)
    once = symmetry.symmetrize_map(_lowpass(volume, 0.4).astype(np.float32), ops)
    twice = symmetry.symmetrize_map(once, ops)
    assert float((twice - once).norm() / once.norm()) < 0.05


def test_imposing_c2_helps_a_sparse_reconstruction(c2_map):
    volume, pixel = c2_map
    poses = geometry_rotations.random_rotations(40, seed=7)
    images = project_volume(volume, poses)
    ops = point_groups.point_group("C2")
    c1 = backprojection.reconstruct(images, poses, regularisation=0.1)
    c2 = backprojection.reconstruct(images, poses, symmetry_ops=ops, regularisation=0.1)
    assert c1.c1_volume is None and c2.c1_volume is not None
    torch.testing.assert_close(c2.c1_volume, c1.volume)
    fsc_c1 = fsc.fourier_shell_correlation(c1.volume, volume, pixel)
    fsc_c2 = fsc.fourier_shell_correlation(c2.volume, volume, pixel)
    assert fsc_c2.fsc[2:16].mean() > fsc_c1.fsc[2:16].mean()
    assert fsc_c2.resolution(0.5) <= fsc_c1.resolution(0.5)
    # Inserting at R @ g is the same as symmetrizing the map afterwards.
    after = symmetry.symmetrize_map(
        backprojection.backproject(images, poses, regularisation=0.1), ops
    )
    assert fsc.fourier_shell_correlation(after, c2.volume, pixel).fsc[1:12].min() > 0.9
    assert c2.symmetry_correlation > 0.6


def test_a_point_group_in_the_wrong_frame_is_rejected(c2_map):
    volume, _ = c2_map
    poses = geometry_rotations.random_rotations(64, seed=8)
    images = project_volume(volume, poses)
    about_x = point_groups.point_group(
        "C2", geometry_rotations.rotation_about_axis(np.array([1.0, 0, 0]), 90.0)
    )
    with pytest.raises(ValueError, match="does not match the map's frame"):
        backprojection.reconstruct(images, poses, symmetry_ops=about_x)
    with pytest.raises(ValueError, match="does not match the map's frame"):
        symmetry.check_point_group(volume, about_x)
    assert symmetry.check_point_group(volume, point_groups.point_group("C2")) > 0.9
    # The check can be switched off.
    backprojection.reconstruct(images, poses, symmetry_ops=about_x, check_symmetry=False)


# ----------------------------------------------------------------------------- workflows


def test_half_set_fsc_is_seeded_and_splits_the_images(small_dataset):
    ds = small_dataset
    first = experiments.half_set_fsc(ds.noisy_images, ds.rotations, ds.pixel_size, seed=1)
    again = experiments.half_set_fsc(ds.noisy_images, ds.rotations, ds.pixel_size, seed=1)
    np.testing.assert_array_equal(first.fsc.fsc, again.fsc.fsc)
    assert len(first.indices_a) + len(first.indices_b) == len(ds)
    assert not set(first.indices_a) & set(first.indices_b)
    assert first.fsc.fsc[1] > 0.5  # the halves agree at low resolution
    assert 2 * ds.pixel_size <= first.fsc.resolution(0.143) < 40


def test_resolution_improves_with_more_images(ubi_map_32):
    volume, pixel = ubi_map_32
    poses = geometry_rotations.random_rotations(200, seed=9)
    images = project_volume(volume, poses)
    noisy = images + 0.5 * images.std() * torch.randn(
        images.shape, generator=torch.Generator().manual_seed(0)
    )
    sweep = experiments.resolution_vs_image_count(noisy, poses, pixel, [10, 200], reference=volume)
    assert sweep.counts.tolist() == [10, 200] and sweep.threshold == 0.143
    assert sweep.resolution_angstrom[1] < sweep.resolution_angstrom[0]
    half = experiments.resolution_vs_image_count(noisy, poses, pixel, [20, 200], threshold=0.5)
    assert half.resolution_angstrom[1] < half.resolution_angstrom[0]
    with pytest.raises(ValueError, match="counts must lie"):
        experiments.resolution_vs_image_count(noisy, poses, pixel, [500])


def test_odd_image_size_is_centred_at_n_over_2(ubi_map_32):
    # The real-space reference projector (centre N // 2 by construction) for odd N.
    volume, pixel = ubi_map_32
    odd = np.ascontiguousarray(volume[1:, 1:, 1:])  # 31³, centre voxel 15 = 31 // 2
    poses = geometry_rotations.random_rotations(150, seed=10)
    recon = backprojection.backproject(
        project_volume_real_space(odd, poses), poses, regularisation=0.0
    )
    curve = fsc.fourier_shell_correlation(recon, odd, pixel)
    assert curve.fsc[1:11].min() > 0.9
    with pytest.raises(ValueError, match="must be even"):
        backprojection.backproject(np.zeros((2, 31, 31)), poses[:2], oversampling=1)
