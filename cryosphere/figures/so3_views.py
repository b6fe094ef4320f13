"""SO(3) distributions prepared for the sphere figures: viewing directions, in-plane angles, colours.

A distribution over SO(3) is held on the level-``L`` HEALPix grid (:mod:`cryosphere.geometry.distributions`:
``probs`` ``(G,)``, ``G = 72 * 8**L``, cell ``g = p * 6 * 2**L + j`` with ``p`` the NESTED
HEALPix pixel of the viewing direction and ``j`` the in-plane index). Two views show it:

* **Viewing-direction sphere** (:func:`~cryosphere.figures.so3_plotly.plot_viewing_sphere`): the marginal over the in-plane angle,
  ``m_p = sum_j probs[p * 6 * 2**L + j]`` (sums to 1), drawn as a density per steradian
  ``m_p / (4π / P)`` (HEALPix pixels have equal area ``4π / P``, ``P = 12 * 4**L``) on a
  latitude-longitude surface whose every vertex takes the value of the HEALPix pixel it falls in
  (``healpy.ang2pix(nest=True)``).
* **Image2Sphere-style scatter** (:func:`~cryosphere.figures.so3_plotly.plot_pose_scatter`): one marker per grid rotation with
  non-negligible probability, placed at its viewing direction; marker area grows with the
  probability and the colour is the in-plane angle on a cyclic colour scale.

**In-plane angle** ``ψ`` (degrees, in [0, 360)): the third RELION Euler angle ``psi`` of the pose,
``R = Rz(-psi) @ Ry(-tilt) @ Rz(-rot)`` (:func:`cryosphere.geometry.rotations.relion_euler_from_matrices`),
wrapped to [0, 360). For grid cell ``p * 6 * 2**L + j`` it is exactly ``360 j / (6 * 2**L)``
(:func:`grid_in_plane_angles_deg`). Rotating the image in-plane by ``θ`` (pose ``Rz(θ) @ R``)
lowers ``ψ`` by ``θ``. At the poles (viewing direction ±z, gimbal lock) ``ψ = 0`` and the whole
in-plane angle sits in ``rot``; no HEALPix pixel centre lies there.

**Viewing direction** of a pose ``R``: ``R[2, :]`` (the volume-frame direction mapped to the
microscope's +z, :func:`cryosphere.geometry.rotations.viewing_directions`); longitude ``atan2(y, x)``, latitude
``asin(z)`` (:func:`lon_lat_deg`, in every figure). The true pose is marked by a ring at its viewing
direction, its symmetry mates ``R @ g`` (``g`` in the point group, volume frame) by diamonds on
the 3D spheres and squares on the Mollweide maps.

:func:`sphere_view` computes everything a view draws (a :class:`SphereView` of arrays); the
plotly views (:mod:`cryosphere.figures.so3_plotly`) and the Mollweide maps
(:mod:`cryosphere.figures.mollweide`) only lay those arrays out. :func:`lon_lat_deg` is the one
longitude/latitude helper of the figures.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from cryosphere._checks import as_symmetry_ops
from cryosphere.geometry import distributions, grids
from cryosphere.geometry import rotations as geometry_rotations

__all__ = [
    "IN_PLANE_COLORSCALE",
    "SphereView",
    "DistributionSet",
    "in_plane_angles_deg",
    "grid_in_plane_angles_deg",
    "cyclic_colorscale",
    "in_plane_colors",
    "in_plane_colormap",
    "lon_lat_deg",
    "pose_markers",
    "lat_lon_pixel_mesh",
    "check_distribution",
    "sphere_view",
]

IN_PLANE_COLORSCALE = "HSV"
"""Plotly cyclic colour scale for the in-plane angle (red at 0° and 360°); the matplotlib
figures use the same colours (:func:`in_plane_colormap`)."""


def in_plane_angles_deg(R: np.ndarray) -> np.ndarray:
    """In-plane angle ``ψ`` of poses ``(..., 3, 3)``: RELION ``psi`` wrapped to [0, 360) degrees.

    Poses are validated (ValueError for non-rotations). See the module docstring for the
    definition and the gimbal-lock convention.
    """
    psi = geometry_rotations.relion_euler_from_matrices(R)[..., 2]
    return np.mod(psi, 360.0)


@functools.cache
def _grid_in_plane(level: int) -> np.ndarray:
    n_psi = 6 * 2**level
    angles = np.tile(360.0 * np.arange(n_psi) / n_psi, 12 * 4**level)
    angles.flags.writeable = False
    return angles


def grid_in_plane_angles_deg(level: int) -> np.ndarray:
    """In-plane angle ``ψ`` (degrees) of every cell of the level-``level`` grid, ``(G,)``.

    Cell ``p * 6 * 2**level + j`` has ``ψ = 360 j / (6 * 2**level)``, equal to
    :func:`in_plane_angles_deg` of the cell's rotation. Read-only cached array.
    """
    grids.healpix_so3_grid_size(level)  # validates the level
    return _grid_in_plane(int(level))


def cyclic_colorscale(colorscale: str) -> list[list[Any]]:
    """The named plotly colour scale as ``[[stop, colour], ...]``; ValueError unless its two
    ends have the same colour (an angle scale must be cyclic)."""
    import plotly.colors

    scale = plotly.colors.get_colorscale(colorscale)
    first = plotly.colors.unlabel_rgb(plotly.colors.convert_colors_to_same_type(scale[0][1])[0][0])
    last = plotly.colors.unlabel_rgb(plotly.colors.convert_colors_to_same_type(scale[-1][1])[0][0])
    if not np.allclose(first, last, atol=1.0):
        raise ValueError(
            f"colour scale {colorscale!r} is not cyclic (it starts at {scale[0][1]} and ends at "
            f"{scale[-1][1]}); use a cyclic one for angles, e.g. 'HSV', 'Twilight' or 'Phase'"
        )
    return scale


def in_plane_colors(
    angles_deg: np.ndarray | float, colorscale: str = IN_PLANE_COLORSCALE
) -> list[str]:
    """Colours ``'rgb(r, g, b)'`` of in-plane angles on a cyclic plotly colour scale.

    Args:
        angles_deg: ``(...)`` angles in degrees, any real value (wrapped modulo 360, so ``0`` and
            ``360`` get the same colour).
        colorscale: a named cyclic plotly colour scale (ValueError when its ends differ).

    Returns:
        One colour string per angle, flattened in C order. This is the colour the plotly views
        give a marker with this angle (colour scale with ``cmin=0``, ``cmax=360``).
    """
    import plotly.colors

    angles = np.asarray(angles_deg, dtype=np.float64).ravel()
    if not np.all(np.isfinite(angles)):
        raise ValueError("in-plane angles hold NaN or infinite values")
    scale = cyclic_colorscale(colorscale)
    return plotly.colors.sample_colorscale(scale, list(np.mod(angles, 360.0) / 360.0))


def in_plane_colormap(colorscale: str = IN_PLANE_COLORSCALE) -> Any:
    """The cyclic plotly ``colorscale`` as a matplotlib colormap over [0, 1] (angle / 360°), so
    the static figures colour in-plane angles exactly as the interactive ones.

    (Matplotlib's own ``'hsv'`` ends at a slightly different red than it starts.)
    """
    import plotly.colors
    from matplotlib.colors import LinearSegmentedColormap

    scale = cyclic_colorscale(colorscale)
    stops = [
        (float(stop), tuple(c / 255.0 for c in plotly.colors.unlabel_rgb(rgb)))
        for stop, rgb in zip(
            (s[0] for s in scale),
            plotly.colors.convert_colors_to_same_type([s[1] for s in scale])[0],
            strict=True,
        )
    ]
    return LinearSegmentedColormap.from_list(f"cyclic_{colorscale}", stops, N=512)


def lon_lat_deg(directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Longitude ``atan2(y, x)`` in (-180, 180] and latitude ``asin(z)`` in [-90, 90], degrees,
    of directions ``(..., 3)`` (normalised first)."""
    d = np.asarray(directions, dtype=np.float64)
    d = d / np.linalg.norm(d, axis=-1, keepdims=True)
    lon = np.degrees(np.arctan2(d[..., 1], d[..., 0]))
    return lon, np.degrees(np.arcsin(np.clip(d[..., 2], -1.0, 1.0)))


def pose_markers(
    true_rotation: np.ndarray, symmetry_ops: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Where the views mark a true pose and its symmetry mates.

    Args:
        true_rotation: ``(3, 3)`` pose ``R`` (validated).
        symmetry_ops: ``(K, 3, 3)`` point-group ops in volume coordinates (None: none).

    Returns:
        ``(directions (M, 3), in_plane_deg (M,))``: row 0 is ``R`` itself (viewing direction
        ``R[2, :]``), rows 1.. the distinct mates ``R @ g`` (``g`` not the identity), in the
        order of ``symmetry_ops``. E.g. the identity pose sits at +z; for a C2 axis ``a`` the
        mate of ``R`` sits at ``(2 a aᵀ - I) @ R[2, :]``.
    """
    R = np.asarray(true_rotation, dtype=np.float64)
    if R.shape != (3, 3):
        raise ValueError(f"true_rotation must have shape (3, 3), got {R.shape}")
    in_plane_angles_deg(R)  # validates
    ops = as_symmetry_ops(symmetry_ops)
    mates = [R] + [R @ g for g in ops if not np.allclose(g, np.eye(3), atol=1e-6)]
    stack = np.stack(mates)
    return geometry_rotations.viewing_directions(stack), in_plane_angles_deg(stack)


@functools.cache
def _pixel_mesh(level: int, n_lat: int, n_lon: int) -> tuple[np.ndarray, np.ndarray]:
    import healpy

    lat = np.linspace(-90.0, 90.0, n_lat)
    lon = np.linspace(-180.0, 180.0, n_lon)
    lon_grid, lat_grid = np.meshgrid(lon, lat)  # (n_lat, n_lon)
    theta = np.radians(90.0 - lat_grid)
    phi = np.radians(lon_grid)
    directions = np.stack(
        [np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], axis=-1
    )
    pixels = healpy.ang2pix(2**level, theta, np.mod(phi, 2 * np.pi), nest=True).astype(np.int64)
    directions.flags.writeable = False
    pixels.flags.writeable = False
    return directions, pixels


def lat_lon_pixel_mesh(
    level: int, resolution_deg: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A latitude-longitude mesh on the unit sphere and the HEALPix pixel of each vertex.

    Args:
        level: grid level (``nside = 2**level``).
        resolution_deg: mesh spacing in degrees; default ``min(3, 58.6 / nside / 4)`` (about a
            quarter of a pixel's width).

    Returns:
        ``(directions (n_lat, n_lon, 3), pixels (n_lat, n_lon))``: unit vectors (x, y, z) at
        latitudes -90..90 and longitudes -180..180 (both ends included), and the NESTED pixel
        index (``healpy.ang2pix(nside, theta, phi, nest=True)``) of each. Read-only, cached.
    """
    grids.healpix_so3_grid_size(level)
    if resolution_deg is None:
        resolution_deg = min(3.0, math.degrees(math.sqrt(4 * math.pi / 12)) / 2**level / 4)
    if not (resolution_deg > 0 and math.isfinite(resolution_deg)):
        raise ValueError(f"resolution_deg must be a positive number, got {resolution_deg}")
    n_lat = int(math.ceil(180.0 / resolution_deg)) + 1
    n_lon = int(math.ceil(360.0 / resolution_deg)) + 1
    return _pixel_mesh(int(level), n_lat, n_lon)


def check_distribution(probs: np.ndarray, level: int) -> np.ndarray:
    """Validate one image's grid distribution and normalise it.

    Args:
        probs: ``(G,)`` non-negative weights, ``G = 72 * 8**level``.
        level: grid level 0..4.

    Returns:
        ``(G,)`` float64 summing to 1.

    Raises:
        ValueError: not 1-D, wrong ``G`` for the level, NaN/infinite or negative weights, or all
            zero (each message says which).
    """
    n_cells = grids.healpix_so3_grid_size(level)
    array = np.asarray(probs)
    if array.ndim != 1:
        raise ValueError(
            f"probs must be one image's distribution of shape (G,), got shape {array.shape}; "
            "pick a row, e.g. labels.soft[i]"
        )
    if array.shape[0] != n_cells:
        raise ValueError(
            f"probs has {array.shape[0]} cells but the level-{level} grid has {n_cells} "
            f"(72 * 8**level); pass the level the distribution was computed on"
        )
    return distributions.normalize_rows(array)


@dataclass(frozen=True)
class SphereView:
    """One image's distribution prepared for the sphere views (see :func:`sphere_view`).

    Attributes:
        level: grid level.
        marginal: ``(P,)`` viewing-direction masses per NESTED HEALPix pixel (sum 1).
        density_per_sr: ``(P,)`` ``marginal / (4π / P)``; integrates to 1 over the sphere.
        cells: ``(M,)`` grid cells shown in the scatter, most probable first.
        directions: ``(M, 3)`` their viewing directions.
        in_plane_deg: ``(M,)`` their in-plane angles ``ψ`` in [0, 360).
        probability: ``(M,)`` their probabilities (of the normalised distribution).
        marker_directions: ``(K, 3)`` true pose (row 0) and mates; ``(0, 3)`` without a pose.
        marker_in_plane_deg: ``(K,)`` their in-plane angles.
    """

    level: int
    marginal: np.ndarray
    density_per_sr: np.ndarray
    cells: np.ndarray
    directions: np.ndarray
    in_plane_deg: np.ndarray
    probability: np.ndarray
    marker_directions: np.ndarray
    marker_in_plane_deg: np.ndarray


def sphere_view(
    probs: np.ndarray,
    level: int,
    true_rotation: np.ndarray | None = None,
    symmetry_ops: np.ndarray | None = None,
    min_relative_probability: float = 0.01,
    max_points: int = 5000,
) -> SphereView:
    """Everything the sphere views draw for one image's distribution.

    Args:
        probs: ``(G,)`` non-negative weights on the level-``level`` grid (normalised here;
            ValueError for NaN, negative, all-zero or wrong-length input).
        level: grid level.
        true_rotation: ``(3, 3)`` true pose to mark, or None.
        symmetry_ops: ``(K, 3, 3)`` point-group ops for the mates (None: none).
        min_relative_probability: scatter keeps the cells with probability at least this
            fraction of the largest one ...
        max_points: ... and at most this many of them (the most probable).
    """
    weights = check_distribution(probs, level)
    if not 0.0 <= min_relative_probability <= 1.0:
        raise ValueError(
            f"min_relative_probability must be in [0, 1], got {min_relative_probability}"
        )
    if int(max_points) < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    marginal = distributions.viewing_direction_marginal(weights, level)
    n_pix = marginal.shape[0]
    order = np.argsort(-weights, kind="stable")
    keep = order[weights[order] >= min_relative_probability * weights[order[0]]]
    cells = keep[: int(max_points)]
    n_psi = 6 * 2**level
    if true_rotation is None:
        marker_directions, marker_in_plane = np.zeros((0, 3)), np.zeros(0)
    else:
        marker_directions, marker_in_plane = pose_markers(true_rotation, symmetry_ops)
    return SphereView(
        level=int(level),
        marginal=marginal,
        density_per_sr=marginal / (4.0 * math.pi / n_pix),
        cells=cells,
        directions=distributions.healpix_pixel_directions(level)[cells // n_psi],
        in_plane_deg=grid_in_plane_angles_deg(level)[cells],
        probability=weights[cells],
        marker_directions=marker_directions,
        marker_in_plane_deg=marker_in_plane,
    )


@dataclass(frozen=True)
class DistributionSet:
    """Per-structure arrays for the sphere explorer widget.

    Attributes:
        images: ``(n, N, N)`` particle images ``[image, y, x]`` (shown beside the spheres).
        rotations: ``(n, 3, 3)`` true poses.
        symmetry_ops: ``(K, 3, 3)`` point-group ops, identity first.
        level: grid level of the distributions.
        label_probs: ``(n, G)`` label distributions (e.g. ``PoseLabels.soft``).
        predicted_probs: ``(n, G)`` predicted distributions, or None.
        point_group: name shown in titles (e.g. ``"C2"``).
    """

    images: np.ndarray
    rotations: np.ndarray
    symmetry_ops: np.ndarray
    level: int
    label_probs: np.ndarray
    predicted_probs: np.ndarray | None = None
    point_group: str = ""

    def __post_init__(self) -> None:
        n = len(self.rotations)
        n_cells = grids.healpix_so3_grid_size(self.level)
        shapes = {"images": np.shape(self.images)[:1], "label_probs": np.shape(self.label_probs)}
        expected = {"images": (n,), "label_probs": (n, n_cells)}
        if self.predicted_probs is not None:
            shapes["predicted_probs"] = np.shape(self.predicted_probs)
            expected["predicted_probs"] = (n, n_cells)
        for name, shape in shapes.items():
            if tuple(shape) != expected[name]:
                raise ValueError(
                    f"{name} has shape {tuple(shape)}, expected {expected[name]} for {n} poses "
                    f"on the level-{self.level} grid"
                )

    def __len__(self) -> int:
        return len(self.rotations)
