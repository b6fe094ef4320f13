"""Train the pose network on a consensus refinement: a RELION particle STAR file with poses
and the map they were refined against (``cryosphere train --star particles.star --map map.mrc``).

Steps (everything checked before any work):

1. read the particle set with its angles (:func:`cryosphere.imaging.particles.read_particle_set`,
   ``require_angles=True``) and the map (:func:`cryosphere.imaging.preprocess.reference_map`,
   Fourier-cropped to the model box; its box and voxel size must match the particles');
2. split the particles (seeded): at most ``max_validation`` are held out for validation, the
   rest is the training split;
3. training data, by ``source``:

   * ``"stream"`` (default): fresh particles simulated from the map with the training split's
     own statistics (:mod:`cryosphere.imaging.refinement_statistics`: CTF rows, shifts from
     the origins, noise level and spectrum, contrast, envelope, SNR) by
     :func:`cryosphere.poses.training.refinement_stream.refinement_stream`, with CTF-aware Bayes
     targets; the statistics go to ``run_dir/refinement_statistics.json``. There is no
     training set to memorise: at realistic SNR the fixed set is memorised (issue 23:
     validation median 91-97° and rising, then 111° on new particles).
   * ``"fixed"``: the training split's real images as they are, targets a kernel around each
     refined pose (:func:`cryosphere.poses.training.targets.pose_kernel_targets`, computed
     per batch), in a :class:`~cryosphere.poses.training.fixed_stream.FixedSetStream` (no fresh
     noise, no in-plane turns: there is no noise-free copy of a real particle). Under
     ``torchrun`` a rank reads and prepares only the shards of its own slots of the training
     split (~1/W of it, one contiguous block of STAR rows, memory-mapped), and the batches are
     those of one process with the same ``slots``; ``run_dir/shards.json`` records the STAR
     rows each rank read.
   * ``"stream"`` with ``real_fraction`` ``F > 0``: each stream batch is ``round(F · B)`` real
     particles drawn as in ``"fixed"`` (the same shards) and the rest fresh
     (:class:`~cryosphere.poses.training.fixed_stream.MixedStream`).

   Nothing else is computed: no MSE landscapes, soft maps or masks (the poster's labels) and
   no clean projections of the particles; only the streamed source builds a template bank,
   which its Bayes targets use.
4. network input, for training and validation alike, as ``cryosphere predict`` makes it: the
   particle recentred by its stated origin (as ``predict`` recentres by the input origins;
   the stream draws shifts from the origins' spread, so the network also sees particles whose
   centre is not yet known), Fourier-cropped, CTF phase-flipped and background-normalised,
   dark particles negated (:mod:`cryosphere.poses.search.contrast`);
5. training (:func:`cryosphere.poses.training.streamed.train_on_stream`) for ``epochs`` passes'
   worth of images, or for ``minutes`` of wall clock in all: what steps 1-4 left of it (at
   least 10 %) goes to training, whose step count is calibrated from the measured time of a
   few steps so the learning-rate schedule completes (the budget also stops the run); every evaluation scores the held-out real particles against their refined poses
   (median error, acc@15°, and ``val_topk_hit``: how often the refined pose's cell is among
   the network's ``top_k`` cells, those ``predict --map`` searches), shown on the progress
   bar, logged to ``run_dir/model/training_log.csv`` and summarised in
   ``run_dir/validation.json``.

Under ``torchrun`` every rank builds the same validation set and the stream of its slots (a
pure function of seed, slot and step); a rank reads the validation particles, a sample for
the contrast and (streamed) for the statistics or (fixed) its own shards, never the whole
refinement.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryosphere import io
from cryosphere.geometry.point_groups import point_group
from cryosphere.imaging import preprocess
from cryosphere.imaging.loader import read_prepared
from cryosphere.imaging.particles import read_particle_set
from cryosphere.imaging.projection import project_volume
from cryosphere.imaging.refinement_statistics import estimate_statistics
from cryosphere.poses import distributed as dd
from cryosphere.poses.network.model import ModelConfig
from cryosphere.poses.search import contrast as contrast_module
from cryosphere.poses.search.map_search import record_map_envelope
from cryosphere.poses.training import fixed_stream as fs
from cryosphere.poses.training import refinement_stream as rs
from cryosphere.poses.training import targets as tg
from cryosphere.poses.training.budget import calibrated_steps, resumed_schedule, scheduled
from cryosphere.poses.training.data_parallel import rank_slots, train_distributed
from cryosphere.poses.training.settings import split_indices
from cryosphere.poses.training.stream import Batch
from cryosphere.poses.training.streamed import (
    StreamTrainingConfig,
    StreamTrainingResult,
    train_on_stream,
)
from cryosphere.runs.series import stream_model_config

__all__ = [
    "SOURCES",
    "RefinementData",
    "refinement_data",
    "train_on_refinement",
]

SOURCES = ("stream", "fixed")
#: Peak learning rate (measured: docs/training_on_a_refinement.md, "The learning rate").
LEARNING_RATE = 1e-2
VALIDATION_FILE = "validation.json"
STATISTICS_FILE = "refinement_statistics.json"
SHARDS_FILE = "shards.json"


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
        contrast: the particles' contrast (:mod:`cryosphere.poses.search.contrast`); dark
            particles are negated on reading.
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
    decided = contrast_module.decide_for_particle_set(
        pset, contrast, small, image_size, rotations=pset.rotations()[:n]
    )
    images, kept, pixel = read_prepared(
        pset, np.arange(n), image_size, decided.sign, skip_bad, progress=progress
    )
    rotations = pset.rotations()[kept]
    clean = project_volume(small, rotations, progress=progress).numpy()
    return RefinementData(
        volume=small,
        pixel_size=pixel,
        noisy_images=images.numpy(),
        clean_images=clean,
        rotations=rotations,
        symmetry_ops=np.eye(3)[None],
        contrast=decided,
    )


def _split(n: int, max_validation: int, fraction: float, seed: int):
    """Seeded (train, validation) indices; the validation share capped at ``max_validation``."""
    train_idx, val_idx = split_indices(n, fraction, seed)
    if len(val_idx) > int(max_validation):
        train_idx = np.sort(np.concatenate([train_idx, val_idx[int(max_validation) :]]))
        val_idx = val_idx[: int(max_validation)]
    if len(val_idx) == 0:
        val_idx = train_idx[-1:]  # tiny sets: score on one training particle rather than none
    return train_idx, val_idx


def _training_source(
    source, pset, small, train_idx, model_config, batch_size, seed, slots, held, sign, skip_bad,
    real, snr_spread=2.0,
):  # fmt: skip
    """``(stream, statistics, share)`` of ``source`` (step 3): for ``"stream"`` the stream of
    ``batch_size − real`` fresh particles and its statistics; for ``"fixed"``, or with ``real``
    particles mixed in, this rank's ``share`` of the training split (the shards of its slots
    ``held`` of ``slots``, :mod:`cryosphere.poses.training.fixed_stream`), read and prepared:
    ``(images, kept STAR rows)``. ``sign`` is the decided contrast (-1: dark particles, negated
    on reading as ``predict`` does, so the stream simulates them white)."""
    stream = stats = share = None
    if source == "stream":
        stats = estimate_statistics(pset, small, indices=train_idx, seed=seed, skip_bad=skip_bad)
        stats = dataclasses.replace(stats, contrast=float(stats.contrast) * float(sign))
        level = model_config.grid_level
        stream = rs.refinement_stream(
            small, stats, level, batch_size=batch_size - real, seed=seed, snr_spread=snr_spread
        )
    if source == "fixed" or real:
        first, last = fs.held_block(len(train_idx), slots, held)
        images, kept, _ = read_prepared(
            pset, train_idx[first:last], model_config.image_size, sign=sign, skip_bad=skip_bad
        )
        share = (images.numpy(), kept)
    return stream, stats, share


def _real_per_batch(real_fraction: float, source: str, batch_size: int) -> int:
    """Real particles in each stream batch of ``batch_size`` (``round(F · B)``, checked)."""
    real = int(round(float(real_fraction) * int(batch_size)))
    if not 0 <= real_fraction < 1 or (real_fraction > 0 and not 0 < real < batch_size):
        raise ValueError(
            f"real_fraction must be 0 or give 1 .. {batch_size - 1} real particles in a batch of "
            f"{batch_size}, got {real_fraction}"
        )
    if real and source != "stream":
        raise ValueError("real_fraction mixes real particles into the streamed source")
    return real


def _fixed_stream(
    context, pset, train_idx, share, level, batch_size, seed, slots, held, symmetry_ops=None
):  # fmt: skip
    """The fixed stream of this rank's ``share`` (every rank calls it: the shard sizes are
    gathered), targets a kernel around each refined pose (and its symmetry mates) computed
    per batch."""
    images, kept = share
    positions = np.searchsorted(train_idx, kept)
    sizes = fs.gathered_shard_sizes(context, len(train_idx), slots, held, positions)
    targets = functools.partial(tg.pose_kernel_targets, level=level, symmetry_ops=symmetry_ops)
    rotations = pset.rotations()[kept]
    return fs.FixedSetStream(
        images, targets, rotations, batch_size, seed, slots=slots, shard_sizes=sizes,
        held_slots=held,
    )  # fmt: skip


def train_on_refinement(
    star_path: str | os.PathLike[str],
    map_path: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    *,
    model_config: ModelConfig | None = None,
    training_config: StreamTrainingConfig | None = None,
    epochs: int | None = None,
    minutes: float | None = None,
    source: str = "stream",
    real_fraction: float = 0.0,
    batch_size: int = 32,
    validation_fraction: float = 0.1,
    max_validation: int = 500,
    top_k: int = 100,
    max_particles: int | None = None,
    resume: bool = True,
    slots: int = 1,
    bf16: bool = False,
    progress: bool = True,
    contrast: str = "auto",
    project_dir: str | os.PathLike[str] | None = None,
    pixel_size_angstrom: float | None = None,
    skip_bad: bool = False,
    symmetry: str = "C1",
    snr_spread: float = 2.0,
) -> StreamTrainingResult:
    """Train on a refinement (module docstring); the checkpoint goes to ``run_dir/model/``.

    One process trains with :func:`cryosphere.poses.training.streamed.train_on_stream`. Under
    ``torchrun`` (or with ``slots > 1`` or ``bf16``) the same stream goes to
    :func:`cryosphere.poses.training.data_parallel.train_distributed` (each optimiser step takes
    ``slots`` stream batches split over the ranks; rank 0 writes; the top-k score is then
    computed once, after training).

    Args:
        model_config: default the streamed default network
            (:func:`cryosphere.runs.series.stream_model_config`, 64-px box, level-2 grid); its
            ``image_size`` is the box the particles and the map are Fourier-cropped to.
        training_config: steps, learning rate, device, seed (also the split's and the
            stream's seed); ``loss`` must be ``"soft_ce"`` (targets are distributions).
            Default: :class:`StreamTrainingConfig` at the peak rate :data:`LEARNING_RATE`.
        epochs: train on ``epochs · n_train`` images (``steps = epochs · ceil(n_train /
            (slots · batch_size))``), in either source.
        minutes: wall-clock budget of the training; without ``epochs`` the step count is
            calibrated to it (module docstring, step 5).
        source: ``"stream"`` (default) or ``"fixed"`` (module docstring, step 3).
        real_fraction: share ``F`` of each stream batch made of real training particles
            (``round(F · batch_size)``, drawn as the fixed source draws them, pose-kernel
            targets) mixed into the fresh ones; 0 (default, measured in
            docs/training_on_a_refinement.md): none.
        batch_size: particles per stream batch (per step on one process).
        validation_fraction, max_validation: held-out share of the particles, and its cap.
        top_k: the ``k`` of the ``val_topk_hit`` score (``predict --map``'s default 100).
        max_particles: use the first ``max_particles`` rows only.
        resume: continue from a checkpoint of the same settings in ``run_dir``.
        slots, bf16: the distributed run's stream batches per step and bf16 autocast.
        contrast: ``"auto"`` (decided at the refined poses), ``"white"`` or ``"dark"``; printed
            and recorded in the checkpoint, which ``predict`` without a map then follows.
        project_dir: the project folder image paths are relative to (RELION's project folder,
            or a cryoSPARC ``.cs``'s).
        pixel_size_angstrom: the pixel size when the STAR file states none.
        skip_bad: leave out particles with NaN or infinite pixels instead of refusing them.
        symmetry: the particle's point group (RELION's ``--sym``: ``C1``, ``Cn``, ``Dn``,
            ``T``, ``O``, ``I``; n-fold axis along z, a 2-fold of Dn along x:
            :func:`cryosphere.geometry.point_groups.point_group`); validation errors, hits and
            kernel targets count every symmetry mate ``R @ g`` of a refined pose as right.
        snr_spread: the streamed particles' SNR is log-uniform in ``[snr / snr_spread, snr ·
            snr_spread]`` around the data's measured SNR
            (:func:`~cryosphere.poses.training.refinement_stream.refinement_stream`).
    """
    symmetry_ops = point_group(symmetry)  # a bad name fails before any work
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    real = _real_per_batch(real_fraction, source, int(batch_size))
    if minutes is not None and not (math.isfinite(minutes) and minutes > 0):
        raise ValueError(f"minutes must be a positive number, got {minutes}")
    if epochs is not None and int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    model_config = model_config or stream_model_config(64)
    training_config = training_config or StreamTrainingConfig(learning_rate=LEARNING_RATE)
    if training_config.loss != "soft_ce":
        raise ValueError("training on a refinement uses distribution targets: loss='soft_ce'")
    seed = training_config.seed
    started = time.perf_counter()
    context = dd.init_from_env(training_config.device)
    try:
        with dd.collective_check(context, "preparing the refinement"):
            pset = read_particle_set(
                star_path,
                require_angles=True,
                project_dir=project_dir,
                pixel_size_angstrom=pixel_size_angstrom,
            )
            small = preprocess.reference_map(map_path, pset, model_config.image_size)
            n = len(pset) if max_particles is None else min(len(pset), int(max_particles))
            train_idx, val_idx = _split(n, max_validation, validation_fraction, seed)
            held = rank_slots(int(slots), context.rank, context.world_size)
            decided = contrast_module.decide_for_particle_set(
                pset, contrast, small, model_config.image_size, rotations=pset.rotations()
            )
            images, val_idx, _ = read_prepared(
                pset, val_idx, model_config.image_size, sign=decided.sign, skip_bad=skip_bad
            )
            rotations = pset.rotations()[val_idx]
            picked = None  # the same particles as picked (origins ignored), if any are stated
            if np.any(pset.origins_angstrom[val_idx] != 0):
                picked = read_prepared(
                    pset, val_idx, model_config.image_size, decided.sign, centre=False
                )[0]
            targets = tg.pose_kernel_targets(rotations, model_config.grid_level, symmetry_ops)
            validation = Batch(
                images, torch.from_numpy(targets.astype(np.float32)), rotations,
                np.zeros(len(val_idx)), images,
            )  # fmt: skip
            stream, stats, share = _training_source(
                source, pset, small, train_idx, model_config, int(batch_size), seed, int(slots),
                held, decided.sign, skip_bad, real, snr_spread,
            )  # fmt: skip
        if share is not None:  # this rank's shards only (issue 23: never the whole refinement)
            fixed = _fixed_stream(
                context, pset, train_idx, share, model_config.grid_level,
                real or int(batch_size), seed + (1 if real else 0), int(slots), held,
                symmetry_ops,
            )  # fmt: skip
            # mixed: its own seed (the stream's generators are [seed, slot, step])
            stream = fixed if stream is None else fs.MixedStream(stream, fixed)
            fs.record_shares(context, Path(run_dir) / SHARDS_FILE, held, share[1])
        if context.writes:
            contrast_module.report(decided)
        if stats is not None and context.writes:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            io.write_json(Path(run_dir) / STATISTICS_FILE, stats.summary())
        if epochs is not None:
            per_epoch = math.ceil(len(train_idx) / (int(batch_size) * int(slots)))
            training_config = scheduled(training_config, int(epochs) * per_epoch)
        budget = None
        if minutes is not None:  # what the preparation left of the budget (at least 10 %)
            budget = max(0.1, 1.0 - (time.perf_counter() - started) / 60.0 / minutes) * minutes
        if epochs is None and budget is not None:
            steps = calibrated_steps(
                stream, model_config, training_config, validation, 60 * budget, context, held[0]
            )
            training_config = scheduled(training_config, steps)
            if resume:  # a resumed run keeps its warm-up and never asks for fewer steps
                training_config = resumed_schedule(run_dir, training_config)
        if budget is not None:
            training_config = dataclasses.replace(training_config, time_budget_s=60.0 * budget)
        if context.world_size == 1 and int(slots) == 1 and not bf16:
            result = train_on_stream(
                stream,
                model_config,
                training_config,
                validation,
                symmetry_ops=symmetry_ops,
                run_dir=Path(run_dir),
                resume=resume,
                progress=progress and context.writes,
                extra_validation=rs.topk_validator(
                    validation.images, rotations, top_k, symmetry_ops
                ),
            )
        else:
            result = train_distributed(
                stream,
                model_config,
                training_config,
                validation,
                slots=int(slots),
                symmetry_ops=symmetry_ops,
                run_dir=run_dir,
                progress=progress,
                bf16=bf16,
                context=context,
            )
        if context.writes:
            _write_validation(
                run_dir, result, source, len(train_idx), validation, top_k, real, symmetry, picked
            )
            if result.checkpoint is not None:
                contrast_module.record_in_checkpoint(result.checkpoint, decided)
                if stats is not None:  # what predict --map blurs this map's templates by
                    record_map_envelope(result.checkpoint, map_path, stats.blur_sigma_px)
        return result
    finally:
        dd.shutdown(context)


def _write_validation(
    run_dir, result, source, n_train, validation, top_k, real=0, symmetry="C1", picked=None
) -> dict[str, Any]:
    """``run_dir/validation.json``: the held-out real particles' scores at every evaluation
    and at the end (``val_topk_hit`` recomputed on the final model), symmetry-aware; with
    ``picked`` (the same particles read with their origins ignored) the final model's scores
    on them too, ``"picked"``: what to expect of new particles whose shifts nobody stated."""
    final = rs.validation_scores(
        result.model, validation.images, validation.rotations, top_k,
        symmetry_ops=point_group(symmetry),
    )  # fmt: skip
    as_picked = None
    if picked is not None:
        as_picked = rs.validation_scores(
            result.model, picked, validation.rotations, top_k,
            symmetry_ops=point_group(symmetry), with_errors=True,
        )  # fmt: skip
    history = [dict(row) for row in result.history]
    record = {
        "source": source,
        "symmetry": symmetry.strip().upper(),
        "real_per_batch": int(real),
        "n_train": int(n_train),
        "n_validation": int(validation.images.shape[0]),
        "steps": result.steps_done,
        "images_seen": result.images_seen,
        "train_seconds": result.train_seconds,
        "final": (history[-1] if history else {}) | final,
        "best_val_median_deg": min((r["val_median_deg"] for r in history), default=None),
        "picked": as_picked,
        "history": history,
    }
    io.write_json(Path(run_dir) / VALIDATION_FILE, record)
    return record


def print_validation(run_dir: str | os.PathLike[str]) -> None:
    """One line: the final validation scores of ``run_dir/validation.json``."""
    record = io.read_json(Path(run_dir) / VALIDATION_FILE)
    final = record["final"]
    symmetry = record["symmetry"]
    print(
        f"validation on {record['n_validation']} held-out particles against their refined "
        f"poses ({symmetry}): median {final['val_median_deg']:.1f}°, acc@15° {final['val_acc15']:.2f}, "
        f"refined cell in the top {final['top_k']} {final['val_topk_hit']:.2f} "
        f"({Path(run_dir) / VALIDATION_FILE})"
    )
    if record.get("picked"):  # the same particles, their origins ignored: as new picks
        picked = record["picked"]
        print(
            f"the same particles as picked (origins ignored): median "
            f"{picked['val_median_deg']:.1f}°, acc@15° {picked['val_acc15']:.2f}, refined cell "
            f"in the top {picked['top_k']} {picked['val_topk_hit']:.2f}"
        )
