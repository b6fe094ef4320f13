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

from dataclasses import dataclass

import numpy as np
import torch

from cryosphere.imaging.microscope import masked_shell_power

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
    of a shell, divided by ``Σ m²``, estimates ``S(k)`` (exact for stationary noise when the
    spectrum varies slowly on the scale of the mask's transform). Each image's background
    mean is removed first (a constant offset is not noise), and the power this removal takes
    from the low shells is restored: each shell is divided by the response of unit white
    noise to the same mask and mean removal instead of ``Σ m²``
    (:func:`_white_noise_response`, exact for white noise); the zero shell takes the value
    of the first.

    ``signal`` ``(n, N, N)``: the images' modelled signal (e.g. each particle's best template
    with its CTF, shift and scale). A particle imaged with a CTF spreads its signal beyond its
    own disc (delocalisation, ~λ·Δf·k: 26 px at 2.5 µm and 1/20 Å⁻¹), so the background holds
    signal in the low shells (1.5× the noise in the first ones for 1UBI at 64 px, SNR 0.05);
    the model's own background power is subtracted, down to a floor of 5 % of the raw
    estimate. Measured: whitening by the corrected spectrum finds 1UBI's poses at 20.5°
    median error against 26.8° uncorrected (docs/training_on_a_refinement.md).

    Raises ValueError when the mask leaves no background or an image holds NaN.
    """
    a = torch.as_tensor(np.asarray(images), dtype=torch.float64)
    if a.ndim != 3 or a.shape[1] != a.shape[2] or a.shape[0] < 1:
        raise ValueError(f"images must have shape (n, N, N), got {tuple(a.shape)}")
    if not bool(torch.isfinite(a).all()):
        raise ValueError("images hold NaN or infinite values; clean the stack first")
    n_pix = a.shape[-1]
    radius = 0.375 * n_pix if radius_px is None else float(radius_px)
    y, x = np.indices((n_pix, n_pix)) - n_pix // 2
    r = np.sqrt(x**2 + y**2)
    ramp = np.clip((r - radius) / max(float(edge_px), 1e-9), 0.0, 1.0)
    mask = torch.from_numpy(0.5 - 0.5 * np.cos(np.pi * ramp))
    weight = float((mask**2).sum())
    if weight < 1.0:
        raise ValueError(
            f"a mask radius of {radius:g} px leaves no background in a {n_pix}-px box; "
            "pass a smaller radius_px"
        )
    shells = _shell_index(n_pix)
    response = _white_noise_response(mask, shells)
    per_shell = masked_shell_power(a, mask, shells) / response
    if signal is not None:
        model = torch.as_tensor(np.asarray(signal), dtype=torch.float64)
        if tuple(model.shape) != tuple(a.shape):
            raise ValueError(f"signal must have the images' shape {tuple(a.shape)}")
        leaked = masked_shell_power(model, mask, shells) / response
        per_shell = np.maximum(per_shell - leaked, 0.05 * per_shell)
    per_shell = np.maximum(per_shell, 1e-12 * per_shell.max())
    return NoiseSpectrum(per_shell, n_pix)


def _white_noise_response(mask: torch.Tensor, shells: np.ndarray) -> np.ndarray:
    """``(n_shells,)`` what :func:`~cryosphere.imaging.microscope.masked_shell_power` returns
    for white noise of unit variance: with ``W = FT(m)`` and ``W₂ = FT(m²)``, removing the
    masked mean ``μ = Σ m I / Σ m`` leaves per coefficient

        E|FT(m (I − μ))|² = Σ m² − 2 Re(W conj(W₂)) / Σ m + |W|² Σ m² / (Σ m)²,

    averaged over each shell (the zero shell takes the first's, as there). Dividing by it
    instead of ``Σ m²`` undoes the mean's removal, which takes power out of the lowest shells
    (to 0.78 of the truth in the first ones, docs/calibration.md)."""
    m = mask.to(torch.float64)
    total, squares = float(m.sum()), float((m**2).sum())
    w, w2 = torch.fft.rfft2(m), torch.fft.rfft2(m**2)
    response = (
        squares - 2.0 * (w * w2.conj()).real / total + (w.real**2 + w.imag**2) * squares / total**2
    ).reshape(-1)
    index = torch.as_tensor(np.asarray(shells), dtype=torch.long).reshape(-1)
    n_shells = int(index.max()) + 1
    summed = torch.zeros(n_shells, dtype=torch.float64).index_add_(0, index, response)
    count = torch.zeros(n_shells, dtype=torch.float64).index_add_(
        0, index, torch.ones(index.numel(), dtype=torch.float64)
    )
    per_shell = (summed / count.clamp(min=1)).numpy()
    per_shell[0] = per_shell[1]
    return np.maximum(per_shell, 1e-12 * squares)
