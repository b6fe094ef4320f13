"""The pipeline layer: one typed run configuration, one run folder, one cache rule.

:class:`RunConfig` (frozen) composes the configuration of every stage of the series:

* ``simulation``: :class:`~cryosphere.imaging.simulate.SimulationParameters` (structure, image
  count, box, SNR, blur, seed, CTF and shifts);
* ``labels``: :class:`LabelSettings` (grid level, mask fraction ``q``, soft-map λ);
* ``lmax``: the harmonic band limit of both networks;
* ``training``: :class:`~cryosphere.poses.train.TrainingConfig` of the poster's network (its
  ``seed`` is the simulation's);
* ``stream``: :class:`StreamSettings` of the default network, trained on streamed particles;
* ``studies``: :class:`StudySettings`, the sizes of the notebooks' studies (sweep, SNR study,
  equivariance pairs, resolution sweep);
* ``network``: other :class:`~cryosphere.poses.model.ModelConfig` settings of the poster's
  network (None: the poster's; no flat name).

Every field also has a flat name (:data:`FLAT_FIELDS`: ``n_projections``, ``stream_steps``…),
the vocabulary of ``cryosphere run --set NAME=VALUE``, of the profiles (:data:`PROFILES`) and of
papermill: a notebook of the series receives two parameters, ``profile`` and ``config`` (a dict
of flat overrides), and builds its run with :meth:`RunConfig.from_profile`.

:class:`Run` owns a run folder's layout (:class:`RunLayout`) and makes or reloads each stage:
:meth:`Run.dataset`, :meth:`Run.labels`, :meth:`Run.trained` (the poster's network) and
:meth:`Run.streamed` (the default network).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from cryosphere import _checks, io
from cryosphere.imaging import simulate
from cryosphere.imaging.simulate import ParticleDataset, SimulationParameters
from cryosphere.poses import labels as pose_labels
from cryosphere.poses import train
from cryosphere.poses.model import ModelConfig
from cryosphere.runs.series import StreamedRun, TrainedRun, load_or_train_stream

__all__ = [
    "FLAT_FIELDS",
    "PROFILES",
    "STAGE_INPUTS",
    "LabelSettings",
    "StreamSettings",
    "StudySettings",
    "RunConfig",
    "RunLayout",
    "Run",
    "StageMismatchError",
]


@dataclass(frozen=True)
class LabelSettings:
    """Labels of the poster's network: the HEALPix SO(3) grid level (72 · 8^level cells), the
    mask fraction ``q`` in (0, 1] and the soft map's λ (None: tuned)."""

    grid_level: int = 2
    q: float = 0.05
    lam: float | None = None

    def __post_init__(self) -> None:
        _checks.check_label_level(self.grid_level)
        _checks.check_q(self.q)
        if self.lam is not None:
            _checks.check_lam(self.lam)


@dataclass(frozen=True)
class StreamSettings:
    """Streamed training of the default network (:func:`cryosphere.runs.series.load_or_train_stream`).

    Attributes:
        steps: optimiser steps; batch_size: fresh particles per step.
        snr: training SNR, ``(low, high)`` log-uniform per particle, or None (the dataset's).
        target: ``"bayes"``, ``"pose"`` or ``"soft"``; learning_rate: peak AdamW rate.
        channels: residual encoder stages.
    """

    steps: int = 1500
    batch_size: int = 64
    snr: tuple[float, float] | float | None = (0.05, 1.0)
    target: str = "bayes"
    learning_rate: float = 2e-3
    channels: tuple[int, ...] = (16, 32, 64)

    def __post_init__(self) -> None:
        if isinstance(self.snr, list):
            object.__setattr__(self, "snr", tuple(float(s) for s in self.snr))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if int(self.steps) < 1 or int(self.batch_size) < 1:
            raise ValueError(
                f"stream steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}"
            )


@dataclass(frozen=True)
class StudySettings:
    """Sizes of the notebooks' studies: the image-count sweep (07), the SNR study (06), the
    equivariance test pairs (04) and the resolution sweep (08)."""

    sweep_counts: tuple[int, ...] = (50, 100, 200)
    sweep_seeds: tuple[int, ...] = (0,)
    sweep_epochs: int = 60
    snr_levels: tuple[float, ...] = (1.0, 0.1)
    image_counts: tuple[int, ...] = (50, 200)
    n_pairs: int = 32

    def __post_init__(self) -> None:
        for name in ("sweep_counts", "sweep_seeds", "snr_levels", "image_counts"):
            object.__setattr__(self, name, tuple(getattr(self, name)))


#: Flat parameter name -> (section of :class:`RunConfig`, field). ``seed`` also seeds training.
FLAT_FIELDS: dict[str, tuple[str, str]] = {
    **{
        name: ("simulation", name)
        for name in (f.name for f in dataclasses.fields(SimulationParameters))
    },
    "grid_level": ("labels", "grid_level"),
    "q": ("labels", "q"),
    "lam": ("labels", "lam"),
    "lmax": ("", "lmax"),
    "epochs": ("training", "epochs"),
    "batch_size": ("training", "batch_size"),
    "learning_rate": ("training", "learning_rate"),
    "loss": ("training", "loss"),
    **{f"stream_{f.name}": ("stream", f.name) for f in dataclasses.fields(StreamSettings)},
    **{f.name: ("studies", f.name) for f in dataclasses.fields(StudySettings)},
}

