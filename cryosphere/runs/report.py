"""The run report: one self-contained HTML page per run folder, to share a run without Jupyter.

:func:`write_report` writes ``<run_dir>/report.html`` from what the run left in its folder:

* the run's profile and parameters, and the seconds each notebook took;
* the summary tables of ``summary.json``: pose accuracy (notebook 06's estimators), equivariance
  (notebook 04), FSC resolution (notebook 08), then every other step's figures of record;
* the label and predicted distributions of a few particles on spheres (the dataset, the soft
  labels of ``labels/labels.npz`` and the default network's ``stream/model/predictions.npz``,
  else the poster's ``model/predictions.npz``);
* the training curves (``model/training_log.csv``, ``stream/model/training_log.csv``);
* the reproducibility block of ``summary.json``.

plotly.js is embedded once, inline: the page opens offline (``file://``) and fetches nothing. A
section whose files the run has not written says so instead of failing, so the report of a
partial run (or of a series without some notebook) still builds. ``cryosphere run`` writes it
after the last notebook; ``cryosphere report RUN_DIR`` rebuilds it.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cryosphere import io

__all__ = ["REPORT_FILE", "write_report", "report_html"]

REPORT_FILE = "report.html"
#: Images whose distributions the report draws (the first ones of the run's dataset).
DEFAULT_PARTICLES = (0, 1, 2)

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
.missing { color: #a00; font-style: italic; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def _format(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(_format(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, default=str)
    return str(value)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_format(cell))}</td>" for cell in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _flatten(record: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows += _flatten(value, f"{name}.")
        else:
            rows.append((name, value))
    return rows


def _nested_table(record: Mapping[str, Any], first: str) -> str:
    """A table of ``{row: {column: value}}`` (the scalar columns), or name/value rows."""
    if record and all(isinstance(v, Mapping) for v in record.values()):
        columns: list[str] = []
        for values in record.values():
            columns += [k for k, v in values.items() if k not in columns and _is_scalar(v)]
        rows = [[name, *(values.get(c, "") for c in columns)] for name, values in record.items()]
        return _table(rows, [first, *columns])
    return _table(_flatten(record), ["name", "value"])


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _missing(text: str) -> str:
    return f'<p class="missing">{html.escape(text)}</p>'


def _records_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A table of a list of flat records (one row each; the union of their keys)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return _table([[row.get(c, "") for c in columns] for row in rows], columns)


def _accuracy(record: Mapping[str, Any]) -> str:
    parts = [_nested_table(record.get("estimators", {}), "estimator")]
    by_snr = record.get("by_snr") or []
    if by_snr:
        names = [k for k, v in by_snr[0].items() if isinstance(v, Mapping) and "median_deg" in v]
        rows = [[row["snr"], *(row[k]["median_deg"] for k in names)] for row in by_snr]
        parts.append(_table(rows, ["SNR", *(f"{k} median (°)" for k in names)]))
    return "\n".join(parts)


def _equivariance(record: Mapping[str, Any]) -> str:
    parts = []
    for name, part in [("poster's network", record), ("default network", record.get("stream"))]:
        if not part:
            continue
        ratio = part.get("model_to_random_out_of_plane")
        parts.append(
            f"<p>{html.escape(name)}: MSE between the prediction of a rotated particle and the "
            f"rotated prediction; model / random (out of plane) = {_format(ratio)}</p>"
        )
        parts.append(_records_table(part.get("rows", [])))
    return "\n".join(parts)


def _fsc(record: Mapping[str, Any]) -> str:
    parts = [_nested_table(record.get("fsc_resolution_angstrom", {}), "poses")]
    if record.get("resolution_vs_count"):
        parts.append("<p>FSC resolution (Å) against the number of images:</p>")
        parts.append(_nested_table(record["resolution_vs_count"], "poses"))
    return "\n".join(parts)


#: Step -> (heading, table builder) of the summary tables named first.
_SUMMARY_TABLES = {
    "06_pose_accuracy": ("Pose accuracy (notebook 06, validation images)", _accuracy),
    "04_equivariance": ("Equivariance (notebook 04)", _equivariance),
    "08_reconstruction": ("FSC resolution in Å (notebook 08)", _fsc),
}


def _summary_sections(summary: Mapping[str, Any]) -> str:
    results = summary.get("results", {})
    parts = ["<h2>Summary</h2>"]
    for step, (heading, build) in _SUMMARY_TABLES.items():
        parts.append(f"<h3>{html.escape(heading)}</h3>")
        record = results.get(step)
        parts.append(build(record) if record is not None else _missing(f"no results/{step}.json"))
    for step in [step for step in results if step not in _SUMMARY_TABLES]:
        parts.append(f"<h3>{html.escape(step)}</h3>")
        parts.append(_table(_flatten(results[step]), ["name", "value"]))
    return "\n".join(parts)


def _figure_div(fig: Any, div_id: str) -> str:
    import plotly.io as pio

    body = pio.to_html(
        fig,
        full_html=False,
        include_plotlyjs=False,
        div_id=div_id,
        config={"displaylogo": False, "responsive": True},
    )
    return f'<div class="report-figure" data-figure="{html.escape(div_id)}">{body}</div>'


def _predictions_file(run_dir: Path) -> tuple[Path, str] | None:
    for path, name in [
        (run_dir / "stream" / "model" / "predictions.npz", "default (streamed) network"),
        (run_dir / "model" / "predictions.npz", "poster's network"),
    ]:
        if path.is_file():
            return path, name
    return None


def _sphere_section(run_dir: Path, particles: Sequence[int]) -> str:
    from cryosphere.figures import so3_plotly, so3_views
    from cryosphere.imaging import simulate
    from cryosphere.poses.labels import dataset_labels as pose_labels
    from cryosphere.poses.labels.soft_maps import soft_labels

    parts = ["<h2>Distributions on spheres</h2>"]
    labels_file = pose_labels.labels_dir(run_dir) / "labels.npz"
    if not (run_dir / simulate.SIMULATION_FILES["record"]).is_file() or not labels_file.is_file():
        return "\n".join(parts + [_missing("no dataset and labels in this run (notebooks 01-02)")])
    dataset = simulate.load_dataset(run_dir)
    with np.load(labels_file) as stored:
        mse, lam = stored["mse"], float(stored["lam"])
    level = int(io.read_json(labels_file.with_suffix(".json"))["parameters"]["level"])
    found = _predictions_file(run_dir)
    predicted = None
    if found is not None:
        with np.load(found[0]) as stored:
            predicted = stored["probabilities"]
        parts.append(f"<p>Label (soft map, λ = {lam:.4g}) and prediction of the {found[1]}.</p>")
    else:
        parts.append(_missing("no predictions.npz in this run: labels only"))
    for i in [p for p in particles if p < len(dataset)]:
        rotation = dataset.rotations[i]
        label = so3_views.sphere_view(
            soft_labels(mse[i : i + 1], lam)[0], level, rotation, dataset.symmetry_ops
        )
        prediction = None
        if predicted is not None and i < len(predicted):
            prediction = so3_views.sphere_view(
                predicted[i].astype(np.float64), level, rotation, dataset.symmetry_ops
            )
        fig = so3_plotly.plot_label_vs_prediction(
            dataset.noisy_images[i],
            label,
            prediction,
            title=f"{dataset.parameters.structure} ({dataset.point_group}), image {i}",
        )
        parts.append(_figure_div(fig, f"sphere-image{i}"))
    return "\n".join(parts)


def _curves_section(run_dir: Path) -> str:
    import pandas as pd

    from cryosphere.figures import curves

    logs = {
        name: pd.read_csv(path)
        for name, path in [
            ("poster's network", run_dir / "model" / "training_log.csv"),
            ("default network", run_dir / "stream" / "model" / "training_log.csv"),
        ]
        if path.is_file()
    }
    if not logs:
        return "<h2>Training curves</h2>" + _missing("no training_log.csv in this run")
    fig = curves.plot_training_curves(logs)
    return "<h2>Training curves</h2>\n" + _figure_div(fig, "training-curves")


def _reproducibility_section(summary: Mapping[str, Any]) -> str:
    record = summary.get("reproducibility")
    if record is None:
        return "<h2>Reproducibility</h2>" + _missing("summary.json has no reproducibility record")
    return (
        "<h2>Reproducibility</h2>\n<p>Same parameters, seeds, threads, device and package "
        "versions repeat this run bit for bit.</p>\n" + _table(_flatten(record), ["name", "value"])
    )


def report_html(
    run_dir: str | os.PathLike[str], particles: Sequence[int] = DEFAULT_PARTICLES
) -> str:
    """The report page of ``run_dir`` (see the module docstring) as one HTML string."""
    from plotly.offline import get_plotlyjs

    folder = Path(run_dir).resolve()
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no summary.json; it is written when cryosphere run finishes "
            "(run it, or point at a finished run folder)"
        )
    summary = io.read_json(summary_path)
    title = f"CryoSphere run {folder.name}"
    parameters = summary.get("parameters", {})
    timings = summary.get("timings_s", {})
    head = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Profile <b>{html.escape(str(summary.get('profile')))}</b>, "
        f"{summary.get('total_s', 0):.0f} s of notebooks; folder "
        f"<code>{html.escape(str(folder))}</code>.</p>",
        "<h2>Parameters</h2>",
        _table(sorted(parameters.items()), ["parameter", "value"]),
        "<h2>Timings</h2>",
        _table([[step, seconds] for step, seconds in timings.items()], ["notebook", "seconds"]),
    ]
    sections = [
        _summary_sections(summary),
        _sphere_section(folder, particles),
        _curves_section(folder),
        _reproducibility_section(summary),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n"
        f'<script type="text/javascript">{get_plotlyjs()}</script>\n</head>\n<body>\n'
        + "\n".join(head + sections)
        + "\n</body>\n</html>\n"
    )


def write_report(
    run_dir: str | os.PathLike[str], particles: Sequence[int] = DEFAULT_PARTICLES
) -> Path:
    """Write ``<run_dir>/report.html`` (atomically); returns its path."""
    text = report_html(run_dir, particles)
    target = Path(run_dir) / REPORT_FILE
    with io.atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return target
