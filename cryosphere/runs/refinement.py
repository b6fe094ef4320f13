"""Train the pose network on a consensus refinement: a RELION particle STAR file with poses
and the map they were refined against (``cryosphere train --star particles.star --map map.mrc``).

Steps (everything checked before any work):

1. read the particle set with its angles (:func:`cryosphere.imaging.particles.read_particle_set`,
   ``require_angles=True``) and the map (:func:`cryosphere.io.read_map`); the map's box and voxel
   size must match the particles' (1 % tolerance);
2. images: each particle is recentred by its origin (shifted by ``+origin / pixel_size``, RELION's
   sign), Fourier-cropped to the model box, CTF phase-flipped when the set has defocus values, and
   background-normalised (:func:`cryosphere.imaging.preprocess.prepare_images`); they are held in
   memory (the array trainer of :mod:`cryosphere.poses.training.fixed_set`);
3. labels: the map is Fourier-cropped to the same box; the noise-free, CTF-free projection at
   each particle's refined pose plays the clean image of the poster's labels
   (:func:`cryosphere.poses.labels.dataset_labels.compute_labels`: MSE against the template bank, top-``q``
   mask, tuned λ), which is consistent with phase-flipped network input;
4. streamed training (:func:`cryosphere.poses.training.streamed.train_on_stream`) on a
   :class:`~cryosphere.poses.training.stream.FixedSetStream` of the training split (a seeded
   ``validation_fraction`` is held out and scored every ``eval_every`` steps), into
   ``run_dir/model/`` (checkpoint usable by ``cryosphere predict``). Fresh noise is off: these
   are real images with no noise-free copy. In-plane augmentation is off for the same reason:
   it turns the noise-free image before noise is drawn, and turning a noisy image by a
   non-quarter angle would blur its noise and empty its corners.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryosphere.imaging import ctf as ctf_module
from cryosphere.imaging import preprocess
from cryosphere.imaging.loader import damaged_images_error, non_finite_rows
from cryosphere.imaging.particles import StackReader, read_particle_set
from cryosphere.imaging.projection import project_volume
from cryosphere.poses import distributed as dd
from cryosphere.poses.labels import dataset_labels
from cryosphere.poses.network.model import ModelConfig
from cryosphere.poses.search import contrast as contrast_module
from cryosphere.poses.training import settings
from cryosphere.poses.training.data_parallel import train_distributed
from cryosphere.poses.training.stream import Batch, FixedSetStream
from cryosphere.poses.training.streamed import (
    StreamTrainingConfig,
    StreamTrainingResult,
    train_on_stream,
)
from cryosphere.runs.series import stream_model_config

__all__ = [
    "RefinementData",
    "refinement_data",
    "train_on_refinement",
]


@dataclass(frozen=True)
class _Parameters:
    blur_sigma: float = 0.0


@dataclass
class RefinementData:
    """A refinement brought to the model box, shaped like a simulated dataset for labels.

    Attributes:
        volume: ``(M, M, M)`` float32 map at ``pixel_size``.
        pixel_size: Å per pixel of the model box.
        noisy_images: ``(n, M, M)`` prepared particle images.
        clean_images: ``(n, M, M)`` projections of ``volume`` at the refined poses.
        rotations: ``(n, 3, 3)`` refined poses.
        symmetry_ops: ``(1, 3, 3)`` identity (C1).
        contrast: the particles' contrast (:mod:`cryosphere.poses.search.contrast`); dark particles
            are negated on reading.
    """

    volume: np.ndarray
    pixel_size: float
    noisy_images: np.ndarray
    clean_images: np.ndarray
    rotations: np.ndarray
    symmetry_ops: np.ndarray
    parameters: _Parameters = _Parameters()
    contrast: contrast_module.ContrastDecision | None = None

    @property
    def image_size(self) -> int:
        """Model box ``M`` in pixels."""
        return int(self.volume.shape[0])


def refinement_data(
    star_path: str | os.PathLike[str],
    map_path: str | os.PathLike[str],
    image_size: int,
    *,
    max_particles: int | None = None,
    progress: bool = True,
    contrast: str = "auto",
    project_dir: str | os.PathLike[str] | None = None,
    pixel_size_angstrom: float | None = None,
    skip_bad: bool = False,
) -> RefinementData:
    """Read, check and prepare a refinement (steps 1-2 and the clean projections of step 3);
    ``contrast`` ``"auto"`` is decided at the refined poses (:mod:`cryosphere.poses.search.contrast`).

    ``project_dir`` and ``pixel_size_angstrom``: as
    :func:`cryosphere.imaging.particles.read_particle_set`. A particle image with NaN or
    infinite pixels is refused (ValueError naming it) or, with ``skip_bad``, left out (a
    warning lists it).
    """
    pset = read_particle_set(
        star_path,
        require_angles=True,
        project_dir=project_dir,
        pixel_size_angstrom=pixel_size_angstrom,
    )
    small = preprocess.reference_map(map_path, pset, image_size)  # checked before reading
    n = len(pset) if max_particles is None else min(len(pset), int(max_particles))
    rotations = pset.rotations()[:n]
    decided = contrast_module.decide_for_particle_set(
        pset, contrast, small, image_size, rotations=rotations
    )
    images, dropped = [], []
    with StackReader(pset) as reader:
        for indices, batch in reader.batches(256, progress=progress):
            if indices[0] >= n:
                break
            keep = indices < n
            indices, batch = indices[keep], batch[keep] * np.float32(decided.sign)
            bad = non_finite_rows(indices, batch)
            if len(bad):
                if not skip_bad:
                    raise damaged_images_error(pset, bad)
                dropped.extend(bad.tolist())
                good = ~np.isin(indices, bad)
                indices, batch = indices[good], batch[good]
            shifts = ctf_module.centring_shift_px(
                pset.origins_angstrom[indices], pset.pixel_size_angstrom
            )
            centred = ctf_module.shift_images(batch, shifts)
            prepared, pixel = preprocess.prepare_images(
                centred,
                pset.pixel_size_angstrom,
                target_size=image_size,
                ctf=None if pset.ctf is None else pset.ctf.subset(indices),
            )
            images.append(prepared.numpy())
    if dropped:
        warnings.warn(
            f"left out {len(dropped)} particles with NaN or infinite pixels: "
            f"{', '.join(pset.image_names(np.array(dropped)))}",
            stacklevel=2,
        )
        rotations = np.delete(rotations, dropped, axis=0)
    clean = project_volume(small, rotations, progress=progress).numpy()
    return RefinementData(
        volume=small,
        pixel_size=float(pixel),
        noisy_images=np.concatenate(images),
        clean_images=clean,
        rotations=rotations,
        symmetry_ops=np.eye(3)[None],
        contrast=decided,
    )


def _split_streams(
    data: RefinementData,
    targets: np.ndarray,
    batch_size: int,
    validation_fraction: float,
    seed: int,
    slots: int = 1,
) -> tuple[FixedSetStream, Batch]:
    """The training stream (``slots`` stream batches per optimiser step) and the fixed
    validation batch of a seeded split."""
    train_idx, val_idx = settings.split_indices(len(data.rotations), validation_fraction, seed)
    if len(val_idx) == 0:
        val_idx = train_idx[-1:]  # tiny sets: score on one training particle rather than none
    images = np.asarray(data.noisy_images, dtype=np.float32)
    stream = FixedSetStream(
        images[train_idx],
        targets[train_idx],
        data.rotations[train_idx],
        batch_size,
        seed,
        slots=slots,
    )
    validation = Batch(
        torch.from_numpy(images[val_idx]),
        torch.from_numpy(targets[val_idx]),
        data.rotations[val_idx],
        np.zeros(len(val_idx)),
        torch.from_numpy(images[val_idx]),
    )
    return stream, validation


def train_on_refinement(
    star_path: str | os.PathLike[str],
    map_path: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    *,
    model_config: ModelConfig | None = None,
    training_config: StreamTrainingConfig | None = None,
    epochs: int | None = None,
    batch_size: int = 32,
    validation_fraction: float = 0.1,
    q: float = 0.05,
    max_particles: int | None = None,
    resume: bool = True,
    slots: int = 1,
    bf16: bool = False,
    progress: bool = True,
    contrast: str = "auto",
    project_dir: str | os.PathLike[str] | None = None,
    pixel_size_angstrom: float | None = None,
    skip_bad: bool = False,
) -> StreamTrainingResult:
    """Train on a refinement (module docstring); the checkpoint goes to ``run_dir/model/``.

    One process trains with :func:`cryosphere.poses.training.streamed.train_on_stream`. Under
    ``torchrun`` (or with ``slots > 1`` or ``bf16``) the same data go to
    :func:`cryosphere.poses.training.data_parallel.train_distributed`: every rank prepares the
    same (deterministic) data and labels, each optimiser step takes ``slots`` stream batches
    split over the ranks (the rank count must divide ``slots``), rank 0 writes.

    Args:
        model_config: default the streamed default network
            (:func:`cryosphere.runs.series.stream_model_config`, 64-px box, level-2 grid); its
            ``image_size`` is the box the particles and the map are Fourier-cropped to.
        training_config: steps, learning rate, loss (``"soft_ce"``: soft-map targets;
            ``"bce"``: top-``q`` masks), device, seed (also the split's and the order's seed).
        epochs: when given, ``steps = epochs · ceil(n_train / (slots · batch_size))``.
        batch_size: particles per stream batch (per step on one process).
        validation_fraction: share of the particles held out for validation.
        resume: continue from a checkpoint of the same settings in ``run_dir`` (one process;
            a distributed run always resumes).
        slots, bf16: the distributed run's stream batches per step and bf16 autocast.
        contrast: ``"auto"`` (decided at the refined poses), ``"white"`` or ``"dark"``; printed
            and recorded in the checkpoint, which ``predict`` without a map then follows.
        project_dir: the project folder image paths are relative to (RELION's project folder,
            or a cryoSPARC ``.cs``'s).
        pixel_size_angstrom, skip_bad: reading the particles (:func:`refinement_data`).
    """
    model_config = model_config or stream_model_config(64)
    training_config = training_config or StreamTrainingConfig()
    context = dd.init_from_env(training_config.device)
    show = progress and context.writes
    try:
        with dd.collective_check(context, "preparing the refinement"):
            data = refinement_data(
                star_path, map_path, model_config.image_size, max_particles=max_particles,
                progress=show, contrast=contrast, project_dir=project_dir,
                pixel_size_angstrom=pixel_size_angstrom, skip_bad=skip_bad,
            )  # fmt: skip
            made = dataset_labels.compute_labels(
                data, level=model_config.grid_level, q=q, progress=show
            )
        if context.writes:
            contrast_module.report(data.contrast)
        targets = np.asarray(made.mask if training_config.loss == "bce" else made.soft, np.float32)
        stream, validation = _split_streams(
            data, targets, int(batch_size), validation_fraction, training_config.seed, slots
        )
        if epochs is not None:
            if int(epochs) < 1:
                raise ValueError(f"epochs must be >= 1, got {epochs}")
            steps = int(epochs) * stream.per_epoch
            training_config = dataclasses.replace(training_config, steps=steps)
        if context.world_size == 1 and int(slots) == 1 and not bf16:
            result = train_on_stream(
                stream,
                model_config,
                training_config,
                validation,
                data.symmetry_ops,
                run_dir=Path(run_dir),
                resume=resume,
                progress=progress,
            )
        else:
            result = train_distributed(
                stream,
                model_config,
                training_config,
                validation,
                slots=int(slots),
                symmetry_ops=data.symmetry_ops,
                run_dir=run_dir,
                progress=progress,
                bf16=bf16,
                context=context,
            )
        if context.writes and result.checkpoint is not None:
            contrast_module.record_in_checkpoint(result.checkpoint, data.contrast)
        return result
    finally:
        dd.shutdown(context)
