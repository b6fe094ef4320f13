"""Batches from a fixed training split, dealt out in slots whose shards a rank reads by
itself; on their own or mixed into a stream of fresh particles (:class:`MixedStream`).

:class:`FixedSetStream` gives :class:`~cryosphere.poses.training.stream.Batch` objects from
``batch(step, slot)``, a pure function of ``(seed, slot, step)`` like the simulated streams
(:mod:`cryosphere.poses.training.stream`), so a resumed run sees the batches it would have seen.

**Shards.** With ``slots = S > 1`` (a distributed run's stream batches per optimiser step,
:mod:`cryosphere.poses.training.data_parallel`) the split of ``n`` images is cut into ``S``
contiguous shards in split order (:func:`shard_bounds`, sizes differing by at most one), and
slot ``k`` only ever draws from shard ``k``: each epoch it goes through its shard in its own
seeded order (``default_rng([seed, k, epoch])``), ``batch_size`` images a step; an epoch is
``ceil(max shard / batch_size)`` steps and a slot whose shard runs out first wraps round to
the start of its order, so every slot's batch has ``batch_size`` images (equal shares, as the
gradient average needs). A rank that draws slots ``a .. b`` (``held_slots``) therefore needs
the images of shards ``a .. b`` only: one contiguous block of the split, ``~n / W`` images on
``W`` ranks. Every global batch holds ``batch_size`` images of each shard (a stratified draw:
when the split's order follows micrographs or defocus, each step still sees all of it).

The batches depend on ``S``, never on the rank count ``W``: ``W`` ranks holding ``S / W``
shards each draw exactly the batches one process holding all ``S`` shards draws.

``shard_sizes`` states the shards' sizes when they are not the even cut of ``len(images)``:
a reader that leaves out damaged images keeps the cut of the whole split and passes the
number of images each shard kept, so the shards stay the same on any rank count.

With ``slots = 1`` (one process) the whole set is one shard drawn in
``default_rng([seed, rank, epoch])`` order, the last batch of an epoch short (unchanged since
before slots).

Options: ``fresh_noise`` (new noise on the clean image each time an image is drawn) and
``in_plane`` (the clean image turns by a random multiple of the grid's in-plane step, the
target is permuted); ``targets`` may be a function of the batch's poses, computed per batch
(a ``(n, G)`` table costs ``4·G`` bytes an image: 18 kB at level 2, more than a 64-px image).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from cryosphere import io
from cryosphere.geometry import rotations as geometry_rotations
from cryosphere.poses.distributed import DistributedContext, all_gather, block_range
from cryosphere.poses.training import targets as tg
from cryosphere.poses.training.stream import Batch, stream_seed

__all__ = [
    "FixedSetStream",
    "MixedStream",
    "shard_bounds",
    "held_block",
    "gathered_shard_sizes",
    "record_shares",
]

TargetFunction = Callable[[np.ndarray], np.ndarray]


def shard_bounds(n: int, slots: int) -> list[tuple[int, int]]:
    """The ``slots`` contiguous shards ``[start, stop)`` of a split of ``n`` images (in split
    order, sizes differing by at most one, earlier shards the larger)."""
    if int(slots) < 1 or int(n) < int(slots):
        raise ValueError(
            f"{n} training images cannot be dealt into {slots} slots (each slot needs one)"
        )
    return [block_range(int(n), k, int(slots)) for k in range(int(slots))]


def held_block(n: int, slots: int, held_slots: range) -> tuple[int, int]:
    """``[start, stop)`` of the split that the shards of ``held_slots`` cover (contiguous)."""
    bounds = shard_bounds(n, slots)
    return bounds[held_slots.start][0], bounds[held_slots.stop - 1][1]


class FixedSetStream:
    """Batches from a fixed training split (module docstring), optionally re-noised.

    Args:
        images: ``(n, N, N)`` images: the whole split, or with ``held_slots`` the shards of
            those slots concatenated in slot order (used as they are without ``fresh_noise``).
        targets: ``(n, G)`` targets (masks for BCE, distributions for cross-entropy), or a
            function ``rotations (k, 3, 3) -> (k, G)`` called per batch.
        rotations: ``(n, 3, 3)`` true poses.
        batch_size: images per batch (per slot).
        seed: order and noise seed.
        clean: ``(n, N, N)`` noise-free images, needed for ``fresh_noise`` / ``in_plane``.
        noise_sigma: noise σ for ``fresh_noise``.
        fresh_noise: new noise on the clean image each time it is drawn.
        in_plane: random in-plane turn by a multiple of the grid step, target permuted.
        level: grid level of ``targets`` (for ``in_plane``).
        slots: stream batches per optimiser step (module docstring: shards).
        shard_sizes: ``(slots,)`` images in each shard; default the even cut of ``n``.
        held_slots: the slots whose shards ``images`` holds; default all. Drawing another
            slot raises a ValueError.
    """

    def __init__(
        self,
        images: np.ndarray,
        targets: np.ndarray | TargetFunction,
        rotations: np.ndarray,
        batch_size: int,
        seed: int = 0,
        *,
        clean: np.ndarray | None = None,
        noise_sigma: float | None = None,
        fresh_noise: bool = False,
        in_plane: bool = False,
        level: int = 2,
        slots: int = 1,
        shard_sizes: Sequence[int] | None = None,
        held_slots: range | None = None,
    ):
        self.images = torch.as_tensor(np.asarray(images, dtype=np.float32))
        self.target_function = targets if callable(targets) else None
        self.targets = (
            None if callable(targets) else torch.as_tensor(np.asarray(targets, np.float32))
        )
        self.rotations = np.asarray(rotations, dtype=np.float64)
        n = self.images.shape[0]
        if n == 0 or self.rotations.shape != (n, 3, 3):
            raise ValueError("images, targets and rotations need the same non-zero length")
        if self.targets is not None and self.targets.shape[0] != n:
            raise ValueError("images, targets and rotations need the same non-zero length")
        if (fresh_noise or in_plane) and clean is None:
            raise ValueError("fresh_noise and in_plane need the clean images (clean=...)")
        if in_plane and not fresh_noise:
            raise ValueError(
                "in_plane augmentation turns the clean images before noise is added; set "
                "fresh_noise=True (turning noisy images would blur the noise and empty the corners)"
            )
        if fresh_noise and not (noise_sigma is not None and noise_sigma > 0):
            raise ValueError("fresh_noise needs the dataset's noise_sigma > 0")
        self.clean = None if clean is None else torch.as_tensor(np.asarray(clean, np.float32))
        self.noise = float(noise_sigma or 0.0)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.fresh_noise, self.in_plane, self.level = bool(fresh_noise), bool(in_plane), int(level)
        self.slots = int(slots)
        if self.slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.held_slots = range(self.slots) if held_slots is None else held_slots
        self._shards(n, shard_sizes)

    def _shards(self, n: int, shard_sizes: Sequence[int] | None) -> None:
        """Sizes, local offsets and epoch length of the shards (module docstring)."""
        held = self.held_slots
        if len(held) == 0 or held.start < 0 or held.stop > self.slots or held.step != 1:
            raise ValueError(f"held_slots must be a non-empty run of 0 .. {self.slots - 1}")
        if shard_sizes is None:
            if len(held) != self.slots:
                raise ValueError("a stream holding some slots only needs their shard_sizes")
            sizes = [b - a for a, b in shard_bounds(n, self.slots)]
        else:
            sizes = [int(s) for s in shard_sizes]
        if len(sizes) != self.slots or min(sizes) < 1:
            raise ValueError(f"shard_sizes must be {self.slots} positive counts, got {sizes}")
        if sum(sizes[k] for k in held) != n:
            raise ValueError(
                f"the shards of slots {held.start}..{held.stop - 1} hold "
                f"{sum(sizes[k] for k in held)} images, but {n} were given"
            )
        self.shard_sizes = sizes
        self.n_images = int(sum(sizes))
        self._offset = dict(
            zip(held, np.cumsum([0] + [sizes[k] for k in held])[:-1].tolist(), strict=True)
        )
        largest = max(sizes) if self.slots > 1 else n
        self.per_epoch = math.ceil(largest / self.batch_size)

    def epoch_permutation(self, epoch: int, rank: int = 0) -> np.ndarray:
        """The order of slot ``rank``'s shard in ``epoch`` (of the whole set with one slot),
        seeded by ``(seed, rank, epoch)``: a permutation of ``0 .. shard size − 1``."""
        size = self.images.shape[0] if self.slots == 1 else self.shard_sizes[rank]
        return stream_seed(self.seed, rank, epoch).permutation(size)

    def _index(self, step: int, slot: int) -> np.ndarray:
        """Local indices of the images of ``batch(step, slot)``."""
        epoch, within = divmod(int(step), self.per_epoch)
        if self.slots == 1:  # each rank its own order of the whole set (one process: rank 0)
            order = self.epoch_permutation(epoch, slot)
            return order[within * self.batch_size : (within + 1) * self.batch_size]
        if slot not in self.held_slots:
            raise ValueError(
                f"slot {slot}'s shard was read by another rank; this stream holds slots "
                f"{self.held_slots.start}..{self.held_slots.stop - 1}"
            )
        size = self.shard_sizes[slot]
        order = self.epoch_permutation(epoch, slot)
        first = within * self.batch_size
        return self._offset[slot] + order[np.arange(first, first + self.batch_size) % size]

    def batch(self, step: int, rank: int = 0) -> Batch:
        """Batch ``step`` of slot ``rank`` (deterministic)."""
        index = torch.from_numpy(self._index(step, int(rank)))
        rng = stream_seed(self.seed, rank + 1, int(step))
        rotations = self.rotations[index.numpy()]
        if self.targets is not None:
            targets = self.targets[index]
        else:
            targets = torch.from_numpy(np.asarray(self.target_function(rotations), np.float32))
        clean = self.clean[index] if self.clean is not None else self.images[index]
        if self.in_plane:
            n_psi = 6 * 2**self.level
            steps = rng.integers(0, n_psi, size=len(index))
            clean, targets = tg.rotate_in_plane(clean, targets, steps, self.level)
            turns = geometry_rotations.rotation_about_z(steps * tg.in_plane_step_deg(self.level))
            rotations = turns @ rotations
        if self.fresh_noise:
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            images = clean + torch.randn(clean.shape, generator=gen) * self.noise
        else:
            images = self.images[index]
        sigma = np.full(len(index), self.noise)
        return Batch(images, targets, rotations, sigma, clean)

    def description(self) -> dict[str, Any]:
        """What identifies the stream (for checkpoints): the same on every rank count."""
        return {
            "kind": "fixed",
            "n_images": self.n_images,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "fresh_noise": self.fresh_noise,
            "in_plane": self.in_plane,
            "level": self.level,
            **({"slots": self.slots} if self.slots != 1 else {}),
        }


def gathered_shard_sizes(
    context: DistributedContext, n: int, slots: int, held_slots: range, kept: np.ndarray
) -> list[int]:
    """Every shard's size on every rank: each rank counts the images it kept of its own
    shards (``kept``: their positions in the split of ``n``, after leaving out damaged ones)
    and the counts are gathered. Call it on every rank (a collective)."""
    bounds = shard_bounds(n, slots)
    kept = np.asarray(kept, dtype=np.int64)
    mine = {
        k: int(np.count_nonzero((kept >= bounds[k][0]) & (kept < bounds[k][1]))) for k in held_slots
    }
    sizes: dict[int, int] = {}
    for part in all_gather(context, mine):
        sizes.update(part)
    return [sizes[k] for k in range(int(slots))]


def record_shares(
    context: DistributedContext, path: str | os.PathLike[str], held_slots: range, rows: np.ndarray
) -> dict[str, Any]:
    """Gather what each rank read of the split and write it to ``path`` (JSON, the writing
    rank only): per rank its ``slots`` ``[first, stop)``, ``n_read`` and ``rows``, the sorted
    ``rows`` (``(k,)`` int, e.g. STAR rows) as ``[start, stop)`` runs. Returns the record;
    call it on every rank (a collective)."""
    rows = np.asarray(rows, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    runs = [[int(r[0]), int(r[-1]) + 1] for r in np.split(rows, breaks) if len(r)]
    mine = {"rank": context.rank, "slots": [held_slots.start, held_slots.stop]}
    parts = all_gather(context, mine | {"n_read": len(rows), "rows": runs})
    record = {"world_size": context.world_size, "ranks": parts}
    if context.writes:
        io.write_json(path, record)
    return record


class MixedStream:
    """Stream batches with real particles mixed in: batch ``(step, slot)`` is the ``slot``
    batch of ``simulated`` (``B − r`` fresh particles) followed by that of ``real`` (``r``
    particles of a :class:`FixedSetStream`, each slot from its own shard).

    Args:
        simulated: any stream with ``batch(step, slot)`` and ``description()`` (e.g. a
            :class:`~cryosphere.poses.training.stream.SimulatedStream`).
        real: the real particles; its ``slots`` are the stream's.

    The batch's ``clean`` holds the real particles' own images (no noise-free copy exists),
    ``noise_sigma`` NaN for them; ``raw``, ``ctf`` and ``shifts_px`` are dropped.
    """

    def __init__(self, simulated: Any, real: FixedSetStream):
        self.simulated, self.real, self.slots = simulated, real, real.slots

    def batch(self, step: int, rank: int = 0) -> Batch:
        """Batch ``step`` of slot ``rank``: simulated then real (deterministic)."""
        fresh, real = self.simulated.batch(step, rank), self.real.batch(step, rank)
        n = real.images.shape[0]
        return Batch(
            images=torch.cat([fresh.images, real.images]),
            targets=torch.cat([fresh.targets, real.targets]),
            rotations=np.concatenate([fresh.rotations, real.rotations]),
            noise_sigma=np.concatenate([fresh.noise_sigma, np.full(n, np.nan)]),
            clean=torch.cat([fresh.clean, real.images]),
        )

    def description(self) -> dict[str, Any]:
        """What identifies the stream (for checkpoints)."""
        simulated, real = self.simulated.description(), self.real.description()
        return {"kind": "mixed", "simulated": simulated, "real": real}
