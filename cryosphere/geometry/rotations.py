"""Rotations and their conventions: construction, RELION and e3nn Euler angles, quaternions,
viewing directions and the geodesic distance.

Conventions (fixed project-wide)
------------------------------------------------------------------------------
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
"""

from __future__ import annotations

import numpy as np
import torch

from cryosphere._checks import as_matrices, check_rotations

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
    "geodesic_distance_deg",
]

_GIMBAL_EPS = 1e-9


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _wrap_deg(a: np.ndarray) -> np.ndarray:
    """Map angles in degrees to (-180, 180]."""
    a = np.mod(a + 180.0, 360.0) - 180.0  # [-180, 180)
    return np.where(a <= -180.0, a + 360.0, a)


def _rz(angle_rad: np.ndarray) -> np.ndarray:
    a = np.asarray(angle_rad, dtype=np.float64)
    c, s = np.cos(a), np.sin(a)
    out = np.zeros(a.shape + (3, 3))
    out[..., 0, 0] = c
    out[..., 0, 1] = -s
    out[..., 1, 0] = s
    out[..., 1, 1] = c
    out[..., 2, 2] = 1.0
    return out


# --------------------------------------------------------------------------------------------
# construction
# --------------------------------------------------------------------------------------------
def random_rotations(n: int, seed: int | np.random.Generator | None = None) -> np.ndarray:
    """Uniform (Haar-distributed) random rotations.

    Args:
        n: number of rotations.
        seed: int, ``np.random.Generator`` or None; the same int seed gives the same result.

    Returns:
        ``(n, 3, 3)`` float64 rotation matrices (normalised Gaussian quaternions).
    """
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((int(n), 4))
    return quaternions_to_matrices(q)


def rotation_about_axis(axis: np.ndarray, angle_deg: np.ndarray | float) -> np.ndarray:
    """Right-handed rotation by ``angle_deg`` (degrees, shape ``(...)``) about ``axis`` (3,).

    The axis need not be normalised. Returns ``(..., 3, 3)``.
    """
    axis = np.asarray(axis, dtype=np.float64)
    if axis.shape != (3,):
        raise ValueError(f"axis must have shape (3,), got {axis.shape}")
    norm = np.linalg.norm(axis)
    if not norm > 0:
        raise ValueError("axis must be a non-zero vector")
    x, y, z = axis / norm
    a = np.deg2rad(np.asarray(angle_deg, dtype=np.float64))
    c, s = np.cos(a), np.sin(a)
    C = 1.0 - c
    out = np.empty(a.shape + (3, 3))
    out[..., 0, 0] = c + x * x * C
    out[..., 0, 1] = x * y * C - z * s
    out[..., 0, 2] = x * z * C + y * s
    out[..., 1, 0] = y * x * C + z * s
    out[..., 1, 1] = c + y * y * C
    out[..., 1, 2] = y * z * C - x * s
    out[..., 2, 0] = z * x * C - y * s
    out[..., 2, 1] = z * y * C + x * s
    out[..., 2, 2] = c + z * z * C
    return out


def rotation_about_z(angle_deg: np.ndarray | float) -> np.ndarray:
    """Right-handed rotation about +z, ``[[c, -s, 0], [s, c, 0], [0, 0, 1]]``; ``(..., 3, 3)``."""
    return _rz(np.deg2rad(np.asarray(angle_deg, dtype=np.float64)))


# --------------------------------------------------------------------------------------------
# RELION Euler angles
# --------------------------------------------------------------------------------------------
def matrices_from_relion_euler(angles_deg: np.ndarray) -> np.ndarray:
    """Pose matrices from RELION Euler angles.

    Args:
        angles_deg: ``(..., 3)`` array of ``(rot, tilt, psi)`` in degrees.

    Returns:
        ``(..., 3, 3)`` matrices, identical to RELION's ``Euler_angles2matrix`` (see module
        docstring); equal to ``Rz(-psi) @ Ry(-tilt) @ Rz(-rot)`` with active rotations.
    """
    ang = np.asarray(angles_deg, dtype=np.float64)
    if ang.ndim < 1 or ang.shape[-1] != 3:
        raise ValueError(f"angles_deg must have shape (..., 3), got {ang.shape}")
    r, t, p = np.moveaxis(np.deg2rad(ang), -1, 0)
    cr, sr, ct, st, cp, sp = np.cos(r), np.sin(r), np.cos(t), np.sin(t), np.cos(p), np.sin(p)
    A = np.empty(ang.shape[:-1] + (3, 3))
    A[..., 0, 0] = cp * ct * cr - sp * sr
    A[..., 0, 1] = cp * ct * sr + sp * cr
    A[..., 0, 2] = -cp * st
    A[..., 1, 0] = -sp * ct * cr - cp * sr
    A[..., 1, 1] = -sp * ct * sr + cp * cr
    A[..., 1, 2] = sp * st
    A[..., 2, 0] = st * cr
    A[..., 2, 1] = st * sr
    A[..., 2, 2] = ct
    return A


