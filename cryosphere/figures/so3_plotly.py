"""Interactive 3D views (plotly) of one image's SO(3) distribution on the unit sphere.

:func:`plot_viewing_sphere` colours the sphere by the viewing-direction density,
:func:`plot_pose_scatter` puts one marker per grid rotation at its viewing direction (colour:
in-plane angle), :func:`plot_label_vs_prediction` sets the particle image beside the label and
the prediction. Every view draws a :class:`~cryosphere.figures.so3_views.SphereView` (see
:mod:`cryosphere.figures.so3_views` for the conventions) and returns a
``plotly.graph_objects.Figure``. Images are drawn with row 0 at the top
(:data:`cryosphere.figures.gallery.PLOTLY_IMAGE_YAXIS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cryosphere.figures.gallery import PLOTLY_IMAGE_YAXIS
from cryosphere.figures.so3_views import (
    IN_PLANE_COLORSCALE,
    SphereView,
    cyclic_colorscale,
    lat_lon_pixel_mesh,
    lon_lat_deg,
)

if TYPE_CHECKING:
    import plotly.graph_objects as go

__all__ = ["plot_viewing_sphere", "plot_pose_scatter", "plot_label_vs_prediction"]

_MARKER_RADIUS = 1.03  # markers sit just outside the unit sphere so the surface does not hide them
_TRUE_COLOR = "black"
_MATE_COLOR = "darkorange"


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


def _unit_sphere(n: int = 25) -> go.Surface:
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

    cyclic_colorscale(colorscale)
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


def _single_sphere_figure(traces: list[Any], view: SphereView, title: str) -> go.Figure:
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
) -> go.Figure:
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
) -> go.Figure:
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
) -> go.Figure:
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
    fig.update_yaxes(scaleanchor="x", row=1, col=1, **PLOTLY_IMAGE_YAXIS, **hidden)
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
