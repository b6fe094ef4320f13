"""Contrast transfer function (CTF), in-plane shifts and CTF correction of particle images.

Signal
------
Images are float arrays ``(n, N, N)`` indexed ``[image, y, x]``, centre at pixel ``N // 2``.
Fourier arrays use the ``torch.fft.rfft2`` layout ``(n, N, N // 2 + 1)``: rows are ``ky =
fftfreq(N)``, columns ``kx = rfftfreq(N)`` (cycles per pixel; divide by the pixel size for
cycles per Å).

CTF (RELION's form)
-------------------
For a spatial frequency ``k`` (1/Å) at angle ``φ = atan2(ky, kx)`` from the image x axis::

    Δf(φ)  = (U + V) / 2 + (U − V) / 2 · cos(2 (φ − θ))          (U, V, θ: rlnDefocusU/V/Angle)
    χ(k)   = π λ Δf |k|² − (π / 2) Cs λ³ |k|⁴ + asin(w) + ψ      (w: rlnAmplitudeContrast,
                                                                   ψ: rlnPhaseShift)
    CTF(k) = s · sin(χ(k)) · exp(−B |k|² / 4)                    (s: rlnCtfScalefactor)

with λ the relativistic electron wavelength at the voltage, Cs in Å and B the B-factor (Å²).
This is RELION's ``CTF::getCTF`` (which writes ``−sin(−χ)`` with a negative defocus);
``tests/test_ctf.py`` checks it against a transcription of that form, 90° phase shift included.
Defocus is positive for underfocus; CTF(0) = +w and the first lobe is positive, so a particle of
positive density stays positive at low resolution (RELION's sign). A phase plate's ψ = 90°
makes CTF(0) = s · cos(asin w) ≈ s. Images marked CTF-premultiplied
(rlnCtfDataAreCtfPremultiplied = 1: the image already multiplied by its CTF once more) carry
CTF² in all: :func:`ctf_2d` then returns CTF², which phase flip, the CTF-aware search and the
Wiener reconstruction use as the images' transfer. :func:`ctf_2d` evaluates this
closed form itself (vectorised, cached frequency grids: about 4x faster than
``torch_ctf.calculate_ctf_2d`` on a 64-px box, which made it the slowest step of ``predict``);
``tests/test_ctf.py`` checks it against ``torch_ctf`` (angle θ measured from x, as RELION) and
against a float64 transcription. A simulated particle is ``irfft2(CTF · rfft2(projection))``.

Shifts and RELION origins
-------------------------
:func:`shift_images` moves image content by ``(sx, sy)`` pixels (a Fourier phase ramp, exact
for integer shifts up to the unpaired Nyquist row/column of even boxes): ``out(x) = in(x − s)``.
RELION 3.1+ stores ``rlnOriginXAngst/YAngst`` = ``o`` such that the particle's centre lies at
``box centre − o / pixel_size``: RELION predicts a particle as the reference projection shifted
by ``−o`` (``ObservationModel::predictObservation`` shifts by ``N/2 − o``), and re-centring
moves a particle's coordinate to ``rlnCoordinate − o``. So **shifting a particle image by
``+o / pixel_size`` centres it** (:func:`centring_shift_px`), and a simulated particle displaced
by ``s`` pixels is written with origin ``o = −s · pixel_size``.

CTF correction
--------------
:func:`phase_flip` multiplies the spectrum by ``sign(CTF)`` (restores contrast signs, keeps the
noise white); :func:`wiener_filter` by ``CTF / (CTF² + K)``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "CTFParameters",
    "random_ctf_parameters",
    "ctf_2d",
    "electron_wavelength_angstrom",
    "apply_ctf",
    "phase_flip",
    "wiener_filter",
    "shift_images",
    "random_shifts_px",
    "centring_shift_px",
    "origin_angstrom_from_shift_px",
]


@dataclass(frozen=True)
class CTFParameters:
    """Per-particle CTF parameters (RELION labels in brackets).

    Attributes:
        defocus_u_angstrom, defocus_v_angstrom: ``(n,)`` defocus in Å, positive underfocus
            (rlnDefocusU, rlnDefocusV).
        defocus_angle_deg: ``(n,)`` direction of U from the image x axis, deg (rlnDefocusAngle).
        voltage_kv: ``(n,)`` acceleration voltage, kV (rlnVoltage).
        spherical_aberration_mm: ``(n,)`` Cs, mm (rlnSphericalAberration).
        amplitude_contrast: ``(n,)`` fraction in [0, 1) (rlnAmplitudeContrast).
        b_factor: ``(n,)`` envelope B-factor, Å² (rlnCtfBfactor); 0 for none.
        phase_shift_deg: ``(n,)`` phase-plate shift ψ, deg (rlnPhaseShift); 0 for none.
        scale_factor: ``(n,)`` CTF scale s (rlnCtfScalefactor); 1 for none.
        premultiplied: ``(n,)`` 1 where the images are CTF-premultiplied
            (rlnCtfDataAreCtfPremultiplied), else 0.
    """

    defocus_u_angstrom: np.ndarray
    defocus_v_angstrom: np.ndarray
    defocus_angle_deg: np.ndarray
    voltage_kv: np.ndarray
    spherical_aberration_mm: np.ndarray
    amplitude_contrast: np.ndarray
    b_factor: np.ndarray
    phase_shift_deg: np.ndarray | float = 0.0
    scale_factor: np.ndarray | float = 1.0
    premultiplied: np.ndarray | float = 0.0

    def __post_init__(self) -> None:
        n = np.asarray(self.defocus_u_angstrom).reshape(-1).shape[0]
        for name in self.__dataclass_fields__:
            value = np.asarray(getattr(self, name), dtype=np.float64).reshape(-1)
            if value.shape[0] == 1 and n > 1:
                value = np.full(n, value[0])
            if value.shape != (n,):
                raise ValueError(f"CTF field {name} must have shape ({n},), got {value.shape}")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"CTF field {name} holds NaN or infinite values")
            object.__setattr__(self, name, value)
        if np.any(self.voltage_kv <= 0):
            raise ValueError("voltage_kv must be positive (e.g. 300 kV)")
        if np.any((self.amplitude_contrast < 0) | (self.amplitude_contrast >= 1)):
            raise ValueError("amplitude_contrast must lie in [0, 1) (typically 0.07-0.1)")
        if np.any(self.scale_factor <= 0):
            raise ValueError("the CTF scale factor (rlnCtfScalefactor) must be positive")
        if np.any((self.premultiplied != 0) & (self.premultiplied != 1)):
            raise ValueError("rlnCtfDataAreCtfPremultiplied must be 0 or 1")

    def __len__(self) -> int:
        return int(self.defocus_u_angstrom.shape[0])

    def subset(self, indices: np.ndarray) -> CTFParameters:
        """The parameters of particles ``indices``."""
        return CTFParameters(**{k: getattr(self, k)[indices] for k in self.__dataclass_fields__})


def random_ctf_parameters(
    n: int,
    rng: np.random.Generator,
    *,
    defocus_range_angstrom: tuple[float, float] = (5000.0, 25000.0),
    max_astigmatism_angstrom: float = 500.0,
    voltage_kv: float = 300.0,
    spherical_aberration_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    b_factor: float = 0.0,
) -> CTFParameters:
    """Draw ``n`` particles' CTFs: mean defocus uniform in ``defocus_range_angstrom`` (Å),
    ``(U − V) / 2`` uniform in ``[0, max_astigmatism_angstrom / 2]``, angle uniform in
    [0, 180) deg; the optics are shared."""
    low, high = (float(v) for v in defocus_range_angstrom)
    if not 0 < low <= high:
        raise ValueError(f"defocus range must satisfy 0 < min <= max (Å), got {(low, high)}")
    if max_astigmatism_angstrom < 0:
        raise ValueError(f"max_astigmatism_angstrom must be >= 0, got {max_astigmatism_angstrom}")
    mean = rng.uniform(low, high, n)
    half = rng.uniform(0.0, max_astigmatism_angstrom / 2.0, n)
    angle = rng.uniform(0.0, 180.0, n)
    return CTFParameters(
        defocus_u_angstrom=mean + half,
        defocus_v_angstrom=mean - half,
        defocus_angle_deg=angle,
        voltage_kv=np.full(n, voltage_kv),
        spherical_aberration_mm=np.full(n, spherical_aberration_mm),
        amplitude_contrast=np.full(n, amplitude_contrast),
        b_factor=np.full(n, b_factor),
    )


def electron_wavelength_angstrom(voltage_kv: np.ndarray | float) -> np.ndarray:
    """Relativistic electron wavelength (Å) at ``voltage_kv``:
    ``λ = h / sqrt(2 m e V (1 + e V / 2 m c²))`` = ``12.2643 / sqrt(V (1 + 0.978466e-6 V))``
    with ``V`` in volts (RELION's constants)."""
    volts = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return 12.2643247 / np.sqrt(volts * (1.0 + 0.978466e-6 * volts))


@functools.lru_cache(maxsize=16)
def _polar_grids(image_size: int, device: str) -> tuple[torch.Tensor, ...]:
    """Cached rfft2-grid arrays ``(N, N // 2 + 1)`` float32: ``|k|²`` (cycles²/px²),
    ``|k|⁴``, ``cos 2φ`` and ``sin 2φ`` (``φ = atan2(ky, kx)``). Read-only: never modify."""
    ky = torch.fft.fftfreq(image_size, dtype=torch.float64)[:, None]
    kx = torch.fft.rfftfreq(image_size, dtype=torch.float64)[None, :]
    k2 = ky**2 + kx**2
    phi = torch.atan2(ky, kx)
    grids = (k2, k2**2, torch.cos(2 * phi), torch.sin(2 * phi))
    return tuple(g.to(device=device, dtype=torch.float32) for g in grids)


def ctf_2d(
    parameters: CTFParameters,
    image_size: int,
    pixel_size_angstrom: float,
    device: torch.device | str | None = None,
    band: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """The CTF of every particle on the ``rfft2`` grid: ``(n, N, N // 2 + 1)`` float32.

    ``pixel_size_angstrom`` is that of the images the CTF multiplies (after any downsampling).
    The closed form of the module docstring, vectorised: per-particle coefficients in float64,
    frequency grids cached per box (:func:`_polar_grids`), one float32 pass over the grid
    (``tests/test_ctf.py`` checks it against ``torch_ctf.calculate_ctf_2d``).

    ``band``: ``(rows, columns)``, only the ``rfft2`` rows ``rows`` (int64, ``fftfreq`` order)
    of the first ``columns`` columns are evaluated: ``(n, len(rows), columns)``, the same values
    as the whole grid's there (a search's low-pass band,
    :meth:`cryosphere.poses.search.matching.TemplateSpectra.band_ctf`: a 12-px band of a 64-px
    box is 3 % of the grid).
    """
    if pixel_size_angstrom <= 0:
        raise ValueError(f"pixel size must be positive (Å), got {pixel_size_angstrom}")
    device = torch.device(device or "cpu")
    k2, k4, cos2, sin2 = _polar_grids(int(image_size), str(device))
    if band is not None:
        rows, columns = torch.as_tensor(band[0], device=device), int(band[1])
        k2, k4, cos2, sin2 = (g.index_select(0, rows)[:, :columns] for g in (k2, k4, cos2, sin2))
    p2 = float(pixel_size_angstrom) ** 2
    lam = electron_wavelength_angstrom(parameters.voltage_kv)
    u, v = parameters.defocus_u_angstrom, parameters.defocus_v_angstrom
    theta = np.deg2rad(parameters.defocus_angle_deg)
    # χ = k² (a + b cos 2(φ − θ)) − c k⁴ + asin(w) + ψ, k in cycles/px (hence the p² factors)
    a = np.pi * lam * (u + v) / 2.0 / p2
    b = np.pi * lam * (u - v) / 2.0 / p2
    c = np.pi / 2.0 * parameters.spherical_aberration_mm * 1e7 * lam**3 / p2**2
    w = np.arcsin(parameters.amplitude_contrast) + np.deg2rad(parameters.phase_shift_deg)

    def col(values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.float32, device=device)[:, None, None]

    astig = col(b * np.cos(2 * theta)) * cos2 + col(b * np.sin(2 * theta)) * sin2
    chi = (astig.add_(col(a))).mul_(k2).sub_(col(c) * k4).add_(col(w))
    ctf = chi.sin_()
    if np.any(parameters.b_factor != 0):
        ctf = ctf.mul_(torch.exp(-col(parameters.b_factor / (4.0 * p2)) * k2))
    if np.any(parameters.scale_factor != 1):
        ctf = ctf.mul_(col(parameters.scale_factor))
    if np.any(parameters.premultiplied):  # the images carry CTF twice
        ctf = torch.where(col(parameters.premultiplied) > 0, ctf * ctf, ctf)
    return ctf


def _filter(images: np.ndarray | torch.Tensor, transfer: torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(images, dtype=torch.float32)
    if tensor.ndim != 3 or tensor.shape[1] != tensor.shape[2]:
        raise ValueError(f"images must have shape (n, N, N), got {tuple(tensor.shape)}")
    n_pix = tensor.shape[-1]
    expected = (tensor.shape[0], n_pix, n_pix // 2 + 1)
    if tuple(transfer.shape) != expected:
        raise ValueError(f"the CTF must have shape {expected}, got {tuple(transfer.shape)}")
    spectrum = torch.fft.rfft2(tensor) * transfer.to(tensor.device)
    return torch.fft.irfft2(spectrum, s=(n_pix, n_pix))


def apply_ctf(images: np.ndarray | torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Images ``(n, N, N)`` modulated by their CTFs ``(n, N, N // 2 + 1)`` (:func:`ctf_2d`)."""
    return _filter(images, ctf)


def phase_flip(images: np.ndarray | torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Images ``(n, N, N)`` with each frequency multiplied by ``sign(CTF)`` (0 stays 0)."""
    return _filter(images, torch.sign(ctf))


def wiener_filter(
    images: np.ndarray | torch.Tensor, ctf: torch.Tensor, wiener_constant: float = 0.1
) -> torch.Tensor:
    """Images ``(n, N, N)`` multiplied in Fourier space by ``CTF / (CTF² + K)``, ``K > 0``
    (about 1 / SNR per frequency)."""
    if not wiener_constant > 0:
        raise ValueError(f"wiener_constant must be positive, got {wiener_constant}")
    return _filter(images, ctf / (ctf**2 + float(wiener_constant)))


def shift_images(images: np.ndarray | torch.Tensor, shifts_px: np.ndarray) -> torch.Tensor:
    """Move the content of each image by ``shifts_px[i] = (sx, sy)`` pixels (sub-pixel allowed):
    ``out(x) = in(x − s)``, periodic, by a Fourier phase ramp. Returns ``(n, N, N)`` float32."""
    tensor = torch.as_tensor(images, dtype=torch.float32)
    shifts = torch.as_tensor(np.asarray(shifts_px, dtype=np.float64), dtype=torch.float64)
    if shifts.shape != (tensor.shape[0], 2):
        raise ValueError(
            f"shifts must have shape ({tensor.shape[0]}, 2), got {tuple(shifts.shape)}"
        )
    n_pix = tensor.shape[-1]
    ky = torch.fft.fftfreq(n_pix, dtype=torch.float64)
    kx = torch.fft.rfftfreq(n_pix, dtype=torch.float64)
    phase = (
        -2.0
        * math.pi
        * (
            shifts[:, 0, None, None] * kx[None, None, :]
            + shifts[:, 1, None, None] * ky[None, :, None]
        )
    )
    ramp = torch.polar(torch.ones_like(phase), phase).to(torch.complex64).to(tensor.device)
    return torch.fft.irfft2(torch.fft.rfft2(tensor) * ramp, s=(n_pix, n_pix))


def random_shifts_px(n: int, rng: np.random.Generator, max_shift_px: float) -> np.ndarray:
    """``(n, 2)`` shifts ``(sx, sy)`` uniform in ``[−max_shift_px, max_shift_px]`` per axis."""
    if max_shift_px < 0:
        raise ValueError(f"max_shift_px must be >= 0, got {max_shift_px}")
    return rng.uniform(-max_shift_px, max_shift_px, (n, 2))


def centring_shift_px(origins_angstrom: np.ndarray, pixel_size_angstrom: float) -> np.ndarray:
    """The shift ``(n, 2)`` px that centres particles with RELION origins ``(n, 2)`` Å
    (rlnOriginXAngst, rlnOriginYAngst): ``+origin / pixel_size`` (see module docstring)."""
    return np.asarray(origins_angstrom, dtype=np.float64) / float(pixel_size_angstrom)


def origin_angstrom_from_shift_px(shifts_px: np.ndarray, pixel_size_angstrom: float) -> np.ndarray:
    """RELION origins ``(n, 2)`` Å of particles whose content was moved by ``shifts_px``
    ``(n, 2)`` from the box centre: ``−shift · pixel_size``."""
    return -np.asarray(shifts_px, dtype=np.float64) * float(pixel_size_angstrom)
