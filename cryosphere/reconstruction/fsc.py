"""Fourier shell correlation between two maps, and the resolution where it crosses a threshold.

:func:`fourier_shell_correlation` correlates two maps shell by shell (shell ``s`` holds the
voxels with ``round(|k| N) = s``, ``k`` in cycles/voxel; ``s = 0 .. N // 2``), with the
frequency axis ``s / (N · pixel_size)`` in 1/Å. :func:`resolution_at_threshold` returns the
resolution (Å) where the curve first drops below a threshold (0.5 or 0.143), linearly
interpolated between the shells either side of the crossing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cryosphere._checks import as_volume

__all__ = ["FSCCurve", "fourier_shell_correlation", "resolution_at_threshold"]


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
    a = as_volume(map_a, "map_a").double().cpu()
    b = as_volume(map_b, "map_b").double().cpu()
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
