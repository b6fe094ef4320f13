"""Sphere views of SO(3) distributions: data helpers, marker positions, colours, exports, widget."""

from __future__ import annotations

import math
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
import pytest  # noqa: E402

from cryosphere.figures import export, mollweide, so3_plotly, so3_views, widgets
from cryosphere.geometry import distributions, grids, point_groups, rotations
from cryosphere.imaging import atoms, chain_symmetry

pass  # RELAYOUT-EMPTY  # noqa: E402

LEVEL = 1  # 576 rotations: fast; the layout is the same at every level


def _peaked(level: int, rotation: np.ndarray, ops: np.ndarray | None = None) -> np.ndarray:
    """A distribution peaked at ``rotation`` (and its mates): exp(-d² / (2 · 20°²))."""
    grid = grids.healpix_so3_grid(level)
    ops = np.eye(3)[None] if ops is None else ops
    d = point_groups.symmetric_geodesic_distance_deg(grid, rotation[None], ops)
    return np.exp(-0.5 * (d / 20.0) ** 2)


def _trace(fig: go.Figure, name: str):
    matches = [t for t in fig.data if t.name == name]
    assert len(matches) == 1, [t.name for t in fig.data]
    return matches[0]


def _unit(points) -> np.ndarray:
    p = np.stack([np.asarray(points.x), np.asarray(points.y), np.asarray(points.z)], axis=-1)
    return p / np.linalg.norm(p, axis=-1, keepdims=True)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def test_marginal_sums_to_one_and_density_integrates_to_one():
    rng = np.random.default_rng(0)
    probs = rng.random(grids.healpix_so3_grid_size(2)) * 7.0  # unnormalised on purpose
    view = so3_views.sphere_view(probs, 2)
    n_pix = 12 * 4**2
    assert view.marginal.shape == (n_pix,)
    assert view.marginal.sum() == pytest.approx(1.0, abs=1e-12)
    assert (view.density_per_sr * 4 * math.pi / n_pix).sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(
        view.marginal, distributions.viewing_direction_marginal(probs, 2), atol=1e-15
    )
    # scatter cells: most probable first, all above the relative threshold, probabilities of
    # the normalised distribution
    assert np.all(np.diff(view.probability) <= 0)
    assert view.probability.min() >= 0.01 * view.probability.max()
    np.testing.assert_allclose(view.probability, probs[view.cells] / probs.sum())


def test_grid_in_plane_angle_is_relion_psi_of_the_cell():
    grid = grids.healpix_so3_grid(LEVEL)
    expected = so3_views.grid_in_plane_angles_deg(LEVEL)
    measured = so3_views.in_plane_angles_deg(grid)
    wrapped = np.abs((measured - expected + 180.0) % 360.0 - 180.0)
    assert wrapped.max() < 1e-9
    assert expected.min() == 0.0 and expected.max() < 360.0
    # the scatter's cells carry their grid direction and angle
    view = so3_views.sphere_view(_peaked(LEVEL, np.eye(3)), LEVEL)
    np.testing.assert_allclose(view.directions, rotations.viewing_directions(grid[view.cells]))
    np.testing.assert_allclose(view.in_plane_deg, expected[view.cells])


def test_surface_mesh_vertices_take_their_pixel_value():
    import healpy

    directions, pixels = so3_views.lat_lon_pixel_mesh(2)
    nside = 4
    assert set(np.unique(pixels)) == set(range(12 * nside**2))  # every pixel is drawn
    sample = directions[1:-1].reshape(-1, 3)[::37]  # away from the poles, where pixels meet
    np.testing.assert_array_equal(
        healpy.vec2pix(nside, *sample.T, nest=True), pixels[1:-1].reshape(-1)[::37]
    )
    view = so3_views.sphere_view(_peaked(2, rotations.random_rotations(1, seed=1)[0]), 2)
    surface = _trace(so3_plotly.plot_viewing_sphere(view), "viewing-direction density")
    np.testing.assert_allclose(
        np.asarray(surface.surfacecolor), view.density_per_sr[pixels], rtol=1e-6
    )


