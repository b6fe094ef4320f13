"""The run configuration: one frozen :class:`RunConfig` of every stage, its flat names and
the profiles.

:class:`RunConfig` composes the configuration of every stage of the series:

* ``simulation``: :class:`~cryosphere.imaging.datasets.SimulationParameters` (structure, image
  count, box, SNR, blur, seed, CTF and shifts);
* ``labels``: :class:`LabelSettings` (grid level, mask fraction ``q``, soft-map λ);
* ``lmax``: the harmonic band limit of both networks;
* ``training``: :class:`~cryosphere.poses.training.settings.TrainingConfig` of the poster's network (its
  ``seed`` is the simulation's);
* ``stream``: :class:`StreamSettings` of the default network, trained on streamed particles;
* ``studies``: :class:`StudySettings`, the sizes of the notebooks' studies (sweep, SNR study,
  equivariance pairs, resolution sweep);
* ``network``: other :class:`~cryosphere.poses.network.model.ModelConfig` settings of the poster's
  network (None: the poster's; no flat name).

Every field also has a flat name (:data:`FLAT_FIELDS`: ``n_projections``, ``stream_steps``…),
the vocabulary of ``cryosphere run -p NAME VALUE``, of the profiles (:data:`PROFILES`) and of
papermill: a notebook of the series receives two parameters, ``profile`` and ``config`` (a dict
of flat overrides), and builds its run with :meth:`RunConfig.from_notebook`, which also takes a
flat name papermill sets on its own (``papermill NB OUT -p snr 0.1``).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryosphere import _checks
from cryosphere.imaging.datasets import SimulationParameters
from cryosphere.poses.network.model import ModelConfig
from cryosphere.poses.training import settings

__all__ = [
    "FLAT_FIELDS",
    "PROFILES",
    "LabelSettings",
    "StreamSettings",
    "StudySettings",
    "RunConfig",
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
        "stream_steps": 1000,
        "stream_batch_size": 16,
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
    training: settings.TrainingConfig = field(
        default_factory=lambda: settings.TrainingConfig(epochs=200, learning_rate=3e-3)
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

    @classmethod
    def from_notebook(
        cls, profile: str, config: dict[str, Any] | None, namespace: Mapping[str, Any]
    ) -> RunConfig:
        """A series notebook's configuration: :meth:`from_profile` with ``config`` and with every
        flat name that is a variable of ``namespace`` (the notebook's ``globals()``) holding a
        parameter value, which is what ``papermill NB OUT -p snr 0.1`` leaves.

        Raises ``ValueError`` when ``config`` is not a dict, when a flat variable and ``config``
        give one name two values, or when a variable's name is a near miss of a flat name
        (``n_projection``), each message showing the spelling that works.
        """
        if not isinstance(config, dict | type(None)):
            raise ValueError(
                f"config must be a dict of flat RunConfig overrides, got {config!r}; with "
                "papermill pass each as its own parameter (-p snr 0.1 -p n_projections 20) "
                "or the dict as YAML (-y 'config: {snr: 0.1}')"
            )
        flat = {
            name: value
            for name, value in namespace.items()
            if name in FLAT_FIELDS and _is_parameter_value(value)
        }
        config = dict(config or {})
        clashes = {n: (config[n], v) for n, v in flat.items() if n in config and config[n] != v}
        if clashes:
            raise ValueError(
                "parameters given twice with different values (as -p NAME VALUE and inside "
                f"config): {clashes}; give each once"
            )
        for name, value in namespace.items():
            if name.startswith("_") or name in FLAT_FIELDS or not _is_parameter_value(value):
                continue
            close = difflib.get_close_matches(name, FLAT_FIELDS, n=1, cutoff=0.85)
            if close:
                raise ValueError(
                    f"{name} = {value!r} is not a RunConfig parameter; did you mean "
                    f"{close[0]} (papermill -p {close[0]} {value!r})?"
                )
        return cls.from_profile(profile, {**config, **flat})

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


def _is_parameter_value(value: Any) -> bool:
    """A value papermill can pass (JSON/YAML scalars and containers), not a module, function
    or other object a notebook names."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_is_parameter_value(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_parameter_value(v) for k, v in value.items())
    return False
