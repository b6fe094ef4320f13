"""Template banks on disk and pose labels over several ranks.

* :func:`template_bank_on_disk` builds the bank of :func:`cryosphere.poses.labels.templates.template_bank`
  (blurred projections at every cell of the level-``level`` grid, ``(G, N, N)`` float32) chunk
  by chunk into a ``.npy`` file and returns it memory-mapped: the level-3 bank of a 128-px map
  (36,864 × 128² floats, 2.4 GB) never has to fit in memory. With a process group the ranks
  project disjoint contiguous chunks into the same file (which must then be on a file system
  every rank sees); it is written under a temporary name and renamed when whole. A bank on the
  GPU is ``torch.from_numpy(np.asarray(bank)).to("cuda")`` where memory allows.
  Chunks are whole ``chunk``-cell blocks of the grid, projected with
  ``project_volume(batch_size=chunk)``: with the default ``chunk=1024`` each template is the
  same computation as in :func:`~cryosphere.poses.labels.templates.template_bank`.
* :func:`compute_labels_sharded` splits the images of :func:`~cryosphere.poses.labels.dataset_labels.
  compute_labels` into contiguous rank blocks, computes each block's MSE landscape against the
  bank (:func:`~cryosphere.poses.labels.landscape.mse_landscape`), gathers the ``(n, G)`` landscape on
  every rank (``n × G × 4`` bytes each) and then tunes λ and makes the soft maps and masks as
  :func:`~cryosphere.poses.labels.dataset_labels.compute_labels` does. The landscape equals the single-process
  one within the float32 bound stated by :func:`~cryosphere.poses.labels.landscape.mse_landscape` (the
  blocks differ, so BLAS may sum in another order).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
from tqdm.auto import tqdm

from cryosphere.geometry import grids
from cryosphere.imaging.projection import gaussian_blur, project_volume, volume_spectrum
from cryosphere.poses import distributed as dd
from cryosphere.poses.labels import dataset_labels, landscape

__all__ = ["template_bank_on_disk", "compute_labels_sharded"]


def _barrier(context: dd.DistributedContext) -> None:
    if context.distributed:
        dist.barrier()


def template_bank_on_disk(
    volume: np.ndarray,
    level: int,
    blur_sigma: float,
    path: str | os.PathLike[str],
    *,
    chunk: int = 1024,
    oversampling: int = 2,
    progress: bool = False,
    context: dd.DistributedContext | None = None,
) -> np.ndarray:
    """Write the level-``level`` template bank of ``volume`` to ``path`` (``.npy``) in chunks.

    Args:
        volume: ``(N, N, N)`` map ``[z, y, x]``.
        level: grid level (``G = 72 · 8**level`` cells).
        blur_sigma: Gaussian blur of the templates, pixels.
        path: the ``.npy`` file to write (replaced atomically).
        chunk: cells projected at once (memory: ``chunk × N² × 4`` bytes plus the projector's).
        oversampling: Fourier oversampling of the projector.
        progress: progress bar over this rank's chunks (rank 0 only).
        context: process group (None: this process alone).

    Returns:
        the ``(G, N, N)`` float32 bank, memory-mapped read-only.
    """
    context = context or dd.DistributedContext()
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise ValueError(f"volume must be a cubic array (N, N, N), got shape {vol.shape}")
    path = Path(path)
    if path.suffix != ".npy":
        raise ValueError(f"the template bank file must end in .npy, got {path}")
    grid = grids.healpix_so3_grid(level)
    n_pix = vol.shape[0]
    tmp = path.with_name(f".{path.name}.partial")
    if context.writes:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(grid), n_pix, n_pix))
    _barrier(context)
    start, stop = dd.block_range(len(grid), context.rank, context.world_size, align=chunk)
    with dd.collective_check(context, "projecting the template bank"):
        bank = np.load(tmp, mmap_mode="r+")
        spectrum = volume_spectrum(vol, oversampling)
        firsts = range(start, stop, int(chunk))
        for first in tqdm(firsts, desc="templates", disable=not (progress and context.writes)):
            last = min(stop, first + int(chunk))
            projections = project_volume(
                vol, grid[first:last], batch_size=int(chunk), spectrum=spectrum
            )
            bank[first:last] = gaussian_blur(projections, blur_sigma).numpy()
        bank.flush()
        del bank
    if context.writes:
        os.replace(tmp, path)
    _barrier(context)
    return np.load(path, mmap_mode="r")


def compute_labels_sharded(
    dataset: Any,
    templates: np.ndarray,
    level: int,
    q: float = 0.05,
    lam: float | None = None,
    *,
    target_share: float = 0.5,
    radius_deg: float | None = None,
    context: dd.DistributedContext | None = None,
) -> dataset_labels.PoseLabels:
    """:func:`cryosphere.poses.labels.dataset_labels.compute_labels` with the MSE landscape split over ranks.

    ``dataset`` needs ``clean_images`` ``(n, N, N)``, ``rotations`` ``(n, 3, 3)`` and
    ``symmetry_ops``; ``templates`` is the ``(G, N, N)`` bank (e.g. memory-mapped from
    :func:`template_bank_on_disk`). Every rank returns the same labels.
    """
    context = context or dd.DistributedContext()
    n = len(dataset.rotations)
    if context.world_size > n:
        raise ValueError(
            f"{context.world_size} ranks for {n} images; start at most {n} ranks for the labels"
        )
    if np.asarray(templates).shape[0] != grids.healpix_so3_grid_size(level):
        raise ValueError(
            f"templates hold {templates.shape[0]} projections, not the level-{level} grid"
        )
    start, stop = dd.block_range(n, context.rank, context.world_size)
    with dd.collective_check(context, "computing the MSE landscape"):
        mine = landscape.mse_landscape(np.asarray(dataset.clean_images[start:stop]), templates)
    mse = np.concatenate(dd.all_gather(context, mine))
    return dataset_labels.labels_from_mse(
        mse, level, dataset.rotations, dataset.symmetry_ops, q, lam, target_share, radius_deg
    )
