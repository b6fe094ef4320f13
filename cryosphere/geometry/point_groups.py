"""Point groups: their rotation operators, symmetry mates and the symmetry-aware distance.

For a volume with point group ``G`` (ops ``g`` in volume coordinates, ``V(g x) = V(x)``) the
poses ``R`` and ``R @ g`` give identical images, so the symmetry mates of ``R`` are ``R @ g``
and the symmetry-aware distance is ``min_g dist(A, B @ g)``.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from cryosphere._checks import as_matrices, check_rotations
from cryosphere.geometry.rotations import (
    geodesic_distance_deg,
    rotation_about_axis,
    rotation_about_z,
)

__all__ = [
    "point_group",
    "symmetry_mates",
    "symmetric_geodesic_distance_deg",
]

_GROUP_HELP = "C1, Cn (n >= 1), Dn (n >= 2), T, O, I (case-insensitive)"


def _closure(generators: list[np.ndarray], expected: int) -> np.ndarray:
    """All products of the generators (BFS), identity first, deduplicated to 1e-6."""
    elems = [np.eye(3)]
    keys = {tuple(np.round(np.eye(3), 6).ravel() + 0.0)}
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for a in frontier:
            for g in generators:
                b = a @ g
                key = tuple(np.round(b, 6).ravel() + 0.0)
                if key not in keys:
                    keys.add(key)
                    elems.append(b)
                    new.append(b)
        frontier = new
        if len(elems) > expected:
            break
    if len(elems) != expected:  # pragma: no cover - internal consistency
        raise RuntimeError(f"group closure gave {len(elems)} elements, expected {expected}")
    return np.stack(elems)


def _cyclic(n: int) -> np.ndarray:
    return rotation_about_z(360.0 * np.arange(n) / n)


def _dihedral(n: int) -> np.ndarray:
    flips = np.stack(
        [
            rotation_about_axis([math.cos(math.pi * k / n), math.sin(math.pi * k / n), 0.0], 180.0)
            for k in range(n)
        ]
    )
    return np.concatenate([_cyclic(n), flips])


@functools.cache
def _standard_group(name: str) -> np.ndarray:
    golden = (1.0 + math.sqrt(5.0)) / 2.0
    two_z = rotation_about_axis([0.0, 0.0, 1.0], 180.0)
    three_111 = rotation_about_axis([1.0, 1.0, 1.0], 120.0)
    if name == "T":
        ops = _closure([two_z, three_111], 12)
    elif name == "O":
        ops = _closure([rotation_about_axis([0.0, 0.0, 1.0], 90.0), three_111], 24)
    elif name == "I":
        five = rotation_about_axis([0.0, 1.0, golden], 72.0)
        ops = _closure([two_z, three_111, five], 60)
    elif name[0] == "C":
        ops = _cyclic(int(name[1:]))
    else:
        ops = _dihedral(int(name[1:]))
    ops = np.ascontiguousarray(ops, dtype=np.float64)
    ops.flags.writeable = False
    return ops


def point_group(name: str, frame: np.ndarray | None = None) -> np.ndarray:
    """Rotation operators ``(K, 3, 3)`` of a point group, identity first.

    Args:
        name: ``'C1'``, ``'Cn'`` (n >= 1, order n), ``'Dn'`` (n >= 2, order 2n), ``'T'`` (12),
            ``'O'`` (24), ``'I'`` (60); case-insensitive.
        frame: optional ``(3, 3)`` rotation whose columns are the symmetry frame's x, y, z axes
            in volume coordinates; the returned ops are ``frame @ g @ frame.T``.

    Standard frame (``frame=None``):
        * Cn: n-fold axis along z.
        * Dn: n-fold axis along z, 2-fold axes in the xy plane at azimuths ``180 k / n``
          degrees (one along x).
        * T: 2-fold axes along x, y, z; 3-fold axes along (+-1, +-1, +-1).
        * O: 4-fold axes along x, y, z; 3-fold along (+-1, +-1, +-1); 2-fold along (1, +-1, 0)
          and permutations.
        * I: 2-fold axes along x, y, z; 3-fold along (+-1, +-1, +-1); 5-fold axes through the
          icosahedron vertices (0, +-1, +-g), (+-1, +-g, 0), (+-g, 0, +-1), g = golden ratio
          (e.g. one 5-fold in the yz plane, 31.7 degrees from z towards y). It contains T.

    Raises:
        ValueError: unknown name (the message lists valid ones) or invalid frame.
    """
    if not isinstance(name, str):
        raise ValueError(f"point group name must be a string, one of {_GROUP_HELP}")
    key = name.strip().upper()
    valid = key in ("T", "O", "I")
    if not valid and len(key) >= 2 and key[0] in "CD" and key[1:].isdigit():
        n = int(key[1:])
        valid = n >= 1 if key[0] == "C" else n >= 2
        key = f"{key[0]}{n}"
    if not valid:
        raise ValueError(f"unknown point group {name!r}; valid names: {_GROUP_HELP}")
    ops = _standard_group(key)
    if frame is None:
        return ops.copy()
    F = check_rotations(frame, "frame")
    if F.shape != (3, 3):
        raise ValueError(f"frame must have shape (3, 3), got {F.shape}")
    return F @ ops @ F.T


def symmetry_mates(R: np.ndarray, ops: np.ndarray) -> np.ndarray:
    """All poses equivalent to ``R`` under the point group: ``R @ g``.

    Args:
        R: ``(..., 3, 3)`` poses.
        ops: ``(K, 3, 3)`` group operators in volume coordinates (e.g. :func:`point_group`).

    Returns:
        ``(..., K, 3, 3)``.
    """
    R = as_matrices(R)
    ops = as_matrices(ops, "ops")
    return R[..., None, :, :] @ ops


def symmetric_geodesic_distance_deg(A: np.ndarray, B: np.ndarray, ops: np.ndarray) -> np.ndarray:
    """Symmetry-aware geodesic distance in degrees: ``min_g geodesic_distance_deg(A, B @ g)``.

    ``A`` and ``B`` are broadcastable ``(..., 3, 3)``; ``ops`` is ``(K, 3, 3)``. Returns ``(...)``.
    """
    A = as_matrices(A, "A")
    return geodesic_distance_deg(A[..., None, :, :], symmetry_mates(B, ops)).min(axis=-1)
