"""Wiener reconstruction with the per-shell SSNR of the half maps (reconstruction.ssnr)."""

from __future__ import annotations

import numpy as np
import pytest

from cryosphere.geometry import rotations
from cryosphere.imaging.projection import add_gaussian_noise, project_volume
from cryosphere.reconstruction import backprojection, ssnr
from cryosphere.reconstruction.fsc import fourier_shell_correlation


def test_ssnr_from_fsc_is_two_fsc_over_one_minus_fsc():
    np.testing.assert_allclose(ssnr.ssnr_from_fsc([0.5, 1 / 3, 0.0, -0.2, 1.0]),
                               [2.0, 1.0, 2e-3 / 0.999, 2e-3 / 0.999, 2 * 0.999 / 1e-3])  # fmt: skip
    # from the first shell under the noise level 3 / sqrt(voxels) = 0.3 on, noise: the floor
    cut = ssnr.ssnr_from_fsc([0.9, 0.5, 0.2, 0.6], n_voxels=[1, 100, 100, 100])
    np.testing.assert_allclose(cut, [18.0, 2.0, 2e-3 / 0.999, 2e-3 / 0.999])


@pytest.fixture(scope="module")
def noisy_set(ubi_map_32):
    volume, pixel = ubi_map_32
    R = rotations.random_rotations(600, 11)
    images, _ = add_gaussian_noise(project_volume(volume, R), snr=0.05, seed=11)
    return volume, pixel, images, R


def test_the_measured_ssnr_beats_the_constant_against_the_truth(noisy_set):
    """A per-shell Wiener constant rescales whole shells, to which the FSC is blind (it
    normalises each shell), so the gain shows in real space: the squared error to the truth
    (the Wiener filter's own criterion) falls below every constant's, and the FSC against the
    truth stays as good."""
    volume, pixel, images, R = noisy_set
    result = ssnr.ssnr_reconstruct(images, R, pixel, seed=1)
    ours = result.volume.numpy()
    truth_fsc = fourier_shell_correlation(ours, volume, pixel).fsc
    error = float(((ours - volume) ** 2).mean())
    for constant in (0.1, 1.0, 10.0, 100.0):
        plain = backprojection.backproject(images, R, regularisation=constant).numpy()
        plain_fsc = fourier_shell_correlation(plain, volume, pixel).fsc
        plain_error = float(((plain - volume) ** 2).mean())
        print(constant, error, plain_error, truth_fsc[1:].mean(), plain_fsc[1:].mean())
        assert error < 0.97 * plain_error  # measured 0.94 of the best constant (10)
        assert truth_fsc[1:].mean() > plain_fsc[1:].mean() - 0.01
    # the half maps are reported with their FSC; the SSNR falls with frequency
    assert result.half_a.shape == (32, 32, 32) and len(result.half_fsc.fsc) == 17
    assert result.ssnr[1] > 10 * result.ssnr[-1]
    assert result.regularisation[-2] > 10 * result.regularisation[1]  # λ(s) rises with s
    assert set(result.indices_a).isdisjoint(result.indices_b)
    assert len(result.indices_a) + len(result.indices_b) == 600


def test_bad_input_is_refused(noisy_set):
    volume, pixel, images, R = noisy_set
    with pytest.raises(ValueError, match="at least 2"):
        ssnr.ssnr_reconstruct(images[:1], R[:1], pixel)
    with pytest.raises(ValueError, match="regularisation"):
        ssnr.ssnr_reconstruct(images, R, pixel, half_regularisation=-1.0)
