"""CTF-aware template matching with a translation search (cryosphere.poses.search.matching)."""

from __future__ import annotations

import numpy as np
import pytest

from cryosphere.geometry import grids, rotations
from cryosphere.imaging import ctf
from cryosphere.poses.labels import templates as labels_templates
from cryosphere.poses.search import matching


@pytest.fixture(scope="module")
def bank(ubi_map_32):
    volume, pixel = ubi_map_32
    return labels_templates.template_bank(volume, level=1, blur_sigma=1.0), pixel


def test_shifted_ctf_image_of_a_grid_pose_is_matched_at_pose_and_shift(bank, ctf_particles):
    templates, pixel = bank
    cells = np.array([5, 100, 377])
    moved = np.array([[2.0, -1.0], [-3.0, 3.0], [0.0, 1.0]])  # content moved by these (px)
    images, params = ctf_particles(templates, pixel, cells, moved, snr=2.0, seed=0)
    result = matching.ctf_template_matching(
        images, templates, ctf=params, pixel_size_angstrom=pixel, max_shift_px=3
    )
    np.testing.assert_array_equal(result.best_index, cells)
    np.testing.assert_allclose(result.shift_px, -moved)  # the shift that centres them
    np.testing.assert_allclose(result.origins_angstrom(pixel), -moved * pixel)
    assert np.all(result.best_mse >= 0)


def test_ctf_templates_beat_ignoring_the_ctf(bank, ctf_particles):
    """At SNR 0.1, with shifts up to 3 px: CTF-carrying templates find the pose far more often
    than bare templates; phase flipping sits in between or equal (measured and printed)."""
    templates, pixel = bank
    rng = np.random.default_rng(1)
    cells = rng.integers(0, templates.shape[0], 48)
    moved = rng.integers(-3, 4, (48, 2)).astype(float)
    images, params = ctf_particles(templates, pixel, cells, moved, snr=0.1, seed=1)
    grid = grids.healpix_so3_grid(1)
    errors = {}
    for mode in matching.MATCHING_MODES:
        result = matching.ctf_template_matching(
            images, templates, ctf=params, pixel_size_angstrom=pixel, mode=mode, batch_size=16
        )
        errors[mode] = np.median(
            rotations.geodesic_distance_deg(grid[result.best_index], grid[cells])
        )
    print("median pose error (deg) by mode:", errors)
    assert errors["ctf_templates"] < 1e-6
    assert errors["ctf_templates"] <= errors["phase_flip"] < errors["none"]


def test_matching_is_blockwise_invariant_and_checks_input(bank, ctf_particles):
    templates, pixel = bank
    cells = np.array([3, 50, 200, 400, 10])
    images, params = ctf_particles(templates, pixel, cells, np.zeros((5, 2)), snr=1.0, seed=2)
    kwargs = dict(ctf=params, pixel_size_angstrom=pixel, max_shift_px=1)
    a = matching.ctf_template_matching(images, templates, **kwargs)
    b = matching.ctf_template_matching(
        images, templates, batch_size=2, template_block=100, **kwargs
    )
    np.testing.assert_array_equal(a.best_index, b.best_index)
    np.testing.assert_allclose(a.best_mse, b.best_mse, rtol=1e-3)
    assert matching.shift_grid_px(1).tolist()[0] == [0.0, 0.0]
    assert len(matching.shift_grid_px(3)) == 49
    with pytest.raises(ValueError, match="CTF"):
        matching.ctf_template_matching(images, templates, ctf=None, pixel_size_angstrom=pixel)
    with pytest.raises(ValueError, match="box"):
        matching.ctf_template_matching(images[:, :16, :16], templates, **kwargs)


def test_ctf_mse_landscape_is_the_pixel_mse_against_ctf_templates():
    from cryosphere.imaging.projection import gaussian_blur

    rng = np.random.default_rng(4)
    # band-limited like projections: at the Nyquist row an astigmatic CTF times a spectrum is
    # not Hermitian, so the pixel-space CTF (irfft2) and the Fourier model differ there
    templates = gaussian_blur(rng.standard_normal((5, 16, 16)), 1.5).numpy()
    images = gaussian_blur(rng.standard_normal((3, 16, 16)), 1.5).numpy()
    params = ctf.random_ctf_parameters(3, rng)
    transfer = ctf.ctf_2d(params, 16, 2.0)
    got = matching.ctf_mse_landscape(images, transfer, matching.template_spectra(templates))
    expected = np.stack(
        [
            (
                (images[i] - ctf.apply_ctf(templates, transfer[i].expand(5, -1, -1)).numpy()) ** 2
            ).mean(axis=(1, 2))
            for i in range(3)
        ]
    )
    # float32 FFTs and products of unit-variance data: relative error ~1e-6, 1e-4 is generous
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    with pytest.raises(ValueError, match="CTF must have shape"):
        matching.ctf_mse_landscape(images, transfer[:2], matching.template_spectra(templates))