# --------------------------------------------------------------------------------------------
# markers
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rotation", "direction", "psi"),
    [
        (np.eye(3), [0.0, 0.0, 1.0], 0.0),
        (rotations.rotation_about_axis([1, 0, 0], 90.0), [0.0, 1.0, 0.0], 270.0),
        (rotations.rotation_about_axis([0, 1, 0], 90.0), [-1.0, 0.0, 0.0], 180.0),
        (
            rotations.matrices_from_relion_euler([30.0, 60.0, 10.0]),
            [math.cos(math.radians(30)) * math.sin(math.radians(60)), 0.5 * math.sin(math.radians(60)), 0.5],
            10.0,
        ),
    ],
)  # fmt: skip
def test_true_pose_marker_sits_at_the_viewing_direction(rotation, direction, psi):
    directions, in_plane = so3_views.pose_markers(rotation)
    np.testing.assert_allclose(directions, [direction], atol=1e-12)
    np.testing.assert_allclose(directions[0], rotation[2], atol=1e-12)  # R[2, :]
    assert in_plane[0] == pytest.approx(psi, abs=1e-9)
    view = so3_views.sphere_view(_peaked(LEVEL, rotation), LEVEL, rotation)
    for fig in (so3_plotly.plot_viewing_sphere(view), so3_plotly.plot_pose_scatter(view)):
        np.testing.assert_allclose(_unit(_trace(fig, "true pose")), [direction], atol=1e-12)
        assert not [t for t in fig.data if t.name == "symmetry mate"]


def test_c2_mates_where_the_point_group_puts_them():
    # synthetic C2 about a = (1, 0, 1)/√2: g = 2 a aᵀ - I sends +z to +x, so the mate of the
    # identity pose (R @ g, viewing direction g[2, :]) sits at +x
    frame = rotations.rotation_about_axis([0, 1, 0], 45.0)
    ops = point_groups.point_group("C2", frame)
    directions, _ = so3_views.pose_markers(np.eye(3), ops)
    np.testing.assert_allclose(directions, [[0, 0, 1], [1, 0, 0]], atol=1e-12)
    # the C2 frame of 1HVR as the simulation detects it, on a random pose
    name, frame_1hvr = chain_symmetry.resolve_point_group(atoms.load_structure("1hvr"), "auto")
    assert name == "C2"
    ops = point_groups.point_group("C2", frame_1hvr)
    axis = frame_1hvr[:, 2]
    rotation = rotations.random_rotations(1, seed=7)[0]
    directions, in_plane = so3_views.pose_markers(rotation, ops)
    mate = (2 * np.outer(axis, axis) - np.eye(3)) @ rotation[2]
    np.testing.assert_allclose(directions, [rotation[2], mate], atol=1e-9)
    assert in_plane[1] == pytest.approx(so3_views.in_plane_angles_deg(rotation @ ops[1]))
    view = so3_views.sphere_view(_peaked(LEVEL, rotation, ops), LEVEL, rotation, ops)
    for fig in (so3_plotly.plot_viewing_sphere(view), so3_plotly.plot_pose_scatter(view)):
        np.testing.assert_allclose(_unit(_trace(fig, "symmetry mate")), [mate], atol=1e-9)
        assert _trace(fig, "symmetry mate").marker.symbol != _trace(fig, "true pose").marker.symbol
    # both modes carry mass: the viewing-direction pixels of the pose and of its mate
    pixel_dirs = distributions.healpix_pixel_directions(LEVEL)
    for d in (rotation[2], mate):
        assert view.marginal[np.argmax(pixel_dirs @ d)] > 2.0 / len(view.marginal)


