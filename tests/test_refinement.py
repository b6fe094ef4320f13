"""Training on a consensus refinement: STAR with poses + map (cryosphere.runs.refinement)."""

from __future__ import annotations

import numpy as np
import pytest
import starfile

from cryosphere import cli, io
from cryosphere.imaging import preprocess
from cryosphere.imaging.datasets import SimulationParameters
from cryosphere.imaging.simulate import save_dataset, simulate_dataset
from cryosphere.poses.prediction import inference
from cryosphere.runs import refinement


@pytest.fixture(scope="module")
def refinement_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refinement")
    data = simulate_dataset(
        SimulationParameters(
            n_projections=16,
            image_size=32,
            seed=8,
            ctf=True,
            max_shift_px=3.0,
            snr=20.0,
            blur_sigma=0.0,
        ),
        progress=False,
    )
    save_dataset(data, folder)
    return data, folder


def _corr(a, b):
    a = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(1, keepdims=True)
    b = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(1, keepdims=True)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_refinement_images_are_recentred_and_match_their_projections(refinement_folder):
    data, folder = refinement_folder
    prepared = refinement.refinement_data(
        folder / "particles.star", folder / "volume.mrc", 16, progress=False
    )
    assert prepared.noisy_images.shape == (16, 16, 16) and prepared.volume.shape == (16,) * 3
    assert prepared.pixel_size == pytest.approx(2 * data.pixel_size)
    matched = _corr(prepared.noisy_images, prepared.clean_images)
    shuffled = _corr(prepared.noisy_images, np.roll(prepared.clean_images, 1, axis=0))
    # with the wrong origin sign the particle would sit at 2 s from the centre instead of 0
    from cryosphere.imaging.ctf import shift_images

    displaced = shift_images(prepared.clean_images, data.shifts_px / 2).numpy()  # s in 16 px
    wrong_sign = _corr(prepared.noisy_images, displaced)
    # phase-flipped, recentred particles look like the projections at their refined poses
    # (measured medians: 0.88 matched, 0.75 other particles' poses)
    assert matched.min() > 0.75 and np.median(matched) > np.median(shuffled) + 0.08
    assert np.median(matched) > np.median(wrong_sign) + 0.15  # measured 0.88 vs 0.65
    small = preprocess.fourier_crop_volume(data.volume, 16)
    assert small.sum() == pytest.approx(data.volume.sum() / 8, rel=1e-3)


