"""Projection operator (line integrals by the Fourier slice theorem), blur and noise.

Signal and geometry
-------------------
A volume ``V`` is a float array ``(N, N, N)`` indexed ``[z, y, x]`` with its centre at voxel
``N // 2``. For a pose ``R`` (``x_mic = R @ x_vol``, see :mod:`cryosphere.geometry.rotations`) the image is

    I_R(x, y) = ∫ V(Rᵀ · (x, y, z)) dz,

a float array ``(N, N)`` indexed ``[y, x]`` with its centre at pixel ``N // 2``; pixel values
are sums of voxel values (a line integral in voxel units), so every image sums to the volume's
sum.

By the Fourier slice theorem, the 2D DFT of ``I_R`` at frequency ``k = (kx, ky, 0)`` (cycles
per pixel) equals the 3D Fourier transform of ``V`` at ``Rᵀ k``. :func:`project_volume`
evaluates that transform once on a grid padded ``oversampling`` times (zero padding in real
space), samples one central slice per pose by trilinear interpolation (only the half-plane
``kx >= 0``: images are real), keeps the frequencies inside the Nyquist circle
(``|k| < 1/2``: isotropic resolution, exact under in-plane quarter turns), and returns the
inverse real FFTs. The zero frequency is sampled exactly, which is why image sums equal the
volume sum to float precision.

:func:`project_volume_real_space` is an independent reference (rotate the volume by trilinear
resampling, sum along z); slow, used to validate the fast projector.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cryosphere._checks import as_volume

__all__ = [
    "volume_spectrum",
    "project_volume",
    "project_volume_real_space",
    "gaussian_blur",
    "noise_sigma_for_snr",
    "add_gaussian_noise",
    "default_device",
    "resolve_device",
    "rotate_images_quarter_turns",
    "rotate_images",
]


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch device; None: CUDA when available, else CPU
    (:func:`default_device`)."""
    return default_device() if device is None else torch.device(device)


def _as_rotations(rotations: np.ndarray | torch.Tensor) -> torch.Tensor:
    if not isinstance(rotations, torch.Tensor):
        rotations = np.array(rotations, dtype=np.float64)  # a writable copy (grids are read-only)
    tensor = torch.as_tensor(rotations)
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim != 3 or tuple(tensor.shape[1:]) != (3, 3):
        raise ValueError(f"rotations must have shape (n, 3, 3), got {tuple(tensor.shape)}")
    return tensor


def volume_spectrum(
    volume: np.ndarray | torch.Tensor, oversampling: int = 2, device: torch.device | None = None
) -> torch.Tensor:
    """Centred 3D DFT of the zero-padded volume, as two real channels.

    Returns a float32 tensor ``(1, 2, P + 1, P + 1, P + 1)`` (real and imaginary parts,
    ``P = oversampling * N``) indexed ``[., ., kz, ky, kx]`` with zero frequency at index
    ``P // 2`` and index ``P`` repeating index 0 (frequency +1/2 = -1/2);
    the layout :func:`torch.nn.functional.grid_sample` reads (stored channels-last).
    """
    vol = as_volume(volume, finite=True).to(device=device or "cpu", dtype=torch.float32)
    n = vol.shape[0]
    if oversampling < 1:
        raise ValueError(f"oversampling must be >= 1, got {oversampling}")
    p = oversampling * n
    padded = torch.zeros((p, p, p), dtype=torch.float32, device=vol.device)
    start = p // 2 - n // 2
    padded[start : start + n, start : start + n, start : start + n] = vol
    spectrum = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(padded)))
    # The DFT is periodic: frequency +1/2 equals -1/2 (index 0). Appending that plane along
    # each axis lets interpolation reach the Nyquist frequency of the rfft layout (kx = +1/2).
    spectrum = torch.cat([spectrum, spectrum[:1]], dim=0)
    spectrum = torch.cat([spectrum, spectrum[:, :1]], dim=1)
    spectrum = torch.cat([spectrum, spectrum[:, :, :1]], dim=2)
    channels = torch.stack([spectrum.real, spectrum.imag])[None]
    # Channels-last keeps the real and imaginary parts of a voxel side by side in memory,
    # which halves the cache misses of the trilinear gathers.
    return channels.contiguous(memory_format=torch.channels_last_3d)


