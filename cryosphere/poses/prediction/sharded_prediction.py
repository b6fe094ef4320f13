"""``cryosphere predict`` over several processes: contiguous particle shards, one STAR file.

:func:`predict_star_distributed` runs :func:`cryosphere.poses.prediction.inference.predict_star` on every
rank of the process group (:mod:`cryosphere.poses.distributed`; alone it is rank 0 of 1):

1. every rank reads and checks the STAR file, its stacks and the checkpoint; a failure on any
   rank (a stack missing on one node, more ranks than particles) raises
   :class:`~cryosphere.poses.distributed.RankError` on all of them before any image is read;
2. rank ``r`` takes the contiguous rows ``block_range(n, r, W, align=batch_size)``: blocks of
   whole batches, so every particle goes through the network in the same batch as in a
   single-process run and the results are the same numbers;
3. the rows are read out of core (:mod:`cryosphere.imaging.loader`: memory-mapped stacks, a
   DataLoader with ``num_workers`` reader processes), predicted, and the per-row results are
   gathered on rank 0, which writes ``OUTPUT.star`` and ``OUTPUT_topk.npz`` atomically, as a
   single-process run would. A rank that dies or fails during prediction makes the gather fail
   on the others (within the group's timeout): nothing is written.

``bf16`` runs the network under bfloat16 autocast (the softmax and top-k stay float32): on a
GPU it is faster, on a CPU usually slower; the top cells can differ where two logits are
within bfloat16's rounding (about 0.4 % of a logit).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from cryosphere.imaging.loader import particle_batches
from cryosphere.imaging.particles import ParticleSet, read_particle_set
from cryosphere.poses import distributed as dd
from cryosphere.poses.network import checkpoints
from cryosphere.poses.prediction import inference

__all__ = ["ShardPlan", "predict_star_distributed"]


@dataclass(frozen=True)
class ShardPlan:
    """This rank's rows ``[start, stop)`` and how they are read and gathered.

    Attributes:
        context: the process group.
        start, stop: the contiguous rows of this rank.
        num_workers: DataLoader reader processes.
    """

    context: dd.DistributedContext
    start: int
    stop: int
    num_workers: int = 0

    @property
    def count(self) -> int:
        """Rows of this rank."""
        return self.stop - self.start

    def batches(self, particle_set: ParticleSet, batch_size: int):
        """``(indices, images)`` batches of this rank's rows (out of core)."""
        return particle_batches(
            particle_set, batch_size, self.start, self.stop, num_workers=self.num_workers
        )

    def finish(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """Gather every rank's rows of ``arrays`` (``(n, ...)`` each) on rank 0; None elsewhere."""
        mine = {key: value[self.start : self.stop] for key, value in arrays.items()}
        try:
            parts = dd.gather_to_writer(self.context, mine)
        except RuntimeError as error:  # a peer died or timed out
            raise dd.RankError(
                f"rank {self.context.rank}: gathering the predictions failed ({error}); another "
                "rank stopped (see its log); nothing was written"
            ) from error
        return None if parts is None else dd.concat_rows(parts)


def _check(star_path, checkpoint, context: dd.DistributedContext, **reading) -> int:
    with warnings.catch_warnings():  # predict_star reads the set again and warns once
        warnings.simplefilter("ignore")
        pset = read_particle_set(star_path, **reading)
    checkpoints.load_checkpoint(checkpoint)
    if context.world_size > len(pset):
        raise ValueError(
            f"{context.world_size} ranks for {len(pset)} particles: each rank needs at least one "
            f"particle; start at most {len(pset)} ranks"
        )
    return len(pset)


def predict_star_distributed(
    star_path: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    top_k: int = 10,
    ctf_correction: str = "auto",
    crop_size: int | None = None,
    normalise: bool = True,
    progress: bool = True,
    num_workers: int = 0,
    bf16: bool = False,
    refine=None,
    turns: int | None = None,
    context: dd.DistributedContext | None = None,
    contrast: str = "auto",
    project_dir: str | os.PathLike[str] | None = None,
    pixel_size_angstrom: float | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
) -> inference.PredictionSummary:
    """Sharded :func:`~cryosphere.poses.prediction.inference.predict_star` (module docstring).

    Arguments as in :func:`~cryosphere.poses.prediction.inference.predict_star`, plus ``num_workers``
    (reader processes per rank) and ``context`` (None: join the group of
    the environment, or run alone). On ranks other than 0 the summary counts the rank's own
    particles and names the file rank 0 wrote.
    """
    context = context or dd.init_from_env(device)
    with dd.collective_check(context, "checking the particles and the checkpoint"):
        reading = {"project_dir": project_dir, "pixel_size_angstrom": pixel_size_angstrom}
        n = _check(star_path, checkpoint, context, **reading)
    start, stop = dd.block_range(n, context.rank, context.world_size, align=batch_size)
    plan = ShardPlan(context, start, stop, int(num_workers))
    return inference.predict_star(
        star_path,
        checkpoint,
        output,
        batch_size=batch_size,
        device=context.device,
        top_k=top_k,
        ctf_correction=ctf_correction,
        crop_size=crop_size,
        normalise=normalise,
        progress=progress and context.writes,
        bf16=bf16,
        refine=refine,
        turns=turns,
        shard=plan,
        contrast=contrast,
        skip_bad=skip_bad,
        overwrite=overwrite,
        **reading,
    )
