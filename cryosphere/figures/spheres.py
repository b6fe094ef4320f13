"""SO(3) distributions on spheres: interactive plotly views, Mollweide figures, HTML/PNG export.

A distribution over SO(3) is held on the level-``L`` HEALPix grid (:mod:`cryosphere.geometry.distributions`:
``probs`` ``(G,)``, ``G = 72 * 8**L``, cell ``g = p * 6 * 2**L + j`` with ``p`` the NESTED
HEALPix pixel of the viewing direction and ``j`` the in-plane index). Two views show it:

* **Viewing-direction sphere** (:func:`plot_viewing_sphere`): the marginal over the in-plane angle,
  ``m_p = sum_j probs[p * 6 * 2**L + j]`` (sums to 1), drawn as a density per steradian
  ``m_p / (4π / P)`` (HEALPix pixels have equal area ``4π / P``, ``P = 12 * 4**L``) on a
  latitude-longitude surface whose every vertex takes the value of the HEALPix pixel it falls in
  (``healpy.ang2pix(nest=True)``).
* **Image2Sphere-style scatter** (:func:`plot_pose_scatter`): one marker per grid rotation with
  non-negligible probability, placed at its viewing direction; marker area grows with the
  probability and the colour is the in-plane angle on a cyclic colour scale.

**In-plane angle** ``ψ`` (degrees, in [0, 360)): the third RELION Euler angle ``psi`` of the pose,
``R = Rz(-psi) @ Ry(-tilt) @ Rz(-rot)`` (:func:`cryosphere.geometry.so3.relion_euler_from_matrices`),
wrapped to [0, 360). For grid cell ``p * 6 * 2**L + j`` it is exactly ``360 j / (6 * 2**L)``
(:func:`grid_in_plane_angles_deg`). Rotating the image in-plane by ``θ`` (pose ``Rz(θ) @ R``)
lowers ``ψ`` by ``θ``. At the poles (viewing direction ±z, gimbal lock) ``ψ = 0`` and the whole
in-plane angle sits in ``rot``; no HEALPix pixel centre lies there.

**Viewing direction** of a pose ``R``: ``R[2, :]`` (the volume-frame direction mapped to the
microscope's +z, :func:`cryosphere.geometry.so3.viewing_directions`); longitude ``atan2(y, x)``, latitude
``asin(z)``, as in :mod:`cryosphere.figures.viz`. The true pose is marked by a ring at its viewing
direction, its symmetry mates ``R @ g`` (``g`` in the point group, volume frame) by diamonds.

:func:`sphere_view` computes everything a view draws (a :class:`SphereView` of arrays); the
``plot_*`` functions only lay those arrays out. Exports write atomically
(:func:`cryosphere.io.atomic_path`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cryosphere import io
from cryosphere.geometry import distributions, so3

__all__ = [
    "IN_PLANE_COLORSCALE",
    "SphereView",
    "DistributionSet",
    "in_plane_angles_deg",
    "grid_in_plane_angles_deg",
    "in_plane_colors",
    "in_plane_colormap",
    "lon_lat_deg",
    "pose_markers",
    "lat_lon_pixel_mesh",
    "check_distribution",
    "sphere_view",
    "plot_viewing_sphere",
    "plot_pose_scatter",
    "plot_label_vs_prediction",
    "plot_mollweide",
    "save_figure",
    "export_html",
    "png_export_problem",
    "export_png",
    "plotly_mimebundle",
]

IN_PLANE_COLORSCALE = "HSV"
"""Plotly cyclic colour scale for the in-plane angle (red at 0° and 360°); the matplotlib
figures use the same colours (:func:`in_plane_colormap`)."""

_MARKER_RADIUS = 1.03  # markers sit just outside the unit sphere so the surface does not hide them
_TRUE_COLOR = "black"
_MATE_COLOR = "darkorange"


# --------------------------------------------------------------------------------------------
# data helpers
# --------------------------------------------------------------------------------------------
def in_plane_angles_deg(R: np.ndarray) -> np.ndarray:
    """In-plane angle ``ψ`` of poses ``(..., 3, 3)``: RELION ``psi`` wrapped to [0, 360) degrees.

    Poses are validated (ValueError for non-rotations). See the module docstring for the
    definition and the gimbal-lock convention.
    """
    psi = so3.relion_euler_from_matrices(R)[..., 2]
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
    so3.healpix_so3_grid_size(level)  # validates the level
    return _grid_in_plane(int(level))


def _check_cyclic(colorscale: str) -> list[list[Any]]:
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
    scale = _check_cyclic(colorscale)
    return plotly.colors.sample_colorscale(scale, list(np.mod(angles, 360.0) / 360.0))


def in_plane_colormap(colorscale: str = IN_PLANE_COLORSCALE) -> Any:
    """The cyclic plotly ``colorscale`` as a matplotlib colormap over [0, 1] (angle / 360°), so
    the static figures colour in-plane angles exactly as the interactive ones.

    (Matplotlib's own ``'hsv'`` ends at a slightly different red than it starts.)
    """
    import plotly.colors
    from matplotlib.colors import LinearSegmentedColormap

    scale = _check_cyclic(colorscale)
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
    ops = np.eye(3)[None] if symmetry_ops is None else np.asarray(symmetry_ops, np.float64)
    if ops.ndim != 3 or ops.shape[1:] != (3, 3):
        raise ValueError(f"symmetry_ops must have shape (K, 3, 3), got {ops.shape}")
    mates = [R] + [R @ g for g in ops if not np.allclose(g, np.eye(3), atol=1e-6)]
    stack = np.stack(mates)
    return so3.viewing_directions(stack), in_plane_angles_deg(stack)


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
    so3.healpix_so3_grid_size(level)
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
    n_cells = so3.healpix_so3_grid_size(level)
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
        n_cells = so3.healpix_so3_grid_size(self.level)
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


# --------------------------------------------------------------------------------------------
# plotly figures
# --------------------------------------------------------------------------------------------
def _scene_layout(view: SphereView | None = None) -> dict[str, Any]:
    """Axes of a unit-sphere scene; the camera looks at the true pose when there is one (from
    slightly above, so the view is never along the z "up" axis), else from (1.35, 1.35, 0.9)."""
    axis = {"range": [-1.15, 1.15], "showbackground": False, "zeroline": False, "nticks": 5}
    eye = np.array([1.35, 1.35, 0.9])
    if view is not None and len(view.marker_directions):
        aim = view.marker_directions[0] + np.array([0.0, 0.0, 0.35])
        if np.linalg.norm(aim[:2]) < 0.2:  # pose near a pole: step sideways
            aim = aim + np.array([0.45, 0.3, 0.0])
        eye = 2.0 * aim / np.linalg.norm(aim)
    return {
        "xaxis": {**axis, "title": {"text": "x"}},
        "yaxis": {**axis, "title": {"text": "y"}},
        "zaxis": {**axis, "title": {"text": "z"}},
        "aspectmode": "cube",
        "camera": {"eye": dict(zip("xyz", eye.tolist(), strict=True))},
    }


def _marker_traces(view: SphereView, colour_by_angle: bool, colorscale: str) -> list[Any]:
    """Ring at the true pose, diamonds at its mates (just outside the unit sphere)."""
    import plotly.graph_objects as go

    traces = []
    if len(view.marker_directions) == 0:
        return traces
    points = _MARKER_RADIUS * view.marker_directions
    lon, lat = lon_lat_deg(view.marker_directions)
    for rows, name, symbol, size, fixed in (
        (slice(0, 1), "true pose", "circle-open", 16, _TRUE_COLOR),
        (slice(1, None), "symmetry mate", "diamond-open", 12, _MATE_COLOR),
    ):
        if len(points[rows]) == 0:
            continue
        colour: Any = view.marker_in_plane_deg[rows] if colour_by_angle else fixed
        marker = {"symbol": symbol, "size": size, "color": colour, "line": {"width": 5}}
        if colour_by_angle:
            marker.update(colorscale=colorscale, cmin=0.0, cmax=360.0, showscale=False)
        traces.append(
            go.Scatter3d(
                x=points[rows, 0],
                y=points[rows, 1],
                z=points[rows, 2],
                mode="markers",
                name=name,
                marker=marker,
                customdata=np.stack(
                    [lon[rows], lat[rows], view.marker_in_plane_deg[rows]], axis=-1
                ),
                hovertemplate=(
                    f"{name}<br>lon %{{customdata[0]:.1f}}°, lat %{{customdata[1]:.1f}}°"
                    "<br>ψ %{customdata[2]:.1f}°<extra></extra>"
                ),
            )
        )
    return traces


def _surface_traces(
    view: SphereView, colorscale: str, resolution_deg: float | None, colorbar_x: float | None
) -> list[Any]:
    import plotly.graph_objects as go

    directions, pixels = lat_lon_pixel_mesh(view.level, resolution_deg)
    lon, lat = lon_lat_deg(directions)
    density = view.density_per_sr[pixels]
    custom = np.stack([lon, lat, view.marginal[pixels], density, pixels], axis=-1)
    colorbar = {"title": {"text": "density (1/sr)", "side": "right"}, "len": 0.75}
    if colorbar_x is not None:
        colorbar["x"] = colorbar_x
    surface = go.Surface(
        x=directions[..., 0].astype(np.float32),
        y=directions[..., 1].astype(np.float32),
        z=directions[..., 2].astype(np.float32),
        surfacecolor=density.astype(np.float32),
        cmin=0.0,
        colorscale=colorscale,
        colorbar=colorbar,
        customdata=custom.astype(np.float32),
        name="viewing-direction density",
        hovertemplate=(
            "x %{x:.2f}, y %{y:.2f}, z %{z:.2f}<br>lon %{customdata[0]:.1f}°, "
            "lat %{customdata[1]:.1f}°<br>pixel %{customdata[4]:.0f}: mass "
            "%{customdata[2]:.4f}, density %{customdata[3]:.3f}/sr<extra></extra>"
        ),
    )
    return [surface, *_marker_traces(view, False, IN_PLANE_COLORSCALE)]


def _unit_sphere(n: int = 25) -> Any:
    import plotly.graph_objects as go

    theta, phi = np.meshgrid(np.linspace(0, np.pi, n), np.linspace(0, 2 * np.pi, 2 * n - 1))
    r = 0.985
    return go.Surface(
        x=r * np.sin(theta) * np.cos(phi),
        y=r * np.sin(theta) * np.sin(phi),
        z=r * np.cos(theta),
        colorscale=[[0, "rgb(225,225,225)"], [1, "rgb(225,225,225)"]],
        showscale=False,
        opacity=0.35,
        hoverinfo="skip",
        name="unit sphere",
    )


def _scatter_traces(
    view: SphereView, colorscale: str, max_marker_px: float, colorbar_x: float | None
) -> list[Any]:
    import plotly.graph_objects as go

    _check_cyclic(colorscale)
    points = view.directions
    lon, lat = lon_lat_deg(points)
    size = 2.0 + (max_marker_px - 2.0) * np.sqrt(view.probability / view.probability.max())
    colorbar = {
        "title": {"text": "in-plane ψ (°)", "side": "right"},
        "tickvals": [0, 90, 180, 270, 360],
        "len": 0.75,
    }
    if colorbar_x is not None:
        colorbar["x"] = colorbar_x
    scatter = go.Scatter3d(
        x=points[:, 0],
        y=points[:, 1],
        z=points[:, 2],
        mode="markers",
        name="grid rotations",
        marker={
            "size": size,
            "color": view.in_plane_deg,
            "colorscale": colorscale,
            "cmin": 0.0,
            "cmax": 360.0,
            "colorbar": colorbar,
            "opacity": 0.9,
            "line": {"width": 0},
        },
        customdata=np.stack([lon, lat, view.in_plane_deg, view.probability, view.cells], axis=-1),
        hovertemplate=(
            "cell %{customdata[4]:.0f}: p = %{customdata[3]:.4f}<br>lon %{customdata[0]:.1f}°, "
            "lat %{customdata[1]:.1f}°, ψ %{customdata[2]:.0f}°<extra></extra>"
        ),
    )
    return [_unit_sphere(), scatter, *_marker_traces(view, True, colorscale)]


def _single_sphere_figure(traces: list[Any], view: SphereView, title: str) -> Any:
    """One 3D sphere scene holding ``traces``, the camera facing the true pose."""
    import plotly.graph_objects as go

    fig = go.Figure(traces)
    fig.update_layout(
        title={"text": title},
        scene=_scene_layout(view),
        legend={"x": 0.0, "y": 0.0},
        margin={"l": 0, "r": 0, "t": 40, "b": 0},
        height=550,
    )
    return fig


def plot_viewing_sphere(
    view: SphereView,
    title: str | None = None,
    colorscale: str = "Viridis",
    resolution_deg: float | None = None,
) -> Any:
    """Viewing-direction marginal as a coloured unit sphere (rotatable, zoomable).

    Colour: ``view.density_per_sr`` (mass per steradian) of the HEALPix pixel under each vertex
    of a latitude-longitude mesh (:func:`lat_lon_pixel_mesh`); hover gives x, y, z, lon/lat,
    the pixel, its mass and density. The true pose is a black ring, mates orange diamonds; the
    camera starts facing the true pose.

    Returns:
        ``plotly.graph_objects.Figure``.
    """
    traces = _surface_traces(view, colorscale, resolution_deg, None)
    return _single_sphere_figure(traces, view, title or "viewing-direction density")


def plot_pose_scatter(
    view: SphereView,
    title: str | None = None,
    colorscale: str = IN_PLANE_COLORSCALE,
    max_marker_px: float = 14.0,
) -> Any:
    """Image2Sphere-style scatter: each shown grid rotation at its viewing direction.

    Marker diameter ``2 + (max_marker_px - 2) * sqrt(p / p_max)`` pixels (area ~ probability);
    colour the in-plane angle ``ψ`` on the cyclic ``colorscale`` (``cmin=0``, ``cmax=360``,
    colour bar in degrees; :func:`in_plane_colors` gives the same colours). The true pose is a
    ring and its mates diamonds, each coloured by its own ``ψ``; the camera starts facing the
    true pose.

    Returns:
        ``plotly.graph_objects.Figure``.
    """
    traces = _scatter_traces(view, colorscale, max_marker_px, None)
    return _single_sphere_figure(
        traces, view, title or "pose distribution (colour: in-plane angle)"
    )


def plot_label_vs_prediction(
    image: np.ndarray,
    label_view: SphereView,
    prediction_view: SphereView | None,
    kind: str = "scatter",
    title: str | None = None,
    titles: Sequence[str] = ("particle image", "label", "prediction"),
) -> Any:
    """The particle image beside its label distribution and the model's prediction.

    Args:
        image: ``(N, N)`` image ``[y, x]``, drawn with row 0 at the top.
        label_view, prediction_view: :class:`SphereView` of each (None: no prediction panel).
        kind: ``"scatter"`` (:func:`plot_pose_scatter` panels) or ``"surface"``
            (:func:`plot_viewing_sphere` panels).
        title: figure title; titles: panel titles.

    Returns:
        ``plotly.graph_objects.Figure`` with a heatmap and one 3D scene per distribution; the
        scenes share a camera start.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if kind not in ("scatter", "surface"):
        raise ValueError(f"kind must be 'scatter' or 'surface', got {kind!r}")
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"image must have shape (N, N), got {image.shape}")
    views = [label_view] if prediction_view is None else [label_view, prediction_view]
    n = len(views)
    density_max = max(float(view.density_per_sr.max()) for view in views)
    widths = [0.24] + [0.76 / n] * n
    fig = make_subplots(
        rows=1,
        cols=1 + n,
        specs=[[{"type": "xy"}] + [{"type": "scene"}] * n],
        column_widths=widths,
        subplot_titles=list(titles[: 1 + n]),
        horizontal_spacing=0.03,
    )
    fig.add_trace(
        go.Heatmap(z=image, colorscale="Greys_r", showscale=False, name="image"), row=1, col=1
    )
    hidden = {"showticklabels": False, "showgrid": False, "zeroline": False, "constrain": "domain"}
    fig.update_yaxes(autorange="reversed", scaleanchor="x", row=1, col=1, **hidden)
    fig.update_xaxes(row=1, col=1, **hidden)
    for i, view in enumerate(views):
        last = i == n - 1
        if kind == "scatter":
            traces = _scatter_traces(view, IN_PLANE_COLORSCALE, 12.0, 1.0)
        else:
            traces = _surface_traces(view, "Viridis", None, 1.0)
        for trace in traces:
            if kind == "scatter" and trace.type == "scatter3d" and trace.name == "grid rotations":
                trace.marker.showscale = last  # one ψ colour bar (same scale in every panel)
            if trace.type == "surface" and trace.name != "unit sphere":
                trace.showscale = last  # one density colour bar: the panels share cmax
                trace.cmax = density_max
            trace.showlegend = last and trace.name in ("true pose", "symmetry mate")
            fig.add_trace(trace, row=1, col=2 + i)
    scene = _scene_layout(label_view)
    fig.update_layout(
        {f"scene{'' if i == 0 else i + 1}": scene for i in range(n)},
        title={"text": title or ""},
        legend={"orientation": "h", "x": 0.5, "xanchor": "center", "y": 0.0},
        plot_bgcolor="white",
        margin={"l": 10, "r": 10, "t": 60, "b": 10},
        height=480,
    )
    return fig


