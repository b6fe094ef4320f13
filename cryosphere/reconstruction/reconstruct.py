"""Reconstruction by Fourier-space back-projection, symmetry, and Fourier shell correlation.

Geometry (the inverse of :func:`cryosphere.imaging.projection.project_volume`)
--------------------------------------------------------------------
An image of pose ``R`` (``x_mic = R @ x_vol``), centred at pixel ``N // 2``, has a 2D DFT
equal to the 3D Fourier transform of the volume at ``Rᵀ k`` (``k = (kx, ky, 0)``). So each
image's DFT is *inserted* as a central slice at ``Rᵀ k`` in a 3D Fourier grid, then the grid
is inverse-transformed.

Algorithm (:func:`backproject`)
-------------------------------
1. Each image is zero-padded to ``P = oversampling * N`` pixels (centre at ``P // 2``) and
   transformed (``rfft2``; the factor ``(-1)^(r + s)`` moves the origin to pixel ``P // 2``,
   which is the image's pixel ``N // 2``, for even and odd ``N``; ``P`` must be even).
   Padding samples the slice finely enough for trilinear insertion to be accurate.
2. Every coefficient inside the sphere ``|k| < P/2 - 1`` (index units of the padded grid,
   i.e. up to ``0.5 - 1/P`` cycles/pixel) is rotated to ``Rᵀ k``, folded to the half-space
   ``kx >= 0`` by Friedel symmetry (``F(-k) = conj F(k)``), and spread over its 8 nearest
   grid voxels with trilinear weights ``t``. Two accumulators are kept on a half grid
   ``(P, P, P/2 + 1)``: the numerator ``Σ w t H Î`` and the weight ``Σ w t H²``, where ``w``
   is the per-insertion weight (1, or a pose probability) and ``H`` the optional known image
   transfer function (a Gaussian blur of ``blur_sigma_px``; ``H = 1`` by default).
3. The reconstruction is the Wiener-style ratio

       V̂(k) = Σ w t H Î / (Σ w t H² + λ),

   with ``λ = regularisation`` (a 1/SNR-like constant in the units of the weight: one
   image sample landing on a voxel adds ``w t H² <= 1``; ``λ = 0`` gives the plain
   weight-normalised reconstruction, voxels with no weight set to zero).
4. Inverse FFT, crop the central ``N³``, and divide by the trilinear gridding kernel's
   transform ``sinc²(x/P) sinc²(y/P) sinc²(z/P)`` (``gridding_correction=True``): trilinear
   spreading convolves the spectrum with a triangle, which apodises the map.

Images are processed in batches (``batch_size``) so memory stays bounded; everything runs on
any torch device (CPU or CUDA).

Why our own back-projector rather than torch-fourier-slice's ``backproject_2d_to_3d``: the
math is the same (trilinear insertion into a padded half grid, sinc² correction), but ours
takes per-insertion weights (probability-weighted poses, symmetry copies), a known transfer
function and a Wiener constant (the peer clamps the weights at 1, a fixed regulariser), and
uses our pose convention directly; ``benchmarks/bench_reconstruction.py`` times both. The
peer's matrices ``M`` *sample* the volume at ``M x``; for our pose ``R`` pass ``M = Rᵀ``
(checked in ``tests/test_reconstruct.py``).

Symmetry
--------
A point group ``ops`` (``(K, 3, 3)`` volume-frame rotations ``g``, identity first; poses ``R``
and ``R @ g`` give the same image) is imposed by inserting every image at every ``R @ g``
(``K`` times the insertions, each voxel seeing ``K`` times the samples); this equals
averaging the C1 map over ``V(g x)``, but needs no resampling of the finished map.
:func:`symmetrize_map` does the real-space average (trilinear) for a finished map. When
``check_symmetry`` is on, the C1 reconstruction (kept as a by-product) is tested with
:func:`check_point_group`: if the map's low-pass correlation with its rotated copies
``V(g x)`` is below ``threshold``, a ``ValueError`` says the stated group does not match the
map's frame.

FSC
---
:func:`fourier_shell_correlation` correlates two maps shell by shell (shell ``s`` holds the
voxels with ``round(|k| N) = s``, ``k`` in cycles/voxel; ``s = 0 .. N // 2``), with the
frequency axis ``s / (N · pixel_size)`` in 1/Å. :func:`resolution_at_threshold` returns the
resolution (Å) where the curve first drops below a threshold (0.5 or 0.143), linearly
interpolated between the shells either side of the crossing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cryosphere.imaging import ctf as ctf_module

__all__ = [
    "Reconstruction",
    "FSCCurve",
    "HalfSetResult",
    "ResolutionSweep",
    "backproject",
    "reconstruct",
    "symmetrize_map",
    "symmetry_correlation",
    "check_point_group",
    "fourier_shell_correlation",
    "resolution_at_threshold",
    "half_set_fsc",
    "resolution_vs_image_count",
    "top_k_poses",
    "plot_fsc_curves",
    "plot_resolution_vs_count",
]


# ----------------------------------------------------------------------------- inputs


def _as_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(images)
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim != 3:
        raise ValueError(f"images must have shape (n, N, N), got {tuple(tensor.shape)}")
    if tensor.shape[1] != tensor.shape[2]:
        raise ValueError(
            f"images must be square (n, N, N), got {tuple(tensor.shape[1:])} pixels; "
            "crop or pad them to a square box first"
        )
    if tensor.shape[0] == 0:
        raise ValueError("no images to reconstruct from")
    return tensor


def _as_poses(
    rotations: np.ndarray | torch.Tensor, weights: np.ndarray | torch.Tensor | None, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return rotations ``(n, k, 3, 3)`` float64 and weights ``(n, k)`` float64."""
    if isinstance(rotations, np.ndarray) and not rotations.flags.writeable:
        rotations = rotations.copy()  # torch refuses to wrap read-only arrays (cached grids)
    rots = torch.as_tensor(rotations, dtype=torch.float64)
    if rots.ndim == 3:
        rots = rots[:, None]
    if rots.ndim != 4 or tuple(rots.shape[-2:]) != (3, 3):
        raise ValueError(
            f"rotations must have shape (n, 3, 3) or (n, k, 3, 3), got {tuple(rots.shape)}"
        )
    if rots.shape[0] != n:
        raise ValueError(
            f"got {n} images but {rots.shape[0]} poses; pass one pose (or one set of k poses) "
            "per image, in the same order"
        )
    if weights is None:
        if rots.shape[1] != 1:
            raise ValueError(
                f"rotations hold k = {rots.shape[1]} poses per image: pass weights (n, k) "
                "(e.g. the poses' probabilities)"
            )
        w = torch.ones(rots.shape[:2], dtype=torch.float64)
    else:
        w = torch.as_tensor(weights, dtype=torch.float64)
        if w.ndim == 1:
            w = w[:, None]
        if tuple(w.shape) != tuple(rots.shape[:2]):
            raise ValueError(
                f"weights must have shape {tuple(rots.shape[:2])} (one per pose), "
                f"got {tuple(w.shape)}"
            )
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError("weights must be finite and >= 0")
    if not torch.isfinite(rots).all():
        raise ValueError("rotations hold NaN or infinite values")
    return rots, w


