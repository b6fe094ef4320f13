"""What the label explorer shows for one image: its MSE landscape, the soft map's and the
mask's viewing-direction marginals and their mass near the true pose
(:func:`cryosphere.figures.viz.plot_label_explorer` draws it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cryosphere import _checks
from cryosphere._checks import check_label_level, check_mse
from cryosphere.geometry import distributions, grids, point_groups, rotations
from cryosphere.poses.labels.soft_maps import soft_labels, top_fraction_mask

__all__ = ["LabelExplorerData", "label_explorer_data"]


@dataclass(frozen=True)
class LabelExplorerData:
    """What the label explorer shows for one image (arrays named as
    :func:`cryosphere.figures.viz.plot_label_explorer`'s arguments; see :meth:`plot_arguments`).

    Attributes:
        mse: ``(G,)`` the image's MSE landscape.
        threshold: largest MSE inside the mask.
        soft_marginal, mask_marginal: ``(P,)`` viewing-direction marginals (masses summing 1)
            of the normalised soft map and of the mask (uniform over its cells).
        pixel_directions: ``(P, 3)`` HEALPix pixel centres.
        true_directions: ``(K, 3)`` viewing directions of the true pose (row 0) and its mates.
        soft_mass_within, mask_mass_within: share of mass within ``radius_deg`` of a mate.
        lam, q, radius_deg, level: parameters.
    """

    mse: np.ndarray
    threshold: float
    soft_marginal: np.ndarray
    mask_marginal: np.ndarray
    pixel_directions: np.ndarray
    true_directions: np.ndarray
    soft_mass_within: float
    mask_mass_within: float
    lam: float
    q: float
    radius_deg: float
    level: int

    def plot_arguments(self) -> dict[str, Any]:
        """Keyword arguments for :func:`cryosphere.figures.viz.plot_label_explorer`."""
        return {
            "mse": self.mse,
            "threshold": self.threshold,
            "soft_marginal": self.soft_marginal,
            "mask_marginal": self.mask_marginal,
            "pixel_directions": self.pixel_directions,
            "true_directions": self.true_directions,
            "soft_mass_within": self.soft_mass_within,
            "mask_mass_within": self.mask_mass_within,
            "lam": self.lam,
            "q": self.q,
            "radius_deg": self.radius_deg,
        }


def label_explorer_data(
    mse_row: np.ndarray,
    level: int,
    true_rotation: np.ndarray,
    symmetry_ops: np.ndarray | None,
    lam: float,
    q: float,
    radius_deg: float = 15.0,
) -> LabelExplorerData:
    """Gather the explorer's data for one image.

    Args:
        mse_row: ``(G,)`` MSE of the image against the level-``level`` templates.
        level: grid level.
        true_rotation: ``(3, 3)`` true pose.
        symmetry_ops: ``(K, 3, 3)`` or None.
        lam: λ for the soft map; q: mask fraction; radius_deg: ball radius for the shares.
    """
    level = check_label_level(level)
    row = check_mse(np.asarray(mse_row)[None])
    soft = soft_labels(row, lam)
    mask = top_fraction_mask(row, q)
    grid = grids.healpix_so3_grid(level)
    if row.shape[1] != grid.shape[0]:
        raise ValueError(
            f"mse_row has {row.shape[1]} cells; the level-{level} grid has {len(grid)}"
        )
    rotation = np.asarray(true_rotation, dtype=np.float64).reshape(1, 3, 3)
    ops = _checks.as_symmetry_ops(symmetry_ops)
    mates = point_groups.symmetry_mates(rotation[0], ops)
    shares = distributions.mass_within_deg(
        np.concatenate([soft, mask.astype(np.float64)]),
        grid,
        np.repeat(rotation, 2, axis=0),
        ops,
        radius_deg,
    )
    return LabelExplorerData(
        mse=row[0].astype(np.float32),
        threshold=float(row[0][mask[0]].max()),
        soft_marginal=distributions.viewing_direction_marginal(soft[0], level),
        mask_marginal=distributions.viewing_direction_marginal(mask[0].astype(np.float64), level),
        pixel_directions=distributions.healpix_pixel_directions(level),
        true_directions=rotations.viewing_directions(mates),
        soft_mass_within=float(shares[0]),
        mask_mass_within=float(shares[1]),
        lam=float(lam),
        q=float(q),
        radius_deg=float(radius_deg),
        level=level,
    )