# --------------------------------------------------------------------------------------------
# matplotlib (static figures for papers)
# --------------------------------------------------------------------------------------------
def plot_mollweide(
    views: SphereView | Sequence[SphereView],
    titles: Sequence[str] | None = None,
    cmap: Any = None,
    max_marker_area: float = 60.0,
    ncols: int | None = None,
) -> Any:
    """Static Mollweide map(s) of the scatter view, one panel per :class:`SphereView`.

    Each shown grid rotation is a dot at (longitude ``atan2(y, x)``, latitude ``asin(z)``) of its
    viewing direction, area ``max_marker_area * p / p_max`` (pt²), colour its in-plane angle
    ``ψ`` on a cyclic colormap (0–360°, shared colour bar in degrees; ``cmap`` None: the plotly
    views' colours, :func:`in_plane_colormap`). The true pose is a ring coloured by its ``ψ``
    (black outline), symmetry mates are squares. Panels fill ``ncols`` columns (default: one
    row).

    Returns:
        ``matplotlib.figure.Figure``.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    view_list = [views] if isinstance(views, SphereView) else list(views)
    cmap = in_plane_colormap() if cmap is None else plt.get_cmap(cmap)
    n = len(view_list)
    cols = n if ncols is None else max(1, min(int(ncols), n))
    rows = math.ceil(n / cols)
    fig = plt.figure(figsize=(5.0 * cols + 0.8, 3.0 * rows + 0.3), constrained_layout=True)
    norm = Normalize(0.0, 360.0)
    scatter = None
    for i, view in enumerate(view_list):
        ax = fig.add_subplot(rows, cols, i + 1, projection="mollweide")
        lon, lat = lon_lat_deg(view.directions)
        order = np.argsort(view.probability)  # most probable drawn last (on top)
        scatter = ax.scatter(
            np.radians(lon[order]),
            np.radians(lat[order]),
            s=max_marker_area * view.probability[order] / view.probability.max(),
            c=np.mod(view.in_plane_deg[order], 360.0),
            cmap=cmap,
            norm=norm,
            linewidths=0,
        )
        if len(view.marker_directions):
            m_lon, m_lat = (np.radians(a) for a in lon_lat_deg(view.marker_directions))
            colours = cmap(norm(np.mod(view.marker_in_plane_deg, 360.0)))
            for part, marker, label in (
                (slice(0, 1), "o", "true pose"),
                (slice(1, None), "s", "symmetry mate"),
            ):
                if len(m_lon[part]) == 0:
                    continue
                for edge, width, name in (("black", 3.2, None), (colours[part], 1.6, label)):
                    ax.scatter(
                        m_lon[part],
                        m_lat[part],
                        s=260,
                        marker=marker,
                        facecolors="none",
                        edgecolors=edge,
                        linewidths=width,
                        label=name,
                    )
            ax.legend(loc="lower right", fontsize=7, markerscale=0.4, bbox_to_anchor=(1.08, -0.1))
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
        if titles is not None:
            ax.set_title(titles[i], fontsize=10)
    if scatter is not None:
        bar = fig.colorbar(scatter, ax=fig.axes, shrink=0.75, pad=0.02)
        bar.set_label("in-plane angle ψ (°)")
        bar.set_ticks([0, 90, 180, 270, 360])
    return fig


def save_figure(
    fig: Any,
    path: str | os.PathLike[str],
    formats: Sequence[str] = ("png", "pdf"),
    dpi: int = 300,
) -> list[Path]:
    """Save a matplotlib figure once per format, each written atomically.

    Args:
        fig: ``matplotlib.figure.Figure``.
        path: target path; its suffix (if any) is replaced by each format's
            (``figures/label.png`` and ``figures/label.pdf`` from ``figures/label``).
        formats: file formats matplotlib knows (default PNG and PDF).
        dpi: resolution of raster formats.

    Returns:
        The written paths, in the order of ``formats``.
    """
    target = Path(path)
    written = []
    for fmt in formats:
        out = target.with_suffix(f".{fmt}")
        with io.atomic_path(out) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
        written.append(out)
    return written


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
def export_html(fig: Any, path: str | os.PathLike[str], div_id: str | None = None) -> Path:
    """Write a plotly figure as a standalone HTML page (plotly.js embedded: opens offline),
    atomically. ``div_id`` names the figure's ``<div>`` (default: a random id)."""
    target = Path(path)
    with io.atomic_path(target) as tmp:
        fig.write_html(tmp, include_plotlyjs=True, full_html=True, div_id=div_id)
    return target