def _slice_frequencies(image_size: int, device: torch.device) -> torch.Tensor:
    """Microscope-frame frequencies (cycles/pixel) of the rfft2 layout: ``(N, N//2+1, 3)``."""
    ky = torch.fft.fftfreq(image_size, device=device)
    kx = torch.fft.rfftfreq(image_size, device=device)
    grid_y, grid_x = torch.meshgrid(ky, kx, indexing="ij")
    return torch.stack([grid_x, grid_y, torch.zeros_like(grid_x)], dim=-1)


def project_volume(
    volume: np.ndarray | torch.Tensor,
    rotations: np.ndarray | torch.Tensor,
    *,
    oversampling: int = 2,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
    progress: bool = False,
    spectrum: torch.Tensor | None = None,
) -> torch.Tensor:
    """Project ``volume`` at each pose (Fourier slice theorem).

    Parameters
    ----------
    volume
        ``(N, N, N)`` ``[z, y, x]`` map, centre at voxel ``N // 2``.
    rotations
        ``(n, 3, 3)`` poses ``R`` (``x_mic = R @ x_vol``).
    oversampling
        Zero-padding factor of the 3D transform (2 keeps trilinear interpolation accurate).
    batch_size
        Poses per batch; bounds memory at about ``batch_size * N * (N/2+1) * 40`` bytes.
    device
        Torch device for the computation (default: the volume's, or CPU for NumPy input).
    spectrum
        Optional output of :func:`volume_spectrum` to reuse across calls.

    Returns
    -------
    torch.Tensor
        ``(n, N, N)`` float32 images ``[image, y, x]`` on ``device``, centre at ``N // 2``.
    """
    vol = as_volume(volume, finite=True)
    if device is None:
        device = vol.device if isinstance(volume, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    n_pix = vol.shape[0]
    rots = _as_rotations(rotations).to(device=device, dtype=torch.float32)
    if spectrum is None:
        spectrum = volume_spectrum(vol, oversampling, device)
    padded_size = spectrum.shape[-1] - 1
    # Frequencies in the volume frame: k_vol = Rᵀ k_mic; as row vectors k_vol = k_mic @ R.
    k_mic = _slice_frequencies(n_pix, device).reshape(-1, 3)
    # grid_sample with align_corners=True maps index i of the P + 1 samples to -1 + 2 i / P;
    # frequency k sits at index k * P + P // 2.
    scale = 2.0
    offset = 2.0 * (padded_size // 2) / padded_size - 1.0
    # Multiplying the spectrum by (-1)^(iy + ix) moves the image centre from pixel 0 to
    # pixel N // 2 (an fftshift for even N, done in Fourier space at no extra pass).
    rows = torch.fft.fftfreq(n_pix, 1.0 / n_pix, device=device)
    cols = torch.fft.rfftfreq(n_pix, 1.0 / n_pix, device=device)
    centring = torch.exp(2j * math.pi * (n_pix // 2) * (rows[:, None] + cols[None, :]) / n_pix)
    # Keep frequencies strictly inside the Nyquist circle: the projector is then isotropic,
    # and an in-plane quarter turn of the pose permutes the kept frequencies exactly.
    inside = (rows[:, None] ** 2 + cols[None, :] ** 2) < (n_pix / 2) ** 2
    centring = centring * inside
    images = torch.empty((rots.shape[0], n_pix, n_pix), dtype=torch.float32, device=device)
    starts = range(0, rots.shape[0], batch_size)
    for start in tqdm(starts, desc="projecting", disable=not progress, unit="batch"):
        batch = rots[start : start + batch_size]
        n_batch = batch.shape[0]
        k_vol = torch.einsum("pj,bjk->bpk", k_mic, batch)
        grid = (k_vol * scale + offset).reshape(n_batch, 1, n_pix, n_pix // 2 + 1, 3)
        # One grid per pose in the batch dimension (the spectrum is only expanded, not
        # copied) lets grid_sample spread the poses over all CPU threads.
        sampled = F.grid_sample(
            spectrum.expand(n_batch, -1, -1, -1, -1),
            grid,
            mode="bilinear",
            padding_mode="zeros",
            align_corners=True,
        )[:, :, 0]
        slices = torch.complex(sampled[:, 0], sampled[:, 1]) * centring
        images[start : start + n_batch] = torch.fft.irfft2(slices, s=(n_pix, n_pix))
    return images


def project_volume_real_space(
    volume: np.ndarray | torch.Tensor, rotations: np.ndarray | torch.Tensor
) -> torch.Tensor:
    """Reference projector: resample ``V(Rᵀ x)`` on the ``N³`` grid (trilinear), sum along z.

    Same conventions and output as :func:`project_volume`; slow (one resampled volume per
    pose) and meant for validation.
    """
    vol = as_volume(volume, finite=True).to(torch.float32)
    rots = _as_rotations(rotations).to(torch.float32)
    n_pix = vol.shape[0]
    coords = torch.arange(n_pix, dtype=torch.float32) - n_pix // 2
    zz, yy, xx = torch.meshgrid(coords, coords, coords, indexing="ij")
    x_mic = torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3)
    scale = 2.0 / (n_pix - 1)
    offset = 2.0 * (n_pix // 2) / (n_pix - 1) - 1.0
    images = []
    for rot in rots:
        x_vol = x_mic @ rot  # row vectors: (Rᵀ x)ᵀ = xᵀ R
        grid = (x_vol * scale + offset).reshape(1, n_pix, n_pix, n_pix, 3)
        rotated = F.grid_sample(
            vol[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True
        )[0, 0]
        images.append(rotated.sum(dim=0))
    return torch.stack(images)


def gaussian_blur(images: np.ndarray | torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Blur images ``(..., N, N)`` with a Gaussian of standard deviation ``sigma_px`` pixels.

    Applied in Fourier space (periodic boundary), so each image keeps its sum exactly.
    ``sigma_px == 0`` returns the images unchanged.
    """
    if sigma_px < 0 or not math.isfinite(sigma_px):
        raise ValueError(f"blur sigma must be >= 0 pixels, got {sigma_px}")
    tensor = torch.as_tensor(images, dtype=torch.float32)
    if sigma_px == 0:
        return tensor.clone()
    n_y, n_x = tensor.shape[-2:]
    ky = torch.fft.fftfreq(n_y, device=tensor.device)
    kx = torch.fft.rfftfreq(n_x, device=tensor.device)
    k2 = ky[:, None] ** 2 + kx[None, :] ** 2
    transfer = torch.exp(-2.0 * math.pi**2 * sigma_px**2 * k2)
    return torch.fft.irfft2(torch.fft.rfft2(tensor) * transfer, s=(n_y, n_x))


def noise_sigma_for_snr(clean_images: np.ndarray | torch.Tensor, snr: float) -> float:
    """Noise standard deviation for a requested SNR: ``σ² = var(clean stack) / SNR``.

    The variance is taken over all pixels of the whole clean stack (one number per stack),
    the GUIDE's definition.
    """
    if not snr > 0 or not math.isfinite(snr):
        raise ValueError(f"snr must be a positive number, got {snr}")
    clean = torch.as_tensor(clean_images, dtype=torch.float64)
    return float(torch.sqrt(clean.var(unbiased=False) / snr))


def add_gaussian_noise(
    clean_images: np.ndarray | torch.Tensor, snr: float, seed: int
) -> tuple[torch.Tensor, float]:
    """Add white Gaussian noise at ``snr`` (see :func:`noise_sigma_for_snr`); seeded.

    Returns ``(noisy images (same shape) float32, sigma)``.
    """
    clean = torch.as_tensor(clean_images, dtype=torch.float32)
    sigma = noise_sigma_for_snr(clean, snr)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn(clean.shape, generator=generator, dtype=torch.float32) * sigma
    return clean + noise.to(clean.device), sigma


def rotate_images_quarter_turns(
    images: np.ndarray | torch.Tensor, quarter_turns: int = 1
) -> torch.Tensor:
    """Rotate images ``(..., N, N)`` by ``90° * quarter_turns`` about pixel ``N // 2``, exactly.

    The result is the image of the pose ``Rz(90° * quarter_turns) @ R`` when the input is the
    image of pose ``R``: a point at microscope (x, y) moves to ``Rz (x, y)``, so the output
    pixel ``[y, x]`` (relative to the centre) reads the input at ``Rzᵀ (x, y) = (y, -x)``.
    Pixels are only permuted (the one row and column that wrap around the box edge for even
    ``N`` come from the opposite edge).
    """
    tensor = torch.as_tensor(images)
    n_pix = tensor.shape[-1]
    if tensor.shape[-2] != n_pix:
        raise ValueError(f"images must be square, got {tuple(tensor.shape[-2:])}")
    shift = 2 * (n_pix // 2) - (n_pix - 1)
    for _ in range(quarter_turns % 4):
        tensor = torch.roll(torch.rot90(tensor, -1, dims=(-2, -1)), shifts=shift, dims=-1)
    return tensor


def rotate_images(
    images: np.ndarray | torch.Tensor, angles_deg: np.ndarray | torch.Tensor | float
) -> torch.Tensor:
    """Rotate images ``(n, N, N)`` by ``angles_deg`` (one per image, or one for all) about pixel
    ``N // 2``: the image of pose ``R`` becomes the image of ``Rz(angle) @ R``.

    Output pixel ``(x, y)`` (relative to the centre) reads the input at ``Rz(angle)ᵀ (x, y)``.
    Multiples of 90° are exact pixel permutations (:func:`rotate_images_quarter_turns`); other
    angles use bilinear interpolation (a slight extra blur; pixels that come from outside the
    box are 0, so rotate clean images before adding noise).
    """
    tensor = torch.as_tensor(images, dtype=torch.float32)
    if tensor.ndim != 3 or tensor.shape[-1] != tensor.shape[-2]:
        raise ValueError(f"images must have shape (n, N, N), got {tuple(tensor.shape)}")
    n, n_pix = tensor.shape[0], tensor.shape[-1]
    angles = np.broadcast_to(np.asarray(angles_deg, dtype=np.float64), (n,))
    if not np.all(np.isfinite(angles)):
        raise ValueError("angles_deg must be finite")
    out = torch.empty_like(tensor)
    quarter = np.isclose(np.mod(angles, 90.0), 0.0, atol=1e-9) | np.isclose(
        np.mod(angles, 90.0), 90.0, atol=1e-9
    )
    for k in range(4):
        sel = np.flatnonzero(quarter & (np.mod(np.round(angles / 90.0), 4) == k))
        if sel.size:
            idx = torch.from_numpy(sel)
            out[idx] = rotate_images_quarter_turns(tensor[idx], k)
    rest = np.flatnonzero(~quarter)
    if rest.size:
        theta = torch.from_numpy(np.deg2rad(angles[rest]))
        cos, sin = torch.cos(theta), torch.sin(theta)
        coords = torch.arange(n_pix, dtype=torch.float64) - n_pix // 2
        y, x = torch.meshgrid(coords, coords, indexing="ij")
        # source = Rz(θ)ᵀ (x, y) = (x cos θ + y sin θ, −x sin θ + y cos θ), in pixels
        src_x = cos[:, None, None] * x + sin[:, None, None] * y + n_pix // 2
        src_y = -sin[:, None, None] * x + cos[:, None, None] * y + n_pix // 2
        grid = torch.stack([src_x, src_y], dim=-1) * (2.0 / (n_pix - 1)) - 1.0
        idx = torch.from_numpy(rest)
        out[idx] = F.grid_sample(
            tensor[idx][:, None],
            grid.to(tensor.dtype).to(tensor.device),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=True,
        )[:, 0]
    return out
