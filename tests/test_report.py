"""The run report (report.html) built from a run folder laid out as the series writes it: a
real simulated dataset and labels, prediction and training-log files in their places and a
summary.json with the records notebooks 04, 06 and 08 leave."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

from cryosphere import cli, io
from cryosphere.poses.labels import dataset_labels as pose_labels
from cryosphere.poses.labels.soft_maps import soft_labels
from cryosphere.runs import execution, report
from cryosphere.runs.reproducibility import reproducibility_record

LEVEL = 1


def _write_training_logs(folder):
    (folder / "model").mkdir(parents=True, exist_ok=True)
    (folder / "model" / "training_log.csv").write_text(
        "epoch,train_loss,val_loss,val_acc15,val_median_deg,epoch_seconds\n"
        "1,0.69,0.47,0.0,123.2,0.1\n2,0.45,0.33,0.05,109.7,0.1\n3,0.31,0.29,0.12,88.5,0.1\n"
    )
    (folder / "stream" / "model").mkdir(parents=True, exist_ok=True)
    (folder / "stream" / "model" / "training_log.csv").write_text(
        "step,train_loss,val_loss,val_acc15,val_median_deg,seconds,images_seen\n"
        "3,8.77,8.86,0.0,137.2,0.52,24\n6,8.55,8.55,0.005,136.8,1.07,48\n"
    )


def _results():
    metrics = {"median_deg": 31.5, "acc15": 0.2, "acc30": 0.48, "log_likelihood": 1.3}
    rows = [
        {"predictor": p, "rotation": k, "mean": m, "min": m / 2, "max": m * 2, "n_pairs": 16}
        for p, m in (("model", 1e-4), ("random", 3e-3))
        for k in ("in_plane", "out_of_plane")
    ]
    return {
        "04_equivariance": {
            "protocol": {"n_pairs": 16},
            "rows": rows,
            "model_to_random_out_of_plane": 0.033,
            "stream": {"protocol": {}, "rows": rows, "model_to_random_out_of_plane": 0.05},
        },
        "06_pose_accuracy": {
            "validation_images": 8,
            "estimators": {"model": metrics, "uniform": {**metrics, "median_deg": 126.0}},
            "by_snr": [
                {"snr": 1.0, "model": metrics, "uniform": {**metrics, "median_deg": 120.0}},
                {"snr": 0.1, "model": metrics, "uniform": {**metrics, "median_deg": 121.0}},
            ],
        },
        "08_reconstruction": {
            "fsc_resolution_angstrom": {"true": {"0.5": 4.1, "0.143": 3.2}},
            "resolution_vs_count": {"true": {"50": 6.0, "100": 4.5}},
            "threshold": 0.5,
        },
        "02_labels": {"lam": 233.8, "q": 0.05},
    }


@pytest.fixture
def run_folder(tmp_path, small_dataset):
    """A finished run's folder: dataset, labels, predictions, training logs, summary.json."""
    from cryosphere.imaging import simulate

    folder = tmp_path / "1ubi-tiny"
    simulate.save_dataset(small_dataset, folder)
    labels = pose_labels.load_or_make_labels(folder, small_dataset, level=LEVEL, progress=False)
    broad = soft_labels(labels.mse, labels.lam / 4)  # a network less sure than the labels
    io.write_npz(folder / "stream" / "model" / "predictions.npz", probabilities=broad)
    _write_training_logs(folder)
    for step, record in _results().items():
        execution.record_results(folder, step, record)
    io.write_json(folder / "run.json", {"profile": "tiny", "parameters": {"snr": 1.0}})
    io.write_json(
        folder / "steps.json", {"02_labels": {"parameters": {}, "seconds": 3.5, "threads": 1}}
    )
    summary = execution.collect_summary(folder, reproducibility_record({"seed": 3}, 1))
    io.write_json(folder / "summary.json", summary)
    return folder


