"""SO(3) and S² harmonics of the pose network: dimensions, Wigner-D matrices (of rotations
and of the HEALPix SO(3) grids), rotating and evaluating coefficients.

Harmonic conventions
--------------------
An SO(3) signal is stored as ``F`` of shape ``(..., dim_so3)``: for each degree ``l = 0..lmax`` the
``(2l+1) x (2l+1)`` block ``F_l`` flattened row-major, and ``f(R) = sum_l sum_mn F_l[m, n]
D_l(R)[m, n]`` with ``D_l = e3nn.o3.wigner_D(l, *e3nn.o3.matrix_to_angles(R))`` (matrices acting on
xyz vectors; ``Y_l(R x) = D_l(R) Y_l(x)`` with ``e3nn.o3.spherical_harmonics``). The left
translation ``f'(S) = f(Q^T S)`` is ``F'_l = D_l(Q) F_l`` (:func:`rotate_so3_coefficients`).
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import torch

from cryosphere.geometry import grids
from cryosphere.geometry import rotations as geometry_rotations

__all__ = [
    "so3_dimension",
    "s2_dimension",
    "wigner_d_flat",
    "grid_wigner",
    "rotate_s2_coefficients",
    "rotate_so3_coefficients",
    "evaluate_so3_coefficients",
]


def s2_dimension(lmax: int) -> int:
    """Number of real spherical-harmonic coefficients up to ``lmax``: ``(lmax + 1)**2``."""
    return (int(lmax) + 1) ** 2


def so3_dimension(lmax: int) -> int:
    """Number of SO(3) harmonic coefficients up to ``lmax``: ``sum_l (2l+1)**2``."""
    return sum((2 * l + 1) ** 2 for l in range(int(lmax) + 1))


@contextlib.contextmanager
def _float64_default():
    # e3nn builds its generators in the default dtype; float64 gives ~1e-15 accurate matrices.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _wigner_blocks(rotations: np.ndarray, lmax: int) -> list[torch.Tensor]:
    """``[D_l(R) (n, 2l+1, 2l+1) float64 for l in 0..lmax]`` on CPU via e3nn."""
    from e3nn import o3

    R = np.array(rotations, dtype=np.float64).reshape(-1, 3, 3)  # writable copy
    alpha, beta, gamma = geometry_rotations.e3nn_angles_from_matrices(R)
    with _float64_default():
        a, b, c = (torch.from_numpy(v) for v in (alpha, beta, gamma))
        return [o3.wigner_D(l, a, b, c).to(torch.float64) for l in range(int(lmax) + 1)]


def wigner_d_flat(rotations: np.ndarray, lmax: int) -> np.ndarray:
    """Flattened Wigner-D matrices ``(n, dim_so3)`` float64 of rotations ``(n, 3, 3)``.

    Block ``l`` is ``D_l(R)`` flattened row-major (e3nn convention, see module docstring), so an
    SO(3) signal with coefficients ``F`` has values ``f(R) = wigner_d_flat(R) @ F``.
    """
    blocks = _wigner_blocks(rotations, lmax)
    return torch.cat([b.reshape(b.shape[0], -1) for b in blocks], dim=1).numpy()


@functools.cache
def _grid_wigner(level: int, lmax: int) -> np.ndarray:
    """``wigner_d_flat(so3.healpix_so3_grid(level), lmax)``, computed from the factorisation
    ``grid[p * n_psi + j] = Rz(-psi_j) @ (Ry(-tilt_p) @ Rz(-rot_p))`` (few unique factors)."""
    angles = grids.healpix_so3_grid_angles(level)
    n_psi = 6 * 2**level
    psi = angles[:n_psi, 2]
    pix = angles[::n_psi, :2]
    in_plane = geometry_rotations.rotation_about_z(-psi)
    out_of_plane = geometry_rotations.matrices_from_relion_euler(
        np.stack([pix[:, 0], pix[:, 1], np.zeros(len(pix))], axis=1)
    )
    a_blocks = _wigner_blocks(in_plane, lmax)
    b_blocks = _wigner_blocks(out_of_plane, lmax)
    flat = [
        (A[None, :, :, :] @ B[:, None, :, :]).reshape(len(pix) * n_psi, -1)
        for A, B in zip(a_blocks, b_blocks, strict=True)
    ]
    out = torch.cat(flat, dim=1).numpy()
    out.flags.writeable = False
    return out


def grid_wigner(level: int, lmax: int) -> np.ndarray:
    """Read-only ``(G, dim_so3)`` float64 Wigner-D rows of the level-``level`` HEALPix grid
    (cached): ``f(grid) = grid_wigner(level, lmax) @ F`` for SO(3) coefficients ``F``."""
    grids.healpix_so3_grid_size(level)  # validates
    return _grid_wigner(int(level), int(lmax))


def _degree_of_so3_dim(dim: int) -> int:
    for lmax in range(0, 64):
        if so3_dimension(lmax) == dim:
            return lmax
    raise ValueError(f"{dim} is not an SO(3) harmonic dimension sum_l (2l+1)^2")


def rotate_so3_coefficients(coefficients: np.ndarray | torch.Tensor, Q: np.ndarray) -> torch.Tensor:
    """Left-translate SO(3) signals: coefficients of ``f'(S) = f(Q^T S)``.

    Args:
        coefficients: ``(..., dim_so3)`` (layout in the module docstring).
        Q: ``(3, 3)`` rotation applied to every signal, or ``(n, 3, 3)``, one rotation per
            signal of ``coefficients`` ``(n, dim_so3)``.

    Returns:
        ``(..., dim_so3)`` tensor with ``F'_l = D_l(Q) F_l`` (same dtype as the input).
    """
    coeff = torch.as_tensor(coefficients)
    lmax = _degree_of_so3_dim(coeff.shape[-1])
    Q = np.asarray(Q, dtype=np.float64)
    batched = Q.ndim == 3
    if batched and (coeff.ndim != 2 or coeff.shape[0] != Q.shape[0]):
        raise ValueError(
            f"one rotation per signal needs coefficients (n, dim) with n = {Q.shape[0]}, got "
            f"{tuple(coeff.shape)}"
        )
    blocks = _wigner_blocks(Q if batched else Q[None], lmax)
    out, start = [], 0
    for l, D in enumerate(blocks):
        d = 2 * l + 1
        block = coeff[..., start : start + d * d].reshape(*coeff.shape[:-1], d, d)
        rotated = D.to(coeff) @ block if batched else D[0].to(coeff) @ block
        out.append(rotated.reshape(*coeff.shape[:-1], d * d))
        start += d * d
    return torch.cat(out, dim=-1)


def rotate_s2_coefficients(coefficients: np.ndarray | torch.Tensor, Q: np.ndarray) -> torch.Tensor:
    """Rotate sphere signals: coefficients ``(..., (lmax+1)**2)`` of ``phi'(x) = phi(Q^T x)``,
    ``c'_l = D_l(Q) c_l``."""
    coeff = torch.as_tensor(coefficients)
    lmax = int(round(math.sqrt(coeff.shape[-1]))) - 1
    if s2_dimension(lmax) != coeff.shape[-1]:
        raise ValueError(f"last axis {coeff.shape[-1]} is not (lmax+1)^2")
    blocks = _wigner_blocks(np.asarray(Q)[None], lmax)
    out = [coeff[..., l * l : (l + 1) ** 2] @ D[0].to(coeff).T for l, D in enumerate(blocks)]
    return torch.cat(out, dim=-1)


def evaluate_so3_coefficients(
    coefficients: np.ndarray | torch.Tensor, rotations: np.ndarray
) -> torch.Tensor:
    """Values ``f(R)`` ``(..., m)`` of SO(3) signals ``(..., dim_so3)`` at rotations ``(m, 3, 3)``."""
    coeff = torch.as_tensor(coefficients)
    lmax = _degree_of_so3_dim(coeff.shape[-1])
    D = torch.from_numpy(wigner_d_flat(rotations, lmax)).to(coeff)
    return coeff @ D.T
