"""Pose accuracy against SNR: the model, template matching and a uniform guess at several SNRs.

Each SNR is a run of its own, ``run_dir/snr/snr_<value>/``: the run's configuration with that
SNR (same poses and seed), made or reloaded through :class:`cryosphere.runs.pipeline.Run`, so it
follows the pipeline's one cache rule. The three estimators (and any ``extra_models``) are
scored on that run's validation images.
It lives in the run layer, not in :mod:`cryosphere.poses.evaluation.metrics`, because it
simulates, labels and trains; the metrics module imports nothing from training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cryosphere.poses.evaluation.metrics import (
    compare_pose_estimators,
    pose_metrics,
    template_matched_poses,
)
from cryosphere.poses.labels import templates as labels_templates
from cryosphere.poses.network.model import PoseDistributionNetwork
from cryosphere.poses.prediction import predictions
from cryosphere.runs.pipeline import Run

__all__ = ["snr_study", "snr_run"]


def snr_run(run: Run, snr: float) -> Run:
    """The run of ``run``'s configuration at ``snr``, in ``run.layout.snr / "snr_<snr>"``."""
    if not float(snr) > 0:
        raise ValueError(f"every SNR must be > 0, got {snr}")
    return Run(
        run.config.replace(snr=float(snr)),
        run.layout.snr / f"snr_{float(snr):g}",
        overwrite=run.overwrite,
        progress=run.progress,
        device=run.device,
    )


def snr_study(
    run: Run,
    snr_levels: Sequence[float] | None = None,
    extra_models: Mapping[str, PoseDistributionNetwork] | None = None,
) -> list[dict[str, Any]]:
    """Model vs template matching vs uniform at each SNR (default ``run.config.studies``).

    ``extra_models`` (name -> trained network, e.g. the streamed default model, which was
    trained on a range of SNRs and so serves every level) are scored on the same images and
    added to each row under their names.

    Returns one dict per SNR: ``{"snr": s, "model": metrics, "template_matching": metrics,
    "uniform": metrics, <extra name>: metrics}`` (metrics from
    :func:`cryosphere.poses.evaluation.metrics.pose_metrics`: geodesic errors in degrees).
    """
    levels = run.config.studies.snr_levels if snr_levels is None else snr_levels
    if not len(levels):
        raise ValueError("snr_levels is empty; give at least one SNR, e.g. [1.0, 0.1]")
    runs = [snr_run(run, snr) for snr in levels]  # every SNR checked before any work
    level = run.config.labels.grid_level
    rows = []
    for at_snr in runs:
        trained = at_snr.trained()
        dataset, val = trained.dataset, trained.result.validation_indices
        templates = labels_templates.dataset_templates(
            dataset, level, cache_dir=at_snr.layout.labels, progress=at_snr.progress
        )
        metrics = compare_pose_estimators(
            dataset.rotations[val],
            dataset.symmetry_ops,
            model_probabilities=trained.predictions.probabilities[val],
            model_poses=trained.predictions.best_rotation[val],
            template_poses=template_matched_poses(dataset.noisy_images[val], templates, level),
            level=level,
        )
        for name, extra in (extra_models or {}).items():
            extra_pred = predictions.predict(extra, dataset.noisy_images[val])
            metrics[name] = pose_metrics(
                extra_pred.best_rotation,
                dataset.rotations[val],
                dataset.symmetry_ops,
                probabilities=extra_pred.probabilities,
                level=level,
            )
        rows.append({"snr": float(at_snr.config.simulation.snr), **metrics})
    return rows
