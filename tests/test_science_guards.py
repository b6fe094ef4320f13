"""Tests written against specific science bugs that the rest of the suite let through.

Each test here was checked by making the bug it names and watching it fail:

* the Bayes target with σ in place of σ² (``poses/targets.py``);
* ``SimulatedStream`` (plain and with CTF/shift realism) and ``FixedSetStream(fresh_noise=True)``
  drawing the same noise for every batch;
* the Wiener weight of a CTF-corrected back-projection without the CTF² term;
* the STAR reader ignoring ``rlnImagePixelSize`` (a stack header that disagrees, or is unset);
* ``left_translate_grid_values`` resampling at ``Q S`` instead of ``Qᵀ S``.
"""

from __future__ import annotations

import warnings

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryosphere.geometry import grids, rotations
from cryosphere.imaging import ctf
from cryosphere.imaging.datasets import SimulationParameters
from cryosphere.imaging.particles import read_particle_set
from cryosphere.imaging.projection import project_volume
from cryosphere.poses.evaluation import equivariance
from cryosphere.poses.labels.templates import template_bank
from cryosphere.poses.training import targets
from cryosphere.poses.training.fixed_stream import FixedSetStream
from cryosphere.poses.training.stream import ParticleRealism, SimulatedStream, StreamConfig
from cryosphere.reconstruction import backprojection

LEVEL = 1


# ---------------------------------------------------------------------------------------------
# Bayes target: p ∝ exp(−‖I − T‖² / 2σ²)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [1.5, 4.0])
def test_bayes_posterior_follows_its_formula_away_from_unit_noise(ubi_map_32, sigma):
    """At σ far from 1, σ and σ² differ: the posterior is checked against the formula in
    float64, computed here from the templates directly, and its sharpness moves with σ."""
    templates = template_bank(ubi_map_32[0], LEVEL, 1.0)
    rng = np.random.default_rng(0)
    scale = float(templates.std())
    images = templates[[5, 300]] + rng.normal(0, sigma * scale, (2, 32, 32)).astype(np.float32)
    noise = sigma * scale
    squared = ((images[:, None].astype(np.float64) - templates[None]) ** 2).sum(axis=(2, 3))
    log_p = -(squared - squared.min(1, keepdims=True)) / (2 * noise**2)
    expected = np.exp(log_p) / np.exp(log_p).sum(1, keepdims=True)
    got = targets.bayes_posterior(images, templates, noise)
    np.testing.assert_allclose(got, expected, atol=2e-4)
    # halving σ must sharpen the posterior: the entropy falls
    sharper = targets.bayes_posterior(images, templates, noise / 2)
    entropy = -(got * np.log(np.clip(got, 1e-30, None))).sum(1)
    entropy_sharp = -(sharper * np.log(np.clip(sharper, 1e-30, None))).sum(1)
    assert np.all(entropy_sharp < entropy)


# ---------------------------------------------------------------------------------------------
# fresh noise in every batch
# ---------------------------------------------------------------------------------------------
def _unit_noise(observed: torch.Tensor, clean: torch.Tensor, sigma: np.ndarray) -> np.ndarray:
    noise = (observed - clean).double().numpy()
    return noise / np.asarray(sigma, dtype=np.float64)[:, None, None]


def _assert_independent(a: np.ndarray, b: np.ndarray) -> None:
    """Unit-variance noise fields ``(n, N, N)``: independent draws correlate ~ 1/N ≈ 0.03."""
    assert 0.8 < a.std() < 1.2 and 0.8 < b.std() < 1.2  # the noise is there, at its level
    corr = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert abs(corr) < 0.05, f"noise of two batches correlates at {corr:.3f}: reused"


def test_simulated_stream_draws_new_noise_for_every_batch_and_image(ubi_map_32):
    stream = SimulatedStream(
        ubi_map_32[0], 1.0, LEVEL, StreamConfig(snr=0.5, target="pose", batch_size=4, seed=2)
    )
    first, second = stream.batch(0), stream.batch(1)
    a = _unit_noise(first.images, first.clean, first.noise_sigma)
    b = _unit_noise(second.images, second.clean, second.noise_sigma)
    _assert_independent(a, b)
    _assert_independent(a[:2], a[2:])  # and image to image within a batch
    other_rank = stream.batch(0, rank=1)
    _assert_independent(a, _unit_noise(other_rank.images, other_rank.clean, other_rank.noise_sigma))


def test_realistic_stream_draws_new_noise_for_every_batch(ubi_map_32):
    volume, pixel = ubi_map_32
    realism = ParticleRealism(pixel, SimulationParameters(ctf=True, max_shift_px=1.0))
    stream = SimulatedStream(
        volume,
        1.0,
        LEVEL,
        StreamConfig(snr=0.5, target="pose", batch_size=4, seed=3, reference_images=16),
        realism=realism,
    )
    first, second = stream.batch(0), stream.batch(1)
    a = _unit_noise(first.raw, first.clean, first.noise_sigma)
    b = _unit_noise(second.raw, second.clean, second.noise_sigma)
    _assert_independent(a, b)
    _assert_independent(a[:2], a[2:])


def test_fixed_set_stream_fresh_noise_is_fresh_every_time_an_image_is_drawn(ubi_map_32):
    R = rotations.random_rotations(8, 4)
    clean = project_volume(ubi_map_32[0], R).numpy()
    kernel = targets.pose_kernel_targets(R, LEVEL)
    sigma = 2.0 * float(clean.std())
    stream = FixedSetStream(
        clean, kernel, R, batch_size=8, seed=5, clean=clean, noise_sigma=sigma, fresh_noise=True
    )
    assert stream.per_epoch == 1  # every step draws all 8 images: same images, new noise
    first, second = stream.batch(0), stream.batch(1)
    a = _unit_noise(first.images, first.clean, first.noise_sigma)
    b = _unit_noise(second.images, second.clean, second.noise_sigma)
    _assert_independent(a, b)
    _assert_independent(a[:4], a[4:])