def _figure_data(page: str, div_id: str) -> list[dict]:
    """The traces passed to Plotly.newPlot for the div ``div_id``."""
    match = re.search(rf'Plotly\.newPlot\(\s*"{div_id}",\s*(\[.*?\]),\s*\{{', page, re.S)
    assert match, f"no Plotly.newPlot for {div_id}"
    return json.loads(match.group(1))


def _array(value) -> np.ndarray:
    """A plotly trace array: a JSON list or plotly's typed array ``{dtype, bdata, shape}``."""
    if isinstance(value, dict):
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        shape = [int(n) for n in str(value.get("shape", len(flat))).split(",")]
        return flat.reshape(shape)
    return np.asarray(value, dtype=np.float64)


def test_report_holds_tables_spheres_curves_and_reproducibility(run_folder, small_dataset):
    path = report.write_report(run_folder)
    page = path.read_text()
    assert path == run_folder / "report.html"
    # self-contained: plotly.js inline, nothing fetched
    assert page.count("<script") >= 5
    assert not re.search(r"<script[^>]*\bsrc=|<link[^>]*\bhref=|<img[^>]*\bsrc=", page)
    assert "https://" not in page.split("</head>")[1]  # (plotly.js names URLs it never uses here)
    # the summary tables
    assert "<td>uniform</td><td>126</td>" in page  # accuracy: estimator row, median
    assert "<td>0.1</td><td>31.5</td><td>121</td>" in page  # the SNR table
    assert "<td>model</td><td>out_of_plane</td><td>0.0001</td>" in page  # equivariance
    assert "0.033" in page and "<td>true</td><td>4.1</td><td>3.2</td>" in page  # FSC
    assert "<td>02_labels</td><td>3.5</td>" in page  # timings
    # spheres of the first particles: label and prediction of the stored distributions
    for i in report.DEFAULT_PARTICLES:
        traces = _figure_data(page, f"sphere-image{i}")
        image = next(t for t in traces if t["type"] == "heatmap")
        assert np.allclose(_array(image["z"]), small_dataset.noisy_images[i], atol=1e-5)
        assert sum(t["type"] == "scatter3d" for t in traces) >= 2
    # training curves: both logs' validation medians
    curves = _figure_data(page, "training-curves")
    medians = [_array(t["y"]) for t in curves if "median error" in t["name"]]
    assert [list(np.round(m, 1)) for m in medians] == [[123.2, 109.7, 88.5], [137.2, 136.8]]
    # the reproducibility block
    assert "<td>packages.torch</td>" in page and "<td>seeds.seed</td><td>3</td>" in page


def test_prediction_panel_shows_the_stored_probabilities(run_folder):
    """The prediction (predictions.npz: the labels at λ/4) is broader than the label: more grid
    rotations pass the scatter's display threshold; without the file only the label is drawn."""
    traces = _figure_data(report.report_html(run_folder), "sphere-image0")
    label, prediction = (len(_array(t["x"])) for t in traces if t["name"] == "grid rotations")
    assert prediction > 1.5 * label
    (run_folder / "stream" / "model" / "predictions.npz").unlink()
    labels_only = _figure_data(report.report_html(run_folder), "sphere-image0")
    assert [len(_array(t["x"])) for t in labels_only if t["name"] == "grid rotations"] == [label]


def test_report_of_a_partial_run_says_what_is_missing(tmp_path):
    folder = tmp_path / "partial"
    folder.mkdir()
    io.write_json(folder / "summary.json", {"profile": "tiny", "results": {}})
    page = report.report_html(folder)
    assert "no results/06_pose_accuracy.json" in page
    assert "no dataset and labels in this run" in page
    assert "no training_log.csv in this run" in page


def test_cli_report_rebuilds_and_refuses_a_folder_without_summary(run_folder, tmp_path, capsys):
    assert cli.main(["report", str(run_folder)]) == 0
    assert (run_folder / "report.html").stat().st_size > 1_000_000  # plotly.js inline
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2
    assert "has no summary.json" in capsys.readouterr().err
