from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_fourier_slice import project_3d_to_2d

from cryosphere.geometry import rotations as geometry_rotations
from cryosphere.imaging.projection import (
    add_gaussian_noise,
    gaussian_blur,
    noise_sigma_for_snr,
    project_volume,
    project_volume_real_space,
    rotate_images_quarter_turns,
)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_fourier_projector_matches_real_space_line_integral(ubi_map_64):
    """Correlation > 0.99 with an independent real-space projector at 64 px.

    Both are compared after the 1-px blur the simulation applies: the raw 1UBI map at ~1 Å/px
    has atoms narrower than two voxels, and a real-space trilinear resampler attenuates those
    highest frequencies (raw correlation ≈ 0.99, ≈ 0.9997 after the blur).
    """
    volume, _ = ubi_map_64
    rotations = geometry_rotations.random_rotations(6, seed=11)
    fast = gaussian_blur(project_volume(volume, rotations), 1.0).numpy()
    reference = gaussian_blur(project_volume_real_space(volume, rotations), 1.0).numpy()
    for a, b in zip(fast, reference, strict=True):
        assert _correlation(a, b) > 0.999


def test_fourier_projector_matches_torch_fourier_slice(ubi_map_64):
    """The peer, given Rᵀ (it samples the volume at M·x), makes the same raw images."""
    volume, _ = ubi_map_64
    rotations = geometry_rotations.random_rotations(6, seed=12)
    ours = project_volume(volume, rotations).numpy()
    peer = project_3d_to_2d(
        torch.as_tensor(volume), torch.as_tensor(rotations.transpose(0, 2, 1), dtype=torch.float32)
    ).numpy()
    for a, b in zip(ours, peer, strict=True):
        assert _correlation(a, b) > 0.99  # the peer also keeps the corners beyond Nyquist
    blurred_ours = gaussian_blur(torch.as_tensor(ours), 1.0).numpy()
    blurred_peer = gaussian_blur(torch.as_tensor(peer), 1.0).numpy()
    for a, b in zip(blurred_ours, blurred_peer, strict=True):
        assert _correlation(a, b) > 0.999


def test_every_image_sums_to_the_map_sum(ubi_map_64):
    volume, _ = ubi_map_64
    images = project_volume(volume, geometry_rotations.random_rotations(50, seed=1)).numpy()
    np.testing.assert_allclose(images.sum(axis=(1, 2)), volume.sum(), rtol=1e-4)


def test_identity_pose_is_the_sum_along_z(ubi_map_32):
    volume, _ = ubi_map_32
    """The identity pose is the sum along z, band-limited to the Nyquist circle |k| < 1/2."""
    image = project_volume(volume, np.eye(3)).numpy()[0]
    n = volume.shape[0]
    spectrum = np.fft.fft2(volume.sum(axis=0))
    ky, kx = np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(n), indexing="ij")
    expected = np.fft.ifft2(spectrum * (ky**2 + kx**2 < 0.25)).real
    np.testing.assert_allclose(image, expected, atol=1e-5 * float(image.max()))


def test_in_plane_quarter_turn_of_the_pose_rotates_the_image(ubi_map_64):
    volume, _ = ubi_map_64
    poses = geometry_rotations.random_rotations(4, seed=5)
    quarter = geometry_rotations.rotation_about_z(90.0)
    images = project_volume(volume, poses)
    turned_pose_images = project_volume(volume, quarter @ poses)
    turned_images = rotate_images_quarter_turns(images, 1)
    np.testing.assert_allclose(
        turned_pose_images.numpy(), turned_images.numpy(), atol=1e-3 * float(images.abs().max())
    )
    # and the rotation is not the identity
    assert not torch.allclose(images, turned_images, atol=1e-2 * float(images.abs().max()))


def test_quarter_turns_compose_to_identity():
    images = torch.randn(3, 17, 17)
    np.testing.assert_array_equal(rotate_images_quarter_turns(images, 4).numpy(), images.numpy())
    even = torch.randn(2, 16, 16)
    twice = rotate_images_quarter_turns(rotate_images_quarter_turns(even, 1), 1)
    np.testing.assert_array_equal(twice.numpy(), rotate_images_quarter_turns(even, 2).numpy())


def test_batches_do_not_change_results(ubi_map_32):
    volume, _ = ubi_map_32
    poses = geometry_rotations.random_rotations(10, seed=2)
    one = project_volume(volume, poses, batch_size=10)
    many = project_volume(volume, poses, batch_size=3)
    torch.testing.assert_close(one, many)


def test_blur_keeps_the_sum_and_lowers_the_peak(ubi_map_32):
    volume, _ = ubi_map_32
    images = project_volume(volume, geometry_rotations.random_rotations(3, seed=0))
    blurred = gaussian_blur(images, 2.0)
    torch.testing.assert_close(blurred.sum(dim=(1, 2)), images.sum(dim=(1, 2)), rtol=1e-4, atol=0)
    assert bool((blurred.amax(dim=(1, 2)) < images.amax(dim=(1, 2))).all())
    torch.testing.assert_close(gaussian_blur(images, 0.0), images)


def test_measured_snr_on_1000_images_is_within_5_percent(ubi_map_32):
    volume, _ = ubi_map_32
    clean = gaussian_blur(
        project_volume(volume, geometry_rotations.random_rotations(1000, seed=4)), 1.0
    )
    for snr in (1.0, 0.1):
        noisy, sigma = add_gaussian_noise(clean, snr, seed=9)
        measured = float(clean.var()) / float((noisy - clean).var())
        assert abs(measured / snr - 1.0) < 0.05
        assert sigma == pytest.approx(noise_sigma_for_snr(clean, snr))


def test_noise_is_seeded(ubi_map_32):
    volume, _ = ubi_map_32
    clean = project_volume(volume, geometry_rotations.random_rotations(5, seed=4))
    a, _ = add_gaussian_noise(clean, 1.0, seed=1)
    b, _ = add_gaussian_noise(clean, 1.0, seed=1)
    c, _ = add_gaussian_noise(clean, 1.0, seed=2)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("snr", [0.0, -1.0, float("nan")])
def test_bad_snr_is_refused(snr):
    with pytest.raises(ValueError, match="snr"):
        noise_sigma_for_snr(torch.ones(2, 4, 4), snr)


def test_negative_blur_and_non_cubic_volume_are_refused():
    with pytest.raises(ValueError, match="blur"):
        gaussian_blur(torch.ones(1, 8, 8), -1.0)
    with pytest.raises(ValueError, match="cubic"):
        project_volume(np.zeros((8, 8, 9), np.float32), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        project_volume(np.full((8, 8, 8), np.nan, np.float32), np.eye(3))
