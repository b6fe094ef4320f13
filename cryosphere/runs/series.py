"""What the series' training stages give a notebook, and the streamed network's stage.

:class:`cryosphere.runs.pipeline.Run` makes the stages (dataset → labels → trained network) with
one cache rule; this module holds their result types (:class:`TrainedRun`, :class:`StreamedRun`)
and :func:`load_or_train_stream`, the stage :meth:`~cryosphere.runs.pipeline.Run.streamed` runs.

:func:`load_or_train_stream` is the setting a user trains for real (the default model of the
series): the network learns from a stream of freshly simulated particles of the run's map
(:mod:`cryosphere.poses.training.stream`), never from the run's own images, which it then predicts
(``run_dir/stream/model/``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryosphere.imaging.datasets import ParticleDataset
from cryosphere.poses.labels import dataset_labels
from cryosphere.poses.labels import templates as labels_templates
from cryosphere.poses.network.encoders import default_encoder_channels
from cryosphere.poses.network.model import ModelConfig
from cryosphere.poses.prediction.predictions import Predictions, predict_dataset
from cryosphere.poses.training import fixed_set, settings
from cryosphere.poses.training.stream import SimulatedStream, StreamConfig
from cryosphere.poses.training.streamed import (
    StreamTrainingConfig,
    StreamTrainingResult,
    train_on_stream,
)

__all__ = [
    "STREAM_FOLDER",
    "TrainedRun",
    "StreamedRun",
    "load_or_train_stream",
]

STREAM_FOLDER = "stream"


@dataclass(frozen=True)
class TrainedRun:
    """What the shared steps give a notebook.

    Attributes:
        dataset: :class:`cryosphere.imaging.datasets.ParticleDataset`.
        labels: :class:`cryosphere.poses.labels.dataset_labels.PoseLabels`.
        model_config, training_config: the network's and the optimiser's settings.
        result: :class:`cryosphere.poses.training.fixed_set.TrainingResult` (model, history, split).
        predictions: :class:`cryosphere.poses.prediction.predictions.Predictions` for every image.
    """

    dataset: ParticleDataset
    labels: dataset_labels.PoseLabels
    model_config: ModelConfig
    training_config: settings.TrainingConfig
    result: fixed_set.TrainingResult
    predictions: Predictions


@dataclass(frozen=True)
class StreamedRun:
    """A network trained on streamed particles of a run's map, and its predictions.

    Attributes:
        model_config, stream_config, training_config: what made it.
        result: :class:`cryosphere.poses.training.streamed.StreamTrainingResult`.
        predictions: :class:`cryosphere.poses.prediction.predictions.Predictions` for every image of the run's
            dataset (none of them was seen in training).
        folder: ``run_dir/stream`` (checkpoint, log and predictions under ``model/``).
    """

    model_config: ModelConfig
    stream_config: StreamConfig
    training_config: StreamTrainingConfig
    result: StreamTrainingResult
    predictions: Predictions
    folder: Path


def stream_model_config(
    image_size: int,
    lmax: int = 4,
    grid_level: int = 2,
    channels: tuple[int, ...] | None = None,
    so3_channels: int | None = None,
) -> ModelConfig:
    """The default network of streamed training: a residual encoder (``channels`` per stage;
    None: :func:`~cryosphere.poses.network.encoders.default_encoder_channels` of the box, (16,
    32, 64) at 64 px), per-image normalisation, otherwise the poster's spherical layers
    (``so3_channels``: the SO(3) signal's channels; None: ``ModelConfig``'s 16)."""
    extra = {} if so3_channels is None else {"so3_channels": int(so3_channels)}
    return ModelConfig(
        image_size=image_size,
        lmax=lmax,
        grid_level=grid_level,
        encoder="resnet",
        encoder_channels=tuple(channels or default_encoder_channels(image_size)),
        per_image_normalisation=True,
        **extra,
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
        dataset: :class:`cryosphere.imaging.datasets.ParticleDataset` (its map, blur and point
            group define the stream; its images are predicted).
        steps: optimiser steps of ``batch_size`` fresh particles each.
        snr: training SNR or ``(low, high)`` log-uniform range; None: the dataset's SNR.
        target, learning_rate, lmax, channels, grid_level, seed: see
            :class:`~cryosphere.poses.training.stream.StreamConfig`, :func:`stream_model_config` and
            :class:`~cryosphere.poses.training.streamed.StreamTrainingConfig`.
        validation_size: held-out particles at the dataset's SNR, scored during training.
    """
    snr = float(dataset.parameters.snr) if snr is None else snr
    stream_config = StreamConfig(snr=snr, target=target, batch_size=batch_size, seed=seed)
    templates = labels_templates.dataset_templates(
        dataset, grid_level, cache_dir=dataset_labels.labels_dir(run_dir), progress=progress
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
    predictions = predict_dataset(folder, result.model, dataset, stack_name="../../particles.mrcs")
    return StreamedRun(model_config, stream_config, training_config, result, predictions, folder)
