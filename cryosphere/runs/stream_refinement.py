"""Streamed, distributed training on a consensus refinement
(``[torchrun --nproc_per_node N -m] cryosphere train --star ... --map ... --steps S``).

The data are prepared as for :func:`cryosphere.runs.refinement.train_on_refinement` (particles
recentred, Fourier-cropped, phase-flipped, normalised; labels from the map's template bank),
then a seeded ``validation_fraction`` of the particles is held out and the rest is served by a
:class:`~cryosphere.poses.stream.FixedSetStream` of ``batch_size`` images per stream batch to
:func:`cryosphere.poses.distributed_training.train_distributed`: ``slots`` stream batches per
optimiser step, split over the ranks. Every rank prepares the same data (the preparation and
labels are deterministic); rank 0 writes ``run_dir/model/checkpoint.pt`` (readable by
``cryosphere predict``) and ``training_log.csv``.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from cryosphere.poses import distributed as dd
from cryosphere.poses import labels, train
from cryosphere.poses.distributed_training import train_distributed
from cryosphere.poses.model import ModelConfig
from cryosphere.poses.stream import Batch, FixedSetStream
from cryosphere.poses.stream_training import StreamTrainingConfig, StreamTrainingResult
from cryosphere.runs.refinement import refinement_data

__all__ = ["train_refinement_on_stream"]


def train_refinement_on_stream(
    star_path: str | os.PathLike[str],
    map_path: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    *,
    model_config: ModelConfig,
    config: StreamTrainingConfig,
    batch_size: int = 32,
    slots: int = 1,
    q: float = 0.05,
    validation_fraction: float = 0.1,
    max_particles: int | None = None,
    bf16: bool = False,
    progress: bool = True,
) -> StreamTrainingResult:
    """Train on a refinement over the ranks of the environment (module docstring).

    ``batch_size`` is the stream batch; the global batch is ``slots × batch_size`` images and
    the rank count must divide ``slots``.
    """
    context = dd.init_from_env(config.device)
    show = progress and context.writes
    with dd.collective_check(context, "preparing the refinement"):
        data = refinement_data(
            star_path,
            map_path,
            model_config.image_size,
            max_particles=max_particles,
            progress=show,
        )
        made = labels.compute_labels(data, level=model_config.grid_level, q=q, progress=show)
    targets = np.asarray(made.mask if config.loss == "bce" else made.soft, dtype=np.float32)
    fit, held = train.split_indices(len(data.rotations), validation_fraction, config.seed)
    stream = FixedSetStream(
        data.noisy_images[fit], targets[fit], data.rotations[fit], batch_size, config.seed,
        slots=slots,
    )  # fmt: skip
    validation = Batch(
        images=torch.from_numpy(np.ascontiguousarray(data.noisy_images[held])),
        targets=torch.from_numpy(targets[held]),
        rotations=data.rotations[held],
        noise_sigma=np.zeros(len(held)),
        clean=torch.from_numpy(np.ascontiguousarray(data.clean_images[held])),
    )
    try:
        return train_distributed(
            stream,
            model_config,
            config,
            validation,
            slots=slots,
            symmetry_ops=data.symmetry_ops,
            run_dir=run_dir,
            progress=progress,
            bf16=bf16,
            context=context,
        )
    finally:
        dd.shutdown(context)
