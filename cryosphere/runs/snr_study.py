"""Pose accuracy against SNR: the model, template matching and a uniform guess at several SNRs,
each SNR with its own simulated dataset, labels and trained model in ``run_dir/snr/snr_<value>/``.

Moved here from :mod:`cryosphere.poses.evaluate` (which still reads it, lazily) so that the
metrics module imports nothing from training.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from cryosphere.imaging.datasets import SimulationParameters
from cryosphere.imaging.simulate import load_or_simulate
from cryosphere.poses import labels, train
from cryosphere.poses.evaluate import compare_pose_estimators, pose_metrics, template_matched_poses
from cryosphere.poses.model import ModelConfig, PoseDistributionNetwork
from cryosphere.poses.train import TrainingConfig

__all__ = ["accuracy_vs_snr"]


def accuracy_vs_snr(
    run_dir: str | os.PathLike[str],
    parameters: SimulationParameters,
    snr_levels: Sequence[float],
    *,
    level: int = 2,
    q: float = 0.05,
    model_config: ModelConfig | None = None,
    training_config: TrainingConfig | None = None,
    progress: bool = True,
    extra_models: Mapping[str, PoseDistributionNetwork] | None = None,
) -> list[dict[str, Any]]:
    """Model vs template matching vs uniform at several SNRs, each in its own run folder.

    For each SNR the dataset ``parameters`` (a :class:`cryosphere.imaging.simulate.SimulationParameters`)
    is simulated with that SNR (same poses and seed) into ``run_dir/snr/snr_<value>/``, labelled,
    and a model is trained (or reloaded) there; the three estimators are scored on that model's
    validation images.

    ``extra_models`` (name -> trained network, e.g. the streamed default model, which was
    trained on a range of SNRs and so serves every level) are scored on the same images and
    added to each row under their names.

    Returns one dict per SNR: ``{"snr": s, "model": metrics, "template_matching": metrics,
    "uniform": metrics, <extra name>: metrics}`` (metrics from :func:`pose_metrics`).
    """
    if not len(snr_levels):
        raise ValueError("snr_levels is empty; give at least one SNR, e.g. [1.0, 0.1]")
    rows = []
    for snr in snr_levels:
        if not float(snr) > 0:
            raise ValueError(f"every SNR must be > 0, got {snr}")
        folder = Path(run_dir) / "snr" / f"snr_{float(snr):g}"
        dataset = load_or_simulate(folder, replace(parameters, snr=float(snr)), progress=progress)
        pose_labels = labels.load_or_make_labels(
            folder, dataset, level=level, q=q, progress=progress
        )
        result, predictions = train.load_or_train(
            folder, dataset, pose_labels, model_config, training_config, progress=progress
        )
        val = result.validation_indices
        templates = labels.dataset_templates(
            dataset, level, cache_dir=labels.labels_dir(folder), progress=progress
        )
        metrics = compare_pose_estimators(
            dataset.rotations[val],
            dataset.symmetry_ops,
            model_probabilities=predictions.probabilities[val],
            model_poses=predictions.best_rotation[val],
            template_poses=template_matched_poses(dataset.noisy_images[val], templates, level),
            level=level,
        )
        for name, extra in (extra_models or {}).items():
            extra_pred = train.predict(extra, dataset.noisy_images[val])
            metrics[name] = pose_metrics(
                extra_pred.best_rotation,
                dataset.rotations[val],
                dataset.symmetry_ops,
                probabilities=extra_pred.probabilities,
                level=level,
            )
        rows.append({"snr": float(snr), **metrics})
    return rows
