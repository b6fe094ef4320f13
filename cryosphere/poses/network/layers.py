"""Layers of the pose network (shapes and equivariance in :mod:`cryosphere.poses.network.model`):
the quarter-turn-invariant convolution, the hemisphere projection, the S² and SO(3)
convolutions and the SO(3) activation.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cryosphere.poses.network.harmonics import _float64_default, _grid_wigner

__all__ = [
    "QuarterTurnConv2d",
    "HemisphereProjection",
    "S2Convolution",
    "SO3Activation",
    "SO3Convolution",
    "hemisphere_points",
]


def _quarter_turn_orbits(kernel_size: int) -> tuple[np.ndarray, int]:
    """Orbit index ``(k, k)`` of kernel taps under 90-degree rotations, and the orbit count."""
    h = kernel_size // 2
    index = -np.ones((kernel_size, kernel_size), dtype=np.int64)
    count = 0
    for i in range(kernel_size):
        for j in range(kernel_size):
            if index[i, j] >= 0:
                continue
            a, b = i - h, j - h
            for _ in range(4):
                index[a + h, b + h] = count
                a, b = b, -a
            count += 1
    return index, count


class QuarterTurnConv2d(nn.Module):
    """Stride-2 convolution with circular padding and kernels invariant under 90-degree turns.

    Each kernel is ``theta[out, in, orbit(i, j)]``: taps in one orbit of the 90-degree rotation
    share a parameter, so ``rot90(kernel) == kernel`` exactly and the layer commutes with quarter
    turns of its input about pixel ``N // 2`` (on the torus) when ``N // 2`` is even.
    Input ``(n, C_in, N, N)``, output ``(n, C_out, ceil(N / 2), ceil(N / 2))``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 2):
        super().__init__()
        index, count = _quarter_turn_orbits(kernel_size)
        self.register_buffer("orbit_index", torch.from_numpy(index.reshape(-1)), persistent=False)
        self.kernel_size = int(kernel_size)
        self.stride = int(stride)
        self.theta = nn.Parameter(torch.empty(out_channels, in_channels, count))
        self.bias = nn.Parameter(torch.empty(out_channels))

    def reset_parameters(self, generator: torch.Generator) -> None:
        fan_in = self.theta.shape[1] * self.kernel_size**2
        with torch.no_grad():
            self.theta.normal_(0.0, math.sqrt(2.0 / fan_in), generator=generator)
            self.bias.zero_()

    def kernel(self) -> torch.Tensor:
        """The ``(C_out, C_in, k, k)`` kernel."""
        k = self.kernel_size
        return self.theta[:, :, self.orbit_index].reshape(*self.theta.shape[:2], k, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.kernel_size // 2
        if p:
            x = F.pad(x, (p, p, p, p), mode="circular")
        return F.conv2d(x, self.kernel(), self.bias, stride=self.stride)


@functools.cache
def _hemisphere_points(nside: int) -> np.ndarray:
    import healpy

    theta, phi = healpy.pix2ang(nside, np.arange(12 * nside * nside))
    keep = np.cos(theta) > 1e-9
    theta, phi = theta[keep], phi[keep]
    quadrant = np.floor(phi / (np.pi / 2) + 1e-9).astype(int) % 4
    theta, phi = theta[quadrant == 0], phi[quadrant == 0]
    base = np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], 1)
    parts = [base]
    for _ in range(3):
        x, y, z = parts[-1].T
        parts.append(np.stack([-y, x, z], axis=1))  # exact 90-degree turn about z
    points = np.concatenate(parts)
    points.flags.writeable = False
    return points


