"""What the series' training stages give a notebook, and the streamed network's stage.

:class:`cryosphere.runs.pipeline.Run` makes the stages (dataset → labels → trained network) with
one cache rule; this module holds their result types (:class:`TrainedRun`, :class:`StreamedRun`)
and :func:`load_or_train_stream`, the stage :meth:`~cryosphere.runs.pipeline.Run.streamed` runs.
:func:`load_or_train_run` is the 0.1 spelling of ``Run(…).trained()``.

:func:`load_or_train_stream` is the setting a user trains for real (the default model of the
series): the network learns from a stream of freshly simulated particles of the run's map
(:mod:`cryosphere.poses.stream`), never from the run's own images, which it then predicts
(``run_dir/stream/model/``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryosphere.imaging.simulate import ParticleDataset
from cryosphere.poses import labels, train
from cryosphere.poses.model import ModelConfig
from cryosphere.poses.stream import SimulatedStream, StreamConfig
from cryosphere.poses.stream_training import (
    StreamTrainingConfig,
    StreamTrainingResult,
    train_on_stream,
)

__all__ = [
    "STREAM_FOLDER",
    "TrainedRun",
    "StreamedRun",
    "load_or_train_run",
    "load_or_train_stream",
]

STREAM_FOLDER = "stream"


@dataclass(frozen=True)
class TrainedRun:
    """What the shared steps give a notebook.

    Attributes:
        dataset: :class:`cryosphere.imaging.simulate.ParticleDataset`.
        labels: :class:`cryosphere.poses.labels.PoseLabels`.
        model_config, training_config: the network's and the optimiser's settings.
        result: :class:`cryosphere.poses.train.TrainingResult` (model, history, split).
        predictions: :class:`cryosphere.poses.train.Predictions` for every image.
    """

    dataset: ParticleDataset
    labels: labels.PoseLabels
    model_config: ModelConfig
    training_config: train.TrainingConfig
    result: train.TrainingResult
    predictions: train.Predictions


def load_or_train_run(
    run_dir: str | os.PathLike[str],
    *,
    structure: str,
    n_projections: int,
    image_size: int,
    snr: float,
    blur_sigma: float,
    seed: int,
    grid_level: int = 2,
    q: float = 0.05,
    lam: float | None = None,
    lmax: int = 4,
    epochs: int = 200,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    loss: str = "bce",
    progress: bool = True,
) -> TrainedRun:
    """Simulate (or load), label (or load) and train (or reload) one run folder.

    The 0.1 spelling of ``Run(RunConfig…, run_dir).trained()``
    (:class:`cryosphere.runs.pipeline.Run`), kept for one release: the keyword arguments are
    flat :class:`~cryosphere.runs.pipeline.RunConfig` names (image size in pixels, blur σ in
    pixels, SNR as ``var(clean) / σ²_noise``; ``grid_level`` of the HEALPix SO(3) grid; ``q``
    the mask fraction; ``lam`` the soft-map λ, None to tune it). A folder holding a stage made
    with other settings raises :class:`~cryosphere.runs.pipeline.StageMismatchError`.
    """
    flat = dict(locals())
    folder, progress = flat.pop("run_dir"), flat.pop("progress")
    from cryosphere.runs.pipeline import Run, RunConfig  # the layer above this module

    return Run(RunConfig.from_flat(flat), folder, progress=progress).trained()


@dataclass(frozen=True)
class StreamedRun:
    """A network trained on streamed particles of a run's map, and its predictions.

    Attributes:
        model_config, stream_config, training_config: what made it.
        result: :class:`cryosphere.poses.stream_training.StreamTrainingResult`.
        predictions: :class:`cryosphere.poses.train.Predictions` for every image of the run's
            dataset (none of them was seen in training).
        folder: ``run_dir/stream`` (checkpoint, log and predictions under ``model/``).
    """

    model_config: ModelConfig
    stream_config: StreamConfig
    training_config: StreamTrainingConfig
    result: StreamTrainingResult
    predictions: train.Predictions
    folder: Path


def stream_model_config(
    image_size: int, lmax: int = 4, grid_level: int = 2, channels: tuple[int, ...] = (16, 32, 64)
) -> ModelConfig:
    """The default network of streamed training: a residual encoder (``channels`` per stage),
    per-image normalisation, otherwise the poster's spherical layers."""
    return ModelConfig(
        image_size=image_size,
        lmax=lmax,
        grid_level=grid_level,
        encoder="resnet",
        encoder_channels=tuple(channels),
        per_image_normalisation=True,
    )


def load_or_train_stream(
    run_dir: str | os.PathLike[str],
    dataset: ParticleDataset,
    *,
    steps: int,
    snr: float | tuple[float, float] | None = None,
    target: str = "bayes",
    learning_rate: float = 2e-3,
    batch_size: int = 64,
    lmax: int = 4,
    channels: tuple[int, ...] = (16, 32, 64),
    grid_level: int = 2,
    seed: int = 0,
    validation_size: int = 200,
    progress: bool = True,
) -> StreamedRun:
    """Train (or resume, or reload) the streamed network of a run folder and predict its images.

    Args:
        run_dir: the run folder (templates are shared with the labels cache).
        dataset: :class:`cryosphere.imaging.simulate.ParticleDataset` (its map, blur and point
            group define the stream; its images are predicted).
        steps: optimiser steps of ``batch_size`` fresh particles each.
        snr: training SNR or ``(low, high)`` log-uniform range; None: the dataset's SNR.
        target, learning_rate, lmax, channels, grid_level, seed: see
            :class:`~cryosphere.poses.stream.StreamConfig`, :func:`stream_model_config` and
            :class:`~cryosphere.poses.stream_training.StreamTrainingConfig`.
        validation_size: held-out particles at the dataset's SNR, scored during training.
    """
    snr = float(dataset.parameters.snr) if snr is None else snr
    stream_config = StreamConfig(snr=snr, target=target, batch_size=batch_size, seed=seed)
    templates = labels.dataset_templates(
        dataset, grid_level, cache_dir=labels.labels_dir(run_dir), progress=progress
    )
    stream = SimulatedStream(
        dataset.volume,
        float(dataset.parameters.blur_sigma),
        grid_level,
        stream_config,
        dataset.symmetry_ops,
        templates=templates if target in ("bayes", "soft") else None,
    )
    validation = stream.heldout(validation_size, snr=float(dataset.parameters.snr))
    model_config = stream_model_config(dataset.image_size, lmax, grid_level, channels)
    training_config = StreamTrainingConfig(
        steps=steps,
        learning_rate=learning_rate,
        warmup_steps=min(100, max(1, steps // 10)),
        eval_every=max(1, min(250, steps // 4 or 1)),
        seed=seed,
    )
    folder = Path(run_dir) / STREAM_FOLDER
    result = train_on_stream(
        stream,
        model_config,
        training_config,
        validation,
        dataset.symmetry_ops,
        run_dir=folder,
        progress=progress,
    )
    predictions = train.predict_dataset(
        folder, result.model, dataset, stack_name="../../particles.mrcs"
    )
    return StreamedRun(model_config, stream_config, training_config, result, predictions, folder)