#: Profiles as flat overrides of :class:`RunConfig`'s defaults (which are the ``quick`` laptop
#: run). ``tiny`` is the notebooks' own default: seconds per notebook, for CI and a first look.
PROFILES: dict[str, dict[str, Any]] = {
    "tiny": {
        "n_projections": 64,
        "image_size": 32,
        "epochs": 3,
        "learning_rate": 1e-3,
        "sweep_counts": [16, 32],
        "sweep_seeds": [0],
        "sweep_epochs": 2,
        "image_counts": [16, 64],
        "n_pairs": 16,
        "stream_steps": 12,
        "stream_batch_size": 8,
    },
    "quick": {
        "n_projections": 200,
        "image_size": 48,
        "snr": 1.0,
        "epochs": 200,
        "learning_rate": 3e-3,
        "lmax": 4,
        "sweep_counts": [50, 100, 200],
        "sweep_seeds": [0],
        "sweep_epochs": 60,
        "snr_levels": [1.0, 0.1],
        "image_counts": [50, 200],
        "n_pairs": 32,
        "stream_steps": 1500,
        "stream_batch_size": 64,
    },
    "paper": {
        "n_projections": 400,
        "image_size": 64,
        "snr": 1.0,
        "epochs": 200,
        "lmax": 4,
        "sweep_counts": [50, 100, 200, 400],
        "sweep_seeds": [0, 1, 2],
        "sweep_epochs": 200,
        "snr_levels": [1.0, 0.3, 0.1, 0.03],
        "image_counts": [50, 100, 200, 400, 1000, 3000],
        "n_pairs": 200,
        "stream_steps": 6000,
        "stream_batch_size": 64,
    },
}


@dataclass(frozen=True)
class RunConfig:
    """Everything a run of the series is made from (frozen; see the module docstring)."""

    simulation: SimulationParameters = field(
        default_factory=lambda: SimulationParameters(n_projections=200, image_size=48)
    )
    labels: LabelSettings = field(default_factory=LabelSettings)
    lmax: int = 4
    training: train.TrainingConfig = field(
        default_factory=lambda: train.TrainingConfig(epochs=200, learning_rate=3e-3)
    )
    stream: StreamSettings = field(default_factory=StreamSettings)
    studies: StudySettings = field(default_factory=StudySettings)
    network: ModelConfig | None = None

    def __post_init__(self) -> None:
        if int(self.training.seed) != int(self.simulation.seed):
            object.__setattr__(
                self, "training", dataclasses.replace(self.training, seed=self.simulation.seed)
            )

    @property
    def model(self) -> ModelConfig:
        """The poster's network: ``network`` (None: the poster's 2-conv encoder and spherical
        layers) with the images' size, ``lmax`` and the labels' grid level."""
        return dataclasses.replace(
            self.network or ModelConfig(),
            image_size=self.simulation.image_size,
            lmax=self.lmax,
            grid_level=self.labels.grid_level,
        )

    def replace(self, **flat: Any) -> RunConfig:
        """A copy with flat fields replaced (``config.replace(n_projections=50, seed=1)``)."""
        unknown = sorted(set(flat) - set(FLAT_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown run parameter(s) {unknown}; valid names: {sorted(FLAT_FIELDS)}"
            )
        sections: dict[str, dict[str, Any]] = {}
        for name, value in flat.items():
            section, attribute = FLAT_FIELDS[name]
            sections.setdefault(section, {})[attribute] = value
        top = sections.pop("", {})
        if "seed" in sections.get("simulation", {}):
            sections.setdefault("training", {})["seed"] = sections["simulation"]["seed"]
        replaced = {
            section: dataclasses.replace(getattr(self, section), **values)
            for section, values in sections.items()
        }
        return dataclasses.replace(self, **replaced, **top)

    @classmethod
    def from_profile(
        cls, profile: str = "quick", overrides: dict[str, Any] | None = None
    ) -> RunConfig:
        """The profile's configuration with flat ``overrides`` on top (unknown names raise
        ``ValueError`` listing the valid ones)."""
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
        return cls().replace(**{**PROFILES[profile], **dict(overrides or {})})

    def to_flat(self) -> dict[str, Any]:
        """Every field under its flat name, JSON-ready (lists for tuples)."""
        flat = {}
        for name, (section, attribute) in FLAT_FIELDS.items():
            value = getattr(getattr(self, section) if section else self, attribute)
            flat[name] = list(value) if isinstance(value, tuple) else value
        return flat

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_flat` (missing names keep the defaults)."""
        return cls().replace(**flat)


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
        return [self.folder / name for name in simulate.SIMULATION_FILES]

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
            result, predictions = train.load_or_train(
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
