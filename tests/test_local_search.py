"""Local template search around the network's top cells (cryosphere.poses.search.local_search)."""

from __future__ import annotations

import numpy as np
import pytest

from cryosphere.geometry import grids
from cryosphere.imaging import ctf
from cryosphere.imaging.projection import add_gaussian_noise
from cryosphere.poses.labels import templates as labels_templates
from cryosphere.poses.search import local_search, map_search, matching


@pytest.fixture(scope="module")
def bank(ubi_map_32):
    volume, pixel = ubi_map_32
    templates = labels_templates.template_bank(volume, level=1, blur_sigma=1.0)
    return templates, matching.template_spectra(templates), pixel


def test_children_partition_the_fine_grid_and_lie_near_their_parent():
    children = local_search.child_cells(1, 2)
    assert children.shape[0] == grids.healpix_so3_grid_size(1)
    np.testing.assert_array_equal(np.unique(children), np.arange(grids.healpix_so3_grid_size(2)))
    owners = {}
    for parent, row in enumerate(children):
        for cell in set(row.tolist()):
            assert owners.setdefault(cell, parent) == parent  # one parent per fine cell
    coarse, fine = grids.healpix_so3_grid(1), grids.healpix_so3_grid(2)
    nearest = grids.nearest_grid_indices(fine[children.ravel()], coarse)
    np.testing.assert_array_equal(nearest, np.repeat(np.arange(len(coarse)), children.shape[1]))
    same = local_search.child_cells(2, 2)
    np.testing.assert_array_equal(same[:, 0], np.arange(grids.healpix_so3_grid_size(2)))
    top = np.array([[3, 7], [0, 575]])
    cands = local_search.candidate_cells(top, 1, 2)
    assert cands.shape == (2, 2 * children.shape[1])
    np.testing.assert_array_equal(cands[1, : children.shape[1]], children[0])
    assert 0 < local_search.search_fraction(1, 2, 2) < 0.01
    with pytest.raises(ValueError, match="fine level"):
        local_search.child_cells(2, 1)
    with pytest.raises(ValueError, match="level-1 cells"):
        local_search.candidate_cells(np.array([[576]]), 1, 2)


@pytest.mark.parametrize("batch_size, step", [(5, 1.0), (None, 0.5)])
def test_with_every_template_as_candidate_it_equals_exhaustive_matching(
    bank, ctf_particles, batch_size, step
):
    """The separable shift search (column then row ramps, buffers reused across blocks, a
    last block shorter than the others) gives exhaustive matching's template and shift."""
    templates, spectra, pixel = bank
    rng = np.random.default_rng(4)
    cells = rng.integers(0, templates.shape[0], 12)
    moved = rng.integers(-2, 3, (12, 2)) * step
    images, params = ctf_particles(templates, pixel, cells, moved, snr=0.3, seed=4)
    kwargs = dict(ctf=params, pixel_size_angstrom=pixel, max_shift_px=2, shift_step_px=step)
    full = matching.ctf_template_matching(images, templates, **kwargs)
    everything = np.tile(np.arange(templates.shape[0]), (12, 1))
    local = local_search.local_template_matching(
        images, everything, spectra, batch_size=batch_size, **kwargs
    )
    np.testing.assert_array_equal(local.best_index, full.best_index)
    np.testing.assert_array_equal(local.shift_px, full.shift_px)
    # float32 products of the same terms in another order: relative error ~ eps32 * sqrt(K)
    np.testing.assert_allclose(local.best_mse, full.best_mse, rtol=1e-4)


def test_a_wrong_top_cell_is_corrected_when_the_truth_is_a_candidate(bank, ctf_particles):
    """The candidates of each image: one wrong cell first, the true cell elsewhere in the
    list; the search returns the true cell and the shift that centres the particle."""
    templates, spectra, pixel = bank
    cells = np.array([5, 100, 377, 50])
    moved = np.array([[2.0, -1.0], [-3.0, 3.0], [0.0, 1.0], [1.0, 1.0]])
    images, params = ctf_particles(templates, pixel, cells, moved, snr=2.0, seed=0)
    wrong = (cells + 200) % templates.shape[0]
    candidates = np.stack([wrong, (cells + 1) % templates.shape[0], cells], axis=1)
    result = local_search.local_template_matching(
        images, candidates, spectra, ctf=params, pixel_size_angstrom=pixel, max_shift_px=3
    )
    np.testing.assert_array_equal(result.best_index, cells)
    np.testing.assert_allclose(result.shift_px, -moved)
    only_wrong = local_search.local_template_matching(
        images, wrong[:, None], spectra, ctf=params, pixel_size_angstrom=pixel, max_shift_px=3
    )
    np.testing.assert_array_equal(only_wrong.best_index, wrong)
    assert np.all(only_wrong.best_mse > result.best_mse)


