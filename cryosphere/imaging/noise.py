"""Coloured Gaussian noise for simulated particles.

Real detectors and real backgrounds do not give white noise: the detector's MTF and the ice
put more noise power at low spatial frequency. :func:`coloured_noise` draws stationary
Gaussian noise whose power spectrum per pixel falls with frequency as

    S(k) ∝ 1 / (1 + (|k| / k0)²)          (k, k0 in cycles/px)

normalised so that its variance per pixel is ``sigma²`` (the same SNR definition as the white
noise of :func:`cryosphere.imaging.projection.add_gaussian_noise`: ``σ² = var(clean) / SNR``).
:func:`coloured_noise_spectrum` gives the same spectrum per shell
(image units² per pixel, the units of :class:`cryosphere.poses.search_posterior.NoiseSpectrum`).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["coloured_noise", "coloured_noise_spectrum", "coloured_power_shape"]


def coloured_power_shape(image_size: int, corner_frequency: float = 0.1) -> np.ndarray:
    """``(N, N // 2 + 1)`` float64 relative power ``1 / (1 + (|k|/k0)²)`` on the ``rfft2``
    half-plane, scaled so its mean over the full plane is 1 (the variance per pixel)."""
    n = int(image_size)
    if not corner_frequency > 0:
        raise ValueError(f"corner_frequency must be > 0 cycles/px, got {corner_frequency}")
    ky = np.fft.fftfreq(n)[:, None]
    kx = np.fft.fftfreq(n)[None, :]
    full = 1.0 / (1.0 + (kx**2 + ky**2) / float(corner_frequency) ** 2)
    full /= full.mean()
    return full[:, : n // 2 + 1]


def coloured_noise(
    shape: tuple[int, int, int],
    sigma: float | np.ndarray,
    seed: int | np.random.Generator,
    corner_frequency: float = 0.1,
) -> torch.Tensor:
    """``(n, N, N)`` float32 stationary Gaussian noise of variance ``sigma²`` per pixel (one
    value, or ``(n,)``) with the low-frequency-heavy spectrum of the module docstring; seeded."""
    n, ny, nx = (int(v) for v in shape)
    if ny != nx:
        raise ValueError(f"images must be square, got {ny}x{nx}")
    rng = np.random.default_rng(seed)
    white = torch.from_numpy(rng.standard_normal((n, ny, nx)))
    amplitude = torch.from_numpy(np.sqrt(coloured_power_shape(nx, corner_frequency)))
    noise = torch.fft.irfft2(torch.fft.rfft2(white) * amplitude, s=(ny, nx))
    scale = torch.as_tensor(np.broadcast_to(np.asarray(sigma, np.float64), (n,)).copy())
    return (noise * scale[:, None, None]).float()


def coloured_noise_spectrum(
    image_size: int, sigma: float, corner_frequency: float = 0.1
) -> np.ndarray:
    """The power per pixel of :func:`coloured_noise` per shell ``j = round(|k| N)``
    ``(n_shells,)`` float64 (the ``power`` of a
    :class:`cryosphere.poses.search_posterior.NoiseSpectrum`, for the exact posterior)."""
    n = int(image_size)
    k0 = float(corner_frequency)
    shells = np.arange(int(np.ceil(n / np.sqrt(2))) + 2) / n
    ky = np.fft.fftfreq(n)[:, None]
    kx = np.fft.fftfreq(n)[None, :]
    norm = (1.0 / (1.0 + (kx**2 + ky**2) / k0**2)).mean()
    return float(sigma) ** 2 / (1.0 + shells**2 / k0**2) / norm
