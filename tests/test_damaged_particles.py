"""Damaged particle data: every case refused with a one-line message naming it, nothing
written; or, where asked (``--skip-bad``), the damaged particles left out and listed."""

from __future__ import annotations

import dataclasses
import shutil
import warnings

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from cryosphere import cli
from cryosphere.geometry.grids import healpix_so3_grid, healpix_so3_grid_size
from cryosphere.imaging.datasets import SimulationParameters
from cryosphere.imaging.particles import read_particle_set
from cryosphere.imaging.simulate import save_dataset, simulate_dataset
from cryosphere.poses.network import checkpoints
from cryosphere.poses.network.model import ModelConfig
from cryosphere.poses.prediction import inference
from cryosphere.poses.training import fixed_set, settings
from cryosphere.poses.training.fixed_stream import FixedSetStream
from cryosphere.poses.training.stream import Batch
from cryosphere.poses.training.streamed import (
    NonFiniteLossError,
    StreamTrainingConfig,
    train_on_stream,
)

TINY = ModelConfig(
    image_size=16, lmax=2, conv_channels=(4, 4), sphere_channels=4, so3_channels=4, grid_level=1
)
TRAIN = ["--box", "16", "--level", "1", "--no-progress", "--encoder-channels", "4", "8"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """8 realistic 32-px particles on disk (STAR, stack, map) and a tiny checkpoint."""
    folder = tmp_path_factory.mktemp("damaged")
    data = simulate_dataset(
        SimulationParameters(n_projections=8, image_size=32, seed=3, ctf=True, snr=5.0),
        progress=False,
    )
    save_dataset(data, folder / "data")
    mask = np.zeros((8, healpix_so3_grid_size(1)), np.float32)
    mask[:, 0] = 1
    images = np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32)
    config = settings.TrainingConfig(epochs=1, batch_size=8)
    result = fixed_set.train_model(
        images, mask, data.rotations, None, TINY, config, run_dir=folder / "run", progress=False
    )
    return folder, result.checkpoint


def _copy_with_nan(folder, rows=(2,)):
    """A copy of the set whose particles ``rows`` (0-based) hold a NaN pixel."""
    target = folder / f"nan{'_'.join(map(str, rows))}"
    shutil.copytree(folder / "data", target)
    with mrcfile.open(target / "particles.mrcs", mode="r+") as mrc:
        for row in rows:
            mrc.data[row, 5, 7] = np.nan
    return target


def _predict_argv(star, checkpoint, out):
    return ["predict", str(star), "--checkpoint", str(checkpoint), "-o", str(out)] + [
        "--no-progress",
        "--workers",
        "0",
    ]


def test_nan_pixels_refused_by_predict_naming_the_particle_or_skipped(dataset, capsys):
    folder, checkpoint = dataset
    bad = _copy_with_nan(folder)
    out = bad / "predicted.star"
    assert cli.main(_predict_argv(bad / "particles.star", checkpoint, out)) == 2
    err = capsys.readouterr().err
    assert "NaN or infinite" in err and "row 3 (000003@particles.mrcs)" in err
    errors = [line for line in err.splitlines() if line.startswith("cryosphere predict:")]
    assert "--skip-bad" in err and len(errors) == 1  # one line (beside the contrast report)
    assert not out.exists() and not inference.topk_path(out).exists()
    assert cli.main([*_predict_argv(bad / "particles.star", checkpoint, out), "--skip-bad"]) == 0
    assert "left out 1 particles with NaN or infinite pixels: 000003@particles.mrcs" in (
        capsys.readouterr().out
    )
    written = starfile.read(out, always_dict=True)["particles"]
    assert len(written) == 7 and "000003@particles.mrcs" not in set(written["rlnImageName"])
    assert len(inference.load_topk(out)) == 7
    # with a map, the contrast is decided on the undamaged particles of its sample
    with_map = ["--skip-bad", "--overwrite", "--map", str(bad / "volume.mrc")]
    assert cli.main([*_predict_argv(bad / "particles.star", checkpoint, out), *with_map]) == 0
    report = capsys.readouterr().err
    assert "contrast white (from the map" in report and "undecided" not in report


def test_nan_pixels_refused_by_train_and_skipped_with_skip_bad(dataset, tmp_path, capsys):
    folder, _ = dataset
    bad = _copy_with_nan(folder, rows=(1, 4))
    run = tmp_path / "run"
    argv = ["train", "--star", str(bad / "particles.star"), "--map", str(bad / "volume.mrc")]
    argv += ["--run-dir", str(run), "--epochs", "1", "--batch-size", "4", *TRAIN]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "2 particle images with NaN or infinite pixels" in err and "000005@" in err
    assert not run.exists()
    with pytest.warns(UserWarning, match="left out 2 particles"):  # the streamed default
        assert cli.main([*argv, "--skip-bad"]) == 0
    record = checkpoints.load_checkpoint(run / "model" / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in record["model_state"].values())
    fixed = [*argv[: -len(TRAIN) - 6], "--run-dir", str(tmp_path / "fixed"), "--epochs", "1"]
    fixed += ["--batch-size", "4", *TRAIN, "--source", "fixed", "--skip-bad"]
    with pytest.warns(UserWarning, match="left out 2 particles"):
        assert cli.main(fixed) == 0
    record = checkpoints.load_checkpoint(tmp_path / "fixed" / "model" / "checkpoint.pt")
    assert record["stream_identity"]["stream"]["n_images"] == 5  # 6 kept, 1 held out


