"""The noise a search whitens by: a radially symmetric power spectrum, white or measured from
the particles' backgrounds (less the signal the CTF carries into them).

Refinement programs weigh each Fourier shell by the noise power there, σ²(k), estimated from
the particles. :func:`background_noise_spectrum` estimates it from the pixels outside a
circular mask, which hold noise only, up to two effects it corrects: removing each
background's mean takes power out of the lowest shells (undone exactly for white noise by the
mask's own response), and the CTF spreads a particle's signal beyond its disc (subtracted
when the modelled signal is given). :mod:`cryosphere.poses.search.posterior` whitens by it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from cryosphere.imaging.microscope import masked_shell_power, noise_power_less_signal

__all__ = ["NoiseSpectrum", "background_noise_spectrum", "white_noise_spectrum"]


@dataclass(frozen=True)
class NoiseSpectrum:
    """A radially symmetric noise power spectrum.

    Attributes:
        power: ``(n_shells,)`` float64 noise power per pixel (image units²) of shell
            ``j = round(|k| · N)`` (``k`` in cycles/px); white noise of variance ``σ²`` has
            ``power = σ²`` in every shell.
        image_size: ``N`` px.
    """

    power: np.ndarray
    image_size: int

    def __post_init__(self) -> None:
        p = np.asarray(self.power, dtype=np.float64)
        if p.ndim != 1 or p.size < 1 or not np.all(np.isfinite(p)) or np.any(p <= 0):
            raise ValueError("noise power must be a 1-D array of positive finite values")

    def half_plane(self) -> torch.Tensor:
        """``(N, N // 2 + 1)`` float64 power at every ``rfft2`` coefficient."""
        shells = _shell_index(self.image_size)
        power = np.asarray(self.power, dtype=np.float64)
        return torch.from_numpy(power[np.minimum(shells, len(power) - 1)])


def _shell_index(n_pix: int) -> np.ndarray:
    """Shell ``round(|k| · N)`` of every ``rfft2`` coefficient, *not* clipped at Nyquist (unlike
    :func:`cryosphere.imaging.microscope.shell_index`): the corners beyond ``N // 2`` keep shells
    of their own, so a spectrum that still falls there is not flattened into the last one."""
    ky = np.fft.fftfreq(n_pix)[:, None]
    kx = np.fft.rfftfreq(n_pix)[None, :]
    return np.rint(np.sqrt(kx**2 + ky**2) * n_pix).astype(np.int64)


def white_noise_spectrum(sigma: float, image_size: int) -> NoiseSpectrum:
    """White noise of standard deviation ``sigma`` (image units) on an ``image_size`` box."""
    n_shells = int(_shell_index(int(image_size)).max()) + 1
    return NoiseSpectrum(np.full(n_shells, float(sigma) ** 2), int(image_size))


def background_noise_spectrum(
    images: np.ndarray | torch.Tensor,
    radius_px: float | None = None,
    edge_px: float = 3.0,
    signal: np.ndarray | torch.Tensor | None = None,
) -> NoiseSpectrum:
    """The noise power spectrum per shell, from the particles' backgrounds.

    Each image ``(n, N, N)`` is multiplied by a mask ``m`` that is 0 inside a circle of
    ``radius_px`` (default ``0.375 · N``, the background of
    :func:`cryosphere.imaging.preprocess.normalise_background`) and rises to 1 over a cosine
    edge of ``edge_px``; the mean of ``|rfft2(m · I)|²`` over images and over the coefficients
    of a shell gives ``P_j``, after each image's background mean is removed (a constant offset
    is not noise). For stationary noise ``P = A S`` exactly, with ``A`` the mask's shell
    response (:func:`_shell_response`: the mask's transform mixes neighbouring shells, which
    flattens a steep spectrum's lowest shells, and the mean's removal empties the lowest
    ones); ``S`` is solved for by non-negative least squares, the zero shell taking the first
    shell's value. Measured (``tests/test_search_posterior.py``, 300 particles of 32 px): the
    first shell of a low-frequency-heavy spectrum within 5 % of the truth, where dividing by
    ``Σ m²`` gave 0.78 of it.

    ``signal`` ``(n, N, N)``: the images' modelled signal (e.g. each particle's best template
    with its CTF, shift and scale). A particle imaged with a CTF spreads its signal beyond its
    own disc (delocalisation, ~λ·Δf·k: 26 px at 2.5 µm and 1/20 Å⁻¹), so the background holds
    signal in the low shells (1.5× the noise in the first ones for 1UBI at 64 px, SNR 0.05);
    the model's own background power is subtracted
    (:func:`~cryosphere.imaging.microscope.noise_power_less_signal`). Measured: whitening by
    the corrected spectrum finds 1UBI's poses at 19.5° median error against 24.8° uncorrected
    (docs/training_on_a_refinement.md).

    Raises ValueError when the mask leaves no background or an image holds NaN.
    """
    a = torch.as_tensor(np.asarray(images))
    a = a if a.is_floating_point() else a.to(torch.float32)
    if a.ndim != 3 or a.shape[1] != a.shape[2] or a.shape[0] < 1:
        raise ValueError(f"images must have shape (n, N, N), got {tuple(a.shape)}")
    if not bool(torch.isfinite(a).all()):
        raise ValueError("images hold NaN or infinite values; clean the stack first")
    n_pix = a.shape[-1]
    radius = 0.375 * n_pix if radius_px is None else float(radius_px)
    mask = torch.from_numpy(_background_mask(n_pix, radius, float(edge_px)))
    weight = float((mask**2).sum())
    if weight < 1.0:
        raise ValueError(
            f"a mask radius of {radius:g} px leaves no background in a {n_pix}-px box; "
            "pass a smaller radius_px"
        )
    shells = _shell_index(n_pix)
    measured = masked_shell_power(a, mask, shells)
    if signal is not None:
        model = torch.as_tensor(np.asarray(signal), dtype=torch.float32)
        if tuple(model.shape) != tuple(a.shape):
            raise ValueError(f"signal must have the images' shape {tuple(a.shape)}")
        measured = noise_power_less_signal(measured, model, mask, shells)
    per_shell = _solve_shells(_shell_response(n_pix, radius, float(edge_px)), measured)
    per_shell = np.maximum(per_shell, 1e-6 * per_shell.max())
    return NoiseSpectrum(per_shell, n_pix)


@functools.lru_cache(maxsize=8)
def _shell_response(n_pix: int, radius_px: float, edge_px: float) -> np.ndarray:
    """``(n_shells, n_shells)`` ``A[j, i]``: what
    :func:`~cryosphere.imaging.microscope.masked_shell_power` returns in shell ``j`` for
    stationary Gaussian noise of unit power in shell ``i`` and none elsewhere (autocovariance
    ``C_i = IFFT(1_{shell i})``), through the mask ``m`` and the removal of the masked mean
    ``μ = Σ m I / Σ m``. With ``A = FFT(m n)``, ``W = FFT(m)`` and ``R = m ⋆ m`` (the mask's
    circular autocorrelation), per coefficient::

        E|A − μ W|² = FFT(R · C)  −  2 Re(FFT(m · (C ⊛ m)) conj(W)) / Σ m  +  Σ(R · C) |W|² / (Σ m)²

    averaged over the coefficients of shell ``j`` (the zero shell copies the first's). A
    spectrum ``S`` then gives ``P = A S``: the mask's transform mixes neighbouring shells
    (which flattens a steep spectrum's lowest shells) and the mean's removal empties the
    lowest ones; :func:`background_noise_spectrum` solves it for ``S``."""
    mask = torch.from_numpy(_background_mask(n_pix, radius_px, edge_px))
    total = float(mask.sum())
    w = torch.fft.fft2(mask)
    autocorrelation = torch.fft.ifft2(w.abs() ** 2).real
    ky = np.fft.fftfreq(n_pix)[:, None]
    kx = np.fft.fftfreq(n_pix)[None, :]
    full = torch.from_numpy(np.rint(np.sqrt(kx**2 + ky**2) * n_pix).astype(np.int64))
    half = torch.from_numpy(_shell_index(n_pix)).reshape(-1)
    n_shells = int(half.max()) + 1
    count = torch.zeros(n_shells, dtype=torch.float64).index_add_(
        0, half, torch.ones(half.numel(), dtype=torch.float64)
    )
    matrix = np.zeros((n_shells, n_shells))
    for shell in range(n_shells):
        spectrum = (full == shell).to(torch.float64)
        covariance = torch.fft.ifft2(spectrum).real
        masked = autocorrelation * covariance
        cross = torch.fft.fft2(mask * torch.fft.ifft2(spectrum * w).real) / total
        response = (
            torch.fft.fft2(masked).real
            - 2.0 * (cross * w.conj()).real
            + float(masked.sum()) / total**2 * w.abs() ** 2
        )
        column = response[:, : n_pix // 2 + 1].reshape(-1)
        summed = torch.zeros(n_shells, dtype=torch.float64).index_add_(0, half, column)
        matrix[:, shell] = (summed / count.clamp(min=1)).numpy()
    matrix[0] = matrix[1]
    return matrix


def _background_mask(n_pix: int, radius_px: float, edge_px: float) -> np.ndarray:
    """``(N, N)`` float64: 0 inside the circle of ``radius_px`` around pixel ``N // 2``, rising
    to 1 over a cosine edge of ``edge_px``."""
    y, x = np.indices((n_pix, n_pix)) - n_pix // 2
    ramp = np.clip((np.sqrt(x**2 + y**2) - radius_px) / max(float(edge_px), 1e-9), 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * ramp)


def _solve_shells(matrix: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """The spectrum ``S >= 0`` per shell with ``A S ≈ P`` (``P``: ``measured``), shells from the
    first on (the zero shell, emptied by the mean's removal, takes the first's value: its
    column joins the first's), by non-negative least squares."""
    from scipy.optimize import nnls

    a = matrix[1:, 1:].copy()
    a[:, 0] += matrix[1:, 0]
    solution, _ = nnls(a, np.asarray(measured, dtype=np.float64)[1:], maxiter=50 * a.shape[1])
    return np.concatenate([solution[:1], solution])
