"""CryoSphere: probability distributions over SO(3) for cryo-EM particle images.

Pose convention (the one used everywhere in this package): a pose ``R`` is a 3x3 rotation
matrix that maps particle (volume) coordinates to microscope coordinates,
``x_mic = R @ x_vol``, with vectors ordered (x, y, z). The image of pose ``R`` is the line
integral of the rotated volume along the microscope z axis; image rows run along microscope y
and columns along microscope x. Volumes are indexed ``[z, y, x]`` with the rotation centre at
voxel ``N // 2`` along each axis, images ``[y, x]`` with the centre at pixel ``N // 2``.
See :mod:`cryosphere.geometry.rotations` for conversions to e3nn and RELION angles.

Layout, by stage (data flow one way): :mod:`cryosphere.geometry` → :mod:`cryosphere.imaging` →
:mod:`cryosphere.poses` → :mod:`cryosphere.reconstruction`; :mod:`cryosphere.figures` draws,
:mod:`cryosphere.runs` runs the notebook series; :mod:`cryosphere.io` writes files atomically.
"""

__version__ = "0.3.0"