def _as_ops(symmetry_ops: np.ndarray | torch.Tensor | None) -> torch.Tensor:
    if symmetry_ops is None:
        return torch.eye(3, dtype=torch.float64)[None]
    ops = torch.as_tensor(np.asarray(symmetry_ops), dtype=torch.float64)
    if ops.ndim == 2:
        ops = ops[None]
    if ops.ndim != 3 or tuple(ops.shape[1:]) != (3, 3):
        raise ValueError(f"symmetry_ops must have shape (K, 3, 3), got {tuple(ops.shape)}")
    eye = torch.eye(3, dtype=torch.float64)
    orthogonal = torch.allclose(ops @ ops.transpose(1, 2), eye.expand_as(ops), atol=1e-5)
    if not orthogonal or not torch.allclose(
        torch.linalg.det(ops), torch.ones(len(ops), dtype=ops.dtype)
    ):
        raise ValueError("symmetry_ops must be proper rotations (e.g. so3.point_group(name))")
    return ops


def _as_volume(volume: np.ndarray | torch.Tensor, name: str = "volume") -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(volume) if not torch.is_tensor(volume) else volume)
    if tensor.ndim != 3 or len(set(tensor.shape)) != 1:
        raise ValueError(f"{name} must be a cubic array (N, N, N), got {tuple(tensor.shape)}")
    return tensor


# ----------------------------------------------------------------------------- insertion


def _sinc2_correction(n_box: int, padded: int, device: torch.device) -> torch.Tensor:
    """``sinc²(d/P)`` per axis (d: voxel offset from the centre), as a separable (N,N,N)."""
    d = torch.arange(n_box, device=device, dtype=torch.float64) - n_box // 2
    s = torch.special.sinc(d / padded) ** 2
    return (s[:, None, None] * s[None, :, None] * s[None, None, :]).float()


@dataclass(frozen=True)
class _Accumulators:
    numerator: torch.Tensor  # (P, P, P//2+1) complex128, [kz, ky, kx], kz/ky centred
    weight: torch.Tensor  # (P, P, P//2+1) float64


