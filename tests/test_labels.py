"""Pose labels: templates, MSE landscapes, soft maps, masks, λ tuning, caches, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cryosphere.geometry import distributions, grids
from cryosphere.imaging import projection
from cryosphere.imaging.datasets import SimulationParameters
from cryosphere.imaging.simulate import simulate_dataset
from cryosphere.poses.labels import dataset_labels, explorer, landscape, soft_maps
from cryosphere.poses.labels import templates as templates_module

LEVEL = 2


@pytest.fixture(scope="module")
def ubi_labels(small_dataset):
    templates = templates_module.template_bank(
        small_dataset.volume, LEVEL, small_dataset.parameters.blur_sigma
    )
    return templates, dataset_labels.compute_labels(
        small_dataset, level=LEVEL, progress=False, templates=templates
    )


@pytest.fixture(scope="module")
def hvr_dataset():
    return simulate_dataset(
        SimulationParameters(structure="1hvr", n_projections=60, image_size=32, seed=5),
        progress=False,
    )


def test_mask_has_ceil_q_g_ones_and_nearest_cell(small_dataset, ubi_labels):
    _, lab = ubi_labels
    G = grids.healpix_so3_grid_size(LEVEL)
    assert lab.mask.shape == (len(small_dataset), G) and lab.mask.dtype == bool
    assert np.all(lab.mask.sum(axis=1) == math.ceil(0.05 * G))
    for q in (0.013, 0.5, 1.0):
        assert np.all(soft_maps.top_fraction_mask(lab.mse, q).sum(axis=1) == math.ceil(q * G))
    recall = distributions.nearest_cell_recall(lab.mask, lab.grid, small_dataset.rotations)
    assert recall[0] >= 0.99


def test_mask_ties_are_deterministic():
    mse = np.zeros((2, 72), dtype=np.float32)
    mse[1, 10:] = 1.0
    mask = soft_maps.top_fraction_mask(mse, 0.1)  # ceil(7.2) = 8 cells
    assert mask.sum(axis=1).tolist() == [8, 8]
    assert np.flatnonzero(mask[0]).tolist() == list(range(8))
    assert np.flatnonzero(mask[1]).tolist() == list(range(8))
    assert np.array_equal(mask, soft_maps.top_fraction_mask(mse, 0.1))


def test_symmetric_particle_mask_holds_c2_mate(hvr_dataset):
    assert hvr_dataset.point_group == "C2"
    lab = dataset_labels.compute_labels(hvr_dataset, level=LEVEL, progress=False)
    recall = distributions.nearest_cell_recall(
        lab.mask, lab.grid, hvr_dataset.rotations, hvr_dataset.symmetry_ops
    )
    assert recall[0] >= 0.99
    assert recall[1] >= 0.95


def test_matrix_product_mse_matches_direct(small_dataset, ubi_labels):
    templates, lab = ubi_labels
    images = small_dataset.clean_images[:6].reshape(6, -1).astype(np.float64)
    flat = templates.reshape(len(templates), -1).astype(np.float64)
    direct = ((images[:, None, :] - flat[None]) ** 2).mean(axis=-1)
    np.testing.assert_allclose(lab.mse[:6], direct, rtol=1e-4, atol=0)
    assert lab.mse.dtype == np.float32


def _mse_tolerance(images, templates):
    """Bound on how far two float32 evaluations of :func:`labels.mse_landscape` may differ.

    Each element is ``(‖x‖² + ‖y‖² − 2 x·y) / P`` with ``x = a_i − c``, ``y = b_g − c`` (``c`` the
    mean template), the norms summed in float64 and the dot product in float32 over ``P``
    pixels. A float32 dot product of length ``P`` in any summation order is within
    ``P·u·Σ|x_k y_k| ≤ P·u·‖x‖‖y‖`` of the exact value (``u = eps/2``), so two evaluations that
    block or vectorise the sum differently differ by at most ``P·eps·‖x‖‖y‖``, i.e.
    ``2·eps·‖x‖‖y‖`` in the MSE, plus ``eps·|MSE|`` for rounding the result to float32.
    Returns ``(n, G)`` float64. A misplaced block would be off by ~MSE, ~10³ times more.
    """
    eps = float(np.finfo(np.float32).eps)
    flat_t = templates.reshape(len(templates), -1).astype(np.float64)
    centre = flat_t.mean(axis=0)
    x = np.linalg.norm(images.reshape(len(images), -1) - centre, axis=1)
    y = np.linalg.norm(flat_t - centre, axis=1)
    return 2 * eps * np.outer(x, y)


def _assert_is_a_minimiser(best, mse, tolerance):
    """``best[i]`` reaches ``min_g mse[i, g]`` within the evaluation tolerance (ties and
    near-ties may resolve either way between differently blocked evaluations)."""
    rows = np.arange(len(best))
    slack = tolerance[rows, best] + tolerance[rows, mse.argmin(axis=1)] + 2e-7 * mse.min(axis=1)
    assert np.all(mse[rows, best] <= mse.min(axis=1) + slack)


def test_chunked_equals_unchunked(ubi_labels):
    templates, _ = ubi_labels
    rng = np.random.default_rng(0)
    images = templates[rng.choice(len(templates), 150, replace=False)]
    images = images + rng.normal(0, 0.05, images.shape).astype(np.float32)
    G, P = len(templates), templates[0].size
    whole = landscape.mse_landscape(images, templates)
    limit = 4 * (G + P) * 70
    rows, cells = landscape._block_sizes(len(images), G, P, limit)
    assert rows == 128 and cells == 192  # both axes are split
    chunked = landscape.mse_landscape(images, templates, memory_limit_bytes=limit)
    # Each element is one whole dot product in both, but BLAS (MKL included) may pick other
    # kernels or thread splits for other matrix heights: equal within the derived bound only.
    tolerance = _mse_tolerance(images, templates)
    assert np.all(np.abs(whole - chunked) <= tolerance + 1.2e-7 * np.abs(whole))
    assert tolerance.max() < 1e-2 * np.median(whole)  # tight enough to catch a misplaced block
    best = landscape.template_matching(images, templates, memory_limit_bytes=limit)
    _assert_is_a_minimiser(best, whole, tolerance)


@pytest.mark.parametrize("limit", [2**17, 2**20, 2**24, 2**29])
def test_block_sizes_respect_memory_limit(limit):
    n, G, P = 1000, 4608, 4096
    rows, cells = landscape._block_sizes(n, G, P, limit)
    assert 4 * cells * P + 4 * rows * (P + cells) <= limit
    assert 1 <= rows <= n and 1 <= cells <= G
    with pytest.raises(ValueError, match="memory_limit_bytes"):
        landscape._block_sizes(n, G, P, 2**15)


def test_template_matching_on_noisy_images(small_dataset, ubi_labels):
    templates, lab = ubi_labels
    best = landscape.template_matching(small_dataset.noisy_images, templates)
    assert best.shape == (len(small_dataset),) and best.dtype == np.int64
    noisy_mse = landscape.mse_landscape(small_dataset.noisy_images, templates)
    # template_matching drops ‖a‖² and sums in other blocks: same argmin up to near-ties
    _assert_is_a_minimiser(best, noisy_mse, _mse_tolerance(small_dataset.noisy_images, templates))
    _assert_is_a_minimiser(
        landscape.template_matching(small_dataset.clean_images, templates),
        lab.mse,
        _mse_tolerance(small_dataset.clean_images, templates),
    )


def test_soft_labels(ubi_labels):
    _, lab = ubi_labels
    np.testing.assert_allclose(lab.soft.sum(axis=1), 1.0, rtol=1e-5)
    assert np.array_equal(lab.soft.argmax(axis=1), lab.mse.argmin(axis=1))
    raw = soft_maps.soft_labels(lab.mse[:3], 2.0, normalize=False)
    np.testing.assert_allclose(raw, np.exp(-2.0 * lab.mse[:3]) ** 2, rtol=1e-5)
    sharper = soft_maps.soft_labels(lab.mse, lab.lam * 10)
    assert np.all(sharper.max(axis=1) >= lab.soft.max(axis=1) - 1e-6)


def test_tune_lambda_criterion_and_determinism(small_dataset, ubi_labels):
    _, lab = ubi_labels
    assert lab.lam_tuned and lab.radius_deg == 15.0
    share = distributions.mass_within_deg(
        lab.soft, lab.grid, small_dataset.rotations, small_dataset.symmetry_ops, 15.0
    )
    assert abs(share.mean() - 0.5) < 1e-3
    again = soft_maps.tune_lambda(
        lab.mse, lab.grid, small_dataset.rotations, small_dataset.symmetry_ops
    )
    assert again == lab.lam
    assert (
        soft_maps.tune_lambda(lab.mse, lab.grid, small_dataset.rotations, target_share=0.8)
        > lab.lam
    )


def test_lambda_grows_with_blur():
    lams = []
    for blur in (1.0, 3.0):
        ds = simulate_dataset(
            SimulationParameters(n_projections=24, image_size=32, blur_sigma=blur, seed=2),
            progress=False,
        )
        lams.append(dataset_labels.compute_labels(ds, level=LEVEL, progress=False).lam)
    assert lams[1] > 1.5 * lams[0]


def test_template_cache_reused_and_rebuilt(tmp_path, monkeypatch, ubi_map_32):
    volume, pixel = ubi_map_32
    calls = []
    real = projection.project_volume

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(templates_module, "project_volume", counting)
    first = templates_module.template_bank(volume, 1, 1.0, pixel_size=pixel, cache_dir=tmp_path)
    assert (tmp_path / "templates_L1.npy").is_file() and (tmp_path / "templates_L1.json").is_file()
    again = templates_module.template_bank(volume, 1, 1.0, pixel_size=pixel, cache_dir=tmp_path)
    assert len(calls) == 1 and np.array_equal(first, again)
    blurrier = templates_module.template_bank(volume, 1, 2.0, pixel_size=pixel, cache_dir=tmp_path)
    assert len(calls) == 2 and not np.allclose(first, blurrier)
    templates_module.template_bank(volume * 1.01, 1, 2.0, pixel_size=pixel, cache_dir=tmp_path)
    assert len(calls) == 3
    templates_module.template_bank(
        volume * 1.01, 1, 2.0, pixel_size=pixel + 0.1, cache_dir=tmp_path
    )
    assert len(calls) == 4
    assert first.shape == (576, 32, 32) and first.dtype == np.float32


def test_load_or_make_labels_caches(tmp_path, monkeypatch, small_dataset):
    made = dataset_labels.load_or_make_labels(tmp_path, small_dataset, level=1, progress=False)
    assert (tmp_path / "labels" / "labels.npz").is_file()
    calls = []
    real = dataset_labels.compute_labels
    monkeypatch.setattr(
        dataset_labels, "compute_labels", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    loaded = dataset_labels.load_or_make_labels(tmp_path, small_dataset, level=1, progress=False)
    assert calls == [] and loaded.lam == made.lam and loaded.level == 1
    assert np.array_equal(loaded.mse, made.mse) and np.array_equal(loaded.mask, made.mask)
    np.testing.assert_allclose(loaded.soft, made.soft)
    other = dataset_labels.load_or_make_labels(
        tmp_path, small_dataset, level=1, q=0.1, progress=False
    )
    assert calls == [1] and other.q == 0.1
    assert np.all(other.mask.sum(axis=1) == math.ceil(0.1 * 576))
    fixed = dataset_labels.load_or_make_labels(
        tmp_path, small_dataset, level=1, lam=3.0, progress=False
    )
    assert calls == [1, 1] and fixed.lam == 3.0 and not fixed.lam_tuned


def test_explorer_data(small_dataset, ubi_labels):
    _, lab = ubi_labels
    data = explorer.label_explorer_data(
        lab.mse[0], LEVEL, small_dataset.rotations[0], small_dataset.symmetry_ops, lab.lam, lab.q
    )
    P = 12 * 4**LEVEL
    assert data.soft_marginal.shape == (P,) and data.mask_marginal.shape == (P,)
    assert abs(data.soft_marginal.sum() - 1) < 1e-6 and abs(data.mask_marginal.sum() - 1) < 1e-9
    assert data.threshold == pytest.approx(float(lab.mse[0][lab.mask[0]].max()))
    assert np.allclose(data.true_directions[0], small_dataset.rotations[0][2])
    assert 0 < data.soft_mass_within <= 1 and 0 < data.mask_mass_within <= 1


@pytest.mark.parametrize("q", [0.0, -0.1, 1.5, float("nan")])
def test_bad_q(q, ubi_labels):
    with pytest.raises(ValueError, match="q"):
        soft_maps.top_fraction_mask(ubi_labels[1].mse, q)


@pytest.mark.parametrize("lam", [0.0, -1.0, float("inf")])
def test_bad_lambda(lam, ubi_labels, small_dataset):
    with pytest.raises(ValueError, match="λ"):
        soft_maps.soft_labels(ubi_labels[1].mse, lam)
    with pytest.raises(ValueError, match="λ"):
        dataset_labels.compute_labels(small_dataset, level=0, lam=lam, progress=False)


@pytest.mark.parametrize("level", [-1, 4, 2.0])
def test_bad_level(level, small_dataset):
    with pytest.raises(ValueError, match="level"):
        dataset_labels.compute_labels(small_dataset, level=level, progress=False)
    with pytest.raises(ValueError, match="level"):
        templates_module.template_bank(small_dataset.volume, level)


def test_bad_images(ubi_labels, small_dataset):
    templates, _ = ubi_labels
    with pytest.raises(ValueError, match="px"):
        landscape.mse_landscape(np.zeros((3, 16, 16), np.float32), templates)
    images = small_dataset.clean_images[:4].copy()
    images[2, 5, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        landscape.mse_landscape(images, templates)
    with pytest.raises(ValueError, match="NaN"):
        landscape.template_matching(images, templates)
    with pytest.raises(ValueError, match="memory_limit_bytes"):
        landscape.mse_landscape(small_dataset.clean_images, templates, memory_limit_bytes=1000)