_CHROME_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def _find_chromium() -> str | None:
    """Path of a Chrome/Chromium kaleido (>= 1) can drive, or None."""
    try:
        from choreographer.browsers.chromium import Chromium

        found = Chromium.find_browser(skip_local=False)
        if found:
            return str(found)
    except Exception:  # noqa: BLE001 - fall back to a plain PATH search
        pass
    if os.environ.get("BROWSER_PATH"):
        return os.environ["BROWSER_PATH"]
    for name in _CHROME_NAMES:
        if found := shutil.which(name):
            return found
    return None


def _kaleido_version() -> str | None:
    if importlib.util.find_spec("kaleido") is None:
        return None
    try:
        return importlib.metadata.version("kaleido")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def png_export_problem() -> str | None:
    """Why :func:`export_png` cannot work here, or None when it can.

    PNG export needs the ``kaleido`` package; kaleido 1.x also needs a Chrome or Chromium
    browser (kaleido 0.2 bundles its own).
    """
    version = _kaleido_version()
    if version is None:
        return (
            "PNG export needs the kaleido package, which is not installed: "
            "pip install kaleido (or pip install 'cryosphere-pose[export]')"
        )
    if int(version.split(".")[0]) >= 1 and _find_chromium() is None:
        return (
            f"PNG export with kaleido {version} needs a Chrome or Chromium browser and none was "
            "found: install one (apt install chromium on Debian/Ubuntu, or plotly_get_chrome to "
            "download one) or set BROWSER_PATH to its executable; export_html needs neither"
        )
    return None


