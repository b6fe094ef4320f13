"""Reconstruction by Fourier-space back-projection (insertion of central slices).

Geometry (the inverse of :func:`cryosphere.imaging.projection.project_volume`)
------------------------------------------------------------------------------
An image of pose ``R`` (``x_mic = R @ x_vol``), centred at pixel ``N // 2``, has a 2D DFT
equal to the 3D Fourier transform of the volume at ``Rᵀ k`` (``k = (kx, ky, 0)``). So each
image's DFT is *inserted* as a central slice at ``Rᵀ k`` in a 3D Fourier grid, then the grid
is inverse-transformed.

Algorithm (:func:`reconstruct`, :func:`backproject`)
----------------------------------------------------
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
averaging the C1 map over ``V(g x)``, but needs no resampling of the finished map. When
``check_symmetry`` is on, :func:`reconstruct` tests the C1 reconstruction (kept as a
by-product) with :func:`cryosphere.reconstruction.symmetry.symmetry_correlation`.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from cryosphere._checks import as_images, as_ops, as_weighted_poses
from cryosphere.imaging import ctf as ctf_module
from cryosphere.reconstruction.symmetry import raise_frame_mismatch, symmetry_correlation

__all__ = [
    "FourierSums",
    "Reconstruction",
    "accumulate",
    "backproject",
    "finish_map",
    "reconstruct",
    "top_k_poses",
]


def _sinc2_correction(n_box: int, padded: int, device: torch.device) -> torch.Tensor:
    """``sinc²(d/P)`` per axis (d: voxel offset from the centre), as a separable (N,N,N)."""
    d = torch.arange(n_box, device=device, dtype=torch.float64) - n_box // 2
    s = torch.special.sinc(d / padded) ** 2
    return (s[:, None, None] * s[None, :, None] * s[None, None, :]).float()


@dataclass(frozen=True)
class _Accumulators:
    numerator: torch.Tensor  # (P, P, P//2+1) complex128, [kz, ky, kx], kz/ky centred
    weight: torch.Tensor  # (P, P, P//2+1) float64


@dataclass(frozen=True)
class _SliceSamples:
    """The padded images' ``rfft2`` coefficients that are inserted, and their fixed factors.

    ``M`` coefficients lie inside the sphere ``|k| < P/2 - 1`` (index units of the padded
    grid), so that every trilinear corner lies on the grid.
    """

    padded: int  # P = oversampling * N (even)
    keep: torch.Tensor  # (P * (P//2 + 1),) bool: which rfft2 coefficients are inserted
    k_mic: torch.Tensor  # (M, 3) float32 microscope-frame frequencies (kx, ky, 0)
    sign: torch.Tensor  # (M,) float32 (-1)^(r + s): image origin at pixel P // 2
    h: torch.Tensor  # (M,) float32 per-sample factor of the numerator (H, halved at kx = 0)
    h2: torch.Tensor  # (M,) float32 per-sample factor of the weight (H², halved at kx = 0)
    centre: torch.Tensor  # (3,) grid index of k = 0 in [z, y, x] order


def _slice_samples(
    n_pix: int, oversampling: int, blur_sigma_px: float, device: torch.device
) -> _SliceSamples:
    p = oversampling * n_pix
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
    return _SliceSamples(
        padded=p,
        keep=keep,
        k_mic=k_mic.float(),
        sign=sign,
        h=(column * transfer).float(),
        h2=(column * transfer**2).float(),
        centre=torch.tensor([p // 2, p // 2, 0.0], device=device),
    )


def _spread(acc: torch.Tensor, coords: torch.Tensor, source: torch.Tensor, p: int) -> torch.Tensor:
    """Add ``source`` ``(3, S)`` at grid points ``coords`` ``(S, 3)`` ([z, y, x], float) into
    ``acc`` ``(3, P * P * (P//2 + 1))`` with trilinear weights over the 8 nearest voxels."""
    half = p // 2 + 1
    floor = torch.floor(coords)
    frac = coords - floor
    floor = floor.long()
    base = (floor[:, 0] * p + floor[:, 1]) * half + floor[:, 2]
    fz, fy, fx = frac.unbind(-1)
    for dz in (0, 1):
        wz = fz if dz else 1.0 - fz
        for dy in (0, 1):
            wzy = wz * (fy if dy else 1.0 - fy)
            for dx in (0, 1):
                tri = wzy * (fx if dx else 1.0 - fx)
                flat = base + ((dz * p + dy) * half + dx)
                acc.index_add_(1, flat, source * tri)
    return acc


def _insert_batch(
    acc: torch.Tensor,
    spectra: torch.Tensor,
    rots: torch.Tensor,
    wts: torch.Tensor,
    samples: _SliceSamples,
    ctf: torch.Tensor | None = None,
) -> None:
    """Insert a batch: ``spectra`` ``(b, M)``, poses ``(b, k, 3, 3)``, weights ``(b, k)``;
    ``ctf`` ``(b, M)``: each image's CTF at the kept samples (None: none)."""
    n_k = rots.shape[1]
    h, h2 = samples.h[None], samples.h2[None]
    if ctf is not None:  # per-image transfer H = blur · CTF
        h, h2 = h * ctf, h2 * ctf**2
        h = h[:, None].expand(-1, n_k, -1).reshape(-1, h.shape[-1])
        h2 = h2[:, None].expand(-1, n_k, -1).reshape(-1, h2.shape[-1])
    # Flatten (image, pose) pairs; skip zero weights (one-hot, top-k padding).
    spectra = spectra[:, None].expand(-1, n_k, -1).reshape(-1, spectra.shape[-1])
    rots = rots.reshape(-1, 3, 3)
    wts = wts.reshape(-1)
    used = wts > 0
    if not bool(used.any()):
        return
    spectra, rots, wts = spectra[used], rots[used], wts[used]
    if ctf is not None:
        h, h2 = h[used], h2[used]
    # Volume-frame frequencies Rᵀ k (row vectors: k @ R), folded to kx >= 0.
    k_vol = torch.einsum("mj,bjk->bmk", samples.k_mic, rots)
    flip = k_vol[..., 0] < 0
    k_vol = torch.where(flip[..., None], -k_vol, k_vol)
    spectra = spectra * (wts[:, None] * h)
    # Grid coordinates (x, y, z) -> indices [z, y, x]; z, y centred at P // 2.
    coords = (k_vol.flip(-1) + samples.centre).reshape(-1, 3)
    source = torch.stack(
        [
            spectra.real.reshape(-1),
            torch.where(flip, -spectra.imag, spectra.imag).reshape(-1),
            (wts[:, None] * h2).expand_as(spectra.real).reshape(-1),
        ]
    )
    _spread(acc, coords, source, samples.padded)


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
    samples = _slice_samples(n_pix, oversampling, blur_sigma_px, device)
    p = samples.padded
    half = p // 2 + 1
    start = p // 2 - n_pix // 2
    # Channel-first float32 accumulators [re, im, weight]: index_add_ along the last dim is
    # several times faster than along the first for a multi-channel source.
    acc = torch.zeros(3, p * p * half, dtype=torch.float32, device=device)
    step = max(1, batch_size // rotations.shape[1])  # images per batch: ~batch_size insertions
    steps = range(0, n_img, step)
    for first in tqdm(steps, desc="back-projecting", disable=not progress, unit="batch"):
        batch = images[first : first + step].to(device=device, dtype=torch.float32)
        padded = torch.zeros((batch.shape[0], p, p), dtype=torch.float32, device=device)
        padded[:, start : start + n_pix, start : start + n_pix] = batch
        spectra = torch.fft.rfft2(padded).reshape(batch.shape[0], -1)[:, samples.keep]
        transfer = None
        if ctf is not None:
            part = ctf.subset(np.arange(first, first + batch.shape[0]))
            full = ctf_module.ctf_2d(part, p, pixel_size, device=device)
            transfer = full.reshape(len(part), -1)[:, samples.keep].to(torch.float32)
        _insert_batch(
            acc,
            spectra * samples.sign,
            rotations[first : first + step].to(device=device, dtype=torch.float32),
            weights[first : first + step].to(device=device, dtype=torch.float32),
            samples,
            transfer,
        )
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


def _check_settings(regularisation: float, oversampling: int, n_pix: int, batch_size: int) -> None:
    if regularisation < 0 or not math.isfinite(regularisation):
        raise ValueError(f"regularisation must be a finite number >= 0, got {regularisation}")
    if int(oversampling) != oversampling or oversampling < 1:
        raise ValueError(f"oversampling must be a positive integer, got {oversampling}")
    if (int(oversampling) * n_pix) % 2:
        raise ValueError(
            f"oversampling * N must be even (got {oversampling} * {n_pix}); "
            "use an even oversampling factor for odd image sizes"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _check_ctf(
    ctf: ctf_module.CTFParameters | None, n_images: int, pixel_size_angstrom: float | None
) -> None:
    if ctf is not None and (len(ctf) != n_images or not (pixel_size_angstrom or 0) > 0):
        raise ValueError(
            f"ctf needs one entry per image ({n_images}, got {len(ctf)}) and a positive "
            f"pixel_size_angstrom (got {pixel_size_angstrom})"
        )


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
        :func:`~cryosphere.reconstruction.symmetry.symmetry_correlation`), or ``None``.
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
        inserted at every ``R @ g``. ``None`` for C1. With ``K > 1`` the identity insertions
        are also accumulated alone, so the C1 map comes at the cost of one extra FFT.
    check_symmetry, symmetry_threshold
        Raise ``ValueError`` when the C1 map's symmetry correlation is below the threshold
        (the stated group does not match the map's frame).
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
    Reconstruction
        ``volume``: ``(N, N, N)`` float32 map ``[z, y, x]`` on ``device``, centre at voxel
        ``N // 2``, in the images' units per voxel (the inverse of ``project_volume``).
    """
    imgs = as_images(images)
    rots, wts = as_weighted_poses(rotations, weights, imgs.shape[0])
    ops = as_ops(symmetry_ops)
    n_pix = imgs.shape[-1]
    _check_settings(regularisation, oversampling, n_pix, batch_size)
    _check_ctf(ctf, imgs.shape[0], pixel_size_angstrom)
    if device is None:
        device = imgs.device if torch.is_tensor(images) else torch.device("cpu")
    insert = dict(
        oversampling=int(oversampling),
        blur_sigma_px=float(blur_sigma_px),
        batch_size=batch_size,
        device=torch.device(device),
        progress=progress,
        ctf=ctf,
        pixel_size=pixel_size_angstrom,
    )
    finish = dict(
        n_pix=n_pix, regularisation=regularisation, gridding_correction=gridding_correction
    )
    first = _insert(imgs, rots, wts, **insert)
    if len(ops) == 1:
        return Reconstruction(_finish(first, **finish))
    c1 = _finish(first, **finish)
    corr = symmetry_correlation(c1, ops.numpy())
    if check_symmetry and corr < symmetry_threshold:
        raise_frame_mismatch(corr, symmetry_threshold, len(ops))
    rest = _insert(imgs, *_combined_poses(rots, wts, ops[1:]), **insert)
    total = _Accumulators(first.numerator + rest.numerator, first.weight + rest.weight)
    return Reconstruction(_finish(total, **finish), c1, corr)


def backproject(
    images: np.ndarray | torch.Tensor,
    rotations: np.ndarray | torch.Tensor,
    weights: np.ndarray | torch.Tensor | None = None,
    **options,
) -> torch.Tensor:
    """The map of :func:`reconstruct` (``reconstruct(...).volume``), without the symmetry check.

    Takes the arguments of :func:`reconstruct` except ``check_symmetry`` and
    ``symmetry_threshold`` (``symmetry_ops``, ``regularisation``, ``blur_sigma_px``,
    ``oversampling``, ``gridding_correction``, ``batch_size``, ``device``, ``progress``; keyword
    only). Returns the ``(N, N, N)`` float32 map ``[z, y, x]``, centre at voxel ``N // 2``.
    """
    for name in ("check_symmetry", "symmetry_threshold"):
        if name in options:
            raise TypeError(f"backproject() checks no symmetry; pass {name} to reconstruct()")
    return reconstruct(images, rotations, weights, check_symmetry=False, **options).volume


_reconstruct_signature = inspect.signature(reconstruct)
backproject.__signature__ = _reconstruct_signature.replace(  # what help() and IDEs show
    parameters=[
        p
        for name, p in _reconstruct_signature.parameters.items()
        if name not in ("check_symmetry", "symmetry_threshold")
    ],
    return_annotation="torch.Tensor",
)


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


FourierSums = _Accumulators  # ``.numerator`` Σ w t H Î, ``.weight`` Σ w t H²: (P, P, P//2+1)


def accumulate(images, rotations, weights=None, *, symmetry_ops=None, **options) -> FourierSums:
    """The sums of :func:`reconstruct` before its Wiener ratio (every ``R @ g`` inserted), on
    the padded half grid ``[kz, ky, kx]`` (kz, ky centred at ``P // 2``). ``options``:
    ``oversampling``, ``blur_sigma_px``, ``batch_size``, ``device``, ``ctf``,
    ``pixel_size_angstrom`` as there."""
    imgs = as_images(images)
    rots, wts = _combined_poses(
        *as_weighted_poses(rotations, weights, imgs.shape[0]), as_ops(symmetry_ops)
    )
    o = {"oversampling": 2, "blur_sigma_px": 0.0, "batch_size": 256} | options
    _check_settings(0.0, o["oversampling"], imgs.shape[-1], o["batch_size"])
    _check_ctf(o.get("ctf"), imgs.shape[0], o.get("pixel_size_angstrom"))
    device = torch.device(o.get("device") or (imgs.device if torch.is_tensor(images) else "cpu"))
    return _insert(imgs, rots, wts, int(o["oversampling"]), float(o["blur_sigma_px"]),
                   o["batch_size"], device, False, o.get("ctf"), o.get("pixel_size_angstrom"))  # fmt: skip


def finish_map(sums: FourierSums, n_pix: int, regularisation: float | torch.Tensor) -> torch.Tensor:
    """The ``(N, N, N)`` float32 map of :func:`accumulate`'s sums: ``Σ w t H Î / (Σ w t H² +
    λ)`` with ``λ`` a constant or a tensor on the sums' grid, gridding-corrected."""
    return _finish(sums, int(n_pix), regularisation, True)
