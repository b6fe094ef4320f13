"""The notebook series' shared first steps: dataset → labels → trained network, in one call.

Notebooks 03–08 all start from the same three steps with the same shared parameters; this module
runs them through the library calls that own each step, so every notebook reuses what an earlier
one wrote to the run folder (or makes it now, identically):

1. :func:`cryosphere.imaging.simulate.load_or_simulate` (``run_dir/particles.*``, ``volume.mrc``…),
2. :func:`cryosphere.poses.labels.load_or_make_labels` (``run_dir/labels/``),
3. :func:`cryosphere.poses.train.load_or_train` (``run_dir/model/``: reloads a finished checkpoint,
   resumes an interrupted one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from cryosphere.imaging import simulate
from cryosphere.poses import labels, train
from cryosphere.poses.model import ModelConfig

__all__ = ["TrainedRun", "load_or_train_run"]


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

    dataset: Any
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

    The keyword arguments are the series' shared notebook parameters (image size in pixels,
    blur σ in pixels, SNR as ``var(clean) / σ²_noise``; ``grid_level`` of the HEALPix SO(3) grid;
    ``q`` the mask fraction; ``lam`` the soft-map λ, None to tune it). A folder that holds a
    dataset or checkpoint made with other parameters raises the owning step's error.
    """
    dataset = simulate.load_or_simulate(
        run_dir,
        simulate.SimulationParameters(
            structure=structure,
            n_projections=n_projections,
            image_size=image_size,
            snr=snr,
            blur_sigma=blur_sigma,
            seed=seed,
        ),
        progress=progress,
    )
    pose_labels = labels.load_or_make_labels(
        run_dir, dataset, level=grid_level, q=q, lam=lam, progress=progress
    )
    model_config = ModelConfig(image_size=image_size, lmax=lmax, grid_level=grid_level)
    training_config = train.TrainingConfig(
        epochs=epochs, learning_rate=learning_rate, batch_size=batch_size, seed=seed, loss=loss
    )
    result, predictions = train.load_or_train(
        run_dir, dataset, pose_labels, model_config, training_config, progress=progress
    )
    return TrainedRun(dataset, pose_labels, model_config, training_config, result, predictions)
