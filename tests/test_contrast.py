"""Particle contrast (poses.contrast): dark-protein particles (CTF = −1 × RELION's, as ASPIRE
makes them) and white ones told apart against the map, a wrong forced choice gives wrong poses,
``auto`` the right ones; training records the contrast and prediction follows it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import starfile

from cryosphere import cli
from cryosphere.geometry import grids, rotations
from cryosphere.imaging import preprocess
from cryosphere.imaging.datasets import SimulationParameters
from cryosphere.imaging.simulate import save_dataset, simulate_dataset
from cryosphere.poses.network import checkpoints
from cryosphere.poses.prediction import inference
from cryosphere.poses.search import contrast, map_search
from cryosphere.poses.training import fixed_set, settings
from cryosphere.runs import refinement


@pytest.fixture(scope="module")
def white_and_dark(tmp_path_factory):
    """One shifted, CTF-modulated 32-px set of 1UBI written twice as RELION does: white
    protein (RELION's CTF) and dark protein (the same particles times −1: ASPIRE's CTF)."""
    data = simulate_dataset(
        SimulationParameters(
            n_projections=16, image_size=32, seed=6, ctf=True, max_shift_px=2.0, snr=1.0
        ),
        progress=False,
    )
    white = tmp_path_factory.mktemp("white")
    dark = tmp_path_factory.mktemp("dark")
    save_dataset(data, white)
    dark_data = dataclasses.replace(data, noisy_images=-np.asarray(data.noisy_images))
    save_dataset(dark_data, dark)
    return data, white, dark


def _model_input(data, sign):
    prepared, pixel = preprocess.prepare_images(
        sign * np.asarray(data.noisy_images), data.pixel_size, target_size=32
    )
    return prepared, pixel


def test_detection_tells_white_from_dark_and_noise_is_undecided(white_and_dark):
    """By a search of the level-1 grid and at the true poses, white particles give +, dark
    ones −, every sampled particle agreeing; pure noise gives no decision (white assumed)."""
    data, _, _ = white_and_dark
    volume = np.asarray(data.volume, np.float32)
    for sign, expected in ((1.0, "white"), (-1.0, "dark")):
        images, pixel = _model_input(data, sign)
        searched = contrast.detect_contrast(images, data.ctf, pixel, volume, max_shift_px=2)
        at_poses = contrast.detect_contrast(
            images, data.ctf, pixel, volume, rotations=data.rotations
        )
        assert searched.contrast == expected and searched.how == "map search"
        assert at_poses.contrast == expected and at_poses.how == "refined poses"
        assert np.all(np.sign(searched.correlations) == sign), searched.correlations
        assert np.all(np.sign(at_poses.correlations) == sign), at_poses.correlations
        assert expected in searched.describe() and "16 of 16" in searched.describe()
    noise = np.random.default_rng(0).normal(size=(48, 32, 32)).astype(np.float32)
    ctf = data.ctf.subset(np.arange(48) % 16)
    undecided = contrast.detect_contrast(noise, ctf, data.pixel_size, volume, max_shift_px=2)
    assert undecided.contrast == "white" and undecided.how == "undecided"
    assert "pass --contrast" in undecided.describe()
    with pytest.raises(ValueError, match="contrast must be one of"):
        contrast.forced_contrast("black")


@pytest.fixture(scope="module")
def tiny_checkpoint(white_and_dark, tmp_path_factory):
    """A 16-px level-1 network (one epoch; the map search below is exhaustive anyway)."""
    from cryosphere.poses.network.model import ModelConfig

    data, _, _ = white_and_dark
    small, _ = preprocess.prepare_images(data.noisy_images, data.pixel_size, target_size=16)
    d = rotations.geodesic_distance_deg(data.rotations[:, None], grids.healpix_so3_grid(1)[None])
    mask = (d <= np.quantile(d, 0.05, axis=1, keepdims=True)).astype(np.float32)
    config = ModelConfig(
        image_size=16, lmax=2, conv_channels=(4, 4), sphere_channels=4, so3_channels=4,
        grid_level=1,
    )  # fmt: skip
    run = tmp_path_factory.mktemp("tiny")
    return fixed_set.train_model(
        small.numpy(), mask, data.rotations, None, config,
        settings.TrainingConfig(epochs=1, batch_size=4), run_dir=run, progress=False,
    ).checkpoint  # fmt: skip


def _searched_errors(data, folder, checkpoint, out, choice):
    refine = map_search.MapRefinement(
        folder / "volume.mrc", level=2, max_shift_px=2, blur_sigma_px=0.5,
        resolution_angstrom=4 * data.pixel_size,
    )  # fmt: skip
    inference.predict_star(
        folder / "particles.star", checkpoint, out, top_k=grids.healpix_so3_grid_size(1),
        progress=False, refine=refine, contrast=choice,
    )  # fmt: skip
    table = starfile.read(out, always_dict=True)["particles"]
    got = rotations.matrices_from_relion_euler(
        table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    )
    return rotations.geodesic_distance_deg(got, data.rotations)


def test_predict_map_auto_finds_dark_particles_and_a_wrong_choice_does_not(
    white_and_dark, tiny_checkpoint, tmp_path, capsys
):
    """``predict --map`` on dark-protein particles: ``auto`` detects dark, says so on stderr
    and in the STAR file's first line, and finds the poses (median within a level-2 cell), as
    ``--contrast dark`` does; forcing ``white`` gives wrong poses. White particles: auto white."""
    data, white, dark = white_and_dark
    spacing = grids.grid_nearest_neighbour_spacing_deg(2)
    auto = _searched_errors(data, dark, tiny_checkpoint, tmp_path / "auto.star", "auto")
    assert np.median(auto) < spacing, auto
    assert "contrast dark (from the map, map search" in capsys.readouterr().err
    first = (tmp_path / "auto.star").read_text().splitlines()[0]
    assert first.startswith("# CryoSphere: contrast dark")
    assert len(starfile.read(tmp_path / "auto.star", always_dict=True)["particles"]) == 16
    forced = _searched_errors(data, dark, tiny_checkpoint, tmp_path / "dark.star", "dark")
    np.testing.assert_allclose(forced, auto)
    wrong = _searched_errors(data, dark, tiny_checkpoint, tmp_path / "white.star", "white")
    assert np.median(wrong) > 3 * spacing, wrong  # anti-correlated templates win
    good = _searched_errors(data, white, tiny_checkpoint, tmp_path / "w.star", "auto")
    assert np.median(good) < spacing, good
    assert "contrast white (from the map" in capsys.readouterr().err


def test_training_records_the_contrast_and_predict_without_a_map_follows_it(
    white_and_dark, tiny_checkpoint, tmp_path, capsys
):
    """``train`` on dark particles decides dark at the refined poses, prints it and records it
    in the checkpoint; ``predict`` without a map then takes it from there, and says that white
    is assumed for a checkpoint without a record. The training images have white protein."""
    data, _, dark = white_and_dark
    prepared = refinement.refinement_data(
        dark / "particles.star", dark / "volume.mrc", 16, progress=False
    )
    assert prepared.contrast.contrast == "dark" and prepared.contrast.how == "refined poses"
    white_prepared = refinement.refinement_data(
        dark / "particles.star", dark / "volume.mrc", 16, progress=False, contrast="white"
    )
    np.testing.assert_allclose(prepared.noisy_images, -white_prepared.noisy_images, atol=1e-5)
    argv = [
        "train", "--star", str(dark / "particles.star"), "--map", str(dark / "volume.mrc"),
        "--run-dir", str(tmp_path / "run"), "--box", "16", "--level", "1", "--epochs", "1",
        "--batch-size", "8", "--no-progress", "--encoder-channels", "4", "8",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    assert "contrast dark (from the map, refined poses" in capsys.readouterr().err
    checkpoint = tmp_path / "run" / "model" / "checkpoint.pt"
    assert contrast.recorded_contrast(checkpoint) == "dark"
    checkpoints.load_model(checkpoint)  # still a valid checkpoint
    out = tmp_path / "predicted.star"
    argv = ["predict", str(dark / "particles.star"), "--checkpoint", str(checkpoint)]
    assert cli.main([*argv, "-o", str(out), "--no-progress", "--workers", "0"]) == 0
    assert "contrast dark (recorded in the checkpoint" in out.read_text().splitlines()[0]
    assert contrast.recorded_contrast(tiny_checkpoint) is None
    plain = tmp_path / "plain.star"
    argv = ["predict", str(dark / "particles.star"), "--checkpoint", str(tiny_checkpoint)]
    assert cli.main([*argv, "-o", str(plain), "--no-progress", "--workers", "0"]) == 0
    assert "contrast white (assumed" in capsys.readouterr().err
