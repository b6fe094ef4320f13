"""Fourier resampling of particle images to another pixel size, same box and centre.

Optics groups of one data set may have different pixel sizes (two detectors, two sessions);
the network and the map search need one. :func:`resample_images` takes ``(n, N, N)`` images of
pixel size ``p`` (Å) to pixel size ``P`` in the same ``N``-px box, centre pixel ``N // 2``
kept: each image is read as the band-limited trigonometric polynomial through its samples
(the inverse DFT, Nyquist term dropped) and evaluated at ``x' = N // 2 + (i − N // 2) · P / p``
(px of the input), after a low-pass to ``min(1 / 2p, 1 / 2P)`` (cycles/Å) so a coarser output
keeps no alias. Separable: ``out = A · image · Aᵀ`` with the ``(N, N)`` matrix

    A[i, j] = (1 / N) · (1 + 2 Σ_{k=1..K} cos(2π k (x'_i − j) / N)),   K = ⌊min(N / 2 − 1, N p / 2P)⌋.

``P = p`` gives the identity up to the dropped Nyquist term. With ``P < p`` (finer output) the
field of view shrinks and nothing wraps; with ``P > p`` the edge pixels sample the periodic
continuation, so :func:`common_pixel_size` picks the finest pixel of a set.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["common_pixel_size", "resampling_matrix", "resample_images"]


def common_pixel_size(pixel_angstrom: np.ndarray) -> float:
    """The one pixel size (Å) a set with per-particle sizes ``(n,)`` is brought to: the finest."""
    return float(np.min(np.asarray(pixel_angstrom, dtype=np.float64)))


@functools.lru_cache(maxsize=32)
def resampling_matrix(image_size: int, from_pixel: float, to_pixel: float) -> np.ndarray:
    """``(N, N)`` float64 matrix ``A`` of the module docstring."""
    n = int(image_size)
    ratio = float(to_pixel) / float(from_pixel)
    centre = n // 2
    positions = centre + (np.arange(n) - centre) * ratio  # x'_i, input px
    top = int(np.floor(min(n / 2 - 1, n / (2 * ratio)) + 1e-9))
    delta = positions[:, None] - np.arange(n)[None, :]
    k = np.arange(1, top + 1)
    terms = np.cos(2 * np.pi * k[None, None, :] * delta[:, :, None] / n).sum(axis=2)
    return (1.0 + 2.0 * terms) / n


def resample_images(
    images: np.ndarray | torch.Tensor, from_pixel: float, to_pixel: float
) -> torch.Tensor:
    """``(n, N, N)`` images of ``from_pixel`` Å resampled to ``to_pixel`` Å, same box:
    ``(n, N, N)`` float32 (module docstring)."""
    tensor = torch.as_tensor(images, dtype=torch.float32)
    if tensor.ndim != 3 or tensor.shape[1] != tensor.shape[2]:
        raise ValueError(f"images must have shape (n, N, N), got {tuple(tensor.shape)}")
    if not (from_pixel > 0 and to_pixel > 0):
        raise ValueError(f"pixel sizes must be positive (Å), got {from_pixel}, {to_pixel}")
    matrix = torch.as_tensor(
        resampling_matrix(tensor.shape[-1], float(from_pixel), float(to_pixel)),
        dtype=torch.float64,
        device=tensor.device,
    )
    out = matrix @ tensor.double() @ matrix.T
    return out.float()
