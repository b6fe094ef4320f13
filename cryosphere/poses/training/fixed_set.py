"""The poster's setting: a network trained by epochs on a fixed set of images and targets.

:func:`train_model` is the streamed trainer (:func:`cryosphere.poses.training.streamed.train_on_stream`)
reading a fixed set: the training split as a :class:`~cryosphere.poses.training.fixed_stream.FixedSetStream`
(one step per batch, ``ceil(n_train / batch_size)`` steps per epoch, the last batch of an epoch
shorter), validated on the held-out split after every epoch. It works on arrays, so it does not
depend on how the targets were made:

* ``images`` ``(n, N, N)`` float (noisy particle images ``[y, x]``),
* ``targets`` ``(n, G)`` on the HEALPix SO(3) grid of ``ModelConfig.grid_level``: a 0/1 mask of
  plausible poses for ``loss="bce"`` (binary cross-entropy with logits, the poster's loss) or a
  non-negative map normalised per image for ``loss="soft_ce"`` (cross-entropy against it),
* ``rotations`` ``(n, 3, 3)`` true poses (validation metrics only),
* ``symmetry_ops`` ``(K, 3, 3)`` point-group ops, identity first (symmetry-aware errors when
  ``K > 1``).

The data order is the one this trainer has always used (epoch ``e`` reads the ``(e+1)``-th
``torch.randperm`` of a CPU generator seeded ``seed + 1``), the optimiser Adam at the
configuration's learning rate (no warm-up; ``"cosine"`` decays per step to 1 %), and the input
normalisation that of the training split: the poster's results are unchanged.

Run-folder files (under ``run_dir/model/``, written atomically): ``checkpoint.pt`` (after every
epoch; the streamed trainer's format, with ``epoch`` and a fingerprint of the data),
``training_log.csv`` (one row per epoch: ``step``, ``epoch``, ``train_loss`` (mean over the
epoch's images), ``val_loss``, ``val_acc15``, ``val_median_deg``, ``seconds`` (cumulative),
``images_seen``), and after :func:`load_or_train` ``predictions.npz`` and
``predicted_particles.star``.

Determinism: on CPU with a fixed thread count, the same inputs and ``TrainingConfig`` give the
same weights, and a run resumed from the checkpoint of epoch ``k`` ends with the same weights as
an uninterrupted one (batches are a function of the seed and the step).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from cryosphere.imaging.datasets import ParticleDataset
from cryosphere.poses.network.model import ModelConfig, PoseDistributionNetwork, build_model
from cryosphere.poses.prediction.predictions import Predictions, predict_dataset
from cryosphere.poses.training.fixed_stream import FixedSetStream
from cryosphere.poses.training.settings import (
    TrainingConfig,
    _check_inputs,
    _fingerprint,
    _normalisation,
    split_indices,
)
from cryosphere.poses.training.stream import Batch
from cryosphere.poses.training.streamed import StreamTrainingConfig, train_on_stream

if TYPE_CHECKING:
    from cryosphere.poses.labels.dataset_labels import PoseLabels

__all__ = [
    "TrainingResult",
    "untrained_model",
    "train_model",
    "load_or_train",
]


@dataclass(frozen=True)
class TrainingResult:
    """What :func:`train_model` returns.

    Attributes:
        model: the trained network (eval mode).
        history: one dict per epoch with the ``training_log.csv`` columns (module docstring).
        train_indices, validation_indices: ``(n_train,)``, ``(n_val,)`` int64 image indices.
        checkpoint: path of the checkpoint, or None without a run folder.
    """

    model: PoseDistributionNetwork
    history: list[dict[str, float]]
    train_indices: np.ndarray
    validation_indices: np.ndarray
    checkpoint: Path | None = None


def untrained_model(
    images: np.ndarray,
    model_config: ModelConfig,
    training_config: TrainingConfig | None = None,
) -> PoseDistributionNetwork:
    """The network :func:`train_model` starts from (same seed, same image normalisation from the
    same training split), untrained: the evaluation's random baseline. Eval mode, on CPU."""
    training_config = training_config or TrainingConfig()
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty stack (n, N, N), got {images.shape}")
    train_idx, _ = split_indices(
        images.shape[0], training_config.validation_fraction, training_config.seed
    )
    model = build_model(model_config, seed=training_config.seed)
    model.set_normalisation(*_normalisation(images[train_idx]))
    return model.eval()


class _TrainingSplit(FixedSetStream):
    """The training split read in the fixed-set trainer's order (module docstring); its
    description carries the data's fingerprint, so a checkpoint resumes only on the same data."""

    def __init__(self, images, targets, rotations, batch_size: int, seed: int, fingerprint: str):
        super().__init__(images, targets, rotations, batch_size, seed)
        self.fingerprint = fingerprint
        self._orders = torch.Generator(device="cpu").manual_seed(int(seed) + 1)
        self._permutations: list[np.ndarray] = []

    def epoch_permutation(self, epoch: int, rank: int = 0) -> np.ndarray:
        while len(self._permutations) <= epoch:  # replayed from the seed: a function of epoch
            n = self.images.shape[0]
            self._permutations.append(torch.randperm(n, generator=self._orders).numpy())
        return self._permutations[epoch]

    def description(self) -> dict:
        return super().description() | {"order": "torch-randperm", "fingerprint": self.fingerprint}


