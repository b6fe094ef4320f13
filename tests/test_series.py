"""The series' shared steps in one call (cryosphere.runs.series)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import train_tiny_run

from cryosphere.poses.network import checkpoints
from cryosphere.runs import series


def test_one_call_makes_then_reloads_the_same_run(tmp_path, tiny_run):
    first = train_tiny_run(tmp_path, progress=False, **tiny_run)
    assert len(first.dataset) == 12 and first.labels.level == 1
    assert first.predictions.probabilities.shape == (12, 576)
    assert len(first.result.history) == 2 and first.training_config.seed == 4
    assert first.model_config.image_size == 32 and first.model_config.lmax == 2
    checkpoint = checkpoints.checkpoint_path(tmp_path)
    stamp = checkpoint.stat().st_mtime_ns
    again = train_tiny_run(tmp_path, progress=False, **tiny_run)
    assert checkpoint.stat().st_mtime_ns == stamp  # reloaded, not retrained
    np.testing.assert_array_equal(again.predictions.logits, first.predictions.logits)
    np.testing.assert_array_equal(again.labels.mask, first.labels.mask)


def test_a_folder_made_with_other_parameters_is_refused(tmp_path, tiny_run):
    train_tiny_run(tmp_path, progress=False, **tiny_run)
    with pytest.raises(FileExistsError, match="other parameters"):
        train_tiny_run(tmp_path, progress=False, **{**tiny_run, "snr": 0.5})


def test_streamed_model_trains_predicts_the_run_images_and_reloads(tmp_path, tiny_run):
    run = train_tiny_run(tmp_path, progress=False, **tiny_run)
    kwargs = dict(steps=6, batch_size=8, lmax=2, channels=(8, 16), grid_level=1, seed=4)
    first = series.load_or_train_stream(
        tmp_path, run.dataset, validation_size=16, progress=False, **kwargs
    )
    checkpoint = checkpoints.checkpoint_path(first.folder)
    assert checkpoint.is_file() and (first.folder / "model" / "predictions.npz").is_file()
    assert (first.folder / "model" / "predicted_particles.star").is_file()
    assert first.result.steps_done == 6 and first.result.images_seen == 48
    assert first.predictions.probabilities.shape == (12, 576)
    assert first.model_config.encoder == "resnet" and first.stream_config.snr == 1.0
    stamp = checkpoint.stat().st_mtime_ns
    again = series.load_or_train_stream(
        tmp_path, run.dataset, validation_size=16, progress=False, **kwargs
    )
    assert checkpoint.stat().st_mtime_ns == stamp  # a finished run is reloaded, not retrained
    np.testing.assert_array_equal(again.predictions.logits, first.predictions.logits)
    assert checkpoints.load_model(checkpoint).config == first.model_config