def hemisphere_points(nside: int = 4) -> np.ndarray:
    """Unit vectors ``(P, 3)`` of the HEALPix pixel centres with ``z > 0`` (``P = 6 nside**2 - 2
    nside``; 88 for nside 4).

    Ordered in four quarter blocks of ``P/4``: block ``k+1`` is block ``k`` turned by exactly 90
    degrees about z (``(x, y) -> (-y, x)``, bitwise), so ``Rz(90) @ points[i] ==
    points[(i + P/4) % P]``.
    """
    if int(nside) < 1 or int(nside) & (int(nside) - 1):
        raise ValueError(f"nside must be a power of 2, got {nside}")
    return _hemisphere_points(int(nside)).copy()


class HemisphereProjection(nn.Module):
    """Read a feature map onto fixed hemisphere points, then take spherical harmonics.

    Point ``x_p`` (unit vector, ``z > 0``) projects orthographically to feature-map position
    ``centre + radius * (x, y)`` (column, row), ``centre = M // 2``, ``radius =
    projection_radius * M / 2``. Its value in channel ``c`` is the average of that channel under a
    normalised Gaussian window of learned width ``sigma_c`` (feature pixels; distances on the
    ``M x M`` torus), and the coefficients are ``c_lm = sum_p (2 pi / P) phi(x_p) Y_lm(x_p)``.

    Input ``(n, Cs, M, M)``, output ``(n, Cs, (lmax+1)**2)``.
    """

    def __init__(
        self,
        channels: int,
        feature_size: int,
        lmax: int,
        nside: int = 4,
        radius_fraction: float = 0.9,
        sigma: float = 1.0,
    ):
        super().__init__()
        from e3nn import o3

        points = hemisphere_points(nside)
        M = int(feature_size)
        radius = radius_fraction * M / 2.0
        centre = M // 2
        # pixel offsets relative to the projected points, wrapped onto the torus: (M*M, P, 2)
        rows, cols = np.meshgrid(np.arange(M) - centre, np.arange(M) - centre, indexing="ij")
        pix = np.stack([cols.reshape(-1), rows.reshape(-1)], axis=1).astype(np.float64)
        delta = pix[:, None, :] - radius * points[None, :, :2]
        delta = np.mod(delta + M / 2.0, M) - M / 2.0
        dist2 = (delta**2).sum(-1)
        self.register_buffer("distance2", torch.from_numpy(dist2).float(), persistent=False)
        with _float64_default():
            Y = o3.spherical_harmonics(
                list(range(int(lmax) + 1)),
                torch.from_numpy(points),
                normalize=True,
                normalization="integral",
            )
        weight = 2.0 * math.pi / points.shape[0]  # hemisphere area / number of points
        self.register_buffer("harmonics", (Y * weight).float(), persistent=False)
        self.register_buffer("points", torch.from_numpy(points).float(), persistent=False)
        self.log_sigma = nn.Parameter(torch.full((int(channels),), math.log(sigma)))
        self.initial_sigma = float(sigma)

    def reset_parameters(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            self.log_sigma.fill_(math.log(self.initial_sigma))

    def sampling_weights(self) -> torch.Tensor:
        """``(Cs, M*M, P)`` Gaussian windows, each summing to 1 over pixels."""
        sigma2 = torch.exp(2.0 * self.log_sigma)[:, None, None]
        logits = -self.distance2[None] / (2.0 * sigma2)
        return torch.softmax(logits, dim=1)

    def sphere_signal(self, features: torch.Tensor) -> torch.Tensor:
        """``(n, Cs, M, M)`` -> values at the hemisphere points ``(n, Cs, P)``."""
        flat = features.flatten(2).transpose(0, 1)  # (Cs, n, M*M)
        return torch.bmm(flat, self.sampling_weights()).transpose(0, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.sphere_signal(features) @ self.harmonics


class S2Convolution(nn.Module):
    """S2 -> SO(3) convolution ``f_o(R) = sum_i int psi_io(R^T x) phi_i(x) dx``.

    In harmonics ``F_l^o = sum_i c_l^i (k_l^io)^T``. Input ``(n, C_in, (lmax+1)**2)``, output
    ``(n, C_out, dim_so3)``. Exactly equivariant: ``c -> D(Q) c`` gives ``F -> D(Q) F``.
    """

    def __init__(self, in_channels: int, out_channels: int, lmax: int):
        super().__init__()
        self.lmax = int(lmax)
        self.kernels = nn.ParameterList(
            [
                nn.Parameter(torch.empty(in_channels, out_channels, 2 * l + 1))
                for l in range(lmax + 1)
            ]
        )

    def reset_parameters(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            for k in self.kernels:
                k.normal_(0.0, 1.0 / math.sqrt(k.shape[0]), generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for l, k in enumerate(self.kernels):
            c = x[..., l * l : (l + 1) ** 2]  # (n, i, m)
            out.append(torch.einsum("nim,ioj->nomj", c, k).flatten(2))
        return torch.cat(out, dim=-1)


class SO3Convolution(nn.Module):
    """SO(3) group convolution ``h_o(R) = sum_i int f_i(S) kappa_io(S^{-1} R) dS``.

    In harmonics ``H_l^o = sum_i F_l^i K_l^io`` (right multiplication), exactly left-equivariant.
    Input ``(n, C_in, dim_so3)``, output ``(n, C_out, dim_so3)``.
    """

    def __init__(self, in_channels: int, out_channels: int, lmax: int):
        super().__init__()
        self.lmax = int(lmax)
        self.kernels = nn.ParameterList(
            [
                nn.Parameter(torch.empty(in_channels, out_channels, 2 * l + 1, 2 * l + 1))
                for l in range(lmax + 1)
            ]
        )

    def reset_parameters(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            for k in self.kernels:
                std = 1.0 / math.sqrt(k.shape[0] * k.shape[2])
                k.normal_(0.0, std, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, start = [], 0
        n, c_in = x.shape[:2]
        for l, k in enumerate(self.kernels):
            d = 2 * l + 1
            block = x[..., start : start + d * d].reshape(n, c_in, d, d)
            out.append(torch.einsum("nimk,iokj->nomj", block, k).flatten(2))
            start += d * d
        return torch.cat(out, dim=-1)


class SO3Activation(nn.Module):
    """Pointwise nonlinearity on an SO(3) grid: ``F -> fit(act(f(R_g)))``.

    Adds a learned bias per channel to the constant (l = 0) term, evaluates the signal on the
    HEALPix SO(3) grid of ``level`` (Wigner-D buffer ``(dim, G)``), applies ReLU and fits
    coefficients up to ``lmax`` by least squares (pseudo-inverse buffer). Exactly equivariant for
    left translations that permute the grid (e.g. ``Rz(90)`` for level >= 1), approximately
    otherwise (aliasing of the activation's high frequencies).
    Input and output ``(n, C, dim_so3)``.
    """

    def __init__(self, channels: int, lmax: int, level: int = 1):
        super().__init__()
        D = _grid_wigner(int(level), int(lmax))  # (G, dim)
        if D.shape[0] < D.shape[1]:
            raise ValueError(
                f"activation grid level {level} ({D.shape[0]} rotations) is too coarse for "
                f"lmax {lmax} ({D.shape[1]} coefficients); use a higher level"
            )
        Dt = torch.from_numpy(np.array(D))
        pinv = torch.linalg.solve(Dt.T @ Dt, Dt.T).numpy()  # (dim, G) least-squares fit
        self.register_buffer("to_grid", torch.from_numpy(D.T.copy()).float(), persistent=False)
        self.register_buffer("from_grid", torch.from_numpy(pinv.T.copy()).float(), persistent=False)
        self.bias = nn.Parameter(torch.zeros(int(channels)))

    def reset_parameters(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift = torch.zeros_like(x[..., :1]) + self.bias[:, None]
        x = torch.cat([x[..., :1] + shift, x[..., 1:]], dim=-1)
        return torch.relu(x @ self.to_grid) @ self.from_grid
