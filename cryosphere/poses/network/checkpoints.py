"""Training checkpoints and logs in a run folder (all written atomically):
``run_dir/model/checkpoint.pt`` (model config and weights, optimizer state, step (and epoch),
history, the identity of the run's settings and data; read back with ``weights_only``) and
``run_dir/model/training_log.csv``.
"""

from __future__ import annotations

import csv
import io as _io
import os
from pathlib import Path
from typing import Any

import torch

from cryosphere import io
from cryosphere.poses.network.model import ARCHITECTURE, ModelConfig, PoseDistributionNetwork

__all__ = [
    "checkpoint_path",
    "load_checkpoint",
    "load_model",
    "read_training_log",
    "write_log_rows",
]


def checkpoint_path(run_dir: str | os.PathLike[str]) -> Path:
    """``run_dir/model/checkpoint.pt``."""
    return Path(run_dir) / "model" / "checkpoint.pt"


def write_log_rows(
    path: Path, rows: list[dict[str, float]], columns: tuple[str, ...] | None = None
) -> None:
    """Write ``rows`` as CSV atomically; columns default to the keys of the rows, in order."""
    if columns is None:
        columns = tuple(dict.fromkeys(k for row in rows for k in row))
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, float("nan")) for k in columns})
    with io.atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def read_training_log(run_dir: str | os.PathLike[str]) -> list[dict[str, float]]:
    """Rows of ``run_dir/model/training_log.csv`` as dicts of floats (epoch as int)."""
    path = Path(run_dir) / "model" / "training_log.csv"
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [
        {k: (int(v) if k in ("epoch", "step") else float(v)) for k, v in r.items()} for r in rows
    ]


def _save_checkpoint(path: Path, record: dict[str, Any]) -> None:
    with io.atomic_path(path) as tmp:
        torch.save(record, tmp)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a checkpoint written by the trainer (``weights_only`` load).

    Raises:
        FileNotFoundError: no file.
        ValueError: not a CryoSphere checkpoint, or one from another architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train a model first (cryosphere train)")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise ValueError(f"{path} is not a readable CryoSphere checkpoint: {exc}") from exc
    if not isinstance(record, dict) or "architecture" not in record:
        raise ValueError(f"{path} is not a CryoSphere checkpoint (no 'architecture' entry)")
    if record["architecture"] != ARCHITECTURE:
        raise ValueError(
            f"{path} holds architecture {record['architecture']!r}, this version reads "
            f"{ARCHITECTURE!r}; retrain with this version"
        )
    return record


def _model_from_record(record: dict[str, Any], source: str) -> PoseDistributionNetwork:
    try:
        config = ModelConfig.from_dict(dict(record["model_config"]))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: invalid model configuration in checkpoint: {exc}") from exc
    model = PoseDistributionNetwork(config, seed=0)
    try:
        model.load_state_dict(record["model_state"])
    except RuntimeError as exc:
        raise ValueError(
            f"{source}: weights do not match the architecture of its configuration ({exc})"
        ) from exc
    return model


def load_model(
    path: str | os.PathLike[str], device: str | torch.device | None = None
) -> PoseDistributionNetwork:
    """The network stored in a checkpoint (eval mode; CPU unless ``device`` is given).

    Raises FileNotFoundError / ValueError with a clear message (see :func:`load_checkpoint`).
    """
    record = load_checkpoint(path)
    model = _model_from_record(record, str(path))
    return model.to(device or "cpu").eval()
