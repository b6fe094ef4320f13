"""The pipeline layer: one run folder, one cache rule (the configuration is
:mod:`cryosphere.runs.run_config`).

A run is made from one frozen :class:`~cryosphere.runs.run_config.RunConfig` (its settings,
flat names and profiles live in :mod:`cryosphere.runs.run_config`). :class:`Run` owns a run folder's layout
(:class:`RunLayout`) and makes or reloads each stage: :meth:`Run.dataset`, :meth:`Run.labels`,
:meth:`Run.trained` (the poster's network) and :meth:`Run.streamed` (the default network).

**The cache rule, the same for every stage.** A stage's key is the SHA-256 of its own
configuration and of the keys of the stages it reads (:data:`STAGE_INPUTS`), recorded in
``run_dir/stages.json`` when the stage is made. Asking a folder for a stage whose record has
another key raises :class:`StageMismatchError` (a ``FileExistsError``) that names the stage and
the settings that differ, before anything is read or written; ``Run(..., overwrite=True)``
instead deletes that stage and every stage that depends on it and makes them again. A stage
with the same key is reloaded (an interrupted training resumes). Folders made before
``stages.json`` existed are checked by the stage's own loader once, then recorded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from cryosphere import io
from cryosphere.imaging import simulate
from cryosphere.imaging.datasets import ParticleDataset
from cryosphere.poses.labels import dataset_labels as pose_labels
from cryosphere.poses.training import fixed_set
from cryosphere.runs.run_config import (
    RunConfig,
)
from cryosphere.runs.series import StreamedRun, TrainedRun, load_or_train_stream

__all__ = [
    "STAGE_INPUTS",
    "RunLayout",
    "Run",
    "StageMismatchError",
]


class StageMismatchError(FileExistsError):
    """A run folder holds a stage made with other settings (see the module's cache rule)."""


#: Stage -> the stages whose results it reads (their keys are part of its key).
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "dataset": (),
    "labels": ("dataset",),
    "model": ("dataset", "labels"),
    "stream": ("dataset",),
}

STAGES_FILE = "stages.json"
T = TypeVar("T")


@dataclass(frozen=True)
class RunLayout:
    """Where a run folder keeps each thing (every path absolute under ``folder``)."""

    folder: Path

    @property
    def dataset(self) -> list[Path]:
        """The dataset's files (``particles.*``, ``volume.mrc``…, in the folder itself)."""
        names = [*simulate.SIMULATION_FILES.values(), simulate.REALISM_FILE]
        return [self.folder / name for name in names]

    labels = property(lambda self: pose_labels.labels_dir(self.folder))
    model = property(lambda self: self.folder / "model")
    stream = property(lambda self: self.folder / "stream")
    results = property(lambda self: self.folder / "results")
    figures = property(lambda self: self.folder / "figures")
    reconstruction = property(lambda self: self.folder / "reconstruction")
    sweep = property(lambda self: self.folder / "sweep")
    snr = property(lambda self: self.folder / "snr")
    notebooks = property(lambda self: self.folder / "notebooks")
    stages = property(lambda self: self.folder / STAGES_FILE)

    def stage_paths(self, stage: str) -> list[Path]:
        """What deleting ``stage`` removes."""
        return {
            "dataset": self.dataset,
            "labels": [self.labels / "labels.npz", self.labels / "labels.json"],
            "model": [self.model],
            "stream": [self.stream],
        }[stage]