def test_train_command_then_predict(refinement_folder, tmp_path, capsys):
    data, folder = refinement_folder
    argv = [
        "train", "--star", str(folder / "particles.star"), "--map", str(folder / "volume.mrc"),
        "--run-dir", str(tmp_path / "run"), "--box", "16", "--level", "1", "--epochs", "1",
        "--batch-size", "8", "--no-progress", "--encoder-channels", "4", "8",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    checkpoint = tmp_path / "run" / "model" / "checkpoint.pt"
    out = capsys.readouterr().out
    assert checkpoint.is_file() and "checkpoint" in out and "refined cell in the top 100" in out
    # the default: fresh particles from the map with the refinement's statistics; one epoch of
    # the 14 training particles (2 held out) in batches of 8 is 2 steps
    from cryosphere.poses.network import checkpoints

    record = checkpoints.load_checkpoint(checkpoint)
    stream = record["stream_identity"]["stream"]
    assert stream["kind"] == "simulated" and stream["realism"]["kind"] == "refinement"
    stats = stream["realism"]["statistics"]
    assert stats["n_particles"] == 14 and stats["contrast_sign"] == 1
    assert record["step"] == 2 and record["model_config"]["encoder"] == "resnet"
    # the refinement's own peak learning rate unless --learning-rate says otherwise (below)
    assert record["training_config"]["learning_rate"] == refinement.LEARNING_RATE == 1e-2
    validation = io.read_json(tmp_path / "run" / "validation.json")
    assert validation["n_validation"] == 2 and validation["source"] == "stream"
    assert 0 <= validation["final"]["val_topk_hit"] <= 1 and validation["final"]["top_k"] == 100
    assert len(validation["history"]) == 2  # one row per evaluation, also in training_log.csv
    # the refinement states origins: its held-out particles are also scored as picked
    picked = validation["picked"]
    assert 0 <= picked["val_topk_hit"] <= 1 and 0 <= picked["val_median_deg"] <= 180
    assert "the same particles as picked (origins ignored): median" in out
    assert (tmp_path / "run" / "refinement_statistics.json").is_file()
    # --minutes: a budget for the whole command; a second call resumes the same run
    timed = [str(tmp_path / "timed") if a == str(tmp_path / "run") else a for a in argv]
    at = timed.index("--epochs")
    timed = timed[:at] + timed[at + 2 :] + ["--minutes", "0.3"]
    assert cli.main(timed) == 0 and cli.main(timed) == 0
    timed_record = checkpoints.load_checkpoint(tmp_path / "timed" / "model" / "checkpoint.pt")
    assert timed_record["step"] >= 1 and timed_record["train_seconds"] < 0.3 * 60 * 1.5
    # the fixed set of real images: no fresh noise, no in-plane turns, no statistics
    # (and a C2 particle's validation: every mate of a refined pose counts)
    capsys.readouterr()
    fixed_argv = argv[:6] + [str(tmp_path / "fixed")] + argv[7:] + ["--source", "fixed"]
    options = ["--sym", "c2", "--lmax", "2", "--learning-rate", "3e-3", "--so3-channels", "4"]
    assert cli.main(fixed_argv + options) == 0
    assert "refined poses (C2): median" in capsys.readouterr().out
    assert io.read_json(tmp_path / "fixed" / "validation.json")["symmetry"] == "C2"
    fixed = checkpoints.load_checkpoint(tmp_path / "fixed" / "model" / "checkpoint.pt")
    stream = fixed["stream_identity"]["stream"]
    assert stream["kind"] == "fixed" and stream["n_images"] == 14
    assert fixed["model_config"]["lmax"] == 2 and record["model_config"]["lmax"] == 4
    assert fixed["training_config"]["learning_rate"] == 3e-3
    assert (
        fixed["model_config"]["so3_channels"] == 4 and record["model_config"]["so3_channels"] == 16
    )
    assert not stream["fresh_noise"] and not stream["in_plane"]
    assert not (tmp_path / "fixed" / "refinement_statistics.json").exists()
    summary = inference.predict_star(
        folder / "particles.star", checkpoint, folder / "pred.star", progress=False
    )
    assert summary.n_images == 16
    # the envelope measured against this map is recorded for predict --map, for this file only
    from cryosphere.poses.search.map_search import recorded_map_envelope

    measured = io.read_json(tmp_path / "run" / "refinement_statistics.json")["blur_sigma_px"]
    assert recorded_map_envelope(checkpoint, folder / "volume.mrc") == measured
    other = tmp_path / "other.mrc"
    io.write_map(other, data.volume * 1.01, data.pixel_size)
    assert recorded_map_envelope(checkpoint, other) is None
    # the same map saved again, by another program (another header label): still this map
    import mrcfile

    resaved = tmp_path / "resaved.mrc"
    io.write_map(resaved, io.read_map(folder / "volume.mrc")[0], data.pixel_size)
    with mrcfile.open(resaved, mode="r+") as handle:
        handle.header.label[0] = b"saved by another program"
    assert resaved.read_bytes() != (folder / "volume.mrc").read_bytes()
    assert recorded_map_envelope(checkpoint, resaved) == measured
    rescaled = tmp_path / "rescaled.mrc"  # the same voxels at another voxel size: another map
    io.write_map(rescaled, io.read_map(folder / "volume.mrc")[0], data.pixel_size * 1.01)
    assert recorded_map_envelope(checkpoint, rescaled) is None
    assert recorded_map_envelope(tmp_path / "fixed" / "model" / "checkpoint.pt", other) is None
    capsys.readouterr()
    searched = tmp_path / "searched.star"
    assert cli.main(["predict", str(folder / "particles.star"), "--checkpoint", str(checkpoint),
                     "-o", str(searched), "--map", str(folder / "volume.mrc"),
                     "--no-progress"]) == 0  # fmt: skip
    assert f"blurred by {measured:g} px, the envelope training measured" in capsys.readouterr().err
    # the 16-px network proposes, the map decides at the particles' 32 px: the envelope's
    # width in Å is kept (twice the px), the origins are written in Å as before
    assert recorded_map_envelope(checkpoint, folder / "volume.mrc", 32) == 2 * measured
    full_box = tmp_path / "searched32.star"
    assert cli.main(["predict", str(folder / "particles.star"), "--checkpoint", str(checkpoint),
                     "-o", str(full_box), "--map", str(folder / "volume.mrc"), "--search-box",
                     "32", "--max-shift", "2", "--no-progress"]) == 0  # fmt: skip
    assert f"blurred by {2 * measured:g} px" in capsys.readouterr().err
    side = np.load(inference.topk_path(full_box))
    table = starfile.read(full_box, always_dict=True)["particles"]
    origins = table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
    np.testing.assert_allclose(side["shift_px"] * data.pixel_size, origins, atol=1e-4)
    assert cli.main(["predict", str(folder / "particles.star"), "--checkpoint", str(checkpoint),
                     "-o", str(tmp_path / "no.star"), "--map", str(folder / "volume.mrc"),
                     "--search-box", "64", "--no-progress"]) == 2  # fmt: skip
    assert "cannot upsample" in capsys.readouterr().err and not (tmp_path / "no.star").exists()


def test_validation_reads_particles_as_picked_when_asked(refinement_folder):
    """``read_prepared(centre=False)``: the stack as boxed, its origins ignored (what
    ``validation.json``'s ``"picked"`` scores); by default each particle is recentred."""
    from cryosphere.imaging.ctf import shift_images
    from cryosphere.imaging.loader import read_prepared
    from cryosphere.imaging.particles import StackReader, read_particle_set

    data, folder = refinement_folder
    pset = read_particle_set(folder / "particles.star", require_angles=True)
    rows = np.arange(6)
    assert np.abs(pset.origins_angstrom[rows]).max() > 0.5 * data.pixel_size
    picked, kept, pixel = read_prepared(pset, rows, 16, centre=False)
    centred, _, _ = read_prepared(pset, rows, 16)
    with StackReader(pset) as reader:
        raw = reader.read(rows)
    ctf = pset.ctf.subset(rows)
    as_boxed, _ = preprocess.prepare_images(raw, data.pixel_size, target_size=16, ctf=ctf)
    np.testing.assert_allclose(picked.numpy(), as_boxed.numpy(), atol=1e-5)
    shift = pset.origins_angstrom[rows] / data.pixel_size
    moved = shift_images(raw, shift)
    recentred, _ = preprocess.prepare_images(moved, data.pixel_size, target_size=16, ctf=ctf)
    np.testing.assert_allclose(centred.numpy(), recentred.numpy(), atol=1e-4)
    assert np.abs(picked.numpy() - centred.numpy()).max() > 0.1
    assert kept.tolist() == rows.tolist() and pixel == pytest.approx(2 * data.pixel_size)


def test_refinement_input_errors_write_nothing(refinement_folder, tmp_path, capsys):
    data, folder = refinement_folder
    table = starfile.read(folder / "particles.star", always_dict=True)
    table["particles"] = table["particles"].drop(columns=["rlnAngleRot"])
    starfile.write(table, folder / "no_angles.star")
    io.write_map(tmp_path / "coarse.mrc", data.volume, data.pixel_size * 2)
    io.write_map(tmp_path / "small.mrc", data.volume[:16, :16, :16], data.pixel_size)
    cases = [
        (folder / "no_angles.star", folder / "volume.mrc", "no rlnAngleRot"),
        (folder / "particles.star", tmp_path / "coarse.mrc", "voxel size"),
        (folder / "particles.star", tmp_path / "small.mrc", "16 voxels wide"),
    ]
    for star, volume, message in cases:
        run = tmp_path / "bad"
        argv = ["train", "--star", str(star), "--map", str(volume), "--run-dir", str(run)]
        options = ["--box", "16", "--level", "1", "--no-progress", "--encoder-channels", "4", "8"]
        assert cli.main(argv + options) == 2
        assert message in capsys.readouterr().err
        assert not run.exists()
    argv = ["train", "--star", str(folder / "particles.star"), "--map", str(folder / "volume.mrc")]
    assert cli.main(argv + ["--run-dir", str(run), "--symmetry", "X5"] + options) == 2
    assert "unknown point group 'X5'" in capsys.readouterr().err and not run.exists()


def test_labels_refuse_a_ctf_dataset_and_refinement_data_gives_the_right_ones(refinement_folder):
    from cryosphere.poses.labels import dataset_labels

    data, folder = refinement_folder
    with pytest.raises(ValueError, match="CTF or shifts"):
        dataset_labels.compute_labels(data, level=1, progress=False)
    prepared = refinement.refinement_data(
        folder / "particles.star", folder / "volume.mrc", 32, progress=False
    )
    made = dataset_labels.compute_labels(prepared, level=1, progress=False)
    from cryosphere.geometry import grids, rotations

    grid = grids.healpix_so3_grid(1)
    nearest = rotations.geodesic_distance_deg(data.rotations[:, None], grid[None]).argmin(axis=1)
    assert made.mask[np.arange(16), nearest].mean() > 0.9  # the true cell is in the mask
