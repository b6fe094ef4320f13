"""Figures of reconstruction quality (matplotlib): FSC curves and resolution against the number
of images. Inputs are the records of :mod:`cryosphere.reconstruction.fsc` and
:mod:`cryosphere.reconstruction.experiments`; nothing is computed here beyond what is drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from cryosphere.reconstruction.experiments import ResolutionSweep
from cryosphere.reconstruction.fsc import FSCCurve

__all__ = ["plot_fsc_curves", "plot_resolution_vs_count"]


def plot_fsc_curves(
    curves: Mapping[str, FSCCurve], thresholds: Sequence[float] = (0.5, 0.143)
) -> Figure:
    """FSC against spatial frequency (1/Å) for named curves, with threshold lines."""
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for name, curve in curves.items():
        label = f"{name} ({curve.resolution(0.143):.1f} Å @0.143)"
        ax.plot(curve.frequency_inv_angstrom, curve.fsc, label=label)
    for t in thresholds:
        ax.axhline(t, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.02)
    ax.legend(fontsize=8)
    return fig


def plot_resolution_vs_count(sweeps: Mapping[str, ResolutionSweep]) -> Figure:
    """Resolution (Å, at each sweep's threshold) against the number of images (log x)."""
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for name, sweep in sweeps.items():
        ax.plot(sweep.counts, sweep.resolution_angstrom, "o-", label=name)
    thresholds = {sweep.threshold for sweep in sweeps.values()}
    ax.set_xscale("log")
    ax.set_xlabel("number of images")
    ax.set_ylabel(f"resolution (Å, FSC = {', '.join(str(t) for t in sorted(thresholds))})")
    ax.legend(fontsize=8)
    return fig