def _json_ready(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    names = sorted(set(old) | set(new))
    return [f"{n}: {old.get(n)!r} -> {new.get(n)!r}" for n in names if old.get(n) != new.get(n)]


class Run:
    """One run folder of the series, made from one :class:`RunConfig`.

    Args:
        config: the run's configuration.
        folder: the run folder (created when a stage is first made).
        overwrite: recompute a stage made with other settings (and every later stage) instead
            of raising :class:`StageMismatchError`.
        progress: tqdm bars in the stages.
        device: torch device of the simulation's projections and of the labels' template bank
            and MSE products (default: CPU). Not part of the stage keys: another device changes
            the arrays only by float error. The networks train on their configs' ``device``.
    """

    def __init__(
        self,
        config: RunConfig,
        folder: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        progress: bool = True,
        device: str | torch.device | None = None,
    ):
        self.config = config
        self.layout = RunLayout(Path(folder).resolve())
        self.overwrite = bool(overwrite)
        self.progress = bool(progress)
        self.device = device
        self._made: dict[str, Any] = {}

    @property
    def folder(self) -> Path:
        return self.layout.folder

    # ---------------------------------------------------------------- the cache rule
    def stage_config(self, stage: str) -> dict[str, Any]:
        """The settings that define ``stage`` (JSON-ready)."""
        config = self.config
        if stage == "dataset":
            return config.simulation.to_dict()
        if stage == "labels":
            return dataclasses.asdict(config.labels)
        if stage == "model":
            return {"model": config.model.to_dict(), "training": config.training.to_dict()}
        if stage == "stream":
            return _json_ready(
                {
                    "stream": dataclasses.asdict(config.stream),
                    "lmax": config.lmax,
                    "grid_level": config.labels.grid_level,
                }
            )
        raise ValueError(f"unknown stage {stage!r}; stages: {sorted(STAGE_INPUTS)}")

    def stage_key(self, stage: str) -> str:
        """SHA-256 of the stage's settings and of its inputs' keys."""
        payload = {
            "stage": stage,
            "config": self.stage_config(stage),
            "inputs": {name: self.stage_key(name) for name in STAGE_INPUTS[stage]},
        }
        text = json.dumps(_json_ready(payload), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def _records(self) -> dict[str, Any]:
        path = self.layout.stages
        return io.read_json(path) if path.is_file() else {}

    def _dependents(self, stage: str) -> list[str]:
        found = [stage]
        for name, inputs in STAGE_INPUTS.items():
            if stage in inputs:
                found += [d for d in self._dependents(name) if d not in found]
        return found

    def _check_stage(self, stage: str) -> None:
        record = self._records().get(stage)
        if record is None or record["key"] == self.stage_key(stage):
            return
        if not self.overwrite:
            changed = _differences(record.get("config", {}), _json_ready(self.stage_config(stage)))
            changed = changed or ["the settings of an earlier stage it reads"]
            raise StageMismatchError(
                f"{self.folder} holds a {stage} stage made with other parameters "
                f"({'; '.join(changed)}); choose another run folder, or pass overwrite=True "
                f"(--overwrite) to recompute the {stage} stage and the stages that use it"
            )
        self.clear(*self._dependents(stage))

    def clear(self, *stages: str) -> None:
        """Delete the named stages' files and records (nothing else)."""
        records = self._records()
        for stage in stages:
            for path in self.layout.stage_paths(stage):
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            records.pop(stage, None)
            self._made.pop(stage, None)
        if self.layout.stages.is_file():
            io.write_json(self.layout.stages, records)

    def _record_stage(self, stage: str) -> None:
        records = self._records()
        records[stage] = {
            "key": self.stage_key(stage),
            "config": _json_ready(self.stage_config(stage)),
        }
        io.write_json(self.layout.stages, records)

    def _stage(self, stage: str, make: Callable[[], T]) -> T:
        if stage not in self._made:
            for name in STAGE_INPUTS[stage]:
                self._check_stage(name)
            self._check_stage(stage)
            self._made[stage] = make()
            self._record_stage(stage)
        return self._made[stage]

    # ---------------------------------------------------------------- the stages
    def dataset(self) -> ParticleDataset:
        """The run's particles (simulated into the folder, or reloaded)."""
        return self._stage(
            "dataset",
            lambda: simulate.load_or_simulate(
                self.folder,
                self.config.simulation,
                overwrite=self.overwrite,  # a folder made before stages.json existed
                progress=self.progress,
                device=self.device,
            ),
        )

    def labels(self) -> pose_labels.PoseLabels:
        """MSE landscape, soft map and mask of every image (``labels/``)."""

        def make() -> pose_labels.PoseLabels:
            settings = self.config.labels
            return pose_labels.load_or_make_labels(
                self.folder,
                self.dataset(),
                level=settings.grid_level,
                q=settings.q,
                lam=settings.lam,
                progress=self.progress,
                device=self.device,
            )

        return self._stage("labels", make)

    def trained(self) -> TrainedRun:
        """The poster's network trained on the run's images (``model/``)."""

        def make() -> TrainedRun:
            dataset, labels = self.dataset(), self.labels()
            config = self.config
            result, predictions = fixed_set.load_or_train(
                self.folder, dataset, labels, config.model, config.training, progress=self.progress
            )
            return TrainedRun(dataset, labels, config.model, config.training, result, predictions)

        return self._stage("model", make)

    def streamed(self) -> StreamedRun:
        """The default network, trained on streamed particles of the run's map and predicting
        the run's images (``stream/``)."""

        def make() -> StreamedRun:
            settings, config = self.config.stream, self.config
            return load_or_train_stream(
                self.folder,
                self.dataset(),
                steps=settings.steps,
                snr=settings.snr,
                target=settings.target,
                learning_rate=settings.learning_rate,
                batch_size=settings.batch_size,
                lmax=config.lmax,
                channels=settings.channels,
                grid_level=config.labels.grid_level,
                seed=config.simulation.seed,
                progress=self.progress,
            )

        return self._stage("stream", make)
