"""Equivariant pose-distribution network: image -> probability distribution over SO(3).

Architecture (all shapes for a batch of ``n`` images of ``N x N`` pixels)
------------------------------------------------------------------------
1. **Image normalisation** ``(I - mean) / std`` with per-dataset scalars stored as buffers
   (:meth:`PoseDistributionNetwork.set_normalisation`), so they travel with the weights.
2. **Encoder** (``ModelConfig.encoder``): ``"resnet"`` is a residual CNN
   (:mod:`cryosphere.poses.encoders`); ``"quarter_turn"``, the poster's, is two
   convolutions ``(n, 1, N, N) -> (n, C1, N/2, N/2) -> (n, C2, N/4, N/4)``: stride-2
   convolutions with ReLU, *circular* padding and kernels constrained to be invariant under
   90-degree rotations (:class:`QuarterTurnConv2d`). Together with the circular padding this
   makes the feature maps commute exactly with :func:`cryosphere.imaging.projection.
   rotate_images_quarter_turns` (a 90-degree rotation about pixel ``N // 2`` on the torus)
   whenever ``N // 2`` is divisible by ``2**len(conv_channels)`` (e.g. ``N`` = 32, 48, 64).
3. **Channel mixing** (1x1 convolution) to ``Cs`` sphere channels.
4. **Half-sphere projection** ``(n, Cs, M*M) -> (n, Cs, P)``: ``P`` fixed points ``x_p`` on the
   hemisphere ``z > 0`` facing the viewer (HEALPix pixel centres, :func:`hemisphere_points`);
   each reads the feature map at its orthographic projection ``(x, y) * radius`` through a
   normalised Gaussian window whose width is learned per channel (distances taken on the
   feature-map torus). The point set is closed under 90-degree rotations about z, built so that
   the rotation permutes the points *exactly* (bitwise).
5. **Spherical harmonics** ``(n, Cs, (lmax+1)**2)``: ``c_lm = sum_p w_p phi(x_p) Y_lm(x_p)``
   with e3nn's real spherical harmonics (``normalization="integral"``) and equal-area weights.
6. **S2 convolution** ``(n, Ch, dim_so3)`` with ``dim_so3 = sum_l (2l+1)**2``:
   ``f(R) = sum_i int psi_i(R^T x) phi_i(x) dx`` for a learned filter ``psi`` given by its
   harmonic coefficients ``k_l``; in harmonics ``F_l = sum_i c_l^i (k_l^i)^T`` (an outer
   product per degree).
7. **SO(3) activation**: evaluate ``f`` on a HEALPix SO(3) grid (level 1, 576 rotations, for
   lmax <= 4; level 2 above), ReLU, least-squares fit back to degree ``lmax``.
8. **SO(3) convolution** ``(n, dim_so3)``: ``h(R) = int f(S) kappa(S^{-1} R) dS``, in harmonics
   ``H_l = sum_i F_l^i K_l^i`` (right multiplication by a learned matrix per degree).
9. **Grid logits** ``(n, G)``: ``h(R_g) = sum_l <H_l, D_l(R_g)>`` with Wigner-D matrices of the
   HEALPix SO(3) grid of ``grid_level`` precomputed as a buffer.

Harmonic conventions
--------------------
An SO(3) signal is stored as ``F`` of shape ``(..., dim_so3)``: for each degree ``l = 0..lmax`` the
``(2l+1) x (2l+1)`` block ``F_l`` flattened row-major, and ``f(R) = sum_l sum_mn F_l[m, n]
D_l(R)[m, n]`` with ``D_l = e3nn.o3.wigner_D(l, *e3nn.o3.matrix_to_angles(R))`` (matrices acting on
xyz vectors; ``Y_l(R x) = D_l(R) Y_l(x)`` with ``e3nn.o3.spherical_harmonics``). The left
translation ``f'(S) = f(Q^T S)`` is ``F'_l = D_l(Q) F_l`` (:func:`rotate_so3_coefficients`).

Equivariance (``encoder="quarter_turn"``; the ``"resnet"`` encoder learns it): rotating the
input image by ``Q = Rz(90 k deg)`` (the image of pose ``Q @ R``)
left-translates the output, ``p(S | I(Q R)) = p(Q^T S | I(R))``, exactly up to float error.
For general rotations of the sphere signal the S2 and SO(3) convolutions are exactly
equivariant and the SO(3) activation approximately (grid aliasing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cryosphere.geometry import so3
from cryosphere.poses.encoders import ENCODERS, ResidualEncoder, resnet_feature_size

__all__ = [
    "ARCHITECTURE",
    "MAX_LMAX",
    "ModelConfig",
    "PoseDistributionNetwork",
    "QuarterTurnConv2d",
    "HemisphereProjection",
    "S2Convolution",
    "SO3Activation",
    "SO3Convolution",
    "hemisphere_points",
    "so3_dimension",
    "s2_dimension",
    "wigner_d_flat",
    "grid_wigner",
    "rotate_s2_coefficients",
    "rotate_so3_coefficients",
    "evaluate_so3_coefficients",
    "build_model",
]

ARCHITECTURE = "cryosphere.PoseDistributionNetwork/v1"
MAX_LMAX = 8


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of :class:`PoseDistributionNetwork` (frozen; ``to_dict``/``from_dict``).

    Attributes:
        image_size: input box size ``N`` in pixels.
        lmax: maximum harmonic degree, 1..8.
        conv_channels: output channels of the stride-2 convolutions (one entry per layer).
        conv_kernel_sizes: odd kernel sizes, one per convolution.
        sphere_channels: channels ``Cs`` of the hemisphere signal.
        so3_channels: channels ``Ch`` of the SO(3) signal after the S2 convolution.
        hemisphere_nside: HEALPix nside of the hemisphere points (4: 88 points, 8: 368).
        projection_radius: radius of the unit hemisphere's projection as a fraction of half the
            feature map (1.0 reaches the box edge).
        sampling_sigma: initial Gaussian width of the hemisphere sampling in feature pixels.
        grid_level: HEALPix SO(3) grid level of the output logits (2: 4,608 rotations).
        activation_grid_level: HEALPix level of the SO(3) activation grid; None picks 1 for
            lmax <= 4 and 2 above.
        encoder: ``"quarter_turn"`` (the poster's two convolutions of ``conv_channels`` /
            ``conv_kernel_sizes``) or ``"resnet"`` (:mod:`cryosphere.poses.encoders`).
        encoder_channels: channels of the resnet stages (each halves the map).
        encoder_blocks: residual blocks per resnet stage.
        per_image_normalisation: normalise each image by its own mean and std (as real
            particles are); False: the dataset scalars of
            :meth:`PoseDistributionNetwork.set_normalisation`.
    """

    image_size: int = 64
    lmax: int = 4
    conv_channels: tuple[int, ...] = (16, 32)
    conv_kernel_sizes: tuple[int, ...] = (5, 3)
    sphere_channels: int = 16
    so3_channels: int = 16
    hemisphere_nside: int = 4
    projection_radius: float = 0.9
    sampling_sigma: float = 1.0
    grid_level: int = 2
    activation_grid_level: int | None = None
    encoder: str = "quarter_turn"
    encoder_channels: tuple[int, ...] = (16, 32, 64)
    encoder_blocks: int = 1
    per_image_normalisation: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.lmax, bool) or not isinstance(self.lmax, (int, np.integer)):
            raise ValueError(f"lmax must be an int in 1..{MAX_LMAX}, got {self.lmax!r}")
        if not 1 <= int(self.lmax) <= MAX_LMAX:
            raise ValueError(
                f"lmax must be in 1..{MAX_LMAX}, got {self.lmax} (the harmonic dimension grows "
                f"as lmax**3; use lmax=4 for the paper setting)"
            )
        object.__setattr__(self, "conv_channels", tuple(int(c) for c in self.conv_channels))
        object.__setattr__(self, "conv_kernel_sizes", tuple(int(k) for k in self.conv_kernel_sizes))
        object.__setattr__(self, "encoder_channels", tuple(int(c) for c in self.encoder_channels))
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.encoder == "resnet":
            if not self.encoder_channels or any(c < 1 for c in self.encoder_channels):
                raise ValueError(
                    f"encoder_channels must be positive ints, got {self.encoder_channels}"
                )
            if int(self.encoder_blocks) < 1:
                raise ValueError(f"encoder_blocks must be >= 1, got {self.encoder_blocks}")
            if resnet_feature_size(int(self.image_size), len(self.encoder_channels)) < 2:
                raise ValueError(
                    f"image_size {self.image_size} is too small for {len(self.encoder_channels)} "
                    "resnet stages (the feature map would be 1 px); use fewer encoder_channels"
                )
        if len(self.conv_channels) == 0 or any(c < 1 for c in self.conv_channels):
            raise ValueError(f"conv_channels must be positive ints, got {self.conv_channels}")
        if len(self.conv_kernel_sizes) != len(self.conv_channels):
            raise ValueError(
                f"conv_kernel_sizes {self.conv_kernel_sizes} must have one entry per "
                f"convolution ({len(self.conv_channels)})"
            )
        if any(k < 1 or k % 2 == 0 for k in self.conv_kernel_sizes):
            raise ValueError(f"conv_kernel_sizes must be odd, got {self.conv_kernel_sizes}")
        min_size = 2 ** (len(self.conv_channels) + 1)
        if int(self.image_size) < min_size:
            raise ValueError(
                f"image_size must be at least {min_size} for {len(self.conv_channels)} stride-2 "
                f"convolutions, got {self.image_size}"
            )
        for name in ("sphere_channels", "so3_channels", "hemisphere_nside"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < float(self.projection_radius) <= 1.0:
            raise ValueError(f"projection_radius must be in (0, 1], got {self.projection_radius}")
        if not float(self.sampling_sigma) > 0:
            raise ValueError(f"sampling_sigma must be > 0, got {self.sampling_sigma}")
        so3.healpix_so3_grid_size(self.grid_level)  # validates
        if self.activation_grid_level is not None:
            so3.healpix_so3_grid_size(self.activation_grid_level)

    @property
    def resolved_activation_grid_level(self) -> int:
        """Level of the SO(3) activation grid (see ``activation_grid_level``)."""
        if self.activation_grid_level is not None:
            return int(self.activation_grid_level)
        return 1 if self.lmax <= 4 else 2

    @property
    def feature_size(self) -> int:
        """Side ``M`` of the last feature map."""
        if self.encoder == "resnet":
            return resnet_feature_size(int(self.image_size), len(self.encoder_channels))
        size = int(self.image_size)
        for _ in self.conv_channels:
            size = (size + 1) // 2
        return size

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (tuples as lists), JSON- and checkpoint-friendly."""
        out = dataclasses.asdict(self)
        out["conv_channels"] = list(self.conv_channels)
        out["conv_kernel_sizes"] = list(self.conv_kernel_sizes)
        out["encoder_channels"] = list(self.encoder_channels)
        return out

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(record) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
        return cls(**record)


# --------------------------------------------------------------------------------------------
# harmonic helpers
# --------------------------------------------------------------------------------------------
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
    alpha, beta, gamma = so3.e3nn_angles_from_matrices(R)
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
    angles = so3.healpix_so3_grid_angles(level)
    n_psi = 6 * 2**level
    psi = angles[:n_psi, 2]
    pix = angles[::n_psi, :2]
    in_plane = so3.rotation_about_z(-psi)
    out_of_plane = so3.matrices_from_relion_euler(
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
    so3.healpix_so3_grid_size(level)  # validates
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


# --------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# network
# --------------------------------------------------------------------------------------------
class PoseDistributionNetwork(nn.Module):
    """Image ``(n, N, N)`` -> logits ``(n, G)`` on the HEALPix SO(3) grid (see module docstring).

    ``forward(images)`` returns grid logits; :meth:`coefficients` the SO(3) harmonic
    coefficients ``(n, dim_so3)`` of the same signal (``logits == coefficients @ grid_wigner``).
    Parameters are initialised from ``seed`` with a private generator (the global torch RNG is
    untouched), so ``PoseDistributionNetwork(config, seed)`` is reproducible.
    """

    def __init__(self, config: ModelConfig, seed: int = 0):
        super().__init__()
        self.config = config
        convs = []
        in_ch = 1
        self.encoder: ResidualEncoder | None = None
        if config.encoder == "resnet":
            self.encoder = ResidualEncoder(config.encoder_channels, int(config.encoder_blocks))
            in_ch = self.encoder.out_channels
        else:
            for out_ch, k in zip(config.conv_channels, config.conv_kernel_sizes, strict=True):
                convs.append(QuarterTurnConv2d(in_ch, out_ch, k))
                in_ch = out_ch
        self.convs = nn.ModuleList(convs)
        self.mix = nn.Conv2d(in_ch, config.sphere_channels, kernel_size=1)
        self.projection = HemisphereProjection(
            config.sphere_channels,
            config.feature_size,
            config.lmax,
            nside=config.hemisphere_nside,
            radius_fraction=config.projection_radius,
            sigma=config.sampling_sigma,
        )
        self.s2_conv = S2Convolution(config.sphere_channels, config.so3_channels, config.lmax)
        self.activation = SO3Activation(
            config.so3_channels, config.lmax, config.resolved_activation_grid_level
        )
        self.so3_conv = SO3Convolution(config.so3_channels, 1, config.lmax)
        self.output_bias = nn.Parameter(torch.zeros(()))
        grid_d = _grid_wigner(config.grid_level, config.lmax)
        self.register_buffer(
            "grid_wigner", torch.from_numpy(grid_d.T.copy()).float(), persistent=False
        )
        self.register_buffer("image_mean", torch.zeros(()))
        self.register_buffer("image_std", torch.ones(()))
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int = 0) -> None:
        """Re-initialise every parameter from ``seed`` (deterministic, private generator)."""
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        for conv in self.convs:
            conv.reset_parameters(generator)
        if self.encoder is not None:
            self.encoder.reset_parameters(generator)
        with torch.no_grad():
            fan_in = self.mix.weight.shape[1]
            self.mix.weight.normal_(0.0, math.sqrt(1.0 / fan_in), generator=generator)
            self.mix.bias.zero_()
            self.output_bias.zero_()
        for layer in (self.projection, self.s2_conv, self.activation, self.so3_conv):
            layer.reset_parameters(generator)

    @property
    def grid_size(self) -> int:
        """Number ``G`` of output grid rotations."""
        return int(self.grid_wigner.shape[1])

    def set_normalisation(self, mean: float, std: float) -> None:
        """Store the image normalisation ``(I - mean) / std`` (per-dataset scalars)."""
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise ValueError(
                f"image normalisation needs finite mean and std > 0, got {mean}, {std}"
            )
        self.image_mean.fill_(float(mean))
        self.image_std.fill_(float(std))

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        N = self.config.image_size
        if images.ndim == 2:
            images = images[None]
        if images.ndim != 3 or tuple(images.shape[1:]) != (N, N):
            raise ValueError(
                f"images must have shape (n, {N}, {N}) for this model (image_size={N}), got "
                f"{tuple(images.shape)}; resample the images or train a model for this size"
            )
        return images

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Last convolutional feature map mixed to sphere channels ``(n, Cs, M, M)``."""
        images = self._check_images(torch.as_tensor(images))
        device = self.image_mean.device
        x = images.to(device=device, dtype=torch.float32)
        if self.config.per_image_normalisation:
            mean = x.mean(dim=(-2, -1), keepdim=True)
            x = (x - mean) / x.std(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        else:
            x = (x - self.image_mean) / self.image_std
        x = x[:, None]
        if self.encoder is not None:
            return self.mix(self.encoder(x))
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.mix(x)

    def sphere_coefficients(self, images: torch.Tensor) -> torch.Tensor:
        """Spherical-harmonic coefficients of the hemisphere signal ``(n, Cs, (lmax+1)**2)``."""
        return self.projection(self.features(images))

    def coefficients(self, images: torch.Tensor) -> torch.Tensor:
        """SO(3) harmonic coefficients ``(n, dim_so3)`` of the output logit signal."""
        x = self.sphere_coefficients(images)
        x = self.activation(self.s2_conv(x))
        x = self.so3_conv(x)[:, 0]
        bias = torch.zeros_like(x[:, :1]) + self.output_bias
        return torch.cat([x[:, :1] + bias, x[:, 1:]], dim=1)

    def logits_from_coefficients(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Evaluate ``(n, dim_so3)`` coefficients on the output grid: ``(n, G)``."""
        return coefficients @ self.grid_wigner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Grid logits ``(n, G)`` for images ``(n, N, N)``."""
        return self.logits_from_coefficients(self.coefficients(images))


def build_model(config: ModelConfig, seed: int = 0) -> PoseDistributionNetwork:
    """The untrained network for ``seed`` (also the evaluation's random baseline)."""
    return PoseDistributionNetwork(config, seed=seed)