# --------------------------------------------------------------------------------------------
# colours
# --------------------------------------------------------------------------------------------
def test_every_in_plane_angle_has_a_colour_and_the_scale_is_cyclic():
    angles = np.concatenate([np.linspace(-360.0, 720.0, 1081), [359.999]])
    colours = so3_views.in_plane_colors(angles)
    assert len(colours) == len(angles)
    assert all(re.fullmatch(r"rgb\(\d+, \d+, \d+\)", c) for c in colours)
    zero, full, negative, almost = so3_views.in_plane_colors([0.0, 360.0, -360.0, 359.999])
    assert zero == full == negative == almost
    zero_rad, two_pi_rad = so3_views.in_plane_colors(np.degrees([0.0, 2 * np.pi]), "Twilight")
    assert zero_rad == two_pi_rad  # 0 and 2π (angles are given in degrees)
    assert so3_views.in_plane_colors(0.0, "Phase") == so3_views.in_plane_colors(360.0, "Phase")
    assert len(set(so3_views.in_plane_colors([0.0, 90.0, 180.0, 270.0]))) == 4
    with pytest.raises(ValueError, match="not cyclic"):
        so3_views.in_plane_colors([0.0], "Viridis")
    with pytest.raises(ValueError, match="NaN"):
        so3_views.in_plane_colors([np.nan])
    cmap = so3_views.in_plane_colormap()  # the Mollweide figures' colours: the same, cyclic
    assert cmap(0.0) == cmap(1.0)
    for angle, colour in zip(
        (0.0, 120.0, 240.0), so3_views.in_plane_colors([0.0, 120.0, 240.0]), strict=True
    ):
        rgb = [int(c) for c in re.findall(r"\d+", colour)]
        np.testing.assert_allclose(np.array(cmap(angle / 360.0)[:3]) * 255, rgb, atol=3)
    scatter = _trace(
        so3_plotly.plot_pose_scatter(so3_views.sphere_view(_peaked(LEVEL, np.eye(3)), LEVEL)),
        "grid rotations",
    )
    assert (scatter.marker.cmin, scatter.marker.cmax) == (0.0, 360.0)
    assert scatter.marker.colorbar.title.text == "in-plane ψ (°)"
    assert np.all(
        (np.asarray(scatter.marker.color) >= 0) & (np.asarray(scatter.marker.color) < 360)
    )


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
def test_bad_distributions_are_refused_clearly():
    good = np.ones(grids.healpix_so3_grid_size(2))
    nan = good.copy()
    nan[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        so3_views.sphere_view(nan, 2)
    with pytest.raises(ValueError, match="4608 .* level-1 grid has 576"):
        so3_views.sphere_view(good, 1)
    with pytest.raises(ValueError, match="shape"):
        so3_views.sphere_view(good[None], 2)
    with pytest.raises(ValueError, match="negative"):
        so3_views.sphere_view(-good, 2)
    with pytest.raises(ValueError, match="sums to 0"):
        so3_views.sphere_view(0 * good, 2)
    with pytest.raises(ValueError, match="rotation"):
        so3_views.sphere_view(good, 2, true_rotation=2 * np.eye(3))
    with pytest.raises(ValueError, match="label_probs"):
        so3_views.DistributionSet(np.zeros((2, 8, 8)), np.stack([np.eye(3)] * 2), np.eye(3)[None],
                                2, np.ones((2, 576)))  # fmt: skip
    view = so3_views.sphere_view(good, 2)
    with pytest.raises(ValueError, match="kind"):
        so3_plotly.plot_label_vs_prediction(np.zeros((8, 8)), view, view, kind="mesh")


# --------------------------------------------------------------------------------------------
# figures and exports
# --------------------------------------------------------------------------------------------
def test_side_by_side_has_the_image_and_one_scene_per_distribution():
    rotation = rotations.random_rotations(1, seed=2)[0]
    label = so3_views.sphere_view(_peaked(LEVEL, rotation), LEVEL, rotation)
    uniform = so3_views.sphere_view(np.ones(grids.healpix_so3_grid_size(LEVEL)), LEVEL, rotation)
    image = np.arange(64.0).reshape(8, 8)
    for kind in ("scatter", "surface"):
        fig = so3_plotly.plot_label_vs_prediction(image, label, uniform, kind=kind, title="t")
        assert [t.type for t in fig.data if t.type == "heatmap"] == ["heatmap"]
        np.testing.assert_array_equal(np.asarray(fig.data[0].z), image)
        scenes = {t.scene for t in fig.data if t.type in ("scatter3d", "surface")}
        assert scenes == {"scene", "scene2"}
    single = so3_plotly.plot_label_vs_prediction(image, label, None)
    assert {t.scene for t in single.data if t.type == "scatter3d"} == {"scene"}


def test_mollweide_figure_and_atomic_png_pdf(tmp_path):
    rotation = rotations.random_rotations(1, seed=4)[0]
    ops = point_groups.point_group("C2")
    view = so3_views.sphere_view(_peaked(LEVEL, rotation, ops), LEVEL, rotation, ops)
    fig = mollweide.plot_mollweide([view, view], ["label", "prediction"])
    panels = [ax for ax in fig.axes if ax.name == "mollweide"]
    assert [ax.get_title() for ax in panels] == ["label", "prediction"]
    offsets = panels[0].collections[0].get_offsets()
    assert len(offsets) == len(view.cells)
    assert fig.axes[-1].get_ylabel() == "in-plane angle ψ (°)"
    paths = export.save_figure(fig, tmp_path / "figures" / "c2_pose.png", dpi=60)
    plt.close(fig)
    assert [p.name for p in paths] == ["c2_pose.png", "c2_pose.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(
        p.name for p in paths
    )  # no temporary files left


def test_export_html_holds_the_figure(tmp_path):
    rotation = rotations.random_rotations(1, seed=5)[0]
    fig = so3_plotly.plot_pose_scatter(
        so3_views.sphere_view(_peaked(LEVEL, rotation), LEVEL, rotation), title="html check"
    )
    path = export.export_html(fig, tmp_path / "out" / "scatter.html", div_id="pose-scatter")
    text = path.read_text()
    assert "<html>" in text[:50] and text.rstrip().endswith("</html>")
    assert 'id="pose-scatter"' in text and "Plotly.newPlot" in text
    assert '"name":"grid rotations"' in text and "html check" in text
    assert "plotly.js v" in text  # plotly.js embedded: opens offline
    assert [p.name for p in path.parent.iterdir()] == ["scatter.html"]


def test_export_png_says_what_is_missing(tmp_path, monkeypatch):
    fig = go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))
    with monkeypatch.context() as patch:
        patch.setattr(export, "_kaleido_version", lambda: None)
        with pytest.raises(RuntimeError, match=r"kaleido .*pip install kaleido"):
            export.export_png(fig, tmp_path / "a.png")
    with monkeypatch.context() as patch:
        patch.setattr(export, "_kaleido_version", lambda: "1.5.0")
        patch.setattr(export, "_find_chromium", lambda: None)
        with pytest.raises(RuntimeError, match=r"Chromium .*apt install chromium"):
            export.export_png(fig, tmp_path / "a.png")
    assert not list(tmp_path.iterdir())
    problem = export.png_export_problem()
    if problem is not None:  # no kaleido or no Chromium here: the clear error, nothing written
        with pytest.raises(RuntimeError, match=re.escape(problem)):
            export.export_png(fig, tmp_path / "a.png")
        assert list(tmp_path.iterdir()) == []
        return
    path = export.export_png(fig, tmp_path / "a.png", width=160, height=120, scale=1)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


