"""Figures of the evaluation (matplotlib): equivariance MSE, pose errors, accuracy curves.

Every function takes arrays or the records of :mod:`cryosphere.poses.evaluate` and returns a
:class:`matplotlib.figure.Figure`; nothing is computed here beyond what is drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from cryosphere.figures.viz import _sphere_panel  # the Mollweide panel the label figures use
from cryosphere.poses.evaluate import accuracy_curve

__all__ = [
    "plot_equivariance_distribution",
    "plot_equivariance_example",
    "plot_error_histograms",
    "plot_accuracy_curves",
    "plot_accuracy_vs_snr",
]


def plot_equivariance_distribution(mse: Mapping[str, Mapping[str, np.ndarray]]) -> Figure:
    """Per-pair equivariance MSE, one box per predictor, one panel per rotation kind.

    Args:
        mse: ``{predictor: {kind: (n_pairs,) MSE}}`` (:attr:`EquivarianceResult.mse`).
    """
    kinds = sorted({kind for values in mse.values() for kind in values})
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        names = [name for name in mse if kind in mse[name]]
        data = [np.maximum(np.asarray(mse[name][kind]), 1e-16) for name in names]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), names)
        ax.set_yscale("log")
        ax.set(title=f"{kind.replace('_', '-')} rotations", ylabel="MSE over grid cells")
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_equivariance_example(
    image_R: np.ndarray,
    image_QR: np.ndarray,
    marginal_QR: np.ndarray,
    marginal_translated: np.ndarray,
    pixel_directions: np.ndarray,
    mse: float | None = None,
) -> Figure:
    """One test pair side by side: the images of ``R`` and ``Q R`` and the viewing-direction
    marginals of ``p(· | I(Q R))`` and of the left-translated ``p(Qᵀ · | I(R))`` (Mollweide).

    Args:
        image_R, image_QR: ``(N, N)`` images ``[y, x]``.
        marginal_QR, marginal_translated: ``(P,)`` marginals on the HEALPix pixels.
        pixel_directions: ``(P, 3)`` unit vectors of the pixel centres.
        mse: the pair's equivariance MSE, shown in the title.
    """
    fig = plt.figure(figsize=(13, 3.4))
    for k, (image, title) in enumerate(((image_R, "I(R)"), (image_QR, "I(Q R)"))):
        ax = fig.add_subplot(1, 4, k + 1)
        ax.imshow(image, cmap="gray", origin="lower")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    panels = ((marginal_QR, "p(S | I(Q R))"), (marginal_translated, "p(Qᵀ S | I(R))"))
    for k, (values, title) in enumerate(panels):
        ax = fig.add_subplot(1, 4, k + 3, projection="mollweide")
        _sphere_panel(ax, pixel_directions, values, None, title)
    if mse is not None:
        fig.suptitle(f"equivariance MSE of this pair: {mse:.2e}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_error_histograms(errors_deg: Mapping[str, np.ndarray], bins: int = 36) -> Figure:
    """Histograms of geodesic errors (degrees, 0–180) per estimator."""
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    edges = np.linspace(0.0, 180.0, bins + 1)
    for name, errors in errors_deg.items():
        ax.hist(np.asarray(errors), bins=edges, histtype="step", linewidth=1.8, label=name)
    ax.set(xlabel="geodesic error (deg)", ylabel="images", title="pose errors", xlim=(0, 180))
    ax.legend()
    fig.tight_layout()
    return fig


def plot_accuracy_curves(
    errors_deg: Mapping[str, np.ndarray], thresholds_deg: np.ndarray | None = None
) -> Figure:
    """Fraction of images with error below a threshold, against the threshold (degrees)."""
    thresholds = np.linspace(0.0, 180.0, 181) if thresholds_deg is None else thresholds_deg
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, errors in errors_deg.items():
        ax.plot(thresholds, accuracy_curve(errors, thresholds), label=name)
    for t in (15, 30):
        ax.axvline(t, color="gray", linestyle=":", linewidth=1)
    ax.set(xlabel="threshold (deg)", ylabel="accuracy", title="accuracy vs threshold")
    ax.set_ylim(0, 1.02)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_accuracy_vs_snr(
    rows: Sequence[Mapping[str, Any]],
    estimators: Sequence[str] = ("model", "template_matching", "uniform"),
) -> Figure:
    """Median error and acc@15° against SNR (log axis) per estimator, from the rows of
    :func:`cryosphere.poses.evaluate.accuracy_vs_snr`."""
    snr = np.array([row["snr"] for row in rows], dtype=float)
    order = np.argsort(snr)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in estimators:
        median = np.array([rows[i][name]["median_deg"] for i in order])
        acc = np.array([rows[i][name]["acc15"] for i in order])
        axes[0].plot(snr[order], median, marker="o", label=name)
        axes[1].plot(snr[order], acc, marker="o", label=name)
    axes[0].set(xscale="log", xlabel="SNR", ylabel="median error (deg)", title="median error")
    axes[1].set(xscale="log", xlabel="SNR", ylabel="acc@15°", title="accuracy at 15°")
    axes[1].set_ylim(0, 1.02)
    axes[0].legend()
    fig.tight_layout()
    return fig