def export_png(
    fig: Any,
    path: str | os.PathLike[str],
    width: int | None = None,
    height: int | None = None,
    scale: float = 2.0,
) -> Path:
    """Render a plotly figure to PNG with kaleido, atomically.

    Raises:
        RuntimeError: kaleido or a Chrome/Chromium browser is missing (the message says which
            and how to install it; see :func:`png_export_problem`), or rendering failed.
    """
    problem = png_export_problem()
    if problem is not None:
        raise RuntimeError(problem)
    target = Path(path)
    try:
        with io.atomic_path(target) as tmp:
            fig.write_image(tmp, format="png", width=width, height=height, scale=scale)
    except Exception as error:
        raise RuntimeError(
            f"kaleido could not render {target.name}: {error}; check that the Chrome/Chromium "
            f"at {_find_chromium()} starts (apt install chromium), or use export_html"
        ) from error
    return target


def plotly_mimebundle(fig: Any) -> dict[str, Any]:
    """A display bundle for a plotly figure: the plotly JSON MIME type (rendered by JupyterLab,
    Notebook 7 and VS Code) and a plain-text fallback; used to show figures in ipywidgets."""
    title = fig.layout.title.text or "plotly figure"
    return {
        "application/vnd.plotly.v1+json": {
            **json.loads(fig.to_json()),
            "config": {"displaylogo": False, "responsive": True},
        },
        "text/plain": f"<plotly figure: {title}>",
    }
