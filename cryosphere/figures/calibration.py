"""Reliability figures (matplotlib) of pose distributions: confidence against hit rate.

Inputs are arrays (or the :class:`cryosphere.poses.evaluation.calibration.ReliabilityDiagram` records made
from them); nothing is computed here beyond what is drawn.
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from cryosphere.poses.evaluation.calibration import ReliabilityDiagram

__all__ = ["plot_reliability"]


def plot_reliability(
    diagrams: Mapping[str, ReliabilityDiagram], show_counts: bool = True
) -> Figure:
    """Reliability diagram: per confidence bin, the hit rate (y) against the mean top-cell
    confidence (x), one line per named source, with the diagonal of perfect calibration and
    each source's ECE in its label. With ``show_counts``, a lower panel gives the fraction of
    particles per bin (where the diagram has weight).

    Args:
        diagrams: ``{name: ReliabilityDiagram}`` (e.g. ``{"network": ..., "search": ...}``).
    """
    if not diagrams:
        raise ValueError("diagrams is empty; pass at least one {name: ReliabilityDiagram}")
    rows = 2 if show_counts else 1
    fig, axes = plt.subplots(
        rows,
        1,
        figsize=(4.6, 5.6 if show_counts else 4.2),
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 1][:rows]},
        constrained_layout=True,
    )
    ax = axes[0, 0]
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="calibrated")
    for name, diagram in diagrams.items():
        used = np.asarray(diagram.counts) > 0
        ax.plot(
            np.asarray(diagram.confidence)[used],
            np.asarray(diagram.hit_rate)[used],
            "o-",
            ms=4,
            label=f"{name} (ECE {diagram.ece:.3f})",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("hit rate (top cell = truth's cell)")
    ax.legend(fontsize=8, loc="upper left")
    if show_counts:
        bottom = axes[1, 0]
        width = 1.0 / len(diagrams)
        for i, (name, diagram) in enumerate(diagrams.items()):
            edges = np.asarray(diagram.edges)
            counts = np.asarray(diagram.counts, dtype=float)
            step = np.diff(edges)
            bottom.bar(
                edges[:-1] + step * width * i,
                counts / max(counts.sum(), 1.0),
                width=step * width,
                align="edge",
                label=name,
            )
        bottom.set_ylabel("fraction")
    axes[-1, 0].set_xlabel("top-cell confidence")
    return fig