def relion_euler_from_matrices(R: np.ndarray) -> np.ndarray:
    """RELION Euler angles ``(rot, tilt, psi)`` in degrees from pose matrices.

    Args:
        R: ``(..., 3, 3)`` rotation matrices (validated, tolerance 1e-5).

    Returns:
        ``(..., 3)``: ``rot, psi`` in (-180, 180], ``tilt`` in [0, 180]. At gimbal lock
        (``sin tilt < 1e-9``, i.e. tilt 0 or 180) ``psi = 0`` and the in-plane angle is in
        ``rot``, so ``matrices_from_relion_euler(relion_euler_from_matrices(R)) == R``.
    """
    R = check_rotations(R)
    sin_t = np.hypot(R[..., 2, 0], R[..., 2, 1])
    tilt = np.arctan2(sin_t, R[..., 2, 2])
    rot = np.arctan2(R[..., 2, 1], R[..., 2, 0])
    psi = np.arctan2(R[..., 1, 2], -R[..., 0, 2])
    gimbal = sin_t < _GIMBAL_EPS
    if np.any(gimbal):
        up = R[..., 2, 2] > 0
        # tilt = 0: A = Rz(-rot) -> A01 = sin rot, A00 = cos rot.
        # tilt = 180: A = diag(-1, 1, -1) Rz(-rot) -> A01 = -sin rot, A00 = -cos rot.
        sign = np.where(up, 1.0, -1.0)
        rot_g = np.arctan2(sign * R[..., 0, 1], sign * R[..., 0, 0])
        rot = np.where(gimbal, rot_g, rot)
        psi = np.where(gimbal, 0.0, psi)
        tilt = np.where(gimbal, np.where(up, 0.0, np.pi), tilt)
    out = np.stack([np.rad2deg(rot), np.rad2deg(tilt), np.rad2deg(psi)], axis=-1)
    out[..., 0] = _wrap_deg(out[..., 0])
    out[..., 2] = _wrap_deg(out[..., 2])
    return out


# --------------------------------------------------------------------------------------------
# e3nn angles
# --------------------------------------------------------------------------------------------
def matrices_from_e3nn_angles(
    alpha: np.ndarray | float, beta: np.ndarray | float, gamma: np.ndarray | float
) -> np.ndarray:
    """``e3nn.o3.angles_to_matrix(alpha, beta, gamma) = Ry(alpha) Rx(beta) Ry(gamma)``.

    Angles in radians, broadcast to a common shape ``(...)``; returns ``(..., 3, 3)`` float64.
    """
    from e3nn import o3

    a, b, c = (torch.as_tensor(np.asarray(v, dtype=np.float64)) for v in (alpha, beta, gamma))
    return o3.angles_to_matrix(a, b, c).numpy().astype(np.float64)


