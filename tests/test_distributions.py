"""Distributions on the HEALPix SO(3) grid."""

from __future__ import annotations

import math

import healpy
import numpy as np
import pytest

from cryosphere.geometry import distributions, grids, point_groups
from cryosphere.geometry import rotations as geometry_rotations


def test_normalize_rows():
    probs = np.array([[1.0, 3.0], [0.0, 2.0]])
    np.testing.assert_allclose(distributions.normalize_rows(probs), [[0.25, 0.75], [0, 1]])
    with pytest.raises(ValueError, match="sums to 0"):
        distributions.normalize_rows(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="negative"):
        distributions.normalize_rows(np.array([[1.0, -1.0]]))
    with pytest.raises(ValueError, match="NaN"):
        distributions.normalize_rows(np.array([[1.0, np.nan]]))


@pytest.mark.parametrize("level", [0, 1, 2])
def test_pixel_directions_match_grid(level):
    dirs = distributions.healpix_pixel_directions(level)
    assert dirs.shape == (12 * 4**level, 3)
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0)
    nside = 2**level
    np.testing.assert_allclose(dirs[5], healpy.pix2vec(nside, 5, nest=True))
    grid_dirs = geometry_rotations.viewing_directions(grids.healpix_so3_grid(level))
    n_psi = 6 * nside
    np.testing.assert_allclose(grid_dirs[::n_psi], dirs, atol=1e-12)
    np.testing.assert_allclose(grid_dirs[n_psi - 1 :: n_psi], dirs, atol=1e-12)


def test_viewing_direction_marginal():
    level = 1
    G, P = grids.healpix_so3_grid_size(level), 48
    rng = np.random.default_rng(0)
    probs = rng.random((3, G))
    marginal = distributions.viewing_direction_marginal(probs, level)
    assert marginal.shape == (3, P)
    np.testing.assert_allclose(marginal.sum(axis=1), 1.0)
    # cell g belongs to pixel g // 12 (12 in-plane angles at level 1)
    delta = np.zeros(G)
    delta[12 * 7 + 5] = 1.0
    assert np.flatnonzero(distributions.viewing_direction_marginal(delta, level)) == [7]
    density = distributions.viewing_direction_marginal(probs, level, density=True)
    np.testing.assert_allclose((density * 4 * math.pi / P).sum(axis=1), 1.0)
    raw = distributions.viewing_direction_marginal(2 * probs, level, normalize=False)
    np.testing.assert_allclose(raw.sum(axis=1), 2 * probs.sum(axis=1))
    with pytest.raises(ValueError, match="level-1 grid"):
        distributions.viewing_direction_marginal(probs[:, :-1], level)


def test_mass_within_deg_and_symmetry():
    level = 2
    grid = grids.healpix_so3_grid(level)
    truth = grid[[100, 2000]]
    probs = np.zeros((2, len(grid)))
    probs[0, 100] = 1.0
    probs[1, 3000] = 1.0
    far = geometry_rotations.geodesic_distance_deg(grid[3000], grid[2000])
    assert far > 30
    share = distributions.mass_within_deg(probs, grid, truth, radius_deg=15)
    np.testing.assert_allclose(share, [1.0, 0.0])
    # with a group whose op maps grid[2000] onto grid[3000], the far cell becomes a mate
    op = grid[2000].T @ grid[3000]
    ops = np.stack([np.eye(3), op])
    share = distributions.mass_within_deg(probs, grid, truth, ops, radius_deg=1)
    np.testing.assert_allclose(share, [1.0, 1.0])
    # uniform mass: share equals the fraction of cells within the ball
    within = distributions.cells_within_deg(grid, truth, radius_deg=20)
    distance = geometry_rotations.geodesic_distance_deg(grid[None], truth[:, None])
    # quaternion and matrix formulas agree to ~1e-12 deg; a cell that close to the radius
    # may fall on either side, every other cell must agree
    clear = np.abs(distance - 20) > 1e-9
    assert np.array_equal(within[clear], (distance <= 20)[clear]) and clear.mean() > 0.99
    uniform = distributions.mass_within_deg(np.ones((2, len(grid))), grid, truth, radius_deg=20)
    np.testing.assert_allclose(uniform, within.mean(axis=1))


def test_nearest_cell_recall():
    grid = grids.healpix_so3_grid(1)
    rotations = geometry_rotations.random_rotations(10, seed=1)
    nearest = grids.nearest_grid_indices(rotations, grid)
    mask = np.zeros((10, len(grid)), dtype=bool)
    mask[np.arange(10), nearest] = True
    mask[:3] = False
    assert distributions.nearest_cell_recall(mask, grid, rotations) == pytest.approx([0.7])
    ops = point_groups.point_group("C2")
    recall = distributions.nearest_cell_recall(mask, grid, rotations, ops)
    assert recall.shape == (2,) and recall[0] == pytest.approx(0.7)
