"""Interactive notebook widgets (ipywidgets) around the plotting functions of :mod:`viz`.

The widgets only wire sliders to library functions; the computations live in
:mod:`cryosphere.labels` and the figures in :mod:`cryosphere.viz`. Building a widget needs
ipywidgets but no running front end, so notebooks executed headless (CI, papermill) still run.
"""

from __future__ import annotations

import math

import numpy as np

from cryosphere import labels as labels_module
from cryosphere import viz

__all__ = ["label_explorer"]


def label_explorer(
    labels: labels_module.PoseLabels,
    rotations: np.ndarray,
    symmetry_ops: np.ndarray | None = None,
    image_index: int = 0,
    lam_range: tuple[float, float] | None = None,
):
    """Sliders for λ (log scale), q and the image index over :func:`viz.plot_label_explorer`.

    Args:
        labels: :class:`cryosphere.labels.PoseLabels` (its MSE landscape is reused; moving a
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
        data = labels_module.label_explorer_data(
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
