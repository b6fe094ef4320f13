"""Wiener reconstruction with the per-shell signal-to-noise ratio measured from half maps.

:func:`cryosphere.reconstruction.backprojection.reconstruct` divides by ``Σ w t H² + λ`` with
one constant ``λ``. Refinement programs use the signal-to-noise of the data itself, shell by
shell: with the images split into two random halves reconstructed independently, the half-map
FSC gives the SSNR of the *full* set (both halves averaged) as

    SSNR(s) = 2 · FSC(s) / (1 − FSC(s))

(the factor 2: the full set has twice the data of a half). In the back-projector's units the
Wiener constant of shell ``s`` is then

    λ(s) = mean over the shell's voxels of (Σ w t H²)  /  SSNR(s),

i.e. the noise-to-signal ratio of one Fourier voxel of the full set (a voxel with the shell's
mean weight and SSNR(s) gets exactly that Wiener filter, ``SSNR / (1 + SSNR)``). Shells where
the FSC is ≤ 0 get ``λ = mean weight / SSNR_min`` (``FSC`` clipped to ``[0.001, 0.999]``):
nearly nothing passes there, which is the point; so do all shells from the first where the FSC
falls below the noise level ``3 / sqrt(voxels in the shell)`` (:func:`ssnr_from_fsc`).

:func:`ssnr_reconstruct` returns the two half maps, their FSC, the SSNR per shell, ``λ(s)`` and
the full-set map; ``tests/test_reconstruct_ssnr.py`` checks that it beats the constant against
the truth on a noisy set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cryosphere._checks import as_images
from cryosphere.imaging import ctf as ctf_module
from cryosphere.reconstruction.backprojection import FourierSums, accumulate, finish_map
from cryosphere.reconstruction.experiments import seeded_halves
from cryosphere.reconstruction.fsc import FSCCurve, fourier_shell_correlation

__all__ = ["SSNRReconstruction", "ssnr_from_fsc", "ssnr_reconstruct"]

_FSC_CLIP = (1e-3, 0.999)


def ssnr_from_fsc(fsc: np.ndarray, n_voxels: np.ndarray | None = None) -> np.ndarray:
    """Full-set SSNR ``2 FSC / (1 − FSC)`` per shell from a half-map FSC ``(S,)``, with the
    FSC clipped to ``[0.001, 0.999]`` first (so the SSNR is finite and positive).

    With ``n_voxels`` ``(S,)`` (the Fourier voxels per shell), every shell from the first
    whose FSC falls below the noise level ``3 / sqrt(n_voxels)`` (three standard deviations of
    the FSC of two independent noise maps) on counts as noise (FSC 0.001): the FSC of pure
    noise is positive about half the time, and taking it for signal under-regularises the
    highest shells, where a deconvolved blur or CTF amplifies the noise most."""
    f = np.clip(np.asarray(fsc, dtype=np.float64), *_FSC_CLIP)
    if n_voxels is not None:
        level = 3.0 / np.sqrt(np.maximum(np.asarray(n_voxels, dtype=np.float64), 1.0))
        below = np.flatnonzero(np.asarray(fsc, dtype=np.float64) < level)
        below = below[below > 0]
        if below.size:
            f[below[0] :] = _FSC_CLIP[0]
    return 2.0 * f / (1.0 - f)


@dataclass(frozen=True)
class SSNRReconstruction:
    """A reconstruction Wiener-filtered with the measured per-shell SSNR.

    Attributes:
        volume: ``(N, N, N)`` float32 full-set map with ``λ(s)``.
        half_a, half_b: ``(N, N, N)`` float32 half maps (constant ``λ``).
        half_fsc: FSC between the half maps (report its 0.143 resolution).
        ssnr: ``(N // 2 + 1,)`` full-set SSNR per shell ``s`` (:func:`ssnr_from_fsc`).
        regularisation: ``(N // 2 + 1,)`` the Wiener constant ``λ(s)`` per shell.
        indices_a, indices_b: the images of each half.
    """

    volume: torch.Tensor
    half_a: torch.Tensor
    half_b: torch.Tensor
    half_fsc: FSCCurve
    ssnr: np.ndarray
    regularisation: np.ndarray
    indices_a: np.ndarray
    indices_b: np.ndarray


def _shell_of_padded_grid(p: int, n_pix: int, device: torch.device) -> torch.Tensor:
    """``(P, P, P//2+1)`` int64 shell ``round(|k| N)`` of every voxel of the padded half grid
    (``[kz, ky, kx]``, kz/ky centred at ``P // 2``, as the accumulators)."""
    centred = torch.arange(p, device=device, dtype=torch.float64) - p // 2
    kx = torch.arange(p // 2 + 1, device=device, dtype=torch.float64)
    radius = torch.sqrt(
        centred[:, None, None] ** 2 + centred[None, :, None] ** 2 + kx[None, None, :] ** 2
    )
    return torch.round(radius * n_pix / p).long()


def ssnr_reconstruct(
    images: np.ndarray | torch.Tensor,
    rotations: np.ndarray | torch.Tensor,
    pixel_size: float,
    weights: np.ndarray | torch.Tensor | None = None,
    *,
    seed: int = 0,
    half_regularisation: float = 1.0,
    symmetry_ops: np.ndarray | None = None,
    blur_sigma_px: float = 0.0,
    oversampling: int = 2,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    ctf: ctf_module.CTFParameters | None = None,
    pixel_size_angstrom: float | None = None,
) -> SSNRReconstruction:
    """Half maps, their FSC, and the full map with the per-shell Wiener constant ``λ(s)``.

    Args:
        images, rotations, weights: as :func:`~cryosphere.reconstruction.backprojection.
            reconstruct` (``(n, N, N)``; ``(n, 3, 3)`` or ``(n, k, 3, 3)`` with weights).
        pixel_size: Å per pixel (the FSC's frequency axis).
        seed: the seeded random split into halves (as :func:`~cryosphere.reconstruction.
            experiments.half_set_fsc`).
        half_regularisation: the constant ``λ`` of the two half maps.
        symmetry_ops, blur_sigma_px, oversampling, batch_size, device, ctf,
            pixel_size_angstrom: as ``reconstruct`` (no symmetry check here).
    """
    imgs = as_images(images)
    n, n_pix = imgs.shape[0], imgs.shape[-1]
    if n < 2:
        raise ValueError("a half-set SSNR needs at least 2 images")
    if not (np.isfinite(half_regularisation) and half_regularisation >= 0):
        raise ValueError(f"half_regularisation must be >= 0, got {half_regularisation}")
    rots = torch.as_tensor(np.asarray(rotations) if not torch.is_tensor(rotations) else rotations)
    wts = None if weights is None else torch.as_tensor(np.asarray(weights))
    halves = seeded_halves(n, seed)
    options = dict(
        symmetry_ops=symmetry_ops,
        blur_sigma_px=blur_sigma_px,
        oversampling=oversampling,
        batch_size=batch_size,
        device=device,
        pixel_size_angstrom=pixel_size_angstrom,
    )
    accumulators = []
    for idx in halves:
        sel = torch.as_tensor(idx)
        accumulators.append(
            accumulate(
                imgs[sel],
                rots[sel],
                None if wts is None else wts[sel],
                ctf=None if ctf is None else ctf.subset(idx),
                **options,
            )
        )
    maps = [finish_map(acc, n_pix, float(half_regularisation)) for acc in accumulators]
    half_fsc = fourier_shell_correlation(maps[0], maps[1], pixel_size)
    ssnr = ssnr_from_fsc(half_fsc.fsc, half_fsc.n_voxels)
    total = FourierSums(
        accumulators[0].numerator + accumulators[1].numerator,
        accumulators[0].weight + accumulators[1].weight,
    )
    p = total.weight.shape[0]
    shells = _shell_of_padded_grid(p, n_pix, total.weight.device).clamp(max=len(ssnr) - 1)
    counts = torch.bincount(shells.reshape(-1), minlength=len(ssnr)).double()
    summed = torch.bincount(shells.reshape(-1), total.weight.reshape(-1), minlength=len(ssnr))
    mean_weight = (summed / counts.clamp(min=1)).cpu().numpy()
    regularisation = np.maximum(mean_weight, 1e-12) / ssnr
    per_voxel = torch.as_tensor(regularisation, device=total.weight.device)[shells]
    volume = finish_map(total, n_pix, per_voxel)
    return SSNRReconstruction(
        volume, maps[0], maps[1], half_fsc, ssnr, regularisation, halves[0], halves[1]
    )