# ---------------------------------------------------------------------------------------------
# CTF-corrected Wiener reconstruction: Σ CTF·Î / (Σ CTF² + λ)
# ---------------------------------------------------------------------------------------------
def test_ctf_wiener_reconstruction_keeps_the_maps_scale(ubi_map_32):
    """Noise-free CTF images at their true poses: the map must come back at the truth's scale.
    Without the square in the weight, low frequencies are divided by Σ CTF (CTF(0) = 0.07)
    instead of Σ CTF², and the map's sum and its low-pass scale are off."""
    volume, pixel = ubi_map_32
    R = rotations.random_rotations(300, 8)
    params = ctf.random_ctf_parameters(300, np.random.default_rng(8))
    images = ctf.apply_ctf(project_volume(volume, R), ctf.ctf_2d(params, 32, pixel))
    recon = backprojection.backproject(
        images, R, ctf=params, pixel_size_angstrom=pixel, regularisation=0.01
    ).numpy()
    assert recon.sum() / volume.sum() == pytest.approx(1.0, abs=0.1)
    # the low-pass content (|k| < 4 voxels) matches the truth in scale (least squares slope)
    k = np.sqrt(sum(f**2 for f in np.meshgrid(*[np.fft.fftfreq(32) * 32] * 3, indexing="ij")))
    low = np.abs(k) < 4

    def lowpass(v):
        return np.fft.ifftn(np.fft.fftn(v) * low).real

    a, b = lowpass(recon).ravel(), lowpass(volume).ravel()
    assert float(a @ b / (b @ b)) == pytest.approx(1.0, abs=0.1)


# ---------------------------------------------------------------------------------------------
# the STAR file's pixel size wins over the MRC header
# ---------------------------------------------------------------------------------------------
def _relion31(folder, header_pixel: float, star_pixel: float):
    """A RELION 3.1 particle file (optics + particles tables) over one stack whose MRC header
    holds ``header_pixel`` (0: unset, as many programs leave it)."""
    images = np.random.default_rng(0).normal(size=(3, 16, 16)).astype(np.float32)
    with mrcfile.new(folder / "particles.mrcs") as mrc:
        mrc.set_data(images)
        mrc.voxel_size = header_pixel
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnOpticsGroup": [1],
            "rlnMicrographOriginalPixelSize": [star_pixel],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
            "rlnImagePixelSize": [star_pixel],
            "rlnImageSize": [16],
            "rlnImageDimensionality": [2],
        }
    )
    particles = pd.DataFrame(
        {
            "rlnImageName": [f"{i:06d}@particles.mrcs" for i in (1, 2, 3)],
            "rlnAngleRot": [10.0, 20.0, 30.0],
            "rlnAngleTilt": [40.0, 50.0, 60.0],
            "rlnAnglePsi": [70.0, 80.0, 90.0],
            "rlnOriginXAngst": [0.0, 1.0, -1.0],
            "rlnOriginYAngst": [0.0, 0.5, -0.5],
            "rlnDefocusU": [15000.0] * 3,
            "rlnDefocusV": [14000.0] * 3,
            "rlnDefocusAngle": [30.0] * 3,
            "rlnOpticsGroup": [1, 1, 1],
        }
    )
    starfile.write({"optics": optics, "particles": particles}, folder / "particles.star")
    return folder / "particles.star"


def test_star_pixel_size_is_read_when_the_mrc_header_has_none(tmp_path):
    star = _relion31(tmp_path, header_pixel=0.0, star_pixel=1.37)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pset = read_particle_set(star)
    assert pset.pixel_size_angstrom == pytest.approx(1.37)


def test_star_pixel_size_is_never_replaced_by_a_disagreeing_header(tmp_path):
    """Header 1 Å (a common default), STAR 1.37 Å: the reader either uses 1.37 Å (warning
    allowed) or refuses the set with an error naming the pixel size; never 1 Å."""
    star = _relion31(tmp_path, header_pixel=1.0, star_pixel=1.37)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pset = read_particle_set(star)
    except ValueError as error:
        assert "pixel size" in str(error) and "1.37" in str(error)
    else:
        assert pset.pixel_size_angstrom == pytest.approx(1.37)


# ---------------------------------------------------------------------------------------------
# left translation f'(S) = f(Qᵀ S)
# ---------------------------------------------------------------------------------------------
def test_left_translation_moves_a_peak_at_R_to_Q_R():
    """A distribution peaked at ``R`` translated by ``Q`` peaks at ``Q R``: the image of pose
    ``Q R`` (the GUIDE's equivariance). With ``Q`` in place of ``Qᵀ`` the peak lands at
    ``Qᵀ R``, which is far from ``Q R`` for a generic ``Q``."""
    level = 2
    grid = grids.healpix_so3_grid(level)
    R = rotations.random_rotations(6, 1)
    axes = np.random.default_rng(2).normal(size=(6, 3))
    Q = np.stack([rotations.rotation_about_axis(axis, 70.0) for axis in axes])
    peaked = targets.pose_kernel_targets(R, level)
    moved = equivariance.left_translate_grid_values(peaked, Q, level)
    spacing = grids.grid_nearest_neighbour_spacing_deg(level)
    error = rotations.geodesic_distance_deg(grid[moved.argmax(1)], Q @ R)
    assert np.all(error < spacing), error
    assert np.all(rotations.geodesic_distance_deg(Q @ R, np.swapaxes(Q, 1, 2) @ R) > 3 * spacing)