def test_without_ctf_it_is_the_plain_squared_error(bank):
    templates, spectra, _ = bank
    cells = np.array([9, 300])
    images, _ = add_gaussian_noise(templates[cells], 1.0, seed=3)
    candidates = np.array([[9, 10, 300], [299, 300, 301]])
    result = local_search.local_template_matching(images.numpy(), candidates, spectra)
    mse = ((images.numpy()[:, None] - templates[candidates]) ** 2).mean(axis=(2, 3))
    np.testing.assert_array_equal(result.best_index, candidates[np.arange(2), mse.argmin(1)])
    np.testing.assert_allclose(result.best_mse, mse.min(1), rtol=1e-4)
    np.testing.assert_array_equal(result.shift_px, 0.0)


def test_bad_input_names_the_problem(bank):
    templates, spectra, pixel = bank
    images = templates[:2]
    with pytest.raises(ValueError, match="candidates must have shape"):
        local_search.local_template_matching(images, np.zeros((3, 2), int), spectra)
    with pytest.raises(ValueError, match="must index the"):
        local_search.local_template_matching(images, np.full((2, 1), 10**6), spectra)
    with pytest.raises(ValueError, match="images must have shape"):
        local_search.local_template_matching(images[:, :8, :8], np.zeros((2, 1), int), spectra)
    params = ctf.random_ctf_parameters(2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="pixel_size_angstrom"):
        local_search.local_template_matching(images, np.zeros((2, 1), int), spectra, ctf=params)


def test_the_scaled_score_ignores_the_images_scale_and_offset(bank, ctf_particles):
    """Real particles come normalised: a scaled, offset image finds the same cell and shift
    with ``score="scaled"`` as the image on the templates' scale does with the MSE."""
    templates, spectra, pixel = bank
    cells = np.array([5, 100, 377, 50])
    moved = np.array([[2.0, -1.0], [-3.0, 3.0], [0.0, 1.0], [1.0, 1.0]])
    images, params = ctf_particles(templates, pixel, cells, moved, snr=1.0, seed=6)
    rescaled = 37.0 * images + 5.0
    candidates = np.stack([cells, (cells + 1) % 576, (cells + 7) % 576, (cells + 99) % 576], 1)
    kwargs = dict(ctf=params, pixel_size_angstrom=pixel, max_shift_px=3)
    plain = local_search.local_template_matching(images, candidates, spectra, **kwargs)
    scaled = local_search.local_template_matching(
        rescaled, candidates, spectra, score="scaled", **kwargs
    )
    np.testing.assert_array_equal(plain.best_index, cells)
    np.testing.assert_array_equal(scaled.best_index, cells)
    np.testing.assert_allclose(scaled.shift_px, -moved)
    with pytest.raises(ValueError, match="score must be one of"):
        local_search.local_template_matching(images, candidates, spectra, score="ncc", **kwargs)


def test_search_top_cells_keeps_the_most_probable_cells(bank):
    """A distribution whose top cells hold the true one finds it; one whose top cells miss it
    cannot; probabilities on the wrong grid are refused."""
    templates, spectra, _ = bank
    cells = np.array([9, 300, 77])
    images, _ = add_gaussian_noise(templates[cells], 2.0, seed=5)
    p = np.full((3, templates.shape[0]), 1e-6)
    p[np.arange(3), cells] = 0.5
    p[np.arange(3), (cells + 5) % 576] = 0.9  # the network's first choice is wrong
    found = local_search.search_top_cells(p, images.numpy(), spectra, top_k=2, coarse_level=1)
    np.testing.assert_array_equal(found.best_index, cells)
    missed = local_search.search_top_cells(p, images.numpy(), spectra, top_k=1, coarse_level=1)
    np.testing.assert_array_equal(missed.best_index, (cells + 5) % 576)
    with pytest.raises(ValueError, match="level-2 grid"):
        local_search.search_top_cells(p, images.numpy(), spectra, coarse_level=2)


