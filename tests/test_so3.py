"""Tests for cryosphere.geometry.so3: conventions, grids, nearest lookups and point groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from cryosphere import _checks
from cryosphere.geometry import grids, point_groups, rotations

ATOL = 1e-5


def _is_rotation(R: np.ndarray, atol: float = 1e-9) -> bool:
    eye = np.broadcast_to(np.eye(3), R.shape)
    orth = np.allclose(np.swapaxes(R, -1, -2) @ R, eye, atol=atol)
    return bool(orth and np.allclose(np.linalg.det(R), 1.0, atol=atol))


def _ry(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


# ---------------------------------------------------------------------------------- grids
@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_grid_size_rotations_and_uniqueness(level: int) -> None:
    grid = grids.healpix_so3_grid(level)
    assert grid.shape == (72 * 8**level, 3, 3)
    assert grids.healpix_so3_grid_size(level) == 72 * 8**level
    assert grid.dtype == np.float64
    assert _is_rotation(grid)
    # no duplicates (as rotations, q ~ -q): every cell's nearest other cell is > 1 degree away
    q = rotations.matrices_to_quaternions(grid)
    dist, idx = cKDTree(np.concatenate([q, -q])).query(q, k=2)
    assert np.all(idx[:, 0] == np.arange(len(q)))
    nearest_other = grid[idx[:, 1] % len(q)]
    assert rotations.geodesic_distance_deg(grid, nearest_other).min() > 1.0
    assert grids.grid_nearest_neighbour_spacing_deg(level) > 1.0


def test_grid_level4_size_and_bad_levels() -> None:
    assert grids.healpix_so3_grid_size(4) == 294_912
    for bad in (5, -1, 2.0, "2"):
        with pytest.raises(ValueError, match="level"):
            grids.healpix_so3_grid(bad)
    with pytest.raises(ValueError, match="0..4"):
        grids.healpix_so3_grid_size(5)


def test_grid_is_cached_read_only_and_ordered() -> None:
    g = grids.healpix_so3_grid(1)
    assert g is grids.healpix_so3_grid(1)
    with pytest.raises(ValueError):
        g[0, 0, 0] = 2.0
    # pixel-major, in-plane-minor: the first 6*nside cells share the viewing direction
    nside = 2
    ang = grids.healpix_so3_grid_angles(1)
    first = ang[: 6 * nside]
    assert np.allclose(first[:, :2], first[0, :2])
    assert np.allclose(np.diff(first[:, 2]) % 360.0, 360.0 / (6 * nside))
    assert not np.allclose(ang[6 * nside, :2], first[0, :2])


def test_grid_viewing_directions_are_healpix_pixel_centres() -> None:
    import healpy

    level, nside = 2, 4
    grid = grids.healpix_so3_grid(level)
    centres = np.stack(healpy.pix2vec(nside, np.arange(12 * nside**2), nest=True), axis=-1)
    vd = rotations.viewing_directions(grid).reshape(12 * nside**2, 6 * nside, 3)
    assert np.allclose(vd, centres[:, None, :], atol=1e-12)


def test_grid_angles_round_trip() -> None:
    for level in (0, 2):
        ang = grids.healpix_so3_grid_angles(level)
        grid = grids.healpix_so3_grid(level)
        assert np.allclose(rotations.matrices_from_relion_euler(ang), grid, atol=1e-12)
        back = rotations.relion_euler_from_matrices(grid)
        assert np.allclose(rotations.matrices_from_relion_euler(back), grid, atol=ATOL)
        # no grid cell is at gimbal lock, so the angles themselves are recovered
        assert np.allclose(back, ang, atol=ATOL)


def test_grid_spacing_and_covering_radius() -> None:
    """Level 2: median nearest-neighbour spacing is ~14.9 deg (asserted in 10-20 deg).

    Covering: the largest distance from 2,000 random rotations (seed 0) to the nearest cell was
    measured at 11.5 deg for level 2 (11.4-12.2 over seeds 0-2) and 6.2 deg for level 3
    (5.7-6.2); we assert < 13.5 deg and < 7.0 deg, and that level 3 is strictly finer.
    """
    spacing2 = grids.grid_nearest_neighbour_spacing_deg(2)
    assert 10.0 < spacing2 < 20.0
    assert grids.grid_nearest_neighbour_spacing_deg(3) < spacing2
    R = rotations.random_rotations(2000, seed=0)
    maxima = []
    for level in (2, 3):
        grid = grids.healpix_so3_grid(level)
        idx = grids.nearest_grid_indices(R, grid)
        maxima.append(rotations.geodesic_distance_deg(R, grid[idx]).max())
    assert maxima[0] < 13.5
    assert maxima[1] < 7.0
    assert maxima[1] < maxima[0]


@pytest.mark.parametrize("method", ["kdtree", "matmul"])
def test_nearest_grid_indices_matches_brute_force(method: str) -> None:
    grid = grids.healpix_so3_grid(1)
    R = rotations.random_rotations(300, seed=3)
    idx = grids.nearest_grid_indices(R, grid, chunk_size=37, method=method)
    assert idx.shape == (300,) and idx.dtype == np.int64
    d_all = rotations.geodesic_distance_deg(R[:, None], grid[None])  # (300, G)
    brute = d_all.argmin(axis=1)
    d_pick = d_all[np.arange(300), idx]
    assert np.allclose(d_pick, d_all.min(axis=1), atol=1e-9)
    assert np.mean(idx == brute) > 0.99
    # grid cells map to themselves; a single query gives a scalar index
    assert np.array_equal(grids.nearest_grid_indices(grid, grid, method=method), np.arange(576))
    assert int(grids.nearest_grid_indices(grid[17], grid, method=method)) == 17


def test_nearest_grid_indices_writable_grid_and_bad_method() -> None:
    grid = np.array(grids.healpix_so3_grid(0))  # writable copy: not cached
    R = rotations.random_rotations(50, seed=1)
    a = grids.nearest_grid_indices(R, grid)
    b = grids.nearest_grid_indices(R, grid, method="matmul")
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="method"):
        grids.nearest_grid_indices(R, grid, method="bogus")


# ---------------------------------------------------------------------------- conventions
def test_relion_matrix_matches_relion_formula() -> None:
    rng = np.random.default_rng(0)
    ang = rng.uniform([-180, 0, -180], [180, 180, 180], size=(50, 3))
    A = rotations.matrices_from_relion_euler(ang)
    r, t, p = np.deg2rad(ang).T
    cr, sr, ct, st, cp, sp = np.cos(r), np.sin(r), np.cos(t), np.sin(t), np.cos(p), np.sin(p)
    assert np.allclose(A[:, 0, 0], cp * ct * cr - sp * sr)
    assert np.allclose(A[:, 0, 1], cp * ct * sr + sp * cr)
    assert np.allclose(A[:, 0, 2], -cp * st)
    assert np.allclose(A[:, 1, 2], sp * st)
    assert np.allclose(A[:, 2], np.stack([cr * st, sr * st, ct], axis=-1))
    assert _is_rotation(A)
    # composition of active elementary rotations: Rz(-psi) Ry(-tilt) Rz(-rot)
    for k in range(5):
        rot, tilt, psi = ang[k]
        B = rotations.rotation_about_z(-psi) @ _ry(-tilt) @ rotations.rotation_about_z(-rot)
        assert np.allclose(A[k], B)


def test_relion_round_trip_including_gimbal_lock() -> None:
    R = rotations.random_rotations(500, seed=5)
    ang = rotations.relion_euler_from_matrices(R)
    assert ang.shape == (500, 3)
    assert np.all((ang[:, 0] > -180) & (ang[:, 0] <= 180))
    assert np.all((ang[:, 2] > -180) & (ang[:, 2] <= 180))
    assert np.all((ang[:, 1] >= 0) & (ang[:, 1] <= 180))
    assert np.allclose(rotations.matrices_from_relion_euler(ang), R, atol=ATOL)

    special = np.array(
        [
            [30.0, 0.0, 40.0],
            [-170.0, 0.0, 120.0],
            [30.0, 180.0, 40.0],
            [100.0, 180.0, -60.0],
            [0.0, 0.0, 0.0],
            [180.0, 180.0, 180.0],
            [10.0, 1e-12, 20.0],
            [10.0, 180.0 - 1e-12, 20.0],
            [10.0, 1e-4, 20.0],
        ]
    )
    M = rotations.matrices_from_relion_euler(special)
    back = rotations.relion_euler_from_matrices(M)
    assert np.allclose(rotations.matrices_from_relion_euler(back), M, atol=ATOL)
    assert np.allclose(back[:6, 1], [0, 0, 180, 180, 0, 180])
    assert np.all(back[:6, 2] == 0.0)  # documented choice: psi = 0 at gimbal lock
    # tilt = 0: only rot + psi matters; tilt = 180: only rot - psi matters
    assert np.isclose(back[0, 0], 70.0)
    assert np.isclose(back[2, 0], -10.0)
    # away from gimbal lock the angles themselves come back
    assert np.allclose(back[8], special[8], atol=ATOL)


def test_viewing_direction_from_relion_angles() -> None:
    rng = np.random.default_rng(1)
    rot = rng.uniform(-180, 180, 20)
    tilt = rng.uniform(0, 180, 20)
    expected = np.stack(
        [
            np.cos(np.deg2rad(rot)) * np.sin(np.deg2rad(tilt)),
            np.sin(np.deg2rad(rot)) * np.sin(np.deg2rad(tilt)),
            np.cos(np.deg2rad(tilt)),
        ],
        axis=-1,
    )
    for psi in (-150.0, 0.0, 77.0):
        ang = np.stack([rot, tilt, np.full(20, psi)], axis=-1)
        R = rotations.matrices_from_relion_euler(ang)
        vd = rotations.viewing_directions(R)
        assert np.allclose(vd, expected)
        # R maps the viewing direction to +z_mic
        assert np.allclose(np.einsum("nij,nj->ni", R, vd), [0, 0, 1])


def test_e3nn_round_trip_and_convention() -> None:
    from e3nn import o3

    R = rotations.random_rotations(200, seed=7)
    a, b, c = rotations.e3nn_angles_from_matrices(R)
    assert a.shape == b.shape == c.shape == (200,)
    assert np.allclose(rotations.matrices_from_e3nn_angles(a, b, c), R, atol=ATOL)
    # Ry(alpha) Rx(beta) Ry(gamma)
    alpha, beta, gamma = 0.3, 1.1, -2.0
    M = rotations.matrices_from_e3nn_angles(alpha, beta, gamma)
    expected = (
        rotations.rotation_about_axis([0, 1, 0], np.rad2deg(alpha))
        @ rotations.rotation_about_axis([1, 0, 0], np.rad2deg(beta))
        @ rotations.rotation_about_axis([0, 1, 0], np.rad2deg(gamma))
    )
    assert M.dtype == np.float64 and M.shape == (3, 3)
    assert np.allclose(M, expected)
    assert np.allclose(M, o3.angles_to_matrix(*map(torch.tensor, (alpha, beta, gamma))))
    # gimbal-lock (beta = 0) round trip
    G = rotations.matrices_from_e3nn_angles(0.4, 0.0, 0.5)
    assert np.allclose(
        rotations.matrices_from_e3nn_angles(*rotations.e3nn_angles_from_matrices(G)), G, atol=ATOL
    )


def test_quaternion_round_trip() -> None:
    R = rotations.random_rotations(1000, seed=2)
    special = np.stack(
        [np.eye(3)]
        + [
            rotations.rotation_about_axis(ax, 180.0)
            for ax in ([1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0])
        ]
    )
    R = np.concatenate([R, special])
    q = rotations.matrices_to_quaternions(R)
    assert q.shape == (R.shape[0], 4)
    assert np.allclose(np.linalg.norm(q, axis=-1), 1.0)
    assert np.all(q[:, 0] >= 0)
    assert np.allclose(rotations.quaternions_to_matrices(q), R, atol=ATOL)
    assert np.allclose(rotations.quaternions_to_matrices(-q), R, atol=ATOL)
    # rotation by angle t about axis n is (cos t/2, sin t/2 n)
    q1 = rotations.matrices_to_quaternions(rotations.rotation_about_axis([0, 0, 1], 60.0))
    assert np.allclose(q1, [np.cos(np.pi / 6), 0, 0, np.sin(np.pi / 6)])


def test_rotation_about_axis_right_handed() -> None:
    Rz = rotations.rotation_about_z(90.0)
    assert np.allclose(Rz @ [1, 0, 0], [0, 1, 0])
    assert np.allclose(rotations.rotation_about_axis([0, 0, 2], 90.0), Rz)
    assert np.allclose(rotations.rotation_about_axis([1, 0, 0], 90.0) @ [0, 1, 0], [0, 0, 1])
    stack = rotations.rotation_about_axis([1, 2, 3], np.array([[10.0, 20.0], [30.0, 40.0]]))
    assert stack.shape == (2, 2, 3, 3) and _is_rotation(stack)
    with pytest.raises(ValueError):
        rotations.rotation_about_axis([0, 0, 0], 10.0)


def test_random_rotations_deterministic_and_uniform() -> None:
    a = rotations.random_rotations(20_000, seed=11)
    assert np.array_equal(a, rotations.random_rotations(20_000, seed=11))
    assert not np.allclose(a[:10], rotations.random_rotations(10, seed=12))
    g1, g2 = np.random.default_rng(4), np.random.default_rng(4)
    assert np.array_equal(
        rotations.random_rotations(5, seed=g1), rotations.random_rotations(5, seed=g2)
    )
    assert a.shape == (20_000, 3, 3) and _is_rotation(a)
    # Haar: E[tr R] = 0, E[R] = 0, E[tr R^2]... use E[R_ij^2] = 1/3; std of the mean ~ 0.006
    assert abs(np.trace(a, axis1=1, axis2=2).mean()) < 0.05
    assert np.abs(a.mean(axis=0)).max() < 0.03
    assert np.allclose((a**2).mean(axis=0), 1 / 3, atol=0.02)
    # rotation angle density is (1 - cos t) / pi: P(angle < 90 deg) = 1/2 - 1/pi ~ 0.182
    ang = rotations.geodesic_distance_deg(np.eye(3), a)
    assert abs(np.mean(ang < 90.0) - (0.5 - 1 / np.pi)) < 0.015


def test_geodesic_distance() -> None:
    R = rotations.random_rotations(100, seed=8)
    d = rotations.geodesic_distance_deg(R, R @ rotations.rotation_about_z(30.0))
    assert d.shape == (100,)
    assert np.allclose(d, 30.0)
    assert np.allclose(rotations.geodesic_distance_deg(R, R), 0.0, atol=1e-6)
    assert np.allclose(
        rotations.geodesic_distance_deg(np.eye(3), rotations.rotation_about_z(180.0)), 180.0
    )
    tiny = rotations.geodesic_distance_deg(np.eye(3), rotations.rotation_about_z(1e-6))
    assert np.isclose(tiny, 1e-6, rtol=1e-6)
    # broadcasting (n, 1) x (1, m) -> (n, m), symmetric
    D = rotations.geodesic_distance_deg(R[:5, None], R[None, :7])
    assert D.shape == (5, 7)
    assert np.allclose(D[:, :5], D[:, :5].T)
    assert np.all(np.isfinite(D))


# --------------------------------------------------------------------------------- symmetry
@pytest.mark.parametrize(
    ("name", "order"),
    [
        ("C1", 1),
        ("C2", 2),
        ("c5", 5),
        ("D2", 4),
        ("D3", 6),
        ("T", 12),
        ("O", 24),
        ("i", 60),
        ("C12", 12),
        ("d12", 24),
    ],
)
def test_point_group_order_and_closure(name: str, order: int) -> None:
    ops = point_groups.point_group(name)
    assert ops.shape == (order, 3, 3)
    assert np.allclose(ops[0], np.eye(3))
    assert _is_rotation(ops)
    q = rotations.matrices_to_quaternions(ops)
    # distinct elements
    D = rotations.geodesic_distance_deg(ops[:, None], ops[None])
    assert np.all(D[~np.eye(order, dtype=bool)] > 1.0)
    # closed under composition
    prods = (ops[:, None] @ ops[None]).reshape(-1, 3, 3)
    dmin = rotations.geodesic_distance_deg(prods[:, None], ops[None]).min(axis=1)
    assert dmin.max() < 1e-6
    assert q.shape == (order, 4)


def test_point_group_standard_axes() -> None:
    def fixes(ops: np.ndarray, axis: list[float], n: int) -> bool:
        a = np.asarray(axis, float) / np.linalg.norm(axis)
        return any(
            np.allclose(g, rotations.rotation_about_axis(a, 360.0 / n), atol=1e-9) for g in ops
        )

    assert fixes(point_groups.point_group("C7"), [0, 0, 1], 7)
    d4 = point_groups.point_group("D4")
    assert fixes(d4, [0, 0, 1], 4) and fixes(d4, [1, 0, 0], 2) and fixes(d4, [1, 1, 0], 2)
    t = point_groups.point_group("T")
    assert all(fixes(t, ax, 2) for ax in ([1, 0, 0], [0, 1, 0], [0, 0, 1]))
    assert fixes(t, [1, 1, 1], 3)
    o = point_groups.point_group("O")
    assert all(fixes(o, ax, 4) for ax in ([1, 0, 0], [0, 1, 0], [0, 0, 1]))
    i = point_groups.point_group("I")
    golden = (1 + 5**0.5) / 2
    assert all(fixes(i, ax, 2) for ax in ([1, 0, 0], [0, 1, 0], [0, 0, 1]))
    assert fixes(i, [0, 1, golden], 5) and fixes(i, [1, 1, 1], 3)


def test_point_group_frame_conjugation() -> None:
    a = np.array([1.0, 2.0, -0.5])
    a /= np.linalg.norm(a)
    # frame whose z column is a (right-handed orthonormal completion)
    x = np.cross(a, [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x)
    frame = np.stack([x, np.cross(a, x), a], axis=1)
    assert np.isclose(np.linalg.det(frame), 1.0)
    for name in ("C4", "D3"):
        ops = point_groups.point_group(name, frame=frame)
        assert np.allclose(ops, frame @ point_groups.point_group(name) @ frame.T)
        n = int(name[1:])
        cyclic = ops[:n]
        assert np.allclose(cyclic @ a, a)  # the principal axis a is fixed
        if name.startswith("D"):
            assert np.allclose(ops[n:] @ a, -a)  # the 2-folds of Dn flip it
            assert np.allclose(ops[n] @ x, x)  # one 2-fold along the frame's x
        else:
            assert ops.shape[0] == n
    t = point_groups.point_group("T", frame=frame)
    assert any(np.allclose(g, rotations.rotation_about_axis(a, 180.0)) for g in t)
    with pytest.raises(ValueError):
        point_groups.point_group("C2", frame=np.diag([1.0, 1.0, -1.0]))


@pytest.mark.parametrize("bad", ["X", "D1", "C0", "Cx", "", "I2 ", "D-3", 3])
def test_point_group_bad_names(bad: object) -> None:
    with pytest.raises(ValueError, match="valid names|must be a string"):
        point_groups.point_group(bad)  # type: ignore[arg-type]


def test_symmetry_mates_and_symmetric_distance() -> None:
    R = rotations.random_rotations(10, seed=9)
    c2 = point_groups.point_group("C2")
    mates = point_groups.symmetry_mates(R, c2)
    assert mates.shape == (10, 2, 3, 3)
    assert np.allclose(mates[:, 0], R)
    assert np.allclose(mates[:, 1], R @ rotations.rotation_about_z(180.0))
    assert np.allclose(
        point_groups.symmetric_geodesic_distance_deg(R, mates[:, 1], c2), 0.0, atol=1e-6
    )
    assert np.allclose(rotations.geodesic_distance_deg(R, mates[:, 1]), 180.0)
    # the symmetric distance is at most the plain one and, for O, at most ~62.8 deg
    B = rotations.random_rotations(10, seed=10)
    o = point_groups.point_group("O")
    ds = point_groups.symmetric_geodesic_distance_deg(R, B, o)
    assert ds.shape == (10,)
    assert np.all(ds <= rotations.geodesic_distance_deg(R, B) + 1e-9)
    assert np.all(ds < 63.0)
    # invariance: replacing B by any mate B @ g leaves it unchanged
    assert np.allclose(point_groups.symmetric_geodesic_distance_deg(R, B @ o[7], o), ds)


def test_non_rotation_inputs_rejected() -> None:
    bad = np.diag([1.0, 1.0, -1.0])
    with pytest.raises(ValueError, match="rotation"):
        rotations.relion_euler_from_matrices(bad)
    with pytest.raises(ValueError, match="rotation"):
        rotations.e3nn_angles_from_matrices(2 * np.eye(3))
    with pytest.raises(ValueError, match="shape"):
        rotations.geodesic_distance_deg(np.eye(2), np.eye(3))
    with pytest.raises(ValueError, match="shape"):
        rotations.quaternions_to_matrices(np.ones(3))
    with pytest.raises(ValueError, match="shape"):
        rotations.matrices_from_relion_euler(np.zeros(2))


def test_as_symmetry_ops_defaults_to_the_identity_and_names_a_bad_shape():
    np.testing.assert_array_equal(_checks.as_symmetry_ops(None), np.eye(3)[None])
    c2 = point_groups.point_group("C2")
    assert _checks.as_symmetry_ops(c2).shape == (2, 3, 3)
    with pytest.raises(ValueError, match=r"\(K, 3, 3\)"):
        _checks.as_symmetry_ops(np.eye(3))
