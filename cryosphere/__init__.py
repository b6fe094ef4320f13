"""CryoSphere: probability distributions over SO(3) for cryo-EM particle images.

Pose convention (the one used everywhere in this package): a pose ``R`` is a 3x3 rotation
matrix that maps particle (volume) coordinates to microscope coordinates,
``x_mic = R @ x_vol``, with vectors ordered (x, y, z). The image of pose ``R`` is the line
integral of the rotated volume along the microscope z axis; image rows run along microscope y
and columns along microscope x. Volumes are indexed ``[z, y, x]`` with the rotation centre at
voxel ``N // 2`` along each axis, images ``[y, x]`` with the centre at pixel ``N // 2``.
See :mod:`cryosphere.so3` for conversions to e3nn and RELION angles.
"""

__version__ = "0.1.0"