def test_coarse_to_fine_searches_the_children_of_the_best_top_cells(bank, ubi_map_32):
    """Images of level-2 poses; the network's top level-1 cells hold the right parent second.
    Scoring the top cells first keeps the right parent, so a search of its children alone
    finds the pose; keeping every top cell gives the plain search's answer."""
    templates, spectra, _ = bank
    fine_templates = labels_templates.template_bank(ubi_map_32[0], level=2, blur_sigma=1.0)
    fine_spectra = matching.template_spectra(fine_templates)
    children = local_search.child_cells(1, 2)
    parents = np.array([9, 300, 77])
    cells = children[parents, 0]  # one level-2 pose inside each parent
    images, _ = add_gaussian_noise(fine_templates[cells], 2.0, seed=8)
    p = np.full((3, templates.shape[0]), 1e-6)
    p[np.arange(3), parents] = 0.5
    p[np.arange(3), (parents + 5) % 576] = 0.9
    p[np.arange(3), (parents + 11) % 576] = 0.7
    kept = local_search.best_of_top_cells(
        images.numpy(), np.stack([(parents + 5) % 576, parents], 1), spectra, 1
    )
    np.testing.assert_array_equal(kept[:, 0], parents)
    common = dict(top_k=3, coarse_level=1, fine_level=2)
    coarse_to_fine = local_search.search_top_cells(
        p, images.numpy(), fine_spectra, keep=1, coarse_spectra=spectra, **common
    )
    np.testing.assert_array_equal(coarse_to_fine.best_index, cells)
    every = local_search.search_top_cells(
        p, images.numpy(), fine_spectra, keep=3, coarse_spectra=spectra, **common
    )
    plain = local_search.search_top_cells(p, images.numpy(), fine_spectra, **common)
    np.testing.assert_array_equal(every.best_index, plain.best_index)
    with pytest.raises(ValueError, match="coarse level's spectra"):
        local_search.search_top_cells(p, images.numpy(), fine_spectra, keep=1, **common)
    with pytest.raises(ValueError, match="keep must lie in"):
        local_search.best_of_top_cells(images.numpy(), np.zeros((3, 2), int), spectra, 3)
    with pytest.raises(ValueError, match="keep must be"):
        map_search.MapRefinement("map.mrc", keep=0)


