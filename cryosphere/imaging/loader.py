"""Out-of-core particle reading: batches of a particle set through a torch DataLoader.

:class:`ParticleBatches` is a map-style dataset whose item ``i`` is one batch of consecutive
rows of a :class:`~cryosphere.imaging.particles.ParticleSet` (rows ``start + i·B`` onwards),
read from the memory-mapped stacks. Every item opens its stacks, copies the images it needs
and closes them again, so the pages a batch touched leave the process's resident memory
with the batch: reading 10⁵-10⁶ particles never holds more than the batches in flight
(``B × N² × 4`` bytes each; ``(1 + workers × prefetch)`` of them). :func:`particle_batches`
wraps it in a :class:`torch.utils.data.DataLoader` whose worker processes read ahead while the
caller computes.

Items are ``(indices (k,) int64, images (k, N, N) float32)`` numpy arrays, ``indices`` the
0-based rows of the STAR file, in STAR order.

Checking a batch before any work on it: :func:`non_finite_rows` finds images holding NaN or
infinite pixels; :func:`damaged_images_error` names them (row of the STAR file and image name) in
a one-line message; :func:`checked_and_centred` refuses them (or, asked to skip them, zeroes and
marks them) and shifts every image by ``+origin / pixel_size``, RELION's sign
(:func:`cryosphere.imaging.ctf.centring_shift_px`), so the particle sits at the box centre.
:func:`read_prepared` reads chosen rows as ``cryosphere predict`` feeds them to the network
(recentred, Fourier-cropped, phase-flipped, background-normalised).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cryosphere.imaging import ctf as ctf_module
from cryosphere.imaging import preprocess
from cryosphere.imaging.particles import ParticleSet, StackReader

__all__ = [
    "ParticleBatches",
    "particle_batches",
    "non_finite_rows",
    "damaged_images_error",
    "centred_images",
    "checked_and_centred",
    "drop_damaged",
    "warn_left_out",
    "read_prepared",
]


class ParticleBatches(Dataset):
    """Batches of rows ``[start, stop)`` of ``particle_set`` (module docstring).

    Args:
        particle_set: the checked particle set.
        batch_size: rows per batch (the last one may be shorter).
        start, stop: the rows to read (``stop`` None: to the end).
    """

    def __init__(
        self, particle_set: ParticleSet, batch_size: int, start: int = 0, stop: int | None = None
    ):
        n = len(particle_set)
        stop = n if stop is None else int(stop)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= int(start) <= stop <= n:
            raise ValueError(f"rows [{start}, {stop}) do not lie in the set's 0..{n} rows")
        self.particle_set = particle_set
        self.batch_size, self.start, self.stop = int(batch_size), int(start), stop

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.batch_size)

    def __getitem__(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= item < len(self):
            raise IndexError(f"batch {item} of {len(self)}")
        first = self.start + item * self.batch_size
        indices = np.arange(first, min(first + self.batch_size, self.stop), dtype=np.int64)
        with StackReader(self.particle_set) as reader:  # maps closed: pages leave the RSS
            return indices, reader.read(indices)


def _as_is(item):
    return item


def particle_batches(
    particle_set: ParticleSet,
    batch_size: int = 256,
    start: int = 0,
    stop: int | None = None,
    num_workers: int = 0,
    prefetch_factor: int = 2,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(indices, images)`` batches of rows ``[start, stop)`` in order.

    ``num_workers`` reader processes (0: read in this process) each keep up to
    ``prefetch_factor`` batches ready.
    """
    dataset = ParticleBatches(particle_set, batch_size, start, stop)
    if len(dataset) == 0:
        return
    workers = max(0, int(num_workers))
    loader = DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_as_is,
        prefetch_factor=int(prefetch_factor) if workers else None,
        persistent_workers=False,
    )
    # no grad-mode context around the yield: a generator left suspended (the caller stopped
    # at a damaged batch) would keep autograd off in the caller's thread
    yield from loader


def non_finite_rows(indices: np.ndarray, images: np.ndarray) -> np.ndarray:
    """The rows of ``indices`` ``(k,)`` whose images ``(k, N, N)`` hold NaN or infinite pixels."""
    flat = np.asarray(images).reshape(len(indices), -1)
    return np.asarray(indices)[~np.isfinite(flat).all(axis=1)]