# --------------------------------------------------------------------------------------------
# widget
# --------------------------------------------------------------------------------------------
def _figure_json(box) -> dict:
    output = box.children[1]
    assert len(output.outputs) == 1
    return output.outputs[0]["data"]["application/vnd.plotly.v1+json"]


def test_sphere_explorer_builds_headless_and_reacts():
    n_cells = grids.healpix_so3_grid_size(LEVEL)
    rng = np.random.default_rng(0)
    c1_rot = rotations.random_rotations(3, seed=0)
    c2_ops = point_groups.point_group("C2")
    c2_rot = rotations.random_rotations(2, seed=1)
    structures = {
        "1UBI": so3_views.DistributionSet(
            images=rng.random((3, 8, 8)),
            rotations=c1_rot,
            symmetry_ops=np.eye(3)[None],
            level=LEVEL,
            label_probs=np.stack([_peaked(LEVEL, r) for r in c1_rot]),
            predicted_probs=rng.random((3, n_cells)),
            point_group="C1",
        ),
        "1HVR": so3_views.DistributionSet(
            images=rng.random((2, 8, 8)),
            rotations=c2_rot,
            symmetry_ops=c2_ops,
            level=LEVEL,
            label_probs=np.stack([_peaked(LEVEL, r, c2_ops) for r in c2_rot]),
            point_group="C2",
        ),
    }
    box = widgets.sphere_explorer(structures, image_index=2)
    menu, slider, toggle = box.children[0].children
    assert (menu.value, slider.value, slider.max, toggle.value) == ("1UBI", 2, 2, "scatter")
    figure = _figure_json(box)
    assert figure["layout"]["title"]["text"] == "1UBI (C1), image 2"
    assert {t.get("scene") for t in figure["data"] if t["type"] == "scatter3d"} == {
        "scene",
        "scene2",
    }
    slider.value = 0
    assert _figure_json(box)["layout"]["title"]["text"] == "1UBI (C1), image 0"
    toggle.value = "surface"
    assert "surface" in {t["type"] for t in _figure_json(box)["data"]}
    slider.value = 2
    menu.value = "1HVR"  # two images, no predictions: the slider is clamped, one scene
    assert (slider.max, slider.value) == (1, 1)
    figure = _figure_json(box)
    assert figure["layout"]["title"]["text"] == "1HVR (C2), image 1"
    assert {t.get("scene") for t in figure["data"] if t["type"] == "surface"} == {"scene"}
    assert [t["name"] for t in figure["data"] if t["name"] == "symmetry mate"] == ["symmetry mate"]
    with pytest.raises(ValueError, match="empty"):
        widgets.sphere_explorer({})
