"""Rotations, angle conventions, HEALPix SO(3) grids and point-group symmetry.

One namespace for three modules: :mod:`~cryosphere.geometry.rotations` (construction,
conversions, distance), :mod:`~cryosphere.geometry.grids` (HEALPix SO(3) grids) and
:mod:`~cryosphere.geometry.point_groups` (symmetry).

Conventions (fixed project-wide)
--------------------------------
* **Pose.** A pose ``R`` is a 3x3 rotation matrix that maps particle (volume) coordinates to
  microscope coordinates, ``x_mic = R @ x_vol``, vectors ordered (x, y, z). The image of pose
  ``R`` is the line integral of the rotated volume along microscope z. Rotations are float64
  numpy arrays of shape ``(..., 3, 3)``.
* **Viewing direction.** The unit vector in volume coordinates that ``R`` maps to ``+z_mic``,
  i.e. ``R.T @ e_z = R[..., 2, :]`` (:func:`viewing_directions`).
* **RELION Euler angles** ``(rot, tilt, psi)`` in degrees, ZYZ (Heymann et al. 2005). The
  matrix is exactly RELION's ``Euler_angles2matrix`` (which maps reference coordinates to
  image coordinates, i.e. it *is* the pose):

  .. code-block:: text

      A = [[ cp ct cr - sp sr,   cp ct sr + sp cr,  -cp st],
           [-sp ct cr - cp sr,  -sp ct sr + cp cr,   sp st],
           [ st cr,              st sr,              ct   ]]

  with ``c/s`` = cos/sin and ``r, t, p`` = rot, tilt, psi. In terms of the active,
  right-handed elementary rotations ``Rz(a) = [[c,-s,0],[s,c,0],[0,0,1]]`` and
  ``Ry(a) = [[c,0,s],[0,1,0],[-s,0,c]]`` this is ``A = Rz(-psi) @ Ry(-tilt) @ Rz(-rot)``
  (RELION composes *passive* rotations). Note that ``Rz(psi) @ Ry(tilt) @ Rz(rot)`` would give
  the bottom row ``(-st cr, st sr, ct)``, which is **not** RELION's; we follow RELION. The
  viewing direction ``A[2, :] = (cos rot sin tilt, sin rot sin tilt, cos tilt)`` has polar
  angle ``tilt`` and azimuth ``rot``.
  Returned angles: ``rot, psi`` in (-180, 180], ``tilt`` in [0, 180]. At gimbal lock
  (``sin tilt < 1e-9``) we return ``psi = 0`` and put the whole in-plane angle in ``rot``.
* **e3nn angles** (radians): ``e3nn.o3.angles_to_matrix(alpha, beta, gamma) =
  Ry(alpha) @ Rx(beta) @ Ry(gamma)`` acting on xyz vectors. We call e3nn itself (torch,
  float64) and return numpy float64.
* **Quaternions** ``(w, x, y, z)``, unit norm, canonicalised to ``w >= 0``.
* **Symmetry.** For a volume with point group ``G`` (ops ``g`` in volume coordinates,
  ``V(g x) = V(x)``) the poses ``R`` and ``R @ g`` give identical images, so the symmetry mates
  of ``R`` are ``R @ g`` and the symmetry-aware distance is ``min_g dist(A, B @ g)``.
* **HEALPix SO(3) grid** of level ``L``: ``nside = 2**L``; viewing directions are the HEALPix
  pixel centres ``(theta, phi) = healpy.pix2ang(nside, p, nest=True)``, in-plane angles
  ``psi_j = 360 j / (6 nside)`` degrees; cell ``p * 6 nside + j`` is the RELION matrix with
  ``rot = phi, tilt = theta, psi = psi_j`` (so its viewing direction is the pixel centre).
  Size ``72 * 8**L``; neighbouring cells are about ``60 / 2**L`` degrees apart.
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
