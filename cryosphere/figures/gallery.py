"""2D figures of maps and images: central slices, image galleries (matplotlib).

Functions here take arrays and return a :class:`matplotlib.figure.Figure`; they compute
nothing beyond what they draw. Volumes are ``(N, N, N)`` ``[z, y, x]``.

Image orientation, one for every image panel of the figures: an image ``[y, x]`` is drawn with
row 0 at the top and column 0 at the left (:data:`IMAGE_ORIGIN`; plotly heatmaps reverse their
y axis, :data:`PLOTLY_IMAGE_YAXIS`). Rows run along microscope y and columns along microscope x
(the pose convention of :mod:`cryosphere`), so microscope y points down the screen, as in
RELION and most image viewers. :func:`draw_image` is the one way the figures draw an image.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

__all__ = [
    "IMAGE_ORIGIN",
    "PLOTLY_IMAGE_YAXIS",
    "draw_image",
    "central_slices",
    "plot_central_slices",
    "plot_image_gallery",
]

IMAGE_ORIGIN = "upper"
"""matplotlib ``imshow`` origin of every image panel: row 0 at the top."""
PLOTLY_IMAGE_YAXIS = {"autorange": "reversed"}
"""plotly y-axis settings that put a heatmap's row 0 at the top (same orientation)."""


def draw_image(
    ax: Axes,
    image: np.ndarray,
    cmap: str = "gray",
    extent: tuple[float, float, float, float] | None = None,
) -> AxesImage:
    """Draw ``image`` ``[row, column]`` on ``ax``, row 0 at the top (:data:`IMAGE_ORIGIN`).

    ``extent`` ``(left, right, bottom, top)`` in data units (e.g. Å) labels the axes; its
    ``top`` is the coordinate of row 0. The grey scale runs from the image's min to its max.
    """
    return ax.imshow(np.asarray(image), cmap=cmap, origin=IMAGE_ORIGIN, extent=extent)


def central_slices(volume: np.ndarray) -> dict[str, np.ndarray]:
    """The three central sections of ``volume`` ``(N, N, N)`` through voxel ``N // 2``.

    Returns ``{"xy": [y, x] at z = N//2, "xz": [z, x] at y = N//2, "yz": [z, y] at x = N//2}``.
    """
    array = np.asarray(volume)
    if array.ndim != 3 or len(set(array.shape)) != 1:
        raise ValueError(f"volume must be cubic (N, N, N), got {array.shape}")
    c = array.shape[0] // 2
    return {"xy": array[c], "xz": array[:, c, :], "yz": array[:, :, c]}


def plot_central_slices(
    volumes: dict[str, np.ndarray], pixel_size: float | None = None, cmap: str = "gray"
) -> Figure:
    """One row per named volume, columns the xy, xz and yz central slices.

    ``pixel_size`` (Å) sets the axis extent in Å (centred on the map centre) when given.
    """
    names = list(volumes)
    fig, axes = plt.subplots(
        len(names), 3, figsize=(7.5, 2.5 * len(names)), squeeze=False, constrained_layout=True
    )
    for row, name in enumerate(names):
        slices = central_slices(volumes[name])
        n = volumes[name].shape[0]
        extent = None
        if pixel_size is not None:
            half = n * pixel_size / 2
            extent = (-half, half, half, -half)
        for col, (plane, section) in enumerate(slices.items()):
            ax = axes[row, col]
            draw_image(ax, section, cmap, extent)
            ax.set_title(f"{name}: {plane}", fontsize=9)
            if extent is None:
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                ax.set_xlabel("Å", fontsize=8)
    return fig


def plot_image_gallery(
    rows: Sequence[np.ndarray],
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    cmap: str = "gray",
    panel_size: float = 1.6,
) -> Figure:
    """A grid of images: ``rows[r]`` is an array ``(n_columns, N, N)`` drawn as row ``r``.

    Each panel has its own grey scale (min to max of that image).
    """
    stacks = [np.asarray(row) for row in rows]
    n_cols = max(len(stack) for stack in stacks)
    fig, axes = plt.subplots(
        len(stacks),
        n_cols,
        figsize=(panel_size * n_cols, panel_size * len(stacks)),
        squeeze=False,
        constrained_layout=True,
    )
    for r, stack in enumerate(stacks):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(stack):
                draw_image(ax, stack[c], cmap)
            else:
                ax.set_axis_off()
            if c == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[r], fontsize=9)
            if r == 0 and column_labels is not None and c < len(column_labels):
                ax.set_title(column_labels[c], fontsize=9)
    return fig
