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

from cryosphere.geometry import grids, point_groups, rotations
from cryosphere.geometry.grids import *  # noqa: F403 (re-exports grids.__all__)
from cryosphere.geometry.point_groups import *  # noqa: F403 (re-exports point_groups.__all__)
from cryosphere.geometry.rotations import *  # noqa: F403 (re-exports rotations.__all__)

#: Every public name of the three modules (each keeps its own ``__all__``).
__all__ = [*rotations.__all__, *grids.__all__, *point_groups.__all__]