def e3nn_angles_from_matrices(R: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`matrices_from_e3nn_angles` via ``e3nn.o3.matrix_to_angles``.

    Args:
        R: ``(..., 3, 3)`` rotation matrices (validated).

    Returns:
        ``(alpha, beta, gamma)``, each ``(...)`` float64 radians; beta in [0, pi].
    """
    from e3nn import o3

    R = check_rotations(R)
    a, b, c = o3.matrix_to_angles(torch.from_numpy(np.ascontiguousarray(R)))
    return a.numpy().copy(), b.numpy().copy(), c.numpy().copy()


# --------------------------------------------------------------------------------------------
# quaternions
# --------------------------------------------------------------------------------------------
def matrices_to_quaternions(R: np.ndarray) -> np.ndarray:
    """Unit quaternions ``(..., 4)`` ordered ``(w, x, y, z)`` with ``w >= 0``.

    Uses Shepperd's method (largest-component branch), so it is stable for all rotations.
    Input ``(..., 3, 3)`` rotation matrices (shape-checked, not orthogonality-checked).
    """
    R = as_matrices(R)
    r00, r01, r02 = R[..., 0, 0], R[..., 0, 1], R[..., 0, 2]
    r10, r11, r12 = R[..., 1, 0], R[..., 1, 1], R[..., 1, 2]
    r20, r21, r22 = R[..., 2, 0], R[..., 2, 1], R[..., 2, 2]
    diag = np.stack([r00 + r11 + r22, r00 - r11 - r22, -r00 + r11 - r22, -r00 - r11 + r22], axis=-1)
    # candidate (unnormalised, each scaled by 4 * its large component) quaternions
    cands = np.stack(
        [
            np.stack([1 + diag[..., 0], r21 - r12, r02 - r20, r10 - r01], axis=-1),
            np.stack([r21 - r12, 1 + diag[..., 1], r01 + r10, r02 + r20], axis=-1),
            np.stack([r02 - r20, r01 + r10, 1 + diag[..., 2], r12 + r21], axis=-1),
            np.stack([r10 - r01, r02 + r20, r12 + r21, 1 + diag[..., 3]], axis=-1),
        ],
        axis=-2,
    )  # (..., 4 branches, 4 components)
    best = np.argmax(diag, axis=-1)[..., None, None]
    q = np.take_along_axis(cands, best, axis=-2)[..., 0, :]
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    return np.where(q[..., :1] < 0, -q, q)


def quaternions_to_matrices(q: np.ndarray) -> np.ndarray:
    """Rotation matrices ``(..., 3, 3)`` from quaternions ``(..., 4)`` ``(w, x, y, z)``.

    Quaternions are normalised first; ``q`` and ``-q`` give the same matrix.
    """
    q = np.asarray(q, dtype=np.float64)
    if q.ndim < 1 or q.shape[-1] != 4:
        raise ValueError(f"q must have shape (..., 4), got {q.shape}")
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = np.moveaxis(q, -1, 0)
    out = np.empty(q.shape[:-1] + (3, 3))
    out[..., 0, 0] = 1 - 2 * (y * y + z * z)
    out[..., 0, 1] = 2 * (x * y - w * z)
    out[..., 0, 2] = 2 * (x * z + w * y)
    out[..., 1, 0] = 2 * (x * y + w * z)
    out[..., 1, 1] = 1 - 2 * (x * x + z * z)
    out[..., 1, 2] = 2 * (y * z - w * x)
    out[..., 2, 0] = 2 * (x * z - w * y)
    out[..., 2, 1] = 2 * (y * z + w * x)
    out[..., 2, 2] = 1 - 2 * (x * x + y * y)
    return out


def viewing_directions(R: np.ndarray) -> np.ndarray:
    """Viewing directions ``(..., 3)``: the volume-frame unit vector mapped to ``+z_mic``,
    ``R.T @ e_z = R[..., 2, :]``."""
    return as_matrices(R)[..., 2, :].copy()


# --------------------------------------------------------------------------------------------
# distances and nearest neighbours
# --------------------------------------------------------------------------------------------
def geodesic_distance_deg(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Geodesic (rotation-angle) distance in degrees between broadcastable ``(..., 3, 3)``.

    Equals ``arccos((tr(A^T B) - 1) / 2)``, computed as ``atan2(sin, cos)`` with the sine from
    the skew part of ``A^T B`` so it is accurate near 0 and 180 degrees and never NaN.
    Returns ``(...)`` in [0, 180].
    """
    A = as_matrices(A, "A")
    B = as_matrices(B, "B")
    M = np.swapaxes(A, -1, -2) @ B
    cos = 0.5 * (M[..., 0, 0] + M[..., 1, 1] + M[..., 2, 2] - 1.0)
    v = np.stack(
        [M[..., 2, 1] - M[..., 1, 2], M[..., 0, 2] - M[..., 2, 0], M[..., 1, 0] - M[..., 0, 1]],
        axis=-1,
    )
    sin = 0.5 * np.linalg.norm(v, axis=-1)
    return np.rad2deg(np.arctan2(sin, np.clip(cos, -1.0, 1.0)))