def test_a_low_pass_band_scores_the_low_passed_images(bank):
    """``template_spectra(..., max_frequency=f)``: the score is the squared error between the
    image and the template both low-passed by the disk of radius ``f`` cycles/px, for the
    local search and for the CTF landscape alike; the band has fewer coefficients."""
    templates, _, pixel = bank
    n = templates.shape[-1]
    band = matching.template_spectra(templates, max_frequency=0.25)
    assert band.spectra.shape[1] < 0.35 * n * (n // 2 + 1)
    cells = np.array([9, 300, 41])
    images, _ = add_gaussian_noise(templates[cells], 0.5, seed=8)
    images = images.numpy()
    candidates = np.array([[9, 10, 300], [299, 300, 301], [41, 40, 500]])
    result = local_search.local_template_matching(images, candidates, band)
    disk = np.hypot(*np.meshgrid(np.fft.fftfreq(n), np.fft.rfftfreq(n), indexing="ij")) <= 0.25

    def low_pass(x):
        return np.fft.irfft2(np.fft.rfft2(x) * disk, s=(n, n))

    mse = ((low_pass(images)[:, None] - low_pass(templates[candidates])) ** 2).mean(axis=(2, 3))
    np.testing.assert_array_equal(result.best_index, candidates[np.arange(3), mse.argmin(1)])
    np.testing.assert_allclose(result.best_mse, mse.min(1), rtol=1e-4)
    transfer = ctf.ctf_2d(ctf.random_ctf_parameters(3, np.random.default_rng(1)), n, pixel)
    landscape = matching.ctf_mse_landscape(images, transfer, band)
    scores, _ = local_search.candidate_scores(
        images, np.tile(np.arange(len(templates)), (3, 1)), band,
        ctf=ctf.random_ctf_parameters(3, np.random.default_rng(1)), pixel_size_angstrom=pixel,
    )  # fmt: skip
    np.testing.assert_allclose(scores, landscape, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="max_frequency must lie in"):
        matching.template_spectra(templates, max_frequency=0.7)
    with pytest.raises(ValueError, match="already band-limited"):
        band.low_passed(0.2)


def test_the_search_posterior_ranks_the_candidates_and_counts_repeats_once(bank, ctf_particles):
    templates, spectra, pixel = bank
    cells = np.array([5, 100, 377, 50])
    moved = np.array([[2.0, -1.0], [-3.0, 3.0], [0.0, 1.0], [1.0, 1.0]])
    images, params = ctf_particles(templates, pixel, cells, moved, snr=1.0, seed=2)
    g = templates.shape[0]
    candidates = np.stack([cells, (cells + 1) % g, (cells + 200) % g, cells], axis=1)
    result = local_search.search_candidates(
        images, candidates, spectra, ctf=params, pixel_size_angstrom=pixel, max_shift_px=3
    )
    p = result.probability
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_array_equal(p[:, 3], 0.0)  # the truth repeated: counted once
    np.testing.assert_array_equal(p.argmax(axis=1), 0)
    np.testing.assert_array_equal(result.match.best_index, cells)
    index, probability, shift = result.most_probable(2)
    np.testing.assert_array_equal(index[:, 0], cells)
    np.testing.assert_allclose(shift[:, 0], -moved)
    assert np.all(probability[:, 0] >= probability[:, 1])
    # equal scores: uniform over the distinct candidates; a perfect fit: one-hot, no NaN
    flat = local_search.candidate_posterior(np.ones((1, 3)), np.array([[1, 2, 2]]), spectra)
    np.testing.assert_allclose(flat, [[0.5, 0.5, 0.0]])
    sharp = local_search.candidate_posterior(np.array([[0.0, 1e-3]]), np.array([[1, 2]]), spectra)
    np.testing.assert_allclose(sharp, [[1.0, 0.0]])
    # log-odds W (s_c - s_min) / (2 s_min), W = the band's real degrees of freedom (N² here)
    two = local_search.candidate_posterior(np.array([[1.0, 1.001]]), np.array([[1, 2]]), spectra)
    n_pix = templates.shape[-1]
    np.testing.assert_allclose(np.log(two[0, 0] / two[0, 1]), n_pix**2 * 0.001 / 2, rtol=1e-6)


def test_the_search_posterior_approaches_the_bayes_posterior_of_the_true_noise(bank):
    """Without CTF or shifts and with every template a candidate, the posterior with the
    noise estimated from the best residual is close to the exact Bayes posterior with the
    simulation's own noise level (the estimate is off by the noise's sampling error, a few %
    at 32 px, and by the best template's misfit)."""
    from cryosphere.poses.training import targets

    templates, spectra, _ = bank
    cells = np.array([9, 300, 41, 222, 500, 17])
    images, sigma = add_gaussian_noise(templates[cells], 0.3, seed=11)
    everything = np.tile(np.arange(templates.shape[0]), (len(cells), 1))
    ours = local_search.search_candidates(images.numpy(), everything, spectra).probability
    exact = targets.bayes_posterior(images.numpy(), templates, sigma)
    total_variation = 0.5 * np.abs(ours - exact).sum(axis=1)
    assert np.all(total_variation < 0.15), total_variation


def test_the_map_search_band_defaults_to_three_pixels_of_the_network_box(tmp_path):
    def band(**kwargs):
        return map_search.MapRefinement(tmp_path / "map.mrc", **kwargs).max_frequency(1.5)

    assert band() == pytest.approx(1 / map_search.DEFAULT_SEARCH_RESOLUTION_PX)
    assert band(resolution_angstrom=6.0) == pytest.approx(0.25)  # 4 px of 1.5 Å
    assert band(resolution_angstrom=3.0) is None  # Nyquist: every frequency
    assert map_search.band_max_frequency(4.0) == 0.25  # what bench_accuracy reads in px
    assert map_search.band_max_frequency(2.0) is None
    with pytest.raises(ValueError, match="resolution_angstrom must be > 0"):
        band(resolution_angstrom=0.0)