def _insert(
    images: torch.Tensor,
    rotations: torch.Tensor,
    weights: torch.Tensor,
    oversampling: int,
    blur_sigma_px: float,
    batch_size: int,
    device: torch.device,
    progress: bool,
    ctf: ctf_module.CTFParameters | None = None,
    pixel_size: float | None = None,
) -> _Accumulators:
    """Accumulate ``Σ w t H Î`` and ``Σ w t H²`` for images ``(n,N,N)``, poses ``(n,k,3,3)``."""
    n_img, n_pix = images.shape[0], images.shape[-1]
    p = oversampling * n_pix
    half = p // 2 + 1
    start = p // 2 - n_pix // 2
    # Padded rfft2 frequencies in index units, kept inside the sphere |k| < P/2 - 1 so that
    # every trilinear corner lies on the grid.
    ky = torch.fft.fftfreq(p, 1.0 / p, device=device, dtype=torch.float64)
    kx = torch.fft.rfftfreq(p, 1.0 / p, device=device, dtype=torch.float64)
    gy, gx = torch.meshgrid(ky, kx, indexing="ij")
    radius = torch.sqrt(gx**2 + gy**2)
    keep = (radius < p / 2 - 1.01).reshape(-1)
    k_mic = torch.stack([gx, gy, torch.zeros_like(gx)], -1).reshape(-1, 3)[keep]
    # (-1)^(r + s) moves the image origin from pixel 0 to pixel P // 2 (even P).
    sign = (1 - 2 * ((gy + gx).long() % 2)).reshape(-1)[keep].to(torch.float32)
    # The kx = 0 column holds each Friedel pair twice (ky and -ky): half weight.
    column = torch.where(k_mic[:, 0] == 0, 0.5, 1.0)
    transfer = torch.exp(-2.0 * math.pi**2 * blur_sigma_px**2 * (radius.reshape(-1)[keep] / p) ** 2)
    base_h = (column * transfer).float()  # per-sample factor in the numerator
    base_h2 = (column * transfer**2).float()  # per-sample factor in the weight
    k_mic = k_mic.float()

    # Channel-first float32 accumulators [re, im, weight]: index_add_ along the last dim is
    # several times faster than along the first for a multi-channel source.
    acc = torch.zeros(3, p * p * half, dtype=torch.float32, device=device)
    centre = torch.tensor([p // 2, p // 2, 0.0], device=device)
    n_k = rotations.shape[1]
    step = max(1, batch_size // n_k)  # images per batch: about batch_size insertions
    steps = range(0, n_img, step)
    for first in tqdm(steps, desc="back-projecting", disable=not progress, unit="batch"):
        batch = images[first : first + step].to(device=device, dtype=torch.float32)
        rots = rotations[first : first + step].to(device=device, dtype=torch.float32)
        wts = weights[first : first + step].to(device=device, dtype=torch.float32)
        padded = torch.zeros((batch.shape[0], p, p), dtype=torch.float32, device=device)
        padded[:, start : start + n_pix, start : start + n_pix] = batch
        spectra = torch.fft.rfft2(padded).reshape(batch.shape[0], -1)[:, keep] * sign
        # Flatten (image, pose) pairs; skip zero weights (one-hot, top-k padding).
        spectra = spectra[:, None].expand(-1, n_k, -1).reshape(-1, spectra.shape[-1])
        rots = rots.reshape(-1, 3, 3)
        wts = wts.reshape(-1)
        used = wts > 0
        if not bool(used.any()):
            continue
        spectra, rots, wts = spectra[used], rots[used], wts[used]
        h, h2 = base_h, base_h2
        if ctf is not None:  # per-image transfer: H = blur · CTF on the padded grid
            part = ctf.subset(np.arange(first, first + batch.shape[0]))
            c = ctf_module.ctf_2d(part, p, pixel_size, device=device).reshape(len(part), -1)
            c = c[:, keep][:, None].expand(-1, n_k, -1).reshape(-1, c[:, keep].shape[-1])[used]
            h, h2 = base_h * c, base_h2 * c**2
        # Volume-frame frequencies Rᵀ k (row vectors: k @ R), folded to kx >= 0.
        k_vol = torch.einsum("mj,bjk->bmk", k_mic, rots)
        flip = k_vol[..., 0] < 0
        k_vol = torch.where(flip[..., None], -k_vol, k_vol)
        spectra = spectra * (wts[:, None] * h)
        # Grid coordinates (x, y, z) -> indices [z, y, x]; z, y centred at P // 2.
        coords = (k_vol.flip(-1) + centre).reshape(-1, 3)
        floor = torch.floor(coords)
        frac = coords - floor
        floor = floor.long()
        base = (floor[:, 0] * p + floor[:, 1]) * half + floor[:, 2]
        source = torch.stack(
            [
                spectra.real.reshape(-1),
                torch.where(flip, -spectra.imag, spectra.imag).reshape(-1),
                (wts[:, None] * h2).expand_as(spectra.real).reshape(-1),
            ]
        )
        fz, fy, fx = frac.unbind(-1)
        for dz in (0, 1):
            wz = fz if dz else 1.0 - fz
            for dy in (0, 1):
                wzy = wz * (fy if dy else 1.0 - fy)
                for dx in (0, 1):
                    tri = wzy * (fx if dx else 1.0 - fx)
                    flat = base + ((dz * p + dy) * half + dx)
                    acc.index_add_(1, flat, source * tri)
    numerator = torch.complex(acc[0].double(), acc[1].double()).reshape(p, p, half)
    weight = acc[2].double().reshape(p, p, half)
    # kx = 0 plane: add the Friedel mates (index i <-> P - i in z and y).
    mate_n = torch.roll(torch.flip(numerator[:, :, 0], (0, 1)), (1, 1), (0, 1)).conj()
    mate_w = torch.roll(torch.flip(weight[:, :, 0], (0, 1)), (1, 1), (0, 1))
    numerator[:, :, 0] = numerator[:, :, 0] + mate_n
    weight[:, :, 0] = weight[:, :, 0] + mate_w
    return _Accumulators(numerator, weight)


def _finish(
    acc: _Accumulators, n_pix: int, regularisation: float, gridding_correction: bool
) -> torch.Tensor:
    """Wiener ratio, inverse FFT, crop to ``N³``, gridding correction -> float32 map."""
    p = acc.weight.shape[0]
    denominator = acc.weight + regularisation
    spectrum = torch.where(
        denominator > 1e-12,
        acc.numerator / denominator.clamp_min(1e-12),
        torch.zeros_like(acc.numerator),
    )
    spectrum = torch.fft.ifftshift(spectrum, dim=(0, 1))
    padded = torch.fft.fftshift(torch.fft.irfftn(spectrum, s=(p, p, p), dim=(0, 1, 2)))
    start = p // 2 - n_pix // 2
    volume = padded[start : start + n_pix, start : start + n_pix, start : start + n_pix].float()
    if gridding_correction:
        volume = volume / _sinc2_correction(n_pix, p, volume.device)
    return volume


def _combined_poses(
    rotations: torch.Tensor, weights: torch.Tensor, ops: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Poses ``R @ g`` for every op: ``(n, k*K, 3, 3)`` and weights ``(n, k*K)``."""
    n, k = rotations.shape[:2]
    rots = (rotations[:, :, None] @ ops).reshape(n, k * len(ops), 3, 3)
    wts = weights[:, :, None].expand(-1, -1, len(ops)).reshape(n, k * len(ops))
    return rots, wts


def backproject(
    images: np.ndarray | torch.Tensor,
    rotations: np.ndarray | torch.Tensor,
    weights: np.ndarray | torch.Tensor | None = None,
    *,
    symmetry_ops: np.ndarray | None = None,
    regularisation: float = 1.0,
    blur_sigma_px: float = 0.0,
    oversampling: int = 2,
    gridding_correction: bool = True,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
    ctf: ctf_module.CTFParameters | None = None,
    pixel_size_angstrom: float | None = None,
) -> torch.Tensor:
    """Reconstruct a map from images and poses (Fourier-slice back-projection).

    Parameters
    ----------
    images
        ``(n, N, N)`` images ``[image, y, x]``, centre at pixel ``N // 2``.
    rotations
        ``(n, 3, 3)`` poses ``R`` (``x_mic = R @ x_vol``), or ``(n, k, 3, 3)``: ``k`` candidate
        poses per image (probability-weighted mode; ``weights`` required).
    weights
        ``(n,)`` or ``(n, k)`` non-negative insertion weights (e.g. pose probabilities); an
        image inserted at ``k`` poses contributes ``Σ_j w_j`` samples. Zero weights are
        skipped, so one-hot weights give exactly the single-pose reconstruction.
    symmetry_ops
        ``(K, 3, 3)`` point-group operators (volume frame, identity first): each image is also
        inserted at every ``R @ g``. ``None`` for C1.
    regularisation
        Wiener constant ``λ >= 0``: ``V̂ = Σ w t H Î / (Σ w t H² + λ)``; ``0`` gives plain
        weight normalisation. ``λ ≈ 1/SNR`` of one image's Fourier sample.
    blur_sigma_px
        Known Gaussian blur of the images (pixels); deconvolved in the Wiener ratio
        (``H = exp(-2π² σ² |k|²)``). 0 = none.
    oversampling
        Padding factor ``P / N`` of the Fourier grid (2 keeps trilinear insertion accurate).
    gridding_correction
        Divide by ``sinc²`` of the trilinear kernel after the inverse FFT.
    batch_size
        Insertions (image-pose pairs) per batch; images per batch are ``batch_size // k``.
        Memory is about ``batch_size * P² * 100`` bytes plus the accumulators (``P³ * 12``
        bytes for the float32 sums, twice that in float64 at the end).
    device
        Torch device (default: the images' for tensors, else CPU).
    ctf, pixel_size_angstrom
        Per-image CTFs (:class:`cryosphere.imaging.ctf.CTFParameters`, ``n`` entries) and the
        images' pixel size (Å): ``H`` becomes blur · CTF of each image, so the Wiener ratio
        corrects the CTF (images must be centred: shift them by their origins first).

    Returns
    -------
    torch.Tensor
        ``(N, N, N)`` float32 map ``[z, y, x]`` on ``device``, centre at voxel ``N // 2``, in
        the images' units per voxel (the inverse of ``project_volume``).
    """
    return reconstruct(
        images,
        rotations,
        weights,
        symmetry_ops=symmetry_ops,
        regularisation=regularisation,
        blur_sigma_px=blur_sigma_px,
        oversampling=oversampling,
        gridding_correction=gridding_correction,
        batch_size=batch_size,
        device=device,
        progress=progress,
        check_symmetry=False,
        ctf=ctf,
        pixel_size_angstrom=pixel_size_angstrom,
    ).volume


@dataclass(frozen=True)
class Reconstruction:
    """A reconstructed map.

    Attributes
    ----------
    volume
        ``(N, N, N)`` float32 map (symmetry imposed when ``symmetry_ops`` was given).
    c1_volume
        The same reconstruction without symmetry (only the identity insertions), or ``None``
        when no symmetry was imposed.
    symmetry_correlation
        Low-pass correlation of ``c1_volume`` with its symmetry-rotated copies (see
        :func:`symmetry_correlation`), or ``None``.
    """

    volume: torch.Tensor
    c1_volume: torch.Tensor | None = None
    symmetry_correlation: float | None = None


def reconstruct(
    images: np.ndarray | torch.Tensor,
    rotations: np.ndarray | torch.Tensor,
    weights: np.ndarray | torch.Tensor | None = None,
    *,
    symmetry_ops: np.ndarray | None = None,
    check_symmetry: bool = True,
    symmetry_threshold: float = 0.5,
    regularisation: float = 1.0,
    blur_sigma_px: float = 0.0,
    oversampling: int = 2,
    gridding_correction: bool = True,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
    ctf: ctf_module.CTFParameters | None = None,
    pixel_size_angstrom: float | None = None,
) -> Reconstruction:
    """:func:`backproject` that also keeps the C1 map and checks a stated point group.

    With ``symmetry_ops`` of order ``K > 1`` the insertions of the identity and of the other
    operators are accumulated separately, so the C1 map comes at the cost of one extra FFT.
    When ``check_symmetry`` is on, :func:`check_point_group` tests the C1 map and raises
    ``ValueError`` if the group does not match the map's frame. Other arguments as in
    :func:`backproject`.
    """
    imgs = _as_images(images)
    rots, wts = _as_poses(rotations, weights, imgs.shape[0])
    ops = _as_ops(symmetry_ops)
    if regularisation < 0 or not math.isfinite(regularisation):
        raise ValueError(f"regularisation must be a finite number >= 0, got {regularisation}")
    if int(oversampling) != oversampling or oversampling < 1:
        raise ValueError(f"oversampling must be a positive integer, got {oversampling}")
    if (int(oversampling) * imgs.shape[-1]) % 2:
        raise ValueError(
            f"oversampling * N must be even (got {oversampling} * {imgs.shape[-1]}); "
            "use an even oversampling factor for odd image sizes"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        device = imgs.device if torch.is_tensor(images) else torch.device("cpu")
    device = torch.device(device)
    n_pix = imgs.shape[-1]
    if ctf is not None and (len(ctf) != imgs.shape[0] or not (pixel_size_angstrom or 0) > 0):
        raise ValueError(
            f"ctf needs one entry per image ({imgs.shape[0]}, got {len(ctf)}) and a positive "
            f"pixel_size_angstrom (got {pixel_size_angstrom})"
        )
    common = dict(
        oversampling=int(oversampling),
        blur_sigma_px=float(blur_sigma_px),
        batch_size=batch_size,
        device=device,
        progress=progress,
        ctf=ctf,
        pixel_size=pixel_size_angstrom,
    )
    first = _insert(imgs, rots, wts, **common)
    if len(ops) == 1:
        return Reconstruction(_finish(first, n_pix, regularisation, gridding_correction))
    c1 = _finish(first, n_pix, regularisation, gridding_correction)
    rest_rots, rest_wts = _combined_poses(rots, wts, ops[1:])
    rest = _insert(imgs, rest_rots, rest_wts, **common)
    total = _Accumulators(first.numerator + rest.numerator, first.weight + rest.weight)
    volume = _finish(total, n_pix, regularisation, gridding_correction)
    corr = symmetry_correlation(c1, ops.numpy())
    if check_symmetry and corr < symmetry_threshold:
        _raise_frame_mismatch(corr, symmetry_threshold, len(ops))
    return Reconstruction(volume, c1, corr)


# ----------------------------------------------------------------------------- symmetry


def _rotate_map(volume: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``V(g x)`` on the grid (trilinear), centre at voxel ``N // 2``."""
    n = volume.shape[0]
    coords = torch.arange(n, dtype=torch.float32, device=volume.device) - n // 2
    zz, yy, xx = torch.meshgrid(coords, coords, coords, indexing="ij")
    x = torch.stack([xx, yy, zz], -1).reshape(-1, 3)
    gx = x @ g.T.to(device=volume.device, dtype=torch.float32)  # row vectors: (g x)ᵀ
    scale = 2.0 / (n - 1)
    offset = 2.0 * (n // 2) / (n - 1) - 1.0
    grid = (gx * scale + offset).reshape(1, n, n, n, 3)
    return F.grid_sample(
        volume[None, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )[0, 0]


def symmetrize_map(volume: np.ndarray | torch.Tensor, symmetry_ops: np.ndarray) -> torch.Tensor:
    """Average of ``V(g x)`` over the point group (real space, trilinear resampling).

    ``volume`` ``(N, N, N)`` ``[z, y, x]`` centred at voxel ``N // 2``; ``symmetry_ops``
    ``(K, 3, 3)``. A map already symmetric under the group comes back unchanged (exactly for
    operators that permute voxels, e.g. 2-folds along grid axes; to interpolation error
    otherwise). Returns float32 ``(N, N, N)``.
    """
    vol = _as_volume(volume).float()
    ops = _as_ops(symmetry_ops)
    total = torch.zeros_like(vol)
    for g in ops:
        total += vol if torch.equal(g, torch.eye(3, dtype=g.dtype)) else _rotate_map(vol, g)
    return total / len(ops)


def _lowpass(volume: torch.Tensor, fraction: float) -> torch.Tensor:
    n = volume.shape[0]
    k = torch.fft.fftfreq(n, device=volume.device)
    kr = torch.fft.rfftfreq(n, device=volume.device)
    k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + kr[None, None, :] ** 2
    keep = k2 <= (0.5 * fraction) ** 2
    return torch.fft.irfftn(torch.fft.rfftn(volume) * keep, s=volume.shape)


def _axis_angle_rotation(axis: np.ndarray, angle_rad: float) -> torch.Tensor:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + math.sin(angle_rad) * k + (1 - math.cos(angle_rad)) * k @ k
    return torch.as_tensor(rot, dtype=torch.float64)


def _masked_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))


def symmetry_correlation(
    volume: np.ndarray | torch.Tensor,
    symmetry_ops: np.ndarray,
    lowpass_fraction: float = 0.5,
    n_controls: int = 8,
) -> float:
    """How well a map obeys a point group in its stated frame (about 1: yes, about 0: no).

    The map is low-pass filtered to ``lowpass_fraction`` of Nyquist (where even a noisy
    reconstruction is reliable) and restricted to the sphere of radius ``N/2 - 1``. For each
    non-identity operator ``g`` (rotation angle ``θ``) the Pearson correlation ``c_g`` of
    ``V(x)`` with ``V(g x)`` is compared with ``c_0``, the median correlation for rotations by
    the same ``θ`` about ``n_controls`` fixed, well-spread axes (a compact particle
    correlates with any rotated copy of itself through its envelope alone):
    ``score_g = (c_g - c_0) / (1 - c_0)``. Returns ``min_g score_g`` (``1.0`` for C1).
    """
    vol = _as_volume(volume).float()
    ops = _as_ops(symmetry_ops)
    if len(ops) == 1:
        return 1.0
    smooth = _lowpass(vol, lowpass_fraction)
    n = vol.shape[0]
    coords = torch.arange(n, dtype=torch.float32, device=vol.device) - n // 2
    r2 = coords[:, None, None] ** 2 + coords[None, :, None] ** 2 + coords[None, None, :] ** 2
    mask = r2 <= (n / 2 - 1) ** 2
    reference = smooth[mask]
    # Fixed control axes: a golden-spiral set on the half sphere (deterministic).
    i = np.arange(n_controls) + 0.5
    z = 1 - i / n_controls
    phi = math.pi * (1 + 5**0.5) * i
    axes = np.stack([np.sqrt(1 - z**2) * np.cos(phi), np.sqrt(1 - z**2) * np.sin(phi), z], -1)
    controls: dict[float, float] = {}
    scores = []
    for g in ops[1:]:
        angle = math.acos(max(-1.0, min(1.0, (float(torch.trace(g)) - 1) / 2)))
        key = round(angle, 4)
        if key not in controls:
            values = [
                _masked_correlation(
                    reference, _rotate_map(smooth, _axis_angle_rotation(ax, angle))[mask]
                )
                for ax in axes
            ]
            controls[key] = float(np.median(values))
        c0 = controls[key]
        cg = _masked_correlation(reference, _rotate_map(smooth, g)[mask])
        scores.append((cg - c0) / max(1 - c0, 1e-6))
    return float(min(scores))


def _raise_frame_mismatch(corr: float, threshold: float, order: int) -> None:
    raise ValueError(
        f"the stated point group (order {order}) does not match the map's frame: the map's "
        f"correlation with its symmetry-rotated copies is {corr:.3f} < {threshold}. Check the "
        "group name and its frame (so3.point_group(name, frame) with the frame from "
        "structure.resolve_point_group), or reconstruct without symmetry_ops"
    )


def check_point_group(
    volume: np.ndarray | torch.Tensor,
    symmetry_ops: np.ndarray,
    threshold: float = 0.5,
    lowpass_fraction: float = 0.5,
) -> float:
    """Raise ``ValueError`` when ``volume`` does not obey ``symmetry_ops`` in its frame.

    Returns the :func:`symmetry_correlation` when it is at least ``threshold``.
    """
    corr = symmetry_correlation(volume, symmetry_ops, lowpass_fraction)
    if corr < threshold:
        _raise_frame_mismatch(corr, threshold, len(_as_ops(symmetry_ops)))
    return corr


# ----------------------------------------------------------------------------- FSC


@dataclass(frozen=True)
class FSCCurve:
    """A Fourier shell correlation curve.

    Attributes
    ----------
    frequency_inv_angstrom
        ``(S,)`` shell frequencies ``s / (N · pixel_size)`` in 1/Å, ``s = 0 .. N // 2``.
    fsc
        ``(S,)`` correlation per shell.
    n_voxels
        ``(S,)`` Fourier voxels per shell.
    pixel_size
        Å per voxel.
    """

    frequency_inv_angstrom: np.ndarray
    fsc: np.ndarray
    n_voxels: np.ndarray
    pixel_size: float

    def resolution(self, threshold: float = 0.143) -> float:
        """Resolution in Å at ``threshold`` (see :func:`resolution_at_threshold`)."""
        return resolution_at_threshold(self.frequency_inv_angstrom, self.fsc, threshold)


def fourier_shell_correlation(
    map_a: np.ndarray | torch.Tensor,
    map_b: np.ndarray | torch.Tensor,
    pixel_size: float,
    mask: np.ndarray | torch.Tensor | None = None,
) -> FSCCurve:
    """FSC between two maps ``(N, N, N)`` of the same box and voxel size ``pixel_size`` (Å).

    ``FSC(s) = Re Σ A B* / sqrt(Σ|A|² Σ|B|²)`` over the voxels of shell ``s`` (``round(|k|
    N) = s``, ``k`` in cycles/voxel; shells beyond ``N // 2`` are dropped). An optional real
    ``mask`` ``(N, N, N)`` multiplies both maps first.
    """
    a = _as_volume(map_a, "map_a").double().cpu()
    b = _as_volume(map_b, "map_b").double().cpu()
    if a.shape != b.shape:
        raise ValueError(
            f"maps must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if not pixel_size > 0:
        raise ValueError(f"pixel_size must be positive (Å), got {pixel_size}")
    if mask is not None:
        m = torch.as_tensor(np.asarray(mask), dtype=torch.float64)
        a, b = a * m, b * m
    n = a.shape[0]
    fa, fb = torch.fft.fftn(a), torch.fft.fftn(b)
    k = torch.fft.fftfreq(n, dtype=torch.float64)
    radius = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    shell = torch.round(radius * n).long().reshape(-1)
    n_shells = n // 2 + 1
    keep = shell < n_shells
    shell = shell[keep]
    cross = torch.zeros(n_shells, dtype=torch.float64).index_add_(
        0, shell, (fa * fb.conj()).real.reshape(-1)[keep]
    )
    pa = torch.zeros(n_shells, dtype=torch.float64).index_add_(
        0, shell, (fa.abs() ** 2).reshape(-1)[keep]
    )
    pb = torch.zeros(n_shells, dtype=torch.float64).index_add_(
        0, shell, (fb.abs() ** 2).reshape(-1)[keep]
    )
    counts = torch.bincount(shell, minlength=n_shells)
    fsc = cross / torch.sqrt(pa * pb).clamp_min(1e-300)
    frequency = np.arange(n_shells) / (n * pixel_size)
    return FSCCurve(frequency, fsc.numpy(), counts.numpy(), float(pixel_size))


def resolution_at_threshold(
    frequency_inv_angstrom: np.ndarray, fsc: np.ndarray, threshold: float = 0.143
) -> float:
    """Resolution (Å) where the FSC first drops below ``threshold``.

    Scans from the first non-zero shell; at the first shell ``s`` with ``fsc[s] < threshold``
    the crossing frequency is interpolated linearly between shells ``s - 1`` and ``s`` and the
    resolution is its inverse. A curve that never drops below ``threshold`` returns the
    Nyquist limit ``1 / frequency[-1]`` (resolution limited by the pixel size); one that is
    already below at shell 1 returns ``1 / frequency[1]`` (no resolved shell).
    """
    freq = np.asarray(frequency_inv_angstrom, dtype=np.float64)
    curve = np.asarray(fsc, dtype=np.float64)
    if freq.shape != curve.shape or freq.ndim != 1 or len(freq) < 2:
        raise ValueError("frequency and fsc must be 1D arrays of the same length (>= 2)")
    below = np.nonzero(curve[1:] < threshold)[0]
    if len(below) == 0:
        return float(1.0 / freq[-1])
    s = int(below[0]) + 1
    if s == 1:
        return float(1.0 / freq[1])
    f0, f1, c0, c1 = freq[s - 1], freq[s], curve[s - 1], curve[s]
    crossing = f0 + (c0 - threshold) / (c0 - c1) * (f1 - f0)
    return float(1.0 / crossing)


# ----------------------------------------------------------------------------- workflows


@dataclass(frozen=True)
class HalfSetResult:
    """Two half-set reconstructions and their FSC (``half_a``/``half_b``: float32 maps)."""

    half_a: torch.Tensor
    half_b: torch.Tensor
    fsc: FSCCurve
    indices_a: np.ndarray
    indices_b: np.ndarray


def half_set_fsc(
    images: np.ndarray | torch.Tensor,
    rotations: np.ndarray | torch.Tensor,
    pixel_size: float,
    weights: np.ndarray | torch.Tensor | None = None,
    *,
    seed: int = 0,
    **reconstruct_kwargs,
) -> HalfSetResult:
    """Gold-standard FSC: split the images into two seeded random halves, reconstruct each.

    ``reconstruct_kwargs`` go to :func:`reconstruct` (symmetry, regularisation, ...). Report
    the half-map resolution at 0.143.
    """
    imgs = _as_images(images)
    n = imgs.shape[0]
    if n < 2:
        raise ValueError("half-set FSC needs at least 2 images")
    _as_poses(rotations, weights, n)
    order = np.random.default_rng(seed).permutation(n)
    ia, ib = np.sort(order[: n // 2]), np.sort(order[n // 2 :])
    rots = torch.as_tensor(np.asarray(rotations) if not torch.is_tensor(rotations) else rotations)
    w = None if weights is None else torch.as_tensor(np.asarray(weights))
    halves = []
    for idx in (ia, ib):
        sel = torch.as_tensor(idx)
        halves.append(
            reconstruct(
                imgs[sel], rots[sel], None if w is None else w[sel], **reconstruct_kwargs
            ).volume
        )
    fsc = fourier_shell_correlation(halves[0], halves[1], pixel_size)
    return HalfSetResult(halves[0], halves[1], fsc, ia, ib)


@dataclass(frozen=True)
class ResolutionSweep:
    """Resolution (Å) against the number of images (arrays ``(len(counts),)``)."""

    counts: np.ndarray
    resolution_angstrom: np.ndarray
    threshold: float
    curves: tuple[FSCCurve, ...]


def resolution_vs_image_count(
    images: np.ndarray | torch.Tensor,
    rotations: np.ndarray | torch.Tensor,
    pixel_size: float,
    counts: Sequence[int],
    reference: np.ndarray | torch.Tensor | None = None,
    *,
    threshold: float = 0.143,
    symmetry_ops: np.ndarray | None = None,
    seed: int = 0,
    progress: bool = False,
    **reconstruct_kwargs,
) -> ResolutionSweep:
    """Reconstruct from the first ``c`` images for each ``c`` in ``counts``; resolution each.

    With a ``reference`` map (ground truth) the FSC is map vs reference; without one it is the
    half-set FSC (:func:`half_set_fsc`, seeded). ``symmetry_ops`` imposes a point group
    (frame check off, since small subsets are noisy). Returns the resolution at ``threshold``.
    """
    imgs = _as_images(images)
    counts = [int(c) for c in counts]
    if any(c < 2 or c > imgs.shape[0] for c in counts):
        raise ValueError(
            f"counts must lie in [2, {imgs.shape[0]}] (the number of images), got {counts}"
        )
    rots = torch.as_tensor(np.asarray(rotations) if not torch.is_tensor(rotations) else rotations)
    _as_poses(rots, None, imgs.shape[0])
    kwargs = dict(reconstruct_kwargs, symmetry_ops=symmetry_ops, check_symmetry=False)
    curves = []
    for c in tqdm(counts, desc="image counts", disable=not progress):
        if reference is None:
            curve = half_set_fsc(imgs[:c], rots[:c], pixel_size, seed=seed, **kwargs).fsc
        else:
            volume = reconstruct(imgs[:c], rots[:c], **kwargs).volume
            curve = fourier_shell_correlation(volume, reference, pixel_size)
        curves.append(curve)
    resolution = np.array([curve.resolution(threshold) for curve in curves])
    return ResolutionSweep(np.array(counts), resolution, float(threshold), tuple(curves))


def top_k_poses(
    probabilities: np.ndarray | torch.Tensor, grid: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most likely grid poses per image and their renormalised probabilities.

    ``probabilities`` ``(n, G)`` over ``grid`` ``(G, 3, 3)``. Returns rotations
    ``(n, k, 3, 3)`` and weights ``(n, k)`` summing to 1 per image, for :func:`backproject`.
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    grid = np.asarray(grid)
    if probs.ndim != 2 or probs.shape[1] != len(grid):
        raise ValueError(
            f"probabilities must have shape (n, {len(grid)}) for a grid of {len(grid)} poses, "
            f"got {probs.shape}"
        )
    if not 1 <= k <= probs.shape[1]:
        raise ValueError(f"k must lie in [1, {probs.shape[1]}], got {k}")
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    weights = np.take_along_axis(probs, top, axis=1)
    weights = weights / np.clip(weights.sum(axis=1, keepdims=True), 1e-300, None)
    return grid[top], weights


# ----------------------------------------------------------------------------- plots


def plot_fsc_curves(curves: dict[str, FSCCurve], thresholds: Sequence[float] = (0.5, 0.143)):
    """FSC against spatial frequency (1/Å) for named curves, with threshold lines."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for name, curve in curves.items():
        label = f"{name} ({curve.resolution(0.143):.1f} Å @0.143)"
        ax.plot(curve.frequency_inv_angstrom, curve.fsc, label=label)
    for t in thresholds:
        ax.axhline(t, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.02)
    ax.legend(fontsize=8)
    return fig


def plot_resolution_vs_count(sweeps: dict[str, ResolutionSweep]):
    """Resolution (Å, at each sweep's threshold) against the number of images (log x)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for name, sweep in sweeps.items():
        ax.plot(sweep.counts, sweep.resolution_angstrom, "o-", label=name)
    thresholds = {sweep.threshold for sweep in sweeps.values()}
    ax.set_xscale("log")
    ax.set_xlabel("number of images")
    ax.set_ylabel(f"resolution (Å, FSC = {', '.join(str(t) for t in sorted(thresholds))})")
    ax.legend(fontsize=8)
    return fig
