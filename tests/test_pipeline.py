"""The pipeline layer (cryosphere.runs.pipeline): RunConfig, Run and the one cache rule."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from cryosphere import io
from cryosphere.poses.network import checkpoints
from cryosphere.runs import pipeline
from cryosphere.runs.pipeline import Run, StageMismatchError
from cryosphere.runs.run_config import PROFILES, RunConfig

STREAM = dict(stream_steps=4, stream_batch_size=8, stream_channels=[8, 16], stream_snr=[0.5, 1.0])


@pytest.fixture(scope="module")
def tiny_config(tiny_run) -> RunConfig:
    return RunConfig.from_profile("tiny", {**tiny_run, **STREAM})


@pytest.fixture(scope="module")
def made_run(tmp_path_factory, tiny_config) -> Run:
    """A run folder with all four stages made once (copied by the tests that change it)."""
    run = Run(tiny_config, tmp_path_factory.mktemp("made"), progress=False)
    run.trained()
    run.streamed()
    return run


def _copy(run: Run, tmp_path) -> str:
    folder = tmp_path / "copy"
    shutil.copytree(run.folder, folder)
    return folder


def test_profiles_flat_names_and_seed_coupling():
    tiny = RunConfig.from_profile("tiny")
    assert tiny.simulation.n_projections == 64 and tiny.stream.steps == 1000
    assert RunConfig.from_flat(tiny.to_flat()) == tiny  # flat round trip
    for name, values in PROFILES.items():
        config = RunConfig.from_profile(name)
        assert {k: config.to_flat()[k] for k in values} == values
    reseeded = tiny.replace(seed=7)
    assert reseeded.simulation.seed == 7 and reseeded.training.seed == 7
    assert tiny.model.image_size == 32 and tiny.model.grid_level == tiny.labels.grid_level
    with pytest.raises(ValueError, match="unknown run parameter.*'n_images'.*valid names"):
        tiny.replace(n_images=5)
    with pytest.raises(ValueError, match="unknown profile 'fast'.*paper"):
        RunConfig.from_profile("fast")
    with pytest.raises(ValueError, match=r"q \(mask fraction\) must be in \(0, 1\]"):
        tiny.replace(q=1.5)


def test_run_makes_records_and_reloads_every_stage(made_run, tiny_config):
    records = io.read_json(made_run.layout.stages)
    assert set(records) == {"dataset", "labels", "model", "stream"}
    assert all(records[s]["key"] == made_run.stage_key(s) for s in records)
    checkpoint = checkpoints.checkpoint_path(made_run.folder)
    stamps = [checkpoint.stat().st_mtime_ns, (made_run.layout.stream / "model").stat().st_mtime_ns]
    again = Run(tiny_config, made_run.folder, progress=False)
    trained, streamed = again.trained(), again.streamed()
    assert stamps[0] == checkpoint.stat().st_mtime_ns  # reloaded, not retrained
    np.testing.assert_array_equal(trained.predictions.logits, made_run.trained().predictions.logits)
    np.testing.assert_array_equal(
        streamed.predictions.logits, made_run.streamed().predictions.logits
    )
    assert trained.training_config.seed == tiny_config.simulation.seed


@pytest.mark.parametrize(
    ("stage", "change", "named", "method"),
    [
        ("dataset", {"snr": 0.5}, "snr: 1.0 -> 0.5", "dataset"),
        ("labels", {"q": 0.1}, "q: 0.05 -> 0.1", "labels"),
        ("model", {"epochs": 3}, "'epochs': 2", "trained"),
        ("stream", {"stream_steps": 5}, "'steps': 4", "streamed"),
    ],
)
def test_a_stage_made_with_other_parameters_is_refused_before_anything_is_written(
    made_run, tmp_path, stage, change, named, method
):
    folder = _copy(made_run, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    run = Run(made_run.config.replace(**change), folder, progress=False)
    with pytest.raises(StageMismatchError, match=f"holds a {stage} stage") as error:
        getattr(run, method)()
    assert named in str(error.value) and "overwrite=True" in str(error.value)
    assert isinstance(error.value, FileExistsError)
    after = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    assert after == before


def test_overwrite_recomputes_the_stage_and_the_stages_that_read_it(made_run, tmp_path):
    folder = _copy(made_run, tmp_path)
    changed = made_run.config.replace(q=0.1)
    run = Run(changed, folder, overwrite=True, progress=False)
    labels = run.labels()
    assert labels.q == 0.1
    records = io.read_json(run.layout.stages)
    assert set(records) == {"dataset", "labels", "stream"}  # the model read the old labels
    assert not run.layout.model.exists() and run.layout.stream.exists()
    assert records["labels"]["key"] == run.stage_key("labels")
    assert run.stage_key("dataset") == made_run.stage_key("dataset")


def test_overwrite_of_the_dataset_remakes_it_and_clears_every_later_stage(made_run, tmp_path):
    folder = _copy(made_run, tmp_path)
    assert all(p.is_file() for p in made_run.layout.dataset[:6])  # the files the layout names
    run = Run(made_run.config.replace(snr=0.5), folder, overwrite=True, progress=False)
    assert run.dataset().parameters.snr == 0.5
    assert set(io.read_json(run.layout.stages)) == {"dataset"}
    assert not run.layout.model.exists() and not run.layout.stream.exists()
    assert not (run.layout.labels / "labels.npz").exists()
    reloaded = Run(made_run.config.replace(snr=0.5), folder, progress=False).dataset()
    assert reloaded.parameters.snr == 0.5


def test_stage_keys_follow_their_inputs(tiny_config, tmp_path):
    base, other = Run(tiny_config, tmp_path), Run(tiny_config.replace(snr=0.5), tmp_path)
    assert all(base.stage_key(s) != other.stage_key(s) for s in pipeline.STAGE_INPUTS)
    longer = Run(tiny_config.replace(epochs=9), tmp_path)
    assert longer.stage_key("labels") == base.stage_key("labels")
    assert longer.stage_key("model") != base.stage_key("model")
    with pytest.raises(ValueError, match="unknown stage"):
        base.stage_key("figures")


def test_an_explicit_device_reaches_simulation_templates_and_labels(tmp_path, monkeypatch):
    """The device path (tensors moved to ``device``, results moved back) on the CPU: the
    same numbers as the default path, and Run passes its device to every stage that takes one."""
    from cryosphere.imaging import datasets, simulate
    from cryosphere.poses.labels import dataset_labels, landscape, templates

    parameters = datasets.SimulationParameters(n_projections=6, image_size=32, seed=2)
    default = simulate.simulate_dataset(parameters, progress=False)
    on_cpu = simulate.simulate_dataset(parameters, progress=False, device="cpu")
    scale = float(np.abs(default.clean_images).max())
    np.testing.assert_allclose(on_cpu.noisy_images, default.noisy_images, rtol=0, atol=1e-6 * scale)
    bank = templates.dataset_templates(default, 1)
    bank_cpu = templates.dataset_templates(default, 1, device=torch.device("cpu"))
    np.testing.assert_allclose(bank_cpu, bank, rtol=0, atol=1e-6 * scale)
    mse = landscape.mse_landscape(default.clean_images, bank)
    np.testing.assert_allclose(
        landscape.mse_landscape(default.clean_images, bank, device="cpu"), mse, rtol=1e-5, atol=0
    )
    assert np.array_equal(
        landscape.template_matching(default.noisy_images, bank, device="cpu"),
        landscape.template_matching(default.noisy_images, bank),
    )
    seen = []
    original = landscape.mse_landscape

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device"))
        return original(*args, **kwargs)

    monkeypatch.setattr(dataset_labels, "mse_landscape", spy)
    config = RunConfig.from_profile("tiny").replace(n_projections=6, seed=2, grid_level=1)
    run = Run(config, tmp_path, progress=False, device="cpu")
    np.testing.assert_allclose(
        run.dataset().noisy_images, on_cpu.noisy_images, rtol=0, atol=1e-6 * scale
    )
    assert run.labels().mse.shape == (6, 576) and seen == ["cpu"]
