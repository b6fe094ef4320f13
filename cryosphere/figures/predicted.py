"""Heatmaps of ``cryosphere predict`` output: any particle of a predicted STAR file.

:func:`predicted_particle_view` reads the top-k side file written beside the STAR file
(:func:`cryosphere.poses.prediction.inference.load_topk`) and turns one particle's ``k`` most probable
cells into a :class:`~cryosphere.figures.so3_views.SphereView` (probability on those cells, 0
elsewhere, renormalised); :func:`plot_predicted_particle` draws it as the Image2Sphere-style
scatter (:func:`~cryosphere.figures.so3_plotly.plot_pose_scatter`), titled with the particle's
image name and its rlnMaxValueProbDistribution.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import starfile

from cryosphere.figures.so3_plotly import plot_pose_scatter
from cryosphere.figures.so3_views import SphereView, sphere_view
from cryosphere.poses.prediction.inference import load_topk

__all__ = ["predicted_particle_view", "plot_predicted_particle"]


def predicted_particle_view(
    star_path: str | os.PathLike[str],
    particle: int,
    true_rotation: np.ndarray | None = None,
    symmetry_ops: np.ndarray | None = None,
) -> SphereView:
    """The sphere view of particle ``particle`` (0-based row of the STAR file) of a
    :func:`~cryosphere.poses.prediction.inference.predict_star` output ``star_path``.

    ``true_rotation`` ``(3, 3)`` (e.g. a refinement's pose) and ``symmetry_ops`` ``(K, 3, 3)``
    add the true-pose markers. Raises IndexError for a particle past the end and
    FileNotFoundError without the side file.
    """
    topk = load_topk(star_path)
    return sphere_view(topk.distribution(particle), topk.level, true_rotation, symmetry_ops)


def plot_predicted_particle(
    star_path: str | os.PathLike[str],
    particle: int,
    true_rotation: np.ndarray | None = None,
    symmetry_ops: np.ndarray | None = None,
) -> Any:
    """Plotly scatter of :func:`predicted_particle_view` for one particle."""
    view = predicted_particle_view(star_path, particle, true_rotation, symmetry_ops)
    table = starfile.read(star_path, always_dict=True)
    particles = table.get("particles", next(iter(table.values())))
    row = particles.iloc[int(particle)]
    title = (
        f"particle {particle} ({row['rlnImageName']}): best pose p = "
        f"{float(row['rlnMaxValueProbDistribution']):.3f}"
    )
    return plot_pose_scatter(view, title=title)
