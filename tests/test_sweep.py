"""The image-count sweep on a tiny grid (8 and 16 images, one epoch, a tiny network)."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest

from cryosphere import io
from cryosphere.figures import plots
from cryosphere.imaging.datasets import SimulationParameters
from cryosphere.poses.network.model import ModelConfig
from cryosphere.poses.training import settings
from cryosphere.runs import sweep

matplotlib.use("Agg")

PARAMETERS = SimulationParameters(structure="1ubi", image_size=32, snr=1.0)
MODEL = ModelConfig(image_size=32, lmax=3, conv_channels=(4, 8), sphere_channels=4, so3_channels=4)
TRAINING = settings.TrainingConfig(epochs=1, batch_size=16, device="cpu")
SETTINGS = {
    "counts": (8, 16),
    "seeds": (0,),
    "model_config": MODEL,
    "training_config": TRAINING,
    "n_equivariance_pairs": 4,
    "progress": False,
}


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sweep_run")
    return run_dir, sweep.projection_count_sweep(run_dir, PARAMETERS, **SETTINGS)


def test_one_finite_row_per_grid_point(tiny_sweep):
    run_dir, result = tiny_sweep
    assert [(row["n"], row["seed"]) for row in result.rows] == [(8, 0), (16, 0)]
    for row in result.rows:
        assert tuple(row) == sweep.ROW_FIELDS
        assert all(math.isfinite(v) for v in row.values())
        assert row["n_train"] + row["n_validation"] == row["n"] and row["n_validation"] >= 1
        assert row["epochs"] == 1
        assert 0.0 <= row["val_acc15"] <= 1.0 and 0.0 <= row["val_median_deg"] <= 180.0
        # the network is exactly equivariant only to 90° in-plane turns; the untrained
        # one is no better out of plane than in plane
        assert row["eq_out_of_plane_random"] > row["eq_in_plane_random"]
        folder = sweep.sweep_folder(run_dir, row["n"], row["seed"])
        assert (folder / "simulation.json").is_file() and (folder / "model/checkpoint.pt").is_file()
    assert [s["n"] for s in result.summary] == [8, 16]
    assert all(s["n_seeds"] == 1 and math.isnan(s["val_median_deg_std"]) for s in result.summary)


def test_template_bank_is_shared_between_runs(tiny_sweep):
    run_dir, _ = tiny_sweep
    shared = run_dir / "sweep" / "templates" / "templates_L2.npy"
    linked = sweep.sweep_folder(run_dir, 8, 0) / "labels" / "templates_L2.npy"
    assert shared.is_file() and linked.is_file()
    assert np.array_equal(np.load(shared), np.load(linked))


def test_csv_and_json_hold_the_rows(tiny_sweep):
    run_dir, result = tiny_sweep
    assert result.csv_path == run_dir / "sweep" / "sweep.csv"
    table = pd.read_csv(result.csv_path, float_precision="round_trip")
    assert list(table.columns) == list(sweep.ROW_FIELDS)
    assert table.to_dict("records") == result.rows
    record = io.read_json(run_dir / "sweep" / "sweep.json")
    assert record["rows"] == result.rows
    assert record["summary"][0]["val_median_deg_std"] is None  # NaN -> None for one seed
    assert record["protocol"]["counts"] == [8, 16]


def test_rerun_reloads_and_same_seed_gives_same_numbers(tiny_sweep, tmp_path):
    run_dir, result = tiny_sweep
    checkpoint = sweep.sweep_folder(run_dir, 16, 0) / "model" / "checkpoint.pt"
    stamp = checkpoint.stat().st_mtime_ns
    again = sweep.projection_count_sweep(run_dir, PARAMETERS, **SETTINGS)
    assert again.rows == result.rows
    assert checkpoint.stat().st_mtime_ns == stamp  # reloaded, not retrained
    fresh = sweep.projection_count_sweep(tmp_path, PARAMETERS, **{**SETTINGS, "counts": (8,)})
    assert fresh.rows == result.rows[:1]


def test_summary_mean_std_min_max_on_a_hand_made_example():
    rows = [
        {"n": 20, "seed": 0, "val_median_deg": 10.0, "eq_in_plane_model": 1.0},
        {"n": 10, "seed": 0, "val_median_deg": 30.0, "eq_in_plane_model": 2.0},
        {"n": 20, "seed": 1, "val_median_deg": 20.0, "eq_in_plane_model": 3.0},
        {"n": 20, "seed": 2, "val_median_deg": 60.0, "eq_in_plane_model": 5.0},
    ]
    summary = sweep.summarize_sweep(rows)
    assert [s["n"] for s in summary] == [10, 20]
    ten, twenty = summary
    assert ten["n_seeds"] == 1 and ten["val_median_deg_mean"] == 30.0
    assert math.isnan(ten["val_median_deg_std"]) and ten["val_median_deg_min"] == 30.0
    assert twenty["n_seeds"] == 3
    assert twenty["val_median_deg_mean"] == pytest.approx(30.0)
    assert twenty["val_median_deg_std"] == pytest.approx(math.sqrt((400 + 100 + 900) / 2))
    assert (twenty["val_median_deg_min"], twenty["val_median_deg_max"]) == (10.0, 60.0)
    assert twenty["eq_in_plane_model_mean"] == pytest.approx(3.0)
    assert twenty["eq_in_plane_model_std"] == pytest.approx(2.0)
    assert "seed_mean" not in twenty
    only = sweep.summarize_sweep(rows, columns=["eq_in_plane_model"])
    assert "val_median_deg_mean" not in only[1] and only[1]["eq_in_plane_model_max"] == 5.0
    with pytest.raises(ValueError, match="empty"):
        sweep.summarize_sweep([])
    with pytest.raises(ValueError, match=r"lack the column\(s\) \['train_acc15'\]"):
        sweep.summarize_sweep(rows, columns=["train_acc15"])


def test_plot_draws_both_panels(tiny_sweep):
    _, result = tiny_sweep
    for spread in ("std", "range"):
        fig = plots.plot_sweep(result.summary, spread=spread)
        errors, equivariance = fig.axes
        assert len(errors.get_lines()) >= 2 and equivariance.get_yscale() == "log"
    fig = plots.plot_sweep(pd.DataFrame(result.summary))
    assert len(fig.axes) == 2
    with pytest.raises(ValueError, match="spread"):
        plots.plot_sweep(result.summary, spread="iqr")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"counts": ()}, "counts is empty"),
        ({"counts": (8, 4)}, r"counts must be >= 5, got 4 \(too few images"),
        ({"counts": (8, 16, 8)}, r"counts holds duplicates \[8\]"),
        ({"counts": (8.5,)}, "counts must hold integers"),
        ({"seeds": ()}, "seeds is empty"),
        ({"seeds": (0, 0)}, "seeds holds duplicates"),
        ({"seeds": (-1,)}, "seeds must be >= 0"),
        ({"training_config": settings.TrainingConfig(epochs=0)}, "epochs must be >= 1"),
        (
            {"training_config": settings.TrainingConfig(epochs=1, validation_fraction=0.0)},
            "validation_fraction must be > 0",
        ),
        ({"model_config": ModelConfig(image_size=64)}, "set ModelConfig\\(image_size=32\\)"),
        ({"level": 1}, "grid_level is 2 but the labels use level 1"),
        ({"q": 0.0}, r"q \(mask fraction\) must be in \(0, 1\]"),
        ({"n_equivariance_pairs": 0}, "n_equivariance_pairs must be >= 1"),
    ],
)
def test_bad_input_is_refused_before_any_work(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        sweep.projection_count_sweep(tmp_path, PARAMETERS, **{**SETTINGS, **change})
    assert not (tmp_path / "sweep").exists()
