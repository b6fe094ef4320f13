"""The poster's experiment on the number of training images: accuracy and equivariance against n.

For every image count ``n`` in ``counts`` and every seed ``s`` in ``seeds``, one complete run is
made in its own folder ``run_dir/sweep/n{n}_seed{s}/`` (:func:`sweep_folder`):

1. a dataset of ``n`` images, the given :class:`~cryosphere.imaging.datasets.SimulationParameters` with
   ``n_projections = n`` and ``seed = s`` (:func:`cryosphere.imaging.simulate.load_or_simulate`);
2. its labels on the level-``level`` grid with mask fraction ``q``
   (:func:`cryosphere.poses.labels.dataset_labels.load_or_make_labels`);
3. a network trained on it with the given :class:`~cryosphere.poses.training.settings.TrainingConfig` and
   ``seed = s`` (:func:`cryosphere.poses.training.fixed_set.load_or_train`: a finished checkpoint is reloaded, an
   interrupted one resumed).

So one seed sets the poses, the noise, the validation split, the network initialisation and the
data order together: the spread across seeds is the spread over data *and* initialisation. The
``seed`` fields of ``parameters`` and ``training_config`` are replaced.

Measured per ``(n, seed)`` (one row, :data:`ROW_FIELDS`):

* pose errors of the most probable grid pose (geodesic, degrees, minimum over the point group;
  :func:`cryosphere.poses.evaluation.metrics.pose_metrics`) on the run's **validation** split (median, mean,
  acc@15°, acc@30°, mean log-likelihood of the true pose) and on its **training** split (median,
  acc@15°): their gap is the over-fitting that fewer images bring;
* the **equivariance MSE** (:func:`cryosphere.poses.evaluation.equivariance.equivariance_table`, noise-free images,
  mean over ``n_equivariance_pairs`` pairs) for out-of-plane and in-plane rotations, of the
  trained network (``eq_*_model``) and of the same network untrained (``eq_*_random``,
  :func:`cryosphere.poses.training.fixed_set.untrained_model`, the random baseline). The test pairs are seeded by
  ``equivariance_seed`` alone, so every run of the grid is tested on the same pairs;
* the last epoch's training and validation loss.

:func:`summarize_sweep` aggregates the rows per ``n`` (mean, sample standard deviation with
``ddof = 1``, min and max across seeds); :func:`cryosphere.figures.plots.plot_sweep` draws the
summary.

Files: ``run_dir/sweep/sweep.csv`` (the rows) and ``run_dir/sweep/sweep.json`` (protocol, rows
and summary), both written atomically after the whole grid is done. The template bank is the
same for every run (same map, blur and grid), so it is computed once into
``run_dir/sweep/templates/`` and hard-linked (copied where links are not possible) into each
run's ``labels/`` folder, where :func:`cryosphere.poses.labels.templates.template_bank` finds and checks it.

Determinism: on CPU, the same inputs and torch thread count give identical rows (another
thread count trains to other weights: see the README's Reproducibility), and a rerun on the
same folder reloads every finished run and gives the same numbers. Each run is a
:class:`cryosphere.runs.pipeline.Run`, so a run folder that holds a stage made with other
settings raises :class:`~cryosphere.runs.pipeline.StageMismatchError` naming the stage and the
settings: choose another ``run_dir``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cryosphere import io
from cryosphere.imaging.datasets import ParticleDataset, SimulationParameters
from cryosphere.poses.evaluation import metrics
from cryosphere.poses.evaluation.equivariance import equivariance_table
from cryosphere.poses.labels import templates
from cryosphere.poses.network.model import ModelConfig
from cryosphere.poses.training import fixed_set, settings
from cryosphere.runs.pipeline import Run
from cryosphere.runs.run_config import LabelSettings, RunConfig

__all__ = [
    "SWEEP_FOLDER",
    "ROW_FIELDS",
    "METRIC_FIELDS",
    "ProjectionSweep",
    "sweep_folder",
    "projection_count_sweep",
    "summarize_sweep",
]

SWEEP_FOLDER = "sweep"
"""Sub-folder of the run folder that holds the sweep's runs, CSV and JSON."""

