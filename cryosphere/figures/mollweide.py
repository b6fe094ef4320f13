"""The one Mollweide map of the figures (matplotlib): directions on the sphere, flattened.

A unit vector ``(x, y, z)`` (a viewing direction, volume frame,
:func:`cryosphere.geometry.rotations.viewing_directions`) is drawn at longitude ``atan2(y, x)`` and
latitude ``asin(z)`` (:func:`~cryosphere.figures.so3_views.lon_lat_deg`) of matplotlib's
``"mollweide"`` projection. :func:`mollweide_panel` scatters values on such an axis and
:func:`mark_poses` marks a true pose (ring) and its symmetry mates (squares); every Mollweide
figure (:mod:`cryosphere.figures.viz`, :mod:`cryosphere.figures.plots`, :func:`plot_mollweide`)
is drawn with these two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import PathCollection
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure

from cryosphere.figures.so3_views import SphereView, in_plane_colormap, lon_lat_deg

__all__ = ["mollweide_panel", "mark_poses", "plot_mollweide"]

TRUE_POSE_COLOR = "red"
"""Colour of the true-pose ring when no per-pose colours are given."""
MATE_COLOR = "darkorange"
"""Colour of the symmetry-mate squares when no per-pose colours are given."""


def mollweide_panel(
    ax: Axes,
    directions: np.ndarray,
    values: np.ndarray,
    *,
    sizes: np.ndarray | float | None = None,
    cmap: str | Colormap = "viridis",
    norm: Normalize | None = None,
    title: str = "",
) -> PathCollection:
    """Scatter ``values`` at ``directions`` on a Mollweide axis.

    Args:
        ax: an axis made with ``projection="mollweide"``.
        directions: ``(P, 3)`` directions ``(x, y, z)`` (normalised here).
        values: ``(P,)`` colour values.
        sizes: marker areas (pt²), one or ``(P,)``; default ``clip(12000 / P, 4, 120)`` (dense
            grids get small dots).
        cmap, norm: colour map and normalisation (default: linear from 0 to the largest value).
        title: panel title.

    Returns:
        The scatter (for a colour bar). Points are drawn in the order given (last on top).
    """
    lon, lat = lon_lat_deg(directions)
    if sizes is None:
        sizes = float(np.clip(12000.0 / max(len(lon), 1), 4.0, 120.0))
    scatter = ax.scatter(
        np.radians(lon),
        np.radians(lat),
        c=values,
        s=sizes,
        cmap=cmap,
        norm=Normalize(vmin=0.0) if norm is None else norm,
        linewidths=0,
    )
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    return scatter


def mark_poses(ax: Axes, directions: np.ndarray, colors: Any = None, size: float = 260.0) -> None:
    """Mark a true pose (ring, row 0 of ``directions``) and its symmetry mates (squares, rows 1..).

    Args:
        ax: a Mollweide axis.
        directions: ``(K, 3)`` viewing directions, the true pose first; ``(0, 3)`` draws nothing.
        colors: ``(K,)`` colours (e.g. by in-plane angle) or None (:data:`TRUE_POSE_COLOR`,
            :data:`MATE_COLOR`). Each mark is a coloured outline inside a black one, so it shows
            on any background. Legend labels: "true pose", "symmetry mate".
        size: marker area (pt²).
    """
    points = np.atleast_2d(np.asarray(directions, dtype=np.float64))
    if points.size == 0:
        return
    lon, lat = (np.radians(a) for a in lon_lat_deg(points))
    if colors is None:
        colors = [TRUE_POSE_COLOR] + [MATE_COLOR] * (len(points) - 1)
    colors = list(colors)
    for part, marker, label in (
        (slice(0, 1), "o", "true pose"),
        (slice(1, None), "s", "symmetry mate"),
    ):
        if len(lon[part]) == 0:
            continue
        for edge, width, name in (("black", 3.2, None), (colors[part], 1.6, label)):
            ax.scatter(
                lon[part],
                lat[part],
                s=size,
                marker=marker,
                facecolors="none",
                edgecolors=edge,
                linewidths=width,
                label=name,
            )


def plot_mollweide(
    views: SphereView | Sequence[SphereView],
    titles: Sequence[str] | None = None,
    cmap: Any = None,
    max_marker_area: float = 60.0,
    ncols: int | None = None,
) -> Figure:
    """Static Mollweide map(s) of the scatter view, one panel per :class:`SphereView`.

    Each shown grid rotation is a dot at its viewing direction, area
    ``max_marker_area * p / p_max`` (pt²), colour its in-plane angle ``ψ`` on a cyclic colormap
    (0–360°, shared colour bar in degrees; ``cmap`` None: the plotly views' colours,
    :func:`~cryosphere.figures.so3_views.in_plane_colormap`). The true pose is a ring and its
    symmetry mates squares (:func:`mark_poses`), each coloured by its own ``ψ``. Panels fill
    ``ncols`` columns (default: one row).
    """
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
        order = np.argsort(view.probability)  # most probable drawn last (on top)
        scatter = mollweide_panel(
            ax,
            view.directions[order],
            np.mod(view.in_plane_deg[order], 360.0),
            sizes=max_marker_area * view.probability[order] / view.probability.max(),
            cmap=cmap,
            norm=norm,
            title="" if titles is None else titles[i],
        )
        if len(view.marker_directions):
            colours = cmap(norm(np.mod(view.marker_in_plane_deg, 360.0)))
            mark_poses(ax, view.marker_directions, colours)
            ax.legend(loc="lower right", fontsize=7, markerscale=0.4, bbox_to_anchor=(1.08, -0.1))
    if scatter is not None:
        bar = fig.colorbar(scatter, ax=fig.axes, shrink=0.75, pad=0.02)
        bar.set_label("in-plane angle ψ (°)")
        bar.set_ticks([0, 90, 180, 270, 360])
    return fig
