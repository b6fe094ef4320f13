"""Geometry of poses: rotations, conversions, HEALPix SO(3) grids, point groups (:mod:`.so3`) and distributions on the grid (:mod:`.distributions`)."""