METRIC_FIELDS = (
    "train_loss",
    "val_loss",
    "val_median_deg",
    "val_mean_deg",
    "val_acc15",
    "val_acc30",
    "val_log_likelihood",
    "train_median_deg",
    "train_acc15",
    "eq_out_of_plane_model",
    "eq_in_plane_model",
    "eq_out_of_plane_random",
    "eq_in_plane_random",
)
"""The measured columns of a row (aggregated by :func:`summarize_sweep`)."""

ROW_FIELDS = ("n", "seed", "n_train", "n_validation", "epochs", *METRIC_FIELDS)
"""Every column of a row, in CSV order."""


@dataclass(frozen=True)
class ProjectionSweep:
    """What :func:`projection_count_sweep` returns.

    Attributes:
        rows: one dict per ``(n, seed)`` with the :data:`ROW_FIELDS` (numbers only), in grid
            order (counts as given, seeds within each count); ``pd.DataFrame(rows)`` is the table.
        summary: one dict per ``n`` (ascending) from :func:`summarize_sweep`.
        csv_path: ``run_dir/sweep/sweep.csv``.
        protocol: the settings that made the rows (JSON-ready).
    """

    rows: list[dict[str, float]]
    summary: list[dict[str, float]]
    csv_path: Path
    protocol: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"protocol", "rows", "summary"}``; NaN (e.g. the standard deviation of
        a single seed) becomes None."""
        return {
            "protocol": dict(self.protocol),
            "rows": [_json_ready(row) for row in self.rows],
            "summary": [_json_ready(row) for row in self.summary],
        }


def _json_ready(record: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in record.items()
    }


def sweep_folder(run_dir: str | os.PathLike[str], n: int, seed: int) -> Path:
    """The run folder of one grid point: ``run_dir/sweep/n{n}_seed{seed}/``."""
    return Path(run_dir) / SWEEP_FOLDER / f"n{int(n)}_seed{int(seed)}"


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------
def _int_list(values: Sequence[int], name: str, minimum: int, example: str) -> list[int]:
    values = list(values)
    if not values:
        raise ValueError(f"{name} is empty; give at least one, e.g. {example}")
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must hold integers, got {value!r}")
        if int(value) < minimum:
            raise ValueError(
                f"every entry of {name} must be >= {minimum}, got {value}"
                + (" (too few images to split into training and validation)" if minimum > 1 else "")
            )
        out.append(int(value))
    duplicates = sorted({v for v in out if out.count(v) > 1})
    if duplicates:
        raise ValueError(f"{name} holds duplicates {duplicates}; give each value once")
    return out


def _check_settings(
    parameters: SimulationParameters,
    model_config: ModelConfig,
    training_config: settings.TrainingConfig,
    level: int,
    q: float,
    n_equivariance_pairs: int,
) -> None:
    if int(training_config.epochs) < 1:
        raise ValueError(
            f"epochs must be >= 1 for a sweep, got {training_config.epochs} (an untrained "
            "network is already the random baseline of every row)"
        )
    if not float(training_config.validation_fraction) > 0:
        raise ValueError(
            "validation_fraction must be > 0: the sweep measures errors on the validation split"
        )
    if int(model_config.image_size) != int(parameters.image_size):
        raise ValueError(
            f"model_config.image_size is {model_config.image_size} but the images are "
            f"{parameters.image_size} px; set ModelConfig(image_size={parameters.image_size})"
        )
    if int(model_config.grid_level) != int(level):
        raise ValueError(
            f"model_config.grid_level is {model_config.grid_level} but the labels use level "
            f"{level}; make them equal"
        )
    if not 0.0 < float(q) <= 1.0:
        raise ValueError(f"q (mask fraction) must be in (0, 1], got {q}")
    if isinstance(n_equivariance_pairs, bool) or int(n_equivariance_pairs) < 1:
        raise ValueError(f"n_equivariance_pairs must be >= 1, got {n_equivariance_pairs}")


# --------------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------------
def _share_templates(dataset: ParticleDataset, level: int, shared: Path, run_labels: Path) -> None:
    """Compute (or reuse) the template bank in ``shared`` and link it into ``run_labels``."""
    templates.dataset_templates(dataset, level, cache_dir=shared)
    run_labels.mkdir(parents=True, exist_ok=True)
    # the record (json) goes last: it marks a complete bank
    for name in (f"templates_L{level}.npy", f"templates_L{level}.json"):
        target = run_labels / name
        if target.exists():
            continue
        try:
            os.link(shared / name, target)
        except OSError:
            with io.atomic_path(target) as tmp:
                shutil.copyfile(shared / name, tmp)


def _run_row(
    folder: Path,
    parameters: SimulationParameters,
    model_config: ModelConfig,
    training_config: settings.TrainingConfig,
    level: int,
    q: float,
    n_pairs: int,
    equivariance_seed: int,
    shared_templates: Path,
) -> dict[str, float]:
    config = RunConfig(
        simulation=parameters,
        labels=LabelSettings(grid_level=level, q=q),
        lmax=model_config.lmax,
        training=training_config,
        network=model_config,
    )
    run = Run(config, folder, progress=False)
    dataset = run.dataset()
    _share_templates(dataset, level, shared_templates, run.layout.labels)
    trained = run.trained()
    result, predictions = trained.result, trained.predictions
    val, trn = result.validation_indices, result.train_indices
    ops = dataset.symmetry_ops
    val_metrics = metrics.pose_metrics(
        predictions.best_rotation[val],
        dataset.rotations[val],
        ops,
        probabilities=predictions.probabilities[val],
        level=level,
    )
    train_metrics = metrics.pose_metrics(
        predictions.best_rotation[trn], dataset.rotations[trn], ops
    )
    random_model = fixed_set.untrained_model(dataset.noisy_images, model_config, training_config)
    equivariance = equivariance_table(
        dataset.volume,
        float(dataset.parameters.blur_sigma),
        model=result.model.cpu(),  # the equivariance test feeds CPU tensors
        random_model=random_model,
        level=level,
        n_pairs=n_pairs,
        seed=equivariance_seed,
    )
    last = result.history[-1]
    return {
        "n": int(parameters.n_projections),
        "seed": int(parameters.seed),
        "n_train": int(len(trn)),
        "n_validation": int(len(val)),
        "epochs": int(len(result.history)),
        "train_loss": float(last["train_loss"]),
        "val_loss": float(last["val_loss"]),
        "val_median_deg": val_metrics["median_deg"],
        "val_mean_deg": val_metrics["mean_deg"],
        "val_acc15": val_metrics["acc15"],
        "val_acc30": val_metrics["acc30"],
        "val_log_likelihood": val_metrics["log_likelihood"],
        "train_median_deg": train_metrics["median_deg"],
        "train_acc15": train_metrics["acc15"],
        "eq_out_of_plane_model": equivariance.mean("model", "out_of_plane"),
        "eq_in_plane_model": equivariance.mean("model", "in_plane"),
        "eq_out_of_plane_random": equivariance.mean("random", "out_of_plane"),
        "eq_in_plane_random": equivariance.mean("random", "in_plane"),
    }


def projection_count_sweep(
    run_dir: str | os.PathLike[str],
    parameters: SimulationParameters,
    counts: Sequence[int] = (50, 100, 200, 400),
    seeds: Sequence[int] = (0, 1, 2),
    model_config: ModelConfig | None = None,
    training_config: settings.TrainingConfig | None = None,
    level: int = 2,
    q: float = 0.05,
    n_equivariance_pairs: int = 32,
    equivariance_seed: int = 0,
    progress: bool = True,
) -> ProjectionSweep:
    """Train one network per (image count, seed) and measure accuracy and equivariance.

    See the module docstring for the protocol, the folders and the measured fields.

    Args:
        run_dir: run folder; everything goes under ``run_dir/sweep/``.
        parameters: the simulation; ``n_projections`` and ``seed`` are replaced per run.
        counts: image counts ``n`` (each >= 5, no duplicates); rows follow this order.
        seeds: seeds (each >= 0, no duplicates); each seeds data, split and initialisation.
        model_config: default ``ModelConfig(image_size=parameters.image_size,
            grid_level=level)``.
        training_config: default :class:`~cryosphere.poses.training.settings.TrainingConfig` (200 epochs);
            ``seed`` is replaced per run; ``epochs`` must be >= 1 and
            ``validation_fraction`` > 0.
        level: HEALPix SO(3) grid level of the labels and the network output.
        q: mask fraction of the labels.
        n_equivariance_pairs: test pairs per rotation kind.
        equivariance_seed: seeds the equivariance test pairs (the same for every run).
        progress: a tqdm bar over the ``(n, seed)`` grid.

    Returns:
        :class:`ProjectionSweep`; the rows are also written to ``run_dir/sweep/sweep.csv`` and
        everything to ``run_dir/sweep/sweep.json``.

    Raises:
        ValueError: bad input (empty, too small or duplicated counts or seeds, epochs < 1,
            mismatched image size or grid level, ...), before any work starts.
    """
    counts = _int_list(counts, "counts", 5, "[50, 100, 200, 400]")
    seeds = _int_list(seeds, "seeds", 0, "[0, 1, 2]")
    if model_config is None:
        model_config = ModelConfig(image_size=parameters.image_size, grid_level=int(level))
    training_config = training_config or settings.TrainingConfig()
    _check_settings(parameters, model_config, training_config, level, q, n_equivariance_pairs)
    folder = Path(run_dir) / SWEEP_FOLDER
    grid = [(n, seed) for n in counts for seed in seeds]
    rows = []
    bar = tqdm(grid, desc="projection sweep", unit="run", disable=not progress)
    for n, seed in bar:
        bar.set_postfix(n=n, seed=seed)
        rows.append(
            _run_row(
                sweep_folder(run_dir, n, seed),
                dataclasses.replace(parameters, n_projections=n, seed=seed),
                model_config,
                dataclasses.replace(training_config, seed=seed),
                int(level),
                float(q),
                int(n_equivariance_pairs),
                int(equivariance_seed),
                folder / "templates",
            )
        )
    bar.close()
    csv_path = folder / "sweep.csv"
    with io.atomic_path(csv_path) as tmp:
        pd.DataFrame(rows, columns=list(ROW_FIELDS)).to_csv(tmp, index=False)
    protocol = {
        "counts": counts,
        "seeds": seeds,
        "simulation": parameters.to_dict(),
        "model_config": model_config.to_dict(),
        "training_config": training_config.to_dict(),
        "level": int(level),
        "q": float(q),
        "n_equivariance_pairs": int(n_equivariance_pairs),
        "equivariance_seed": int(equivariance_seed),
        "seed_sets": "poses, noise, validation split, initialisation and data order",
        "errors": "geodesic, degrees, minimum over the point group; most probable grid pose",
        "equivariance": "mean over pairs of the per-pair MSE of sigmoid(grid logits), "
        "noise-free images (cryosphere.poses.evaluation.equivariance.equivariance_table)",
        "std": "sample standard deviation across seeds (ddof=1)",
    }
    sweep = ProjectionSweep(
        rows=rows, summary=summarize_sweep(rows), csv_path=csv_path, protocol=protocol
    )
    io.write_json(folder / "sweep.json", sweep.to_dict())
    return sweep


# --------------------------------------------------------------------------------------------
# aggregation and figure
# --------------------------------------------------------------------------------------------
def summarize_sweep(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    by: str = "n",
) -> list[dict[str, float]]:
    """Aggregate rows per value of ``by`` across seeds.

    Args:
        rows: dicts holding ``by`` and the ``columns``.
        columns: what to aggregate; default the :data:`METRIC_FIELDS` present in the rows.
        by: the grouping key.

    Returns:
        One dict per value of ``by`` (ascending): ``by``, ``n_seeds`` (rows in the group) and,
        for every column ``c``, ``c_mean``, ``c_std`` (sample standard deviation, ``ddof = 1``;
        NaN for a single row), ``c_min`` and ``c_max``.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("rows is empty; nothing to summarise")
    if any(by not in row for row in rows):
        raise ValueError(f"every row needs the grouping key {by!r}")
    if columns is None:
        columns = [c for c in METRIC_FIELDS if c in rows[0]]
    missing = sorted({c for row in rows for c in columns if c not in row})
    if missing:
        raise ValueError(f"rows lack the column(s) {missing}")
    summary = []
    for key in sorted({row[by] for row in rows}):
        group = [row for row in rows if row[by] == key]
        record: dict[str, float] = {by: key, "n_seeds": len(group)}
        for column in columns:
            values = np.array([float(row[column]) for row in group])
            record[f"{column}_mean"] = float(np.mean(values))
            record[f"{column}_std"] = (
                float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
            )
            record[f"{column}_min"] = float(np.min(values))
            record[f"{column}_max"] = float(np.max(values))
        summary.append(record)
    return summary