def train_model(
    images: np.ndarray,
    targets: np.ndarray,
    rotations: np.ndarray,
    symmetry_ops: np.ndarray | None,
    model_config: ModelConfig,
    training_config: TrainingConfig | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    resume: bool = True,
    progress: bool = True,
) -> TrainingResult:
    """Train a :class:`PoseDistributionNetwork` on arrays by epochs (module docstring).

    Args:
        images: ``(n, N, N)`` images, ``N == model_config.image_size``.
        targets: ``(n, G)`` masks (``loss="bce"``) or soft maps (``loss="soft_ce"``) on the grid
            of ``model_config.grid_level``.
        rotations: ``(n, 3, 3)`` true poses, for the validation metrics.
        symmetry_ops: ``(K, 3, 3)`` point-group ops (or None for C1).
        model_config, training_config: architecture and optimisation settings.
        run_dir: run folder; checkpoint and log go to ``run_dir/model/``. None: nothing written.
        resume: continue from ``run_dir/model/checkpoint.pt`` when it exists (its configs,
            except ``epochs`` and ``device``, and data must match, otherwise ValueError).
            False: start over.
        progress: tqdm bar over steps.

    Returns:
        :class:`TrainingResult` (model in eval mode, on the training device).
    """
    config = training_config or TrainingConfig()
    images, targets, rotations, ops = _check_inputs(
        images, targets, rotations, symmetry_ops, model_config, config.loss
    )
    train_idx, val_idx = split_indices(images.shape[0], config.validation_fraction, config.seed)
    fingerprint = _fingerprint(images, targets, rotations, ops)
    split = _TrainingSplit(
        images[train_idx], targets[train_idx], rotations[train_idx], config.batch_size,
        config.seed, fingerprint,
    )  # fmt: skip
    per_epoch = math.ceil(len(train_idx) / int(config.batch_size))
    validation = Batch(
        torch.from_numpy(images[val_idx]),
        torch.from_numpy(targets[val_idx]),
        rotations[val_idx],
        np.zeros(len(val_idx)),
        torch.from_numpy(images[val_idx]),
    )
    stream_config = StreamTrainingConfig(
        steps=int(config.epochs) * per_epoch,
        learning_rate=float(config.learning_rate),
        lr_schedule=config.lr_schedule,
        warmup_steps=0,
        eval_every=per_epoch,
        seed=int(config.seed),
        loss=config.loss,
        device=config.device,
    )
    result = train_on_stream(
        split, model_config, stream_config, validation, ops, run_dir=run_dir, resume=resume,
        progress=progress, input_statistics=_normalisation(images[train_idx]),
        steps_per_epoch=per_epoch,
    )  # fmt: skip
    return TrainingResult(result.model, result.history, train_idx, val_idx, result.checkpoint)


def load_or_train(
    run_dir: str | os.PathLike[str],
    dataset: ParticleDataset,
    labels: PoseLabels,
    model_config: ModelConfig | None = None,
    training_config: TrainingConfig | None = None,
    progress: bool = True,
) -> tuple[TrainingResult, Predictions]:
    """Train (or resume, or reload a finished run) on a run folder's dataset and labels.

    Args:
        run_dir: run folder (checkpoint, log and predictions go to ``run_dir/model/``).
        dataset: :class:`cryosphere.imaging.datasets.ParticleDataset` (uses ``noisy_images``,
            ``rotations``, ``symmetry_ops``, ``pixel_size``).
        labels: pose labels with ``mask`` (n, G) bool, ``soft`` (n, G) and ``level``.
        model_config: default ``ModelConfig(image_size=dataset.image_size,
            grid_level=labels.level)``.
        training_config: default :class:`TrainingConfig`.

    Returns:
        ``(TrainingResult, Predictions for every image)``; predictions are saved with
        :func:`save_predictions`.
    """
    training_config = training_config or TrainingConfig()
    if model_config is None:
        model_config = ModelConfig(image_size=dataset.image_size, grid_level=int(labels.level))
    source = labels.mask if training_config.loss == "bce" else labels.soft
    targets = np.asarray(source, dtype=np.float32)
    result = train_model(
        dataset.noisy_images,
        targets,
        dataset.rotations,
        dataset.symmetry_ops,
        model_config,
        training_config,
        run_dir=run_dir,
        resume=True,
        progress=progress,
    )
    return result, predict_dataset(run_dir, result.model, dataset)
