"""Rotations, angle conventions, HEALPix SO(3) grids and point-group symmetry.

One namespace for three modules, each of which states its conventions:

* :mod:`~cryosphere.geometry.rotations`: construction, RELION and e3nn Euler angles,
  quaternions, viewing directions, geodesic distance. A pose ``R`` maps volume to microscope
  coordinates, ``x_mic = R @ x_vol``; RELION angles are ZYZ ``(rot, tilt, psi)`` in degrees
  and give exactly RELION's matrix.
* :mod:`~cryosphere.geometry.grids`: the HEALPix SO(3) grid of level ``L`` (``72 * 8**L``
  cells, about ``60 / 2**L`` degrees apart), nearest cells, spacing.
* :mod:`~cryosphere.geometry.point_groups`: point-group operators, symmetry mates ``R @ g``
  and the symmetry-aware distance ``min_g dist(A, B @ g)``.
"""

from __future__ import annotations

from cryosphere.geometry.grids import (
    MAX_HEALPIX_LEVEL,
    grid_nearest_neighbour_spacing_deg,
    healpix_so3_grid,
    healpix_so3_grid_angles,
    healpix_so3_grid_size,
    nearest_grid_indices,
)
from cryosphere.geometry.point_groups import (
    as_symmetry_ops,
    point_group,
    symmetric_geodesic_distance_deg,
    symmetry_mates,
)
from cryosphere.geometry.rotations import (
    e3nn_angles_from_matrices,
    geodesic_distance_deg,
    matrices_from_e3nn_angles,
    matrices_from_relion_euler,
    matrices_to_quaternions,
    quaternions_to_matrices,
    random_rotations,
    relion_euler_from_matrices,
    rotation_about_axis,
    rotation_about_z,
    viewing_directions,
)

__all__ = [
    "random_rotations",
    "rotation_about_axis",
    "rotation_about_z",
    "matrices_from_relion_euler",
    "relion_euler_from_matrices",
    "matrices_from_e3nn_angles",
    "e3nn_angles_from_matrices",
    "matrices_to_quaternions",
    "quaternions_to_matrices",
    "viewing_directions",
    "healpix_so3_grid_size",
    "healpix_so3_grid",
    "healpix_so3_grid_angles",
    "geodesic_distance_deg",
    "nearest_grid_indices",
    "point_group",
    "symmetry_mates",
    "symmetric_geodesic_distance_deg",
    "as_symmetry_ops",
    "grid_nearest_neighbour_spacing_deg",
    "MAX_HEALPIX_LEVEL",
]
