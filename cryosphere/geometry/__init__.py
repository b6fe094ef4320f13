"""Geometry of poses: rotations and conversions (:mod:`.rotations`), HEALPix SO(3) grids
(:mod:`.grids`), point groups (:mod:`.point_groups`), distributions on the grid
(:mod:`.distributions`)."""
