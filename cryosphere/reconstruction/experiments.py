"""Resolution experiments built on reconstruction and FSC: gold-standard half sets, and the
resolution reached against the number of images.

:func:`half_set_fsc` splits the images into two seeded random halves and correlates their
reconstructions (report the half-map resolution at FSC 0.143);
:func:`resolution_vs_image_count` repeats a reconstruction on the first ``c`` images for each
count ``c`` and reads the resolution off each FSC curve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from cryosphere._checks import as_images, as_weighted_poses
from cryosphere.reconstruction.backprojection import reconstruct
from cryosphere.reconstruction.fsc import FSCCurve, fourier_shell_correlation

__all__ = [
    "HalfSetResult",
    "ResolutionSweep",
    "half_set_fsc",
    "resolution_vs_image_count",
    "seeded_halves",
]


@dataclass(frozen=True)
class HalfSetResult:
    """Two half-set reconstructions and their FSC (``half_a``/``half_b``: float32 maps)."""

    half_a: torch.Tensor
    half_b: torch.Tensor
    fsc: FSCCurve
    indices_a: np.ndarray
    indices_b: np.ndarray


def seeded_halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The gold-standard split of ``range(n)``: a permutation seeded by ``seed``, its first
    ``n // 2`` and the rest, each sorted (int64)."""
    order = np.random.default_rng(seed).permutation(int(n))
    return np.sort(order[: int(n) // 2]), np.sort(order[int(n) // 2 :])


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
    imgs = as_images(images)
    n = imgs.shape[0]
    if n < 2:
        raise ValueError("half-set FSC needs at least 2 images")
    as_weighted_poses(rotations, weights, n)
    ia, ib = seeded_halves(n, seed)
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
    imgs = as_images(images)
    counts = [int(c) for c in counts]
    if any(c < 2 or c > imgs.shape[0] for c in counts):
        raise ValueError(
            f"counts must lie in [2, {imgs.shape[0]}] (the number of images), got {counts}"
        )
    rots = torch.as_tensor(np.asarray(rotations) if not torch.is_tensor(rotations) else rotations)
    as_weighted_poses(rots, None, imgs.shape[0])
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
