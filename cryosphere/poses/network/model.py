"""Equivariant pose-distribution network: image -> probability distribution over SO(3).

Architecture (all shapes for a batch of ``n`` images of ``N x N`` pixels)
------------------------------------------------------------------------
1. **Image normalisation** ``(I - mean) / std`` with per-dataset scalars stored as buffers
   (:meth:`PoseDistributionNetwork.set_normalisation`), so they travel with the weights.
2. **Encoder** (``ModelConfig.encoder``): ``"resnet"`` is a residual CNN
   (:mod:`cryosphere.poses.network.encoders`); ``"quarter_turn"``, the poster's, is two
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
SO(3) signals are stored as flattened Wigner-D blocks, ``f(R) = sum_l <F_l, D_l(R)>`` (e3nn's
matrices); the layout and the left translation are in :mod:`cryosphere.poses.network.harmonics`.

Equivariance (``encoder="quarter_turn"``; the ``"resnet"`` encoder learns it): rotating the
input image by ``Q = Rz(90 k deg)`` (the image of pose ``Q @ R``)
left-translates the output, ``p(S | I(Q R)) = p(Q^T S | I(R))``, exactly up to float error.
For general rotations of the sphere signal the S2 and SO(3) convolutions are exactly
equivariant and the SO(3) activation approximately (grid aliasing).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cryosphere._checks import known_fields
from cryosphere.geometry import grids
from cryosphere.imaging import preprocess
from cryosphere.poses.network.encoders import ENCODERS, ResidualEncoder, resnet_feature_size
from cryosphere.poses.network.harmonics import _grid_wigner
from cryosphere.poses.network.layers import (
    HemisphereProjection,
    QuarterTurnConv2d,
    S2Convolution,
    SO3Activation,
    SO3Convolution,
)

__all__ = [
    "ARCHITECTURE",
    "MAX_LMAX",
    "ModelConfig",
    "PoseDistributionNetwork",
    "build_model",
]

ARCHITECTURE = "cryosphere.poses.network.model.PoseDistributionNetwork/v1"
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
            ``conv_kernel_sizes``) or ``"resnet"`` (:mod:`cryosphere.poses.network.encoders`).
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
        grids.healpix_so3_grid_size(self.grid_level)  # validates
        if self.activation_grid_level is not None:
            grids.healpix_so3_grid_size(self.activation_grid_level)

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
        return known_fields(cls, record)(**record)


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
            mean, std = preprocess.mean_and_std(x, dim=(-2, -1), keepdim=True, unbiased=True)
            x = (x - mean) / std.clamp_min(1e-12)
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
