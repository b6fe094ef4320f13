"""Figures of pose distributions on SO(3) and the sphere of viewing directions (matplotlib).

Functions here take arrays and return a :class:`matplotlib.figure.Figure`; they compute nothing
beyond what they draw. Viewing directions are volume-frame unit vectors ``(x, y, z)`` (see
:func:`cryosphere.geometry.rotations.viewing_directions`), drawn on the Mollweide map of
:mod:`cryosphere.figures.mollweide` (longitude ``atan2(y, x)``, latitude ``asin(z)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from cryosphere.figures.mollweide import mark_poses, mollweide_panel

__all__ = ["plot_label_explorer", "plot_viewing_marginals"]


def plot_label_explorer(
    mse: np.ndarray,
    threshold: float,
    soft_marginal: np.ndarray,
    mask_marginal: np.ndarray,
    pixel_directions: np.ndarray,
    true_directions: np.ndarray | None = None,
    soft_mass_within: float | None = None,
    mask_mass_within: float | None = None,
    lam: float | None = None,
    q: float | None = None,
    radius_deg: float = 15.0,
    title: str | None = None,
) -> Figure:
    """One image's labels: MSE histogram with the mask threshold, and the viewing-direction
    marginals of the soft map and of the mask on the sphere.

    Args:
        mse: ``(G,)`` the image's MSE against every grid template.
        threshold: largest MSE inside the mask (vertical line).
        soft_marginal, mask_marginal: ``(P,)`` masses per HEALPix pixel.
        pixel_directions: ``(P, 3)`` pixel centres.
        true_directions: ``(K, 3)`` viewing directions of the true pose (row 0) and its mates.
        soft_mass_within, mask_mass_within: shares of mass within ``radius_deg`` of a true
            pose (shown in the titles).
        lam, q: label parameters (shown in the titles).
        title: figure title.
    """
    mse = np.asarray(mse, dtype=np.float64).ravel()
    fig = plt.figure(figsize=(14, 4.0), constrained_layout=True)
    ax_hist = fig.add_subplot(1, 3, 1)
    ax_hist.hist(mse, bins=60, color="0.55")
    label = "mask threshold" if q is None else f"top {100 * q:g} % threshold"
    ax_hist.axvline(threshold, color="red", lw=1.5, label=label)
    ax_hist.set_yscale("log")
    ax_hist.set_xlabel("MSE to template")
    ax_hist.set_ylabel("grid cells")
    ax_hist.legend(fontsize=8)
    ax_hist.set_title(f"MSE over {mse.size} grid cells", fontsize=10)

    soft_title = "soft map" + ("" if lam is None else f" (λ = {lam:.3g})")
    if soft_mass_within is not None:
        soft_title += f"\n{100 * soft_mass_within:.0f} % of mass within {radius_deg:g}° of truth"
    mask_title = "mask" + ("" if q is None else f" (q = {100 * q:g} %)")
    if mask_mass_within is not None:
        mask_title += f"\n{100 * mask_mass_within:.0f} % of cells within {radius_deg:g}° of truth"
    for position, values, panel_title in (
        (2, soft_marginal, soft_title),
        (3, mask_marginal, mask_title),
    ):
        ax = fig.add_subplot(1, 3, position, projection="mollweide")
        scatter = mollweide_panel(ax, pixel_directions, values, title=panel_title)
        if true_directions is not None:
            mark_poses(ax, true_directions)
        fig.colorbar(
            scatter,
            ax=ax,
            orientation="horizontal",
            shrink=0.7,
            pad=0.04,
            label="mass per viewing direction",
        )
    if true_directions is not None:
        ax.legend(loc="lower right", fontsize=7, markerscale=0.4, bbox_to_anchor=(1.05, -0.05))
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_viewing_marginals(
    marginals: Sequence[np.ndarray],
    pixel_directions: np.ndarray,
    true_directions: Sequence[np.ndarray | None] | None = None,
    titles: Sequence[str] | None = None,
) -> Figure:
    """Viewing-direction marginals side by side (e.g. the soft maps of two structures).

    Args:
        marginals: each ``(P,)`` masses per HEALPix pixel.
        pixel_directions: ``(P, 3)`` pixel centres shared by all panels.
        true_directions: per panel ``(K, 3)`` true pose + mates, or None.
        titles: per panel.
    """
    n = len(marginals)
    fig = plt.figure(figsize=(5.2 * n, 3.4), constrained_layout=True)
    for i, values in enumerate(marginals):
        ax = fig.add_subplot(1, n, i + 1, projection="mollweide")
        truth = None if true_directions is None else true_directions[i]
        title = "" if titles is None else titles[i]
        scatter = mollweide_panel(ax, pixel_directions, values, title=title)
        if truth is not None:
            mark_poses(ax, truth)
        fig.colorbar(scatter, ax=ax, orientation="horizontal", shrink=0.7, pad=0.04)
    return fig
