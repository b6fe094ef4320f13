"""Particles imaged as a microscope images them: CTF in a padded field, then boxed; coloured noise.

Why a padded field
------------------
A real particle is imaged in a whole micrograph, and the CTF acts on that field; the particle is
boxed afterwards. The CTF's point-spread function spreads the signal of spatial frequency ``k``
(1/Å) by a distance (the stationary point of the phase ``χ``, :mod:`cryosphere.imaging.ctf`)::

    d(k) = (1 / 2π) dχ/dk = λ Δf k − Cs λ³ k³          (Å)

so a particle boxed after imaging has lost the part of its high-frequency signal that was
delocalised out of the box. Multiplying by the CTF inside the particle box instead is a
*circular* convolution: the delocalised signal wraps round and stays in the box, which gives the
images information no real particle carries (at 25,000 Å defocus and 0.95 Å/px the in-box
image correlates with the truly imaged one at ≈ 0 in the shells above 0.1 cycles/px).

The padding rule
----------------
Let the projection (its density inside the ``N``-px box) sit at the centre of an ``M``-px field.
The circular convolution on ``M`` adds to an output pixel ``x`` the density at ``y + jM``
(``j ≠ 0``). For ``x`` and ``y`` both in the box, ``|x − y| < N``, so a wrapped term needs
``|x − y + jM| ≥ M − N`` to lie within the point-spread radius ``R``: no wrap reaches the box
when::

    M ≥ N + R,   R = max_{k ≤ k_max} |λ Δf_max k − Cs λ³ k³| / p        (px)

with ``Δf_max`` the largest defocus (``max(U, V)``) of the particles, ``p`` the pixel size (Å)
and ``k_max`` the highest frequency kept (default Nyquist, ``0.5 / p``). :func:`field_size_px`
returns the smallest FFT-friendly even size (factors 2, 3, 5, 7) at least ``N + R``; at
300 kV, 2.5 µm, Cs 2.7 mm and 64 px of 0.95 Å (1UBI at 64 px) that is 64 + 241 → 320 px, five
times the box. A fixed "2-4 × the box" is not a rule: there a 192-px field still correlates
with the truly imaged particle at only 0.29 in the worst shell up to 1/3 cycles/px, 256 px at
0.93, 320 px at 1.00. ``tests/test_microscope.py`` checks the rule against a 1024-px field
(per-shell correlation > 0.9 up to 1/3 cycles/px) and shows the in-box CTF failing it at
15,000 and 25,000 Å.

Coloured noise
--------------
:func:`colour_noise` filters white noise by ``sqrt(P(|k|))`` for a radial power spectrum ``P``
(one value per Fourier shell of width 1/N cycles/px, shells ``0 … N // 2``) and rescales each
image so its variance is unchanged (the SNR keeps its meaning). :func:`pixel_mtf_power` is the
stated model of a detector's pixel response, ``P(k) = sinc²(k)`` (``k`` in cycles/px,
``sinc(x) = sin(πx) / (πx)``: 0.41 at Nyquist); :func:`radial_power_spectrum` measures ``P``
from images (e.g. particle backgrounds, :mod:`cryosphere.imaging.refinement_statistics`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cryosphere.imaging import ctf as ctf_module

__all__ = [
    "delocalisation_px",
    "field_size_px",
    "image_in_field",
    "masked_shell_power",
    "LEAKED_SIGNAL_FLOOR",
    "noise_power_less_signal",
    "shell_index",
    "radial_power_spectrum",
    "pixel_mtf_power",
    "colour_noise",
    "coloured_noise",
    "coloured_noise_spectrum",
    "coloured_power_shape",
]

_MAX_FIELD_PIXELS = 2**24  # pixels of padded field per chunk (64 images of 512 px)
#: Field sizes of :func:`image_in_field` are multiples of this (px): 2⁵, FFT-friendly.
FIELD_STEP_PX = 32


def delocalisation_px(
    ctf: ctf_module.CTFParameters, pixel_size_angstrom: float, max_frequency_px: float = 0.5
) -> float:
    """Largest CTF delocalisation ``R`` (px) of the particles up to ``max_frequency_px``
    (cycles/px): ``max_{k ≤ k_max} |λ Δf_max k − Cs λ³ k³| / p`` (module docstring)."""
    if not pixel_size_angstrom > 0:
        raise ValueError(f"pixel size must be positive (Å), got {pixel_size_angstrom}")
    if not 0 < max_frequency_px <= 0.5:
        raise ValueError(f"max_frequency_px must be in (0, 0.5] cycles/px, got {max_frequency_px}")
    return float(_delocalisation_each_px(ctf, pixel_size_angstrom, max_frequency_px).max())


def _delocalisation_each_px(
    ctf: ctf_module.CTFParameters, pixel_size_angstrom: float, max_frequency_px: float
) -> np.ndarray:
    """``(n,)`` each particle's ``R`` (px) of :func:`delocalisation_px`."""
    p = float(pixel_size_angstrom)
    k = np.linspace(0.0, max_frequency_px / p, 257)[None, :]  # 1/Å
    lam = ctf_module.electron_wavelength_angstrom(ctf.voltage_kv)[:, None]
    defocus = np.maximum(ctf.defocus_u_angstrom, ctf.defocus_v_angstrom)[:, None]
    cs = ctf.spherical_aberration_mm[:, None] * 1e7
    spread = np.abs(lam * defocus * k - cs * lam**3 * k**3)
    return spread.max(axis=1) / p


