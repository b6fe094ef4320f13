"""The figures package: one image orientation, one Mollweide map, one lon/lat helper."""

from __future__ import annotations

import ast
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cryosphere.figures import (
    gallery,
    mollweide,
    plots,
    so3_plotly,
    so3_views,
    viz,  # noqa: E402
)
from cryosphere.geometry import distributions, grids, rotations

pass  # RELAYOUT-EMPTY  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
N = 16


def _top_band_image() -> np.ndarray:
    """An ``[y, x]`` image bright in its first N/4 rows (small y), dark elsewhere."""
    image = np.zeros((N, N), np.float32)
    image[: N // 4] = 1.0
    return image


def _brightness_top_and_bottom(fig, ax) -> tuple[float, float]:
    """Mean grey level of the top and bottom eighths of ``ax`` as rendered on screen."""
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].mean(axis=-1)
    box = ax.get_window_extent()  # display pixels, origin at the bottom left
    height = pixels.shape[0]
    top, bottom = height - int(box.y1), height - int(box.y0)  # buffer rows, row 0 on top
    left, right = int(box.x0) + 2, int(box.x1) - 2
    band = max(1, (bottom - top) // 8)
    upper = pixels[top + 2 : top + 2 + band, left:right].mean()
    lower = pixels[bottom - 2 - band : bottom - 2, left:right].mean()
    return float(upper), float(lower)


def _assert_row_zero_on_top(fig, ax) -> None:
    assert [image.origin for image in ax.images] == [gallery.IMAGE_ORIGIN] == ["upper"]
    upper, lower = _brightness_top_and_bottom(fig, ax)
    assert upper > lower + 100, (upper, lower)  # bright rows (row 0 ..) drawn at the top


def test_gallery_draws_row_zero_at_the_top():
    fig = gallery.plot_image_gallery([_top_band_image()[None]])
    _assert_row_zero_on_top(fig, fig.axes[0])
    plt.close(fig)


@pytest.mark.parametrize("pixel_size", [None, 2.0])
def test_central_slices_draw_row_zero_at_the_top(pixel_size):
    z, y, _ = np.meshgrid(*(np.arange(N),) * 3, indexing="ij")
    volume = ((z < N // 4) | (y < N // 4)).astype(np.float32)  # every section: bright first rows
    fig = gallery.plot_central_slices({"map": volume}, pixel_size=pixel_size)
    for ax in fig.axes:
        _assert_row_zero_on_top(fig, ax)
    plt.close(fig)


def test_equivariance_example_draws_images_as_the_gallery_does():
    level = 1
    directions = distributions.healpix_pixel_directions(level)
    marginal = np.full(len(directions), 1.0 / len(directions))
    image = _top_band_image()
    fig = plots.plot_equivariance_example(image, image, marginal, marginal, directions, 1e-3)
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 2
    for ax in image_axes:
        _assert_row_zero_on_top(fig, ax)
    plt.close(fig)


def test_plotly_image_panel_has_row_zero_at_the_top():
    view = so3_views.sphere_view(np.ones(grids.healpix_so3_grid_size(1)), 1)
    image = _top_band_image()
    fig = so3_plotly.plot_label_vs_prediction(image, view, None)
    heatmap = [trace for trace in fig.data if trace.type == "heatmap"][0]
    np.testing.assert_array_equal(np.asarray(heatmap.z), image)
    assert fig.layout.yaxis.autorange == gallery.PLOTLY_IMAGE_YAXIS["autorange"] == "reversed"


def test_lon_lat_deg_of_known_directions():
    directions = np.array([[1, 0, 0], [0, 2, 0], [0, 0, 1], [-1, 0, 0], [1, 1, -np.sqrt(2)]])
    lon, lat = so3_views.lon_lat_deg(directions)
    np.testing.assert_allclose(lon, [0, 90, 0, 180, 45], atol=1e-12)
    np.testing.assert_allclose(lat, [0, 0, 90, 0, -45], atol=1e-12)
    assert so3_views.lon_lat_deg is so3_views.lon_lat_deg


def test_one_lon_lat_helper_in_the_figures():
    """Longitude is computed in one place (so3_views.lon_lat_deg); the rest call it."""
    users = sorted(
        path.name
        for path in (ROOT / "cryosphere" / "figures").glob("*.py")
        if "arctan2" in path.read_text()
    )
    assert users == ["so3_views.py"]


def test_mollweide_panel_and_pose_marks_sit_at_lon_lat():
    directions = np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]])
    fig = plt.figure()
    ax = fig.add_subplot(projection="mollweide")
    scatter = mollweide.mollweide_panel(ax, directions, np.array([1.0, 2.0, 3.0]), title="t")
    np.testing.assert_allclose(scatter.get_offsets(), [[0, 0], [np.pi / 2, 0], [0, np.pi / 2]])
    assert scatter.norm.vmin == 0.0 and ax.get_title() == "t"
    mollweide.mark_poses(ax, directions[1:])  # true pose at +y, one mate at +z
    marks = {c.get_label(): c.get_offsets() for c in ax.collections[1:]}
    np.testing.assert_allclose(marks["true pose"], [[np.pi / 2, 0]])
    np.testing.assert_allclose(marks["symmetry mate"], [[0, np.pi / 2]])
    plt.close(fig)


def test_label_figure_marks_the_true_pose_with_the_shared_map():
    level = 1
    rotation = rotations.random_rotations(1, seed=3)[0]
    directions = distributions.healpix_pixel_directions(level)
    values = np.random.default_rng(0).random(len(directions))
    fig = viz.plot_viewing_marginals([values], directions, [rotation[2][None]], ["a"])
    ax = fig.axes[0]
    ring = [c for c in ax.collections if c.get_label() == "true pose"]
    lon, lat = so3_views.lon_lat_deg(rotation[2])
    np.testing.assert_allclose(ring[0].get_offsets(), [[np.radians(lon), np.radians(lat)]])
    np.testing.assert_allclose(ax.collections[0].get_array(), values)
    plt.close(fig)


@pytest.mark.parametrize("stage", ["figures", "reconstruction"])
def test_no_private_names_imported_across_modules(stage):
    """Modules share public helpers only (a private module's names are public within it)."""
    for path in (ROOT / "cryosphere" / stage).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cryosphere"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"
