"""Interactive notebook widgets (ipywidgets) around the plotting functions of :mod:`.viz` and
:mod:`.so3_plotly`.

The widgets only wire sliders to library functions; the computations live in
:mod:`cryosphere.poses.labels.dataset_labels` and :mod:`cryosphere.figures.so3_views`, the figures in
:mod:`cryosphere.figures.viz` and :mod:`cryosphere.figures.so3_plotly`. Building a widget needs
ipywidgets but no running front end, so notebooks executed headless (CI, papermill) still run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from cryosphere.figures import export, so3_plotly, so3_views, viz
from cryosphere.poses.labels import explorer
from cryosphere.poses.labels.dataset_labels import PoseLabels

__all__ = ["label_explorer", "sphere_explorer"]


def label_explorer(
    labels: PoseLabels,
    rotations: np.ndarray,
    symmetry_ops: np.ndarray | None = None,
    image_index: int = 0,
    lam_range: tuple[float, float] | None = None,
):
    """Sliders for λ (log scale), q and the image index over :func:`viz.plot_label_explorer`.

    Args:
        labels: :class:`cryosphere.poses.labels.dataset_labels.PoseLabels` (its MSE landscape is reused; moving a
            slider recomputes only the chosen image's soft map and mask).
        rotations: ``(n, 3, 3)`` true poses of the labelled images.
        symmetry_ops: ``(K, 3, 3)`` point-group ops (None: no symmetry).
        image_index: initial image.
        lam_range: λ slider range (default: labels.lam / 100 to labels.lam * 100).

    Returns:
        An ``ipywidgets.VBox``: sliders above an ``ipywidgets.Image`` holding the figure as PNG
        (rendered here, so no display messages are sent: headless execution never waits on it).
    """
    import io

    import ipywidgets
    import matplotlib.pyplot as plt

    if len(labels) != len(rotations):
        raise ValueError(
            f"labels cover {len(labels)} images but {len(rotations)} rotations were given"
        )
    lo, hi = lam_range or (labels.lam / 100.0, labels.lam * 100.0)
    if not 0 < lo < hi:
        raise ValueError(f"lam_range must satisfy 0 < low < high, got {(lo, hi)}")
    lam_slider = ipywidgets.FloatLogSlider(
        value=labels.lam,
        base=10,
        min=math.log10(lo),
        max=math.log10(hi),
        step=0.05,
        description="λ",
        continuous_update=False,
    )
    q_slider = ipywidgets.FloatSlider(
        value=labels.q,
        min=0.005,
        max=0.5,
        step=0.005,
        description="q",
        readout_format=".3f",
        continuous_update=False,
    )
    index_slider = ipywidgets.IntSlider(
        value=int(image_index),
        min=0,
        max=len(labels) - 1,
        description="image",
        continuous_update=False,
    )
    image = ipywidgets.Image(format="png")

    def redraw(_change=None) -> None:
        i = index_slider.value
        data = explorer.label_explorer_data(
            labels.mse[i],
            labels.level,
            rotations[i],
            symmetry_ops,
            lam_slider.value,
            q_slider.value,
            labels.radius_deg,
        )
        fig = viz.plot_label_explorer(**data.plot_arguments(), title=f"image {i}")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=80)
        plt.close(fig)
        image.value = buffer.getvalue()

    for slider in (lam_slider, q_slider, index_slider):
        slider.observe(redraw, names="value")
    redraw()
    return ipywidgets.VBox([ipywidgets.HBox([lam_slider, q_slider, index_slider]), image])


def sphere_explorer(
    structures: Mapping[str, so3_views.DistributionSet],
    image_index: int = 0,
    kind: str = "scatter",
):
    """Pick a structure, an image and a view; shows :func:`so3_plotly.plot_label_vs_prediction`.

    Args:
        structures: name (e.g. ``"1UBI (C1)"``) -> :class:`cryosphere.figures.so3_views.DistributionSet`
            with the images, true poses, symmetry ops, label and predicted distributions.
        image_index: initial image (clamped to each structure's image count).
        kind: initial view, ``"scatter"`` (Image2Sphere-style) or ``"surface"`` (viewing-
            direction density).

    Returns:
        An ``ipywidgets.VBox``: a structure dropdown, an image slider and a view toggle above an
        ``ipywidgets.Output`` whose single output is the figure's plotly MIME bundle (set
        directly, so no display messages are sent: headless execution never waits on it).
    """
    import ipywidgets

    if not structures:
        raise ValueError("structures is empty; give at least one name -> DistributionSet")
    if kind not in ("scatter", "surface"):
        raise ValueError(f"kind must be 'scatter' or 'surface', got {kind!r}")
    names = list(structures)
    first = structures[names[0]]
    structure_menu = ipywidgets.Dropdown(options=names, value=names[0], description="structure")
    index_slider = ipywidgets.IntSlider(
        value=min(max(int(image_index), 0), len(first) - 1),
        min=0,
        max=len(first) - 1,
        description="image",
        continuous_update=False,
    )
    kind_toggle = ipywidgets.ToggleButtons(
        options=["scatter", "surface"], value=kind, description="view"
    )
    output = ipywidgets.Output()

    def redraw(_change=None) -> None:
        data = structures[structure_menu.value]
        i = index_slider.value
        rotation = data.rotations[i]
        label_view = so3_views.sphere_view(
            data.label_probs[i], data.level, rotation, data.symmetry_ops
        )
        prediction_view = None
        if data.predicted_probs is not None:
            prediction_view = so3_views.sphere_view(
                data.predicted_probs[i], data.level, rotation, data.symmetry_ops
            )
        group = f" ({data.point_group})" if data.point_group else ""
        fig = so3_plotly.plot_label_vs_prediction(
            data.images[i],
            label_view,
            prediction_view,
            kind=kind_toggle.value,
            title=f"{structure_menu.value}{group}, image {i}",
        )
        bundle = export.plotly_mimebundle(fig)
        output.outputs = ({"output_type": "display_data", "data": bundle, "metadata": {}},)

    def change_structure(_change=None) -> None:
        index_slider.unobserve(redraw, names="value")
        index_slider.max = len(structures[structure_menu.value]) - 1  # clamps the value
        index_slider.observe(redraw, names="value")
        redraw()

    structure_menu.observe(change_structure, names="value")
    index_slider.observe(redraw, names="value")
    kind_toggle.observe(redraw, names="value")
    redraw()
    return ipywidgets.VBox([ipywidgets.HBox([structure_menu, index_slider, kind_toggle]), output])
