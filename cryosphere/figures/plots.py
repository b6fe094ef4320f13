"""Figures of the evaluation (matplotlib): equivariance MSE, pose errors, accuracy curves, and
accuracy and equivariance against the number of training images (:func:`plot_sweep`).

Every function takes arrays or the records of :mod:`cryosphere.poses.evaluation.metrics` and returns a
:class:`matplotlib.figure.Figure`; nothing is computed here beyond what is drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cryosphere.figures.gallery import draw_image
from cryosphere.figures.mollweide import mollweide_panel
from cryosphere.poses.evaluation.metrics import accuracy_curve

__all__ = [
    "plot_equivariance_distribution",
    "plot_equivariance_example",
    "plot_error_histograms",
    "plot_accuracy_curves",
    "plot_accuracy_vs_snr",
    "plot_sweep",
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
        image_R, image_QR: ``(N, N)`` images ``[y, x]``, drawn with row 0 at the top
            (:func:`cryosphere.figures.gallery.draw_image`).
        marginal_QR, marginal_translated: ``(P,)`` marginals on the HEALPix pixels.
        pixel_directions: ``(P, 3)`` unit vectors of the pixel centres.
        mse: the pair's equivariance MSE, shown in the title.
    """
    fig = plt.figure(figsize=(13, 3.4))
    for k, (image, title) in enumerate(((image_R, "I(R)"), (image_QR, "I(Q R)"))):
        ax = fig.add_subplot(1, 4, k + 1)
        draw_image(ax, image)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    panels = ((marginal_QR, "p(S | I(Q R))"), (marginal_translated, "p(Qᵀ S | I(R))"))
    for k, (values, title) in enumerate(panels):
        ax = fig.add_subplot(1, 4, k + 3, projection="mollweide")
        mollweide_panel(ax, pixel_directions, values, title=title)
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
    :func:`cryosphere.runs.snr_study.snr_study`."""
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


def _sweep_series(
    records: list[Mapping[str, Any]], column: str, spread: str
) -> tuple[np.ndarray, np.ndarray]:
    mean = np.array([float(r[f"{column}_mean"]) for r in records])
    if spread == "std":
        std = np.nan_to_num(np.array([float(r[f"{column}_std"]) for r in records]))
        return mean, np.vstack([std, std])
    low = mean - np.array([float(r[f"{column}_min"]) for r in records])
    high = np.array([float(r[f"{column}_max"]) for r in records]) - mean
    return mean, np.vstack([low, high])


def plot_sweep(summary: Sequence[Mapping[str, Any]] | pd.DataFrame, spread: str = "std") -> Figure:
    """Validation and training median error, and equivariance MSE, against the image count.

    Args:
        summary: the per-``n`` records of :func:`cryosphere.runs.sweep.summarize_sweep` (or a
            DataFrame of them).
        spread: error bars, ``"std"`` (± the standard deviation across seeds; none for a single
            seed) or ``"range"`` (min to max across seeds).

    Returns:
        A figure with two panels: median geodesic error (degrees) of the validation and the
        training split; mean equivariance MSE (log scale) out of plane and in plane, trained
        network (solid) and untrained network (dashed). The x axis is ``n`` on a log scale.
    """
    if spread not in ("std", "range"):
        raise ValueError(f"spread must be 'std' or 'range', got {spread!r}")
    records = summary.to_dict("records") if isinstance(summary, pd.DataFrame) else list(summary)
    if not records:
        raise ValueError("summary is empty; nothing to plot")
    records = sorted(records, key=lambda r: r["n"])
    n = np.array([float(r["n"]) for r in records])
    fig, (ax_err, ax_eq) = plt.subplots(1, 2, figsize=(10.5, 3.8))
    for column, label, colour in (
        ("val_median_deg", "validation", "C0"),
        ("train_median_deg", "training", "C1"),
    ):
        mean, err = _sweep_series(records, column, spread)
        ax_err.errorbar(n, mean, yerr=err, marker="o", capsize=3, color=colour, label=label)
    ax_err.set(
        xlabel="images n (training + validation)", ylabel="median error (deg)", title="pose error"
    )
    ax_err.set_ylim(bottom=0)
    for kind, colour in (("out_of_plane", "C2"), ("in_plane", "C3")):
        for predictor, style in (("model", "-"), ("random", "--")):
            mean, err = _sweep_series(records, f"eq_{kind}_{predictor}", spread)
            ax_eq.errorbar(
                n,
                mean,
                yerr=err,
                marker="o" if predictor == "model" else "s",
                linestyle=style,
                capsize=3,
                color=colour,
                label=f"{kind.replace('_', '-')}, {'trained' if predictor == 'model' else 'untrained'}",
            )
    ax_eq.set_yscale("log")
    ax_eq.set(xlabel="images n (training + validation)", ylabel="MSE", title="equivariance MSE")
    for ax in (ax_err, ax_eq):
        ax.set_xscale("log")
        ax.set_xticks(n, [f"{int(v)}" for v in n])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    seeds = max(int(r.get("n_seeds", 1)) for r in records)
    bars = "± std across seeds" if spread == "std" else "min–max across seeds"
    if seeds < 2:
        bars += ", none with one seed"
    fig.suptitle(f"number of training images (error bars: {bars})", fontsize=10)
    fig.tight_layout()
    return fig