def damaged_images_error(particle_set, rows: np.ndarray) -> ValueError:
    """A one-line ValueError naming the damaged particles ``rows`` (0-based, the first five)."""
    rows = np.asarray(rows).reshape(-1)
    names = particle_set.image_names(rows[:5])
    listed = ", ".join(
        f"row {int(i) + 1} ({name})" for i, name in zip(rows[:5], names, strict=True)
    )
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    return ValueError(
        f"{particle_set.star_path}: {len(rows)} particle images with NaN or infinite pixels: "
        f"{listed}{more}; remove them from the STAR file or pass --skip-bad to leave them out "
        "(nothing was written)"
    )


def drop_damaged(
    particle_set, indices: np.ndarray, images: np.ndarray, skip_bad: bool, dropped: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``indices`` ``(k,)`` and their images ``(k, N, N)`` without the damaged ones (NaN or
    infinite pixels): those raise :func:`damaged_images_error`, or with ``skip_bad`` are
    appended to ``dropped`` and left out."""
    damaged = non_finite_rows(indices, images)
    if len(damaged) == 0:
        return indices, images
    if not skip_bad:
        raise damaged_images_error(particle_set, damaged)
    dropped.extend(int(i) for i in damaged)
    good = ~np.isin(indices, damaged)
    return indices[good], images[good]


def warn_left_out(particle_set, dropped: list[int] | np.ndarray, stacklevel: int = 3) -> None:
    """One warning naming the particles ``dropped`` (0-based rows) that ``skip_bad`` left out."""
    if len(dropped):
        warnings.warn(
            f"left out {len(dropped)} particles with NaN or infinite pixels: "
            f"{', '.join(particle_set.image_names(np.asarray(dropped)))}",
            stacklevel=stacklevel,
        )


def checked_and_centred(
    particle_set, indices: np.ndarray, images: np.ndarray, skip_bad: bool, bad: np.ndarray
) -> torch.Tensor:
    """Images ``(k, N, N)`` of rows ``indices`` shifted by ``+origin / pixel`` (centred),
    float32. Damaged images raise :func:`damaged_images_error`, or with ``skip_bad`` are zeroed
    and marked ``True`` in ``bad`` ``(n,)``."""
    damaged = non_finite_rows(indices, images)
    if len(damaged):
        if not skip_bad:
            raise damaged_images_error(particle_set, damaged)
        bad[damaged] = True
        images = np.where(np.isin(indices, damaged)[:, None, None], 0.0, images)
    return centred_images(particle_set, indices, images)


def centred_images(particle_set, indices: np.ndarray, images: np.ndarray) -> torch.Tensor:
    """Images ``(k, N, N)`` of rows ``indices`` shifted by ``+origin / pixel`` (RELION's sign:
    the particle's centre to pixel ``N // 2``), float32; unshifted when no origin is stated."""
    origins = particle_set.origins_angstrom[indices]
    if not np.any(origins):
        return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    shifts = ctf_module.centring_shift_px(origins, particle_set.pixel_size_angstrom)
    return ctf_module.shift_images(images, shifts)


def read_prepared(
    pset: ParticleSet,
    indices: np.ndarray,
    image_size: int,
    sign: float = 1.0,
    skip_bad: bool = False,
    progress: bool = False,
    centre: bool = True,
) -> tuple[torch.Tensor, np.ndarray, float]:
    """Particles ``indices`` as ``cryosphere predict`` feeds them to the network: recentred by
    their origins (``centre=False``: as picked, the origins ignored), Fourier-cropped to
    ``image_size``, CTF phase-flipped, background-normalised, multiplied by the contrast
    ``sign``. Returns ``(images (k, M, M), kept indices (k,), pixel
    size of the model box in Å)``. Damaged images (NaN or infinite pixels) raise a ValueError
    naming them, or with ``skip_bad`` are left out (a warning lists them)."""
    indices = np.asarray(indices, dtype=np.int64)
    out, kept, dropped, pixel = [], [], [], pset.pixel_size_angstrom
    with StackReader(pset) as reader:
        starts = range(0, len(indices), 256)
        for start in tqdm(starts, desc="particles", unit="batch", disable=not progress):
            index = indices[start : start + 256]
            raw = reader.read(index) * np.float32(sign)
            index, raw = drop_damaged(pset, index, raw, skip_bad, dropped)
            if len(index) == 0:
                continue
            prepared, pixel = preprocess.prepare_images(
                centred_images(pset, index, raw) if centre else raw,
                pset.pixel_size_angstrom,
                target_size=image_size,
                ctf=None if pset.ctf is None else pset.ctf.subset(index),
            )
            out.append(prepared)
            kept.append(index)
    warn_left_out(pset, dropped)
    if not out:
        raise ValueError(f"{pset.star_path}: no particle images left to read")
    return torch.cat(out), np.concatenate(kept), float(pixel)