def _fast_size(n: int) -> int:
    """Smallest even integer ``>= n`` whose prime factors are 2, 3, 5 and 7."""
    m = max(2, int(n) + int(n) % 2)
    while True:
        rest = m
        for prime in (2, 3, 5, 7):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return m
        m += 2


def field_size_px(
    image_size: int,
    ctf: ctf_module.CTFParameters,
    pixel_size_angstrom: float,
    max_frequency_px: float = 0.5,
) -> int:
    """The padded field ``M`` (px) of the module docstring's rule: smallest FFT-friendly even
    size ``>= image_size + R`` with ``R`` from :func:`delocalisation_px`."""
    spread = delocalisation_px(ctf, pixel_size_angstrom, max_frequency_px)
    return _fast_size(int(image_size) + math.ceil(spread))


def image_in_field(
    projections: np.ndarray | torch.Tensor,
    ctf: ctf_module.CTFParameters | None,
    pixel_size_angstrom: float,
    *,
    shifts_px: np.ndarray | None = None,
    field_size: int | None = None,
    max_frequency_px: float = 0.5,
) -> torch.Tensor:
    """Particles ``(n, N, N)`` float32 as a microscope makes them: each projection is placed at
    the centre of an ``M``-px field (zeros around; pixel ``N // 2`` → ``M // 2``), moved by its
    shift ``(sx, sy)`` px (``out(x) = in(x − s)``, as :func:`cryosphere.imaging.ctf.shift_images`),
    multiplied by its CTF there, and boxed back to the centre ``N`` px.

    Args:
        projections: ``(n, N, N)`` noise-free projections ``[image, y, x]``.
        ctf: the particles' CTFs (None: no CTF, only the shift in the field).
        pixel_size_angstrom: Å per pixel of the projections.
        shifts_px: ``(n, 2)`` shifts in px, or None.
        field_size: ``M`` in px; None: the padding rule per particle (``N + R`` of its own
            defocus rounded up to a multiple of :data:`FIELD_STEP_PX`, so the particles of a
            batch share a few field sizes; a particle at 0.5 µm needs a 128-px field where one
            at 2.5 µm needs 320 px, about 2× less work over a 0.5-2.5 µm batch than one field
            for all). Which field a particle gets does not change it: by the rule no wrapped
            signal reaches its box.
        max_frequency_px: ``k_max`` of the rule (cycles/px).
    """
    images = torch.as_tensor(projections, dtype=torch.float32)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"projections must have shape (n, N, N), got {tuple(images.shape)}")
    n, size = images.shape[0], images.shape[-1]
    if ctf is not None and len(ctf) != n:
        raise ValueError(f"{len(ctf)} CTFs given for {n} projections")
    if shifts_px is not None and np.shape(shifts_px) != (n, 2):
        raise ValueError(f"shifts must have shape ({n}, 2), got {np.shape(shifts_px)}")
    if field_size is None and ctf is not None:
        spread = _delocalisation_each_px(ctf, pixel_size_angstrom, max_frequency_px)
        fields = FIELD_STEP_PX * np.ceil((size + np.ceil(spread)) / FIELD_STEP_PX).astype(int)
        fields = np.maximum(fields, _fast_size(size))
        out = torch.empty_like(images)
        for m in np.unique(fields):
            index = np.flatnonzero(fields == m)
            out[index] = image_in_field(
                images[index],
                ctf.subset(index),
                pixel_size_angstrom,
                shifts_px=None if shifts_px is None else np.asarray(shifts_px)[index],
                field_size=int(m),
            )
        return out
    m = size if field_size is None else int(field_size)
    if m < size:
        raise ValueError(f"the field ({m} px) must be at least the box ({size} px)")
    start = m // 2 - size // 2
    chunk = max(1, _MAX_FIELD_PIXELS // (m * m))
    out = torch.empty_like(images)
    for first in range(0, n, chunk):
        part = slice(first, min(n, first + chunk))
        field = torch.zeros((part.stop - first, m, m), dtype=torch.float32, device=images.device)
        field[:, start : start + size, start : start + size] = images[part]
        spectrum = torch.fft.rfft2(field)  # one transform pair for the shift and the CTF
        if shifts_px is not None:
            spectrum *= _phase_ramp(np.asarray(shifts_px)[part], m, images.device)
        if ctf is not None:
            index = np.arange(part.start, part.stop)
            spectrum *= ctf_module.ctf_2d(ctf.subset(index), m, pixel_size_angstrom, images.device)
        field = torch.fft.irfft2(spectrum, s=(m, m))
        out[part] = field[:, start : start + size, start : start + size]
    return out


def _phase_ramp(shifts_px: np.ndarray, size: int, device: torch.device) -> torch.Tensor:
    """``exp(−2πi (sx kx + sy ky))`` ``(n, M, M // 2 + 1)`` complex64: multiplying a spectrum
    by it moves the content by ``(sx, sy)`` px (as :func:`cryosphere.imaging.ctf.shift_images`)."""
    ky = torch.fft.fftfreq(size, dtype=torch.float64)[None, :, None]
    kx = torch.fft.rfftfreq(size, dtype=torch.float64)[None, None, :]
    s = torch.as_tensor(shifts_px, dtype=torch.float64)
    phase = (-2.0 * math.pi) * (s[:, 0, None, None] * kx + s[:, 1, None, None] * ky)
    return torch.complex(torch.cos(phase).float(), torch.sin(phase).float()).to(device)


def shell_index(size: int) -> torch.Tensor:
    """Shell of every ``rfft2`` coefficient of an ``N``-px image: ``round(|k| · N)``, clipped
    to ``N // 2`` (corners beyond Nyquist join the last shell)."""
    ky = torch.fft.fftfreq(size, dtype=torch.float64)[:, None]
    kx = torch.fft.rfftfreq(size, dtype=torch.float64)[None, :]
    shells = torch.round(torch.sqrt(ky**2 + kx**2) * size).long()
    return shells.clamp_(max=size // 2)


def masked_shell_power(
    images: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None,
    shells: np.ndarray | torch.Tensor,
) -> np.ndarray:
    """Mean of ``|rfft2(m · (I − mean_m I))|²`` over the images ``(n, N, N)`` and over the
    ``rfft2`` coefficients of each shell: ``(max(shells) + 1,)`` float64, image units² (not
    divided by ``Σ m²``). ``mask`` ``m``: ``(N, N)`` weights (None: 1), each image's mean under
    it removed first; ``shells``: the shell ``(N, N // 2 + 1)`` of every coefficient. The zero
    shell, emptied by the mean's removal, takes the first shell's value. The transform runs in
    single precision (within 1e-5 of a double-precision reference, tests/test_microscope.py),
    the means and sums accumulate in double."""
    tensor = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if tensor.ndim != 3 or tensor.shape[1] != tensor.shape[2]:
        raise ValueError(f"images must have shape (n, N, N), got {tuple(tensor.shape)}")
    if mask is not None:
        weights = torch.as_tensor(np.asarray(mask), dtype=torch.float32)
        mean = (tensor * weights).sum(dim=(1, 2), dtype=torch.float64) / float(weights.sum())
        tensor = (tensor - mean.float()[:, None, None]) * weights
    spectrum = torch.fft.rfft2(tensor)
    power = spectrum.real.square() + spectrum.imag.square()
    power = power.sum(dim=0, dtype=torch.float64).reshape(-1) / max(tensor.shape[0], 1)
    index = torch.as_tensor(np.asarray(shells), dtype=torch.long).reshape(-1)
    n_shells = int(index.max()) + 1
    total = torch.zeros(n_shells, dtype=torch.float64).index_add_(0, index, power)
    count = torch.bincount(index, minlength=n_shells).to(torch.float64)
    spectrum = (total / count.clamp(min=1)).numpy()
    spectrum[0] = spectrum[1]
    return spectrum


#: What :func:`noise_power_less_signal` keeps at least: this share of the measured power.
LEAKED_SIGNAL_FLOOR = 0.05


def noise_power_less_signal(
    measured: np.ndarray,
    signal: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor,
    shells: np.ndarray | torch.Tensor,
) -> np.ndarray:
    """The noise share of a background's shell power ``measured`` (from
    :func:`masked_shell_power` of the images under ``mask``): less the modelled ``signal``'s
    own power under the same mask (``(n, N, N)``, e.g. each particle's template with its CTF,
    shift and scale), kept above ``LEAKED_SIGNAL_FLOOR`` of ``measured``.

    A particle imaged with a CTF spreads its signal beyond its disc (~λ·Δf·k: 26 px at 2.5 µm
    and 1/20 Å⁻¹), so the background holds signal in the low shells, which is not noise.
    Returns ``(len(measured),)`` float64, image units².
    """
    measured = np.asarray(measured, dtype=np.float64)
    leaked = masked_shell_power(signal, mask, shells)
    return np.maximum(measured - leaked, LEAKED_SIGNAL_FLOOR * measured)


def radial_power_spectrum(
    images: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor | None = None
) -> np.ndarray:
    """Mean power per Fourier shell ``(N // 2 + 1,)`` of images ``(n, N, N)``, normalised to a
    mean of 1 over the ``rfft2`` coefficients (a shape, not a level).

    ``mask``: ``(N, N)`` 0/1 weights applied to every image before the transform (e.g. the
    background outside a circle); the images' mean over the mask is removed first
    (:func:`masked_shell_power`).
    """
    size = np.asarray(images).shape[-1]
    shells = shell_index(size)
    spectrum = masked_shell_power(images, mask, shells)
    return spectrum / float(np.mean(spectrum[shells.numpy()]))


def pixel_mtf_power(image_size: int) -> np.ndarray:
    """The stated detector model ``P(k) = sinc²(k)`` per shell ``(N // 2 + 1,)``, ``k = shell /
    N`` cycles/px (module docstring)."""
    k = np.arange(int(image_size) // 2 + 1) / int(image_size)
    return np.sinc(k) ** 2


def colour_noise(noise: torch.Tensor, radial_power: np.ndarray) -> torch.Tensor:
    """White noise ``(n, N, N)`` filtered by ``sqrt(radial_power)`` (``(N // 2 + 1,)`` per shell,
    :func:`radial_power_spectrum`) and rescaled to each image's own standard deviation."""
    tensor = torch.as_tensor(noise, dtype=torch.float32)
    size = tensor.shape[-1]
    power = np.asarray(radial_power, dtype=np.float64)
    if power.shape != (size // 2 + 1,) or not np.all(np.isfinite(power)) or np.any(power < 0):
        raise ValueError(
            f"radial_power must hold {size // 2 + 1} finite values >= 0 (one per shell of a "
            f"{size}-px image), got shape {power.shape}"
        )
    amplitude = torch.from_numpy(np.sqrt(power)).float()[shell_index(size)].to(tensor.device)
    coloured = torch.fft.irfft2(torch.fft.rfft2(tensor) * amplitude, s=(size, size))
    before = tensor.std(dim=(1, 2), keepdim=True)
    after = coloured.std(dim=(1, 2), keepdim=True).clamp(min=1e-12)
    return coloured * (before / after)


# --------------------------------------------------------------------------------------------
# coloured noise with a low-frequency-heavy (Lorentzian) spectrum
# --------------------------------------------------------------------------------------------
def coloured_power_shape(image_size: int, corner_frequency: float = 0.1) -> np.ndarray:
    """Real detectors and backgrounds do not give white noise: the MTF and the ice put more
    power at low spatial frequency. This model's power per pixel falls with frequency as
    ``S(k) ∝ 1 / (1 + (|k| / k0)²)`` (``k``, ``k0`` in cycles/px), at variance ``sigma²`` per
    pixel (the SNR definition of :func:`cryosphere.imaging.projection.add_gaussian_noise`);
    :func:`coloured_noise` draws it and :func:`coloured_noise_spectrum` gives it per shell.

    Returns ``(N, N // 2 + 1)`` float64 relative power ``1 / (1 + (|k|/k0)²)`` on the ``rfft2``
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
    :class:`cryosphere.poses.search.noise.NoiseSpectrum`, for the exact posterior)."""
    n = int(image_size)
    k0 = float(corner_frequency)
    shells = np.arange(int(np.ceil(n / np.sqrt(2))) + 2) / n
    ky = np.fft.fftfreq(n)[:, None]
    kx = np.fft.fftfreq(n)[None, :]
    norm = (1.0 / (1.0 + (kx**2 + ky**2) / k0**2)).mean()
    return float(sigma) ** 2 / (1.0 + shells**2 / k0**2) / norm
