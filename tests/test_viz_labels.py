"""Label explorer figure and widget build headless."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from cryosphere.figures import viz, widgets
from cryosphere.geometry import distributions, grids, point_groups
from cryosphere.geometry import rotations as geometry_rotations
from cryosphere.poses.labels import dataset_labels, explorer, soft_maps

pass  # RELAYOUT-EMPTY  # noqa: E402


@pytest.fixture(scope="module")
def toy_labels():
    level = 1
    grid = grids.healpix_so3_grid(level)
    rotations = geometry_rotations.random_rotations(3, seed=0)
    mse = (
        geometry_rotations.geodesic_distance_deg(grid[None], rotations[:, None]).astype(np.float32)
        / 90
    )
    soft = soft_maps.soft_labels(mse, 5.0)
    mask = soft_maps.top_fraction_mask(mse, 0.05)
    lab = dataset_labels.PoseLabels(mse=mse, soft=soft, mask=mask, lam=5.0, q=0.05, level=level)
    return lab, rotations


def test_plot_label_explorer(toy_labels):
    lab, rotations = toy_labels
    data = explorer.label_explorer_data(
        lab.mse[0], lab.level, rotations[0], point_groups.point_group("C2"), lab.lam, lab.q, 30.0
    )
    fig = viz.plot_label_explorer(**data.plot_arguments(), title="toy")
    assert isinstance(fig, Figure) and len(fig.axes) == 5  # 3 panels + 2 colour bars
    assert fig.axes[0].get_lines()[0].get_xdata()[0] == pytest.approx(data.threshold)
    assert "λ = 5" in fig.axes[1].get_title()
    plt.close(fig)


def test_plot_viewing_marginals(toy_labels):
    lab, rotations = toy_labels
    marginals = distributions.viewing_direction_marginal(lab.soft[:2], lab.level)
    fig = viz.plot_viewing_marginals(
        list(marginals),
        distributions.healpix_pixel_directions(lab.level),
        [rotations[i][None, 2] for i in range(2)],
        ["a", "b"],
    )
    assert [ax.get_title() for ax in fig.axes[::2]] == ["a", "b"]
    plt.close(fig)


def test_label_explorer_widget_builds_and_reacts(toy_labels):
    lab, rotations = toy_labels
    box = widgets.label_explorer(lab, rotations, image_index=1)
    lam_slider, q_slider, index_slider = box.children[0].children
    image = box.children[1]
    assert lam_slider.value == pytest.approx(5.0) and index_slider.value == 1
    first = image.value
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    q_slider.value = 0.1
    assert image.value != first  # the figure was redrawn
    index_slider.value = 2
    with pytest.raises(ValueError, match="rotations"):
        widgets.label_explorer(lab, rotations[:2])