class _DamagedFrom:
    """A real stream whose batches from step ``first_bad`` on hold a NaN image."""

    def __init__(self, stream: FixedSetStream, first_bad: int):
        self.stream, self.first_bad = stream, first_bad

    def batch(self, step: int, rank: int = 0) -> Batch:
        batch = self.stream.batch(step, rank)
        if step >= self.first_bad:
            images = batch.images.clone()
            images[0, 3, 3] = float("nan")
            batch = dataclasses.replace(batch, images=images)
        return batch

    def description(self):
        return self.stream.description()


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.normal(size=(8, 16, 16)).astype(np.float32)
    targets = np.full((8, healpix_so3_grid_size(1)), 1.0 / 576, np.float32)
    rotations = healpix_so3_grid(1)[:8]
    stream = _DamagedFrom(FixedSetStream(images, targets, rotations, 4, 0), first_bad=2)
    validation = FixedSetStream(images, targets, rotations, 8, 0).batch(0)
    config = StreamTrainingConfig(steps=6, eval_every=1, warmup_steps=0)
    with pytest.raises(NonFiniteLossError) as error:
        train_on_stream(stream, TINY, config, validation, run_dir=tmp_path, progress=False)
    message = str(error.value)
    assert "training stopped at step 3" in message and "nan" in message
    assert "last good checkpoint" in message and "(step 2)" in message
    record = checkpoints.load_checkpoint(checkpoints.checkpoint_path(tmp_path))
    assert record["step"] == 2
    assert all(torch.isfinite(v).all() for v in record["model_state"].values())


def test_truncated_and_non_mrc_stacks_and_integers_in_messages(dataset, tmp_path):
    folder, _ = dataset
    shutil.copytree(folder / "data", tmp_path / "set")
    stack = tmp_path / "set" / "particles.mrcs"
    data = stack.read_bytes()
    stack.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError) as error:
        read_particle_set(tmp_path / "set" / "particles.star")
    message = str(error.value)
    assert str(stack) in message and "is truncated" in message and "8 images" in message
    assert "\n" not in message
    stack.write_text("this is a text file, not an MRC stack\n" * 40)
    with pytest.raises(ValueError, match=r"particles.mrcs is not a readable MRC stack: .*not an"):
        read_particle_set(tmp_path / "set" / "particles.star")
    shutil.copy(folder / "data" / "particles.mrcs", stack)
    table = starfile.read(tmp_path / "set" / "particles.star", always_dict=True)
    table["optics"]["rlnImageSize"] = 448
    starfile.write(table, tmp_path / "set" / "wrong_box.star")
    with pytest.raises(ValueError) as error:
        read_particle_set(tmp_path / "set" / "wrong_box.star")
    assert "rlnImageSize [448]" in str(error.value) and "np." not in str(error.value)


def test_a_library_warning_is_given_once_per_run(dataset, tmp_path):
    """A header mrcfile warns about (an unknown machine stamp) is reported once, not once
    per opening of the stack."""
    folder, checkpoint = dataset
    shutil.copytree(folder / "data", tmp_path / "set")
    with mrcfile.open(tmp_path / "set" / "particles.mrcs", mode="r+") as mrc:
        mrc.header.machst = np.frombuffer(b"\x00\x00\x00\x00", dtype="u1")
    argv = _predict_argv(tmp_path / "set" / "particles.star", checkpoint, tmp_path / "o.star")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main([*argv, "--batch-size", "2"]) == 0  # 4 batches, 4 openings
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "mrcfile" in messages[0] and "machine stamp" in messages[0]


def test_train_minutes_stops_on_the_clock(dataset, tmp_path, capsys):
    folder, _ = dataset
    data = folder / "data"
    argv = ["train", "--star", str(data / "particles.star"), "--map", str(data / "volume.mrc")]
    argv += ["--run-dir", str(tmp_path / "run"), "--steps", "100000", "--batch-size", "4"]
    assert cli.main([*argv, *TRAIN, "--minutes", "0.0001"]) == 0
    record = checkpoints.load_checkpoint(tmp_path / "run" / "model" / "checkpoint.pt")
    # the budget counts the whole command: training gets what preparation left (at least 10 %)
    assert 1 <= record["step"] < 100 and 0 < record["training_config"]["time_budget_s"] <= 0.006
    assert cli.main([*argv, *TRAIN, "--minutes", "0"]) == 2
    assert "--minutes must be positive" in capsys.readouterr().err
