"""The classical searches (cryosphere.poses.search.coarse_to_fine): exhaustive on the fast kernel
against the slow reference, coarse to fine against exhaustive."""

from __future__ import annotations

import numpy as np
import pytest

from cryosphere.geometry import grids
from cryosphere.poses.labels import templates as labels_templates
from cryosphere.poses.search import coarse_to_fine, local_search, matching


@pytest.fixture(scope="module")
def banks(ubi_map_32):
    """Level-1 and level-2 templates of the 32-px 1UBI map (blur 1 px) and its pixel size."""
    volume, pixel = ubi_map_32
    return {level: labels_templates.template_bank(volume, level, 1.0) for level in (0, 1, 2)}, pixel


def test_band_spectra_are_the_template_banks_spectra_on_the_band(ubi_map_32, banks):
    volume, _ = ubi_map_32
    templates, _ = banks
    chunked = coarse_to_fine.band_spectra(volume, 1, 4.0, 1.0, chunk=100)
    reference = matching.template_spectra(templates[1], 0.25)
    assert chunked.max_frequency == reference.max_frequency == 0.25
    np.testing.assert_allclose(chunked.spectra.numpy(), reference.spectra.numpy(), atol=1e-3)
    whole = coarse_to_fine.band_spectra(volume, 0, None, 1.0)
    assert whole.max_frequency is None and whole.spectra.shape == (72, 32 * 17)


def test_exhaustive_fast_kernel_agrees_with_ctf_template_matching(banks, ctf_particles):
    """Every level-1 cell on the whole half-plane, ±2 px shifts, each template with its
    particle's CTF: the same cell, shift and score as the slow reference."""
    templates, pixel = banks
    rng = np.random.default_rng(11)
    cells = rng.integers(0, 576, 10)
    moved = rng.integers(-2, 3, (10, 2)).astype(float)
    images, params = ctf_particles(templates[1], pixel, cells, moved, snr=0.2, seed=11)
    kwargs = dict(ctf=params, pixel_size_angstrom=pixel, max_shift_px=2)
    slow = matching.ctf_template_matching(images, templates[1], **kwargs)
    spectra = matching.template_spectra(templates[1])
    fast = coarse_to_fine.exhaustive_search(
        images, spectra, keep_top=5, images_per_block=3, **kwargs
    )
    np.testing.assert_array_equal(fast.match.best_index, slow.best_index)
    np.testing.assert_array_equal(fast.match.shift_px, slow.shift_px)
    np.testing.assert_allclose(fast.match.best_mse, slow.best_mse, rtol=1e-4)
    assert fast.candidates.shape == fast.probability.shape == (10, 5)
    np.testing.assert_array_equal(fast.candidates[:, 0], slow.best_index)  # most probable first
    assert np.all(np.diff(fast.probability, axis=1) <= 0) and np.all(fast.probability.sum(1) <= 1)
    np.testing.assert_array_equal(fast.shift_px[:, 0], slow.shift_px)
    assert (slow.best_index == cells).mean() >= 0.8  # the particles are easy enough to matter


@pytest.mark.parametrize(
    "schedule",
    [
        coarse_to_fine.CoarseToFine(
            1, 2, coarse_resolution_px=3.0, keep=16, fine_resolution_px=2.0
        ),
        coarse_to_fine.CoarseToFine(
            0, 2, coarse_resolution_px=3.0, keep=(48, 16), fine_resolution_px=2.0
        ),
    ],
)
def test_coarse_to_fine_finds_the_exhaustive_pose_on_easy_particles(banks, ctf_particles, schedule):
    """Level-2 particles with CTFs and shifts at SNR 1: the coarse stage (low-pass, every
    coarse cell) keeps the right parent, the fine stage finds exhaustive matching's cell and
    shift while scoring a few percent of the templates."""
    templates, pixel = banks
    rng = np.random.default_rng(5)
    cells = rng.integers(0, grids.healpix_so3_grid_size(2), 16)
    moved = rng.integers(-2, 3, (16, 2)).astype(float)
    images, params = ctf_particles(templates[2], pixel, cells, moved, snr=1.0, seed=5)
    kwargs = dict(ctf=params, pixel_size_angstrom=pixel, max_shift_px=2)
    spectra = [
        matching.template_spectra(templates[level], 1.0 / res if res > 2 else None)
        for level, res in zip(schedule.levels, schedule.resolutions_px, strict=True)
    ]
    exhaustive = coarse_to_fine.exhaustive_search(images, spectra[-1], **kwargs)
    found = coarse_to_fine.coarse_to_fine_search(images, spectra, schedule, **kwargs)
    np.testing.assert_array_equal(exhaustive.match.best_index, cells)
    np.testing.assert_array_equal(found.match.best_index, exhaustive.match.best_index)
    np.testing.assert_array_equal(found.match.shift_px, exhaustive.match.shift_px)
    np.testing.assert_allclose(found.match.best_mse, exhaustive.match.best_mse, rtol=1e-6)
    assert found.candidates.shape[1] < 0.05 * grids.healpix_so3_grid_size(2)
    np.testing.assert_allclose(found.probability.sum(1), 1.0)


def test_kept_cells_are_distinct_and_ranked_by_score():
    scores = np.array([[3.0, 1.0, 1.0, 0.5, 2.0], [0.1, 0.2, 0.3, 0.4, 0.5]])
    candidates = np.array([[10, 11, 11, 12, 13], [4, 4, 4, 5, 6]])
    kept = coarse_to_fine._top_of(scores, candidates, 3)
    np.testing.assert_array_equal(kept, [[12, 11, 13], [4, 5, 6]])


def test_the_schedule_refuses_what_it_cannot_search():
    with pytest.raises(ValueError, match="coarse_level <= fine_level"):
        coarse_to_fine.CoarseToFine(3, 2)
    with pytest.raises(ValueError, match="one value per refining stage"):
        coarse_to_fine.CoarseToFine(1, 3, keep=(4,))
    with pytest.raises(ValueError, match="keep must lie in 1..72"):
        coarse_to_fine.CoarseToFine(0, 1, keep=100)
    with pytest.raises(ValueError, match="Nyquist"):
        coarse_to_fine.CoarseToFine(1, 2, coarse_resolution_px=1.0)
    schedule = coarse_to_fine.CoarseToFine(1, 3, keep=(8, 4), coarse_resolution_px=6.0)
    assert schedule.levels == (1, 2, 3) and schedule.keeps == (8, 4)
    assert schedule.resolutions_px == (6.0, 6.0, 3.0)
    assert coarse_to_fine.CoarseToFine(2, 2, keep=()).resolutions_px == (3.0,)


def test_refining_needs_the_templates_of_each_finer_level(banks):
    templates, _ = banks
    spectra = matching.template_spectra(templates[1])
    with pytest.raises(ValueError, match="needs the 4608 templates"):
        coarse_to_fine.refine_cells(np.zeros((1, 32, 32)), np.array([[0]]), [1, 2], [spectra], [])
    assert local_search.child_cells(1, 2).shape[0] == 576
