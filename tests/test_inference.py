"""`cryosphere predict`: STAR + stacks in, STAR with predicted poses out (poses.inference)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryosphere import cli
from cryosphere.geometry import grids, rotations
from cryosphere.imaging.datasets import SimulationParameters
from cryosphere.imaging.simulate import save_dataset, simulate_dataset
from cryosphere.poses.network import checkpoints
from cryosphere.poses.network.model import ModelConfig
from cryosphere.poses.prediction import inference, predictions
from cryosphere.poses.training import fixed_set, settings

TINY = ModelConfig(
    image_size=16, lmax=2, conv_channels=(4, 4), sphere_channels=4, so3_channels=4, grid_level=1
)


@pytest.fixture(scope="module")
def particle_run(tmp_path_factory):
    """A 32-px realistic set on disk and a 16-px model checkpoint trained for one epoch."""
    folder = tmp_path_factory.mktemp("predict")
    data = simulate_dataset(
        SimulationParameters(
            n_projections=12, image_size=32, seed=6, ctf=True, max_shift_px=2.0, snr=1.0
        ),
        progress=False,
    )
    save_dataset(data, folder / "data")
    from cryosphere.imaging import preprocess

    small, _ = preprocess.prepare_images(data.noisy_images, data.pixel_size, target_size=16)
    G = grids.healpix_so3_grid_size(1)
    d = rotations.geodesic_distance_deg(data.rotations[:, None], grids.healpix_so3_grid(1)[None])
    mask = (d <= np.quantile(d, 0.05, axis=1, keepdims=True)).astype(np.float32)
    assert mask.shape == (12, G)
    result = fixed_set.train_model(
        small.numpy(),
        mask,
        data.rotations,
        None,
        TINY,
        settings.TrainingConfig(epochs=1, batch_size=4),
        run_dir=folder / "run",
        progress=False,
    )
    return data, folder, result.checkpoint


def test_predict_star_writes_every_column_and_the_poses(particle_run):
    data, folder, checkpoint = particle_run
    star_in = folder / "data" / "particles.star"
    out = folder / "data" / "predicted.star"
    summary = inference.predict_star(
        star_in, checkpoint, out, batch_size=5, top_k=4, progress=False
    )
    assert summary.n_images == 12 and summary.star == out and summary.images_per_s > 0
    before = starfile.read(star_in, always_dict=True)
    after = starfile.read(out, always_dict=True)
    # values kept (9 significant digits: 300.0 is written "300", read back as an integer)
    pd.testing.assert_frame_equal(after["optics"], before["optics"], check_dtype=False)
    new = {"rlnMaxValueProbDistribution", inference.SPREAD_COLUMN}
    assert set(after["particles"].columns) == set(before["particles"].columns) | new
    unchanged = [c for c in before["particles"] if not c.startswith("rlnAngle")]
    pd.testing.assert_frame_equal(
        after["particles"][unchanged], before["particles"][unchanged], check_dtype=False
    )
    # the written angles are those of the network's own prediction on the same preprocessing:
    # each particle recentred by its origin (-shift), as train does, then prepared
    from cryosphere.imaging import ctf as ctf_module
    from cryosphere.imaging import preprocess

    model = checkpoints.load_model(checkpoint)
    centred = ctf_module.shift_images(data.noisy_images, -data.shifts_px)
    prepared, _ = preprocess.prepare_images(centred, data.pixel_size, target_size=16, ctf=data.ctf)
    expected = predictions.predict(model, prepared.numpy())
    got = rotations.matrices_from_relion_euler(
        after["particles"][["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    )
    assert rotations.geodesic_distance_deg(got, expected.best_rotation).max() < 1e-3
    np.testing.assert_allclose(
        after["particles"]["rlnMaxValueProbDistribution"], expected.best_probability, atol=1e-5
    )
    side = np.load(inference.topk_path(out))
    assert side["top_index"].shape == (12, 4) and side["top_angles_deg"].shape == (12, 4, 3)
    np.testing.assert_array_equal(side["top_index"][:, 0], expected.best_index)
    assert np.all(np.diff(side["top_probability"], axis=1) <= 0)
    spread = after["particles"][inference.SPREAD_COLUMN].to_numpy()
    assert np.all((spread >= 0) & (spread <= 180))


def test_angular_spread_is_zero_for_a_sharp_distribution_and_grows_when_spread():
    grid = grids.healpix_so3_grid(1)
    top = np.array([[0, 1, 2], [0, 1, 2]])
    sharp = np.array([[1.0, 0.0, 0.0], [0.4, 0.3, 0.3]])
    spread = inference.angular_spread_deg(grid, top, sharp)
    assert spread[0] == 0.0
    d = rotations.geodesic_distance_deg(grid[[0, 0]], grid[[1, 2]])
    assert spread[1] == pytest.approx(np.sqrt(0.3 * d[0] ** 2 + 0.3 * d[1] ** 2), rel=1e-6)


def test_predict_command_line_and_bad_input_write_nothing(particle_run, tmp_path, capsys):
    data, folder, checkpoint = particle_run
    star_in = folder / "data" / "particles.star"
    out = folder / "data" / "cli.star"
    code = cli.main(
        [
            "predict", str(star_in), "--checkpoint", str(checkpoint), "-o", str(out),
            "--no-progress", "--batch-size", "7",
        ]
    )  # fmt: skip
    assert code == 0 and out.is_file() and inference.topk_path(out).is_file()
    assert "12 particles" in capsys.readouterr().out
    searched = folder / "data" / "cli_map.star"
    code = cli.main(
        [
            "predict", str(star_in), "--checkpoint", str(checkpoint), "-o", str(searched),
            "--no-progress", "--map", str(folder / "data" / "volume.mrc"), "--search-level",
            "2", "--max-shift", "1", "--keep", "4", "--resolution", "4", "--prescreen", "20",
            "--prescreen-resolution", "6",
        ]
    )  # fmt: skip
    assert code == 0
    assert "rlnOriginXAngst" in starfile.read(searched, always_dict=True)["particles"]
    assert int(np.load(inference.topk_path(searched))["refine_level"]) == 2
    assert np.load(inference.topk_path(searched))["top_index"].shape[1] == 100  # --map's default
    assert np.load(inference.topk_path(out))["top_index"].shape[1] == 10
    # bad requests: clear message, exit 2, nothing written
    bad = folder / "data" / "bad.star"
    cases = [
        ([str(folder / "nothing.star")], "no STAR file"),
        ([str(star_in), "--crop", "8"], "crop size"),
        ([str(star_in), "--checkpoint", str(tmp_path / "none.pt")], "no checkpoint"),
        ([str(star_in), "--map", str(tmp_path / "none.mrc")], "none.mrc"),
        ([str(star_in), "--map", str(star_in), "--max-shift", "-1"], "max_shift_px"),
        ([str(star_in), "--map", str(star_in), "--resolution", "0"], "resolution_angstrom"),
        ([str(star_in), "--map", str(star_in), "--classical-cells", "-1"], "classical_cells"),
        ([str(star_in), "--map", str(star_in), "--prescreen", "0"], "prescreen_keep"),
        ([str(star_in), "--map", str(star_in), "--map-blur", "-1"], "blur_sigma_px"),
    ]
    for extra, message in cases:
        argv = ["predict", *extra[:1], "--checkpoint", str(checkpoint), "-o", str(bad)]
        argv += extra[1:]
        assert cli.main(argv + ["--no-progress"]) == 2
        assert message in capsys.readouterr().err
        assert not bad.exists() and not inference.topk_path(bad).exists()
    with pytest.raises(FileExistsError, match="input STAR"):
        inference.predict_star(star_in, checkpoint, star_in, progress=False)
    plain = starfile.read(star_in, always_dict=True)
    plain["particles"].loc[0, "rlnImageName"] = "99@particles.mrcs"
    starfile.write(plain, folder / "data" / "past.star")
    with pytest.raises(ValueError, match="image 99"):
        inference.predict_star(folder / "data" / "past.star", checkpoint, bad, progress=False)
    assert not bad.exists()


def test_heatmap_of_any_predicted_particle_from_the_star_and_side_file(particle_run):
    from cryosphere.figures import predicted

    data, folder, checkpoint = particle_run
    out = folder / "data" / "for_heatmap.star"
    inference.predict_star(folder / "data" / "particles.star", checkpoint, out, top_k=5,
                           progress=False)  # fmt: skip
    topk = inference.load_topk(out)
    assert len(topk) == 12 and topk.rotations().shape == (12, 5, 3, 3)
    np.testing.assert_allclose(topk.weights().sum(1), 1.0, rtol=1e-12)
    assert topk.searched_index is None
    with pytest.raises(ValueError, match="holds no map search"):
        topk.searched_weights()
    view = predicted.predicted_particle_view(out, 7, data.rotations[7], data.symmetry_ops)
    # the scatter shows the particle's top cells, most probable first, renormalised over them
    np.testing.assert_array_equal(view.cells[:1], topk.index[7, :1])
    assert set(view.cells) <= set(topk.index[7])
    assert view.probability[0] == pytest.approx(topk.weights()[7, 0], rel=1e-6)
    assert np.allclose(view.marker_directions[0], data.rotations[7][2])
    figure = predicted.plot_predicted_particle(out, 7)
    assert "particle 7" in figure.layout.title.text
    with pytest.raises(IndexError, match="out of range"):
        predicted.predicted_particle_view(out, 12)
    with pytest.raises(FileNotFoundError, match="top-k side file"):
        predicted.predicted_particle_view(folder / "data" / "particles.star", 0)


def test_bf16_prediction_keeps_the_float32_distribution_within_bfloat16_rounding(particle_run):
    """bfloat16 rounds to 2^-8 relative (u). Through the network's few layers the logits move
    by a few u · max|logit| (measured ≈ 2.3 u); allow 8 u. A top cell whose float32 lead over
    the next exceeds twice that stays on top, and p = exp(l − logsumexp) moves by at most the
    factor exp(2 · 8 u · max|logit|)."""
    data, folder, checkpoint = particle_run
    star_in = folder / "data" / "particles.star"
    full, half = folder / "data" / "f32.star", folder / "data" / "bf16.star"
    inference.predict_star(star_in, checkpoint, full, top_k=4, progress=False)
    inference.predict_star(star_in, checkpoint, half, top_k=4, progress=False, bf16=True)
    a, b = np.load(inference.topk_path(full)), np.load(inference.topk_path(half))
    assert b["top_probability"].dtype == np.float32 and np.all(np.isfinite(b["top_probability"]))
    from cryosphere.imaging import preprocess

    model = checkpoints.load_model(checkpoint)
    images, _ = preprocess.prepare_images(
        data.noisy_images, data.pixel_size, target_size=16, ctf=data.ctf
    )
    with torch.inference_mode():
        l32 = model.logits_from_coefficients(model.coefficients(images))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            l16 = model.logits_from_coefficients(model.coefficients(images)).float()
    shift = 8 * 2.0**-8 * float(l32.abs().max())
    assert float((l16 - l32).abs().max()) <= shift
    lead = (torch.topk(l32, 2, dim=1).values @ torch.tensor([1.0, -1.0])).numpy()
    clear = lead > 2 * shift
    assert np.array_equal(a["top_index"][clear, 0], b["top_index"][clear, 0])
    same = a["top_index"][:, 0] == b["top_index"][:, 0]
    ratio = b["top_probability"][same, 0] / a["top_probability"][same, 0]
    assert np.all(np.abs(np.log(ratio)) <= 2 * shift)


def test_predict_with_the_map_searches_the_top_cells_and_writes_pose_and_origin(particle_run):
    """With every coarse cell kept, the search over their level-2 children is exhaustive
    template matching with CTF and shifts: at SNR 1 it finds each particle's pose within a
    level-2 cell and the origin that centres it; the network's cells and probabilities stay
    in the side file; a finer search level than 3 or a map of another box is refused."""
    from cryosphere.poses.search import map_search

    data, folder, checkpoint = particle_run
    star_in = folder / "data" / "particles.star"
    out = folder / "data" / "refined.star"
    model_pixel = data.pixel_size * 2  # 32 px Fourier-cropped to the model's 16 px
    refine = map_search.MapRefinement(
        folder / "data" / "volume.mrc", level=2, max_shift_px=2, blur_sigma_px=0.5,
        resolution_angstrom=2 * model_pixel,  # Nyquist: every frequency, as exhaustive matching
    )  # fmt: skip
    G = grids.healpix_so3_grid_size(1)
    inference.predict_star(
        star_in, checkpoint, out, top_k=G, batch_size=5, progress=False, refine=refine
    )
    after = starfile.read(out, always_dict=True)["particles"]
    before = starfile.read(star_in, always_dict=True)["particles"]
    got = rotations.matrices_from_relion_euler(
        after[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    )
    errors = predictions.pose_errors_deg(got, data.rotations, data.symmetry_ops)
    assert np.median(errors) < grids.grid_nearest_neighbour_spacing_deg(2), errors
    origins = after[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
    truth = before[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
    assert np.median(np.abs(origins - truth)) <= model_pixel  # within one search step
    side = np.load(inference.topk_path(out))
    assert int(side["refine_level"]) == 2 and side["shift_px"].shape == (12, 2)
    assert side["top_index"].shape == (12, G)
    parent = grids.nearest_grid_indices(
        grids.healpix_so3_grid(2)[side["refined_index"]], grids.healpix_so3_grid(1)
    )
    expected = side["top_probability"][side["top_index"] == parent[:, None]]
    # the STAR file holds 6 decimals: the network's probability in its own column, the search
    # posterior's probability of the written pose in RELION's
    np.testing.assert_allclose(after[inference.NETWORK_PROBABILITY_COLUMN], expected, atol=5e-7)
    kept = side["searched_probability"]
    np.testing.assert_allclose(after["rlnMaxValueProbDistribution"], kept[:, 0], atol=5e-7)
    # the search's posterior: its most probable candidates first, the written pose first
    assert side["searched_index"].shape == (12, inference.SEARCHED_KEPT)
    np.testing.assert_array_equal(side["searched_index"][:, 0], side["refined_index"])
    np.testing.assert_array_equal(side["searched_shift_px"][:, 0], side["shift_px"])
    # the side file's shifts are whole origins (the input's stated ones included), px of the
    # network's box: the STAR file's origins divided by its pixel size
    assert np.abs(truth).max() > 1.0  # Å: the input states origins
    np.testing.assert_allclose(side["shift_px"] * model_pixel, origins, atol=1e-4)
    assert np.all(np.diff(kept, axis=1) <= 0) and np.all(kept <= 1) and np.all(kept[:, 0] > 0)
    topk = inference.load_topk(out)
    np.testing.assert_allclose(topk.searched_weights().sum(axis=1), 1.0)
    assert topk.searched_rotations().shape == (12, inference.SEARCHED_KEPT, 3, 3)
    # coarse to fine: the children of the best 8 top cells only; as good here
    import dataclasses

    fine = folder / "data" / "refined_fine.star"
    inference.predict_star(
        star_in, checkpoint, fine, top_k=G, batch_size=5, progress=False,
        refine=dataclasses.replace(refine, keep=8),
    )  # fmt: skip
    picked = starfile.read(fine, always_dict=True)["particles"]
    picked = rotations.matrices_from_relion_euler(
        picked[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    )
    fine_errors = predictions.pose_errors_deg(picked, data.rotations, data.symmetry_ops)
    assert np.median(fine_errors) < grids.grid_nearest_neighbour_spacing_deg(2), fine_errors
    # a search prepared once serves many calls, with the same answer
    from cryosphere.imaging.particles import read_particle_set

    pset = read_particle_set(star_in)
    prepared = map_search.MapSearch(refine, pset, 16, 1)
    again = folder / "data" / "refined_again.star"
    inference.predict_star(
        star_in, checkpoint, again, top_k=G, batch_size=5, progress=False, refine=prepared
    )
    side_again = np.load(inference.topk_path(again))
    np.testing.assert_array_equal(side_again["refined_index"], side["refined_index"])
    bad = folder / "data" / "refused.star"
    with pytest.raises(ValueError, match="prepared for"):
        inference.predict_star(
            star_in, checkpoint, bad, progress=False,
            refine=map_search.MapSearch(refine, pset, 16, 0),
        )  # fmt: skip
    with pytest.raises(ValueError, match="search level"):
        inference.predict_star(
            star_in, checkpoint, bad, progress=False,
            refine=map_search.MapRefinement(refine.map_path, level=4),
        )  # fmt: skip
    from cryosphere import io

    io.write_map(folder / "small.mrc", np.zeros((16, 16, 16), np.float32), data.pixel_size)
    with pytest.raises(ValueError, match="voxels wide"):
        inference.predict_star(
            star_in, checkpoint, bad, progress=False,
            refine=map_search.MapRefinement(folder / "small.mrc"),
        )  # fmt: skip
    assert not bad.exists() and not inference.topk_path(bad).exists()


def test_the_quarter_turn_average_is_exactly_equivariant_and_one_turn_is_plain(particle_run):
    """The averaged distribution of an image turned by 90° is that of the image with its
    in-plane index moved by a quarter of the ψ steps (float rounding apart); one turn is the
    plain log-softmax; for the poster's encoder, equivariant to quarter turns by construction,
    the average changes nothing; predict writes the averaged top cells."""
    from cryosphere.geometry.grids import in_plane_permutation
    from cryosphere.imaging.projection import rotate_images_quarter_turns
    from cryosphere.poses.network.model import build_model
    from cryosphere.poses.prediction.predictions import turn_averaged_log_probabilities

    data, folder, checkpoint = particle_run
    resnet = dataclasses.replace(TINY, encoder="resnet", encoder_channels=(4, 8))
    model = build_model(resnet, seed=0).eval()
    rng = np.random.default_rng(3)
    images = torch.as_tensor(rng.standard_normal((5, 16, 16)), dtype=torch.float32)

    def log_p(network, x, turns):
        with torch.inference_mode():
            return turn_averaged_log_probabilities(network, x, turns)

    averaged = log_p(model, images, 4)
    turned = log_p(model, rotate_images_quarter_turns(images, 1), 4)
    with torch.inference_mode():
        plain = torch.log_softmax(model.logits_from_coefficients(model.coefficients(images)), 1)
    quarter = 6 * 2**TINY.grid_level // 4
    moved = averaged[:, torch.from_numpy(in_plane_permutation(TINY.grid_level, quarter))]
    # float32 sums of the same four terms in another order: a few eps32 of |log p| ~ 10
    torch.testing.assert_close(turned, moved, atol=1e-4, rtol=0)
    torch.testing.assert_close(log_p(model, images, 1), plain, atol=1e-5, rtol=0)
    assert torch.allclose(torch.logsumexp(averaged, 1), torch.zeros(5), atol=1e-5)
    assert not torch.allclose(averaged, plain, atol=1e-3)  # the turns did change it
    poster = checkpoints.load_model(checkpoint)
    torch.testing.assert_close(
        log_p(poster, images, 4), log_p(poster, images, 1), atol=1e-4, rtol=0
    )
    with pytest.raises(ValueError, match="turns must be"):
        turn_averaged_log_probabilities(model, images, 3)
    out = folder / "data" / "turned.star"
    inference.predict_star(
        folder / "data" / "particles.star", checkpoint, out, top_k=4, progress=False, turns=4
    )
    assert np.load(inference.topk_path(out))["top_index"].shape == (12, 4)


def test_predict_averages_quarter_turns_by_default_only_without_a_map(particle_run, monkeypatch):
    """The network's own pose comes from its distribution averaged over
    NETWORK_ALONE_TURNS quarter turns unless ``turns`` says otherwise; with a map search the
    default is one pass (the map decides)."""
    from cryosphere.poses.search import map_search

    data, folder, checkpoint = particle_run
    seen, real = [], inference._top_cells

    def recording(model, images, k, bf16=False, turns=1):
        seen.append(turns)
        return real(model, images, k, bf16, turns)

    monkeypatch.setattr(inference, "_top_cells", recording)
    star_in, out = folder / "data" / "particles.star", folder / "data" / "default_turns.star"
    for turns, refine in [(None, None), (2, None), (None, folder / "data" / "volume.mrc")]:
        seen.clear()
        inference.predict_star(
            star_in, checkpoint, out, top_k=4, progress=False, turns=turns, overwrite=True,
            refine=refine and map_search.MapRefinement(refine, level=1, max_shift_px=0),
        )  # fmt: skip
        expected = turns or (1 if refine else inference.NETWORK_ALONE_TURNS)
        assert seen and set(seen) == {expected}
    assert inference.NETWORK_ALONE_TURNS == 4


def test_the_classical_stage_finds_the_poses_the_network_cells_miss(particle_run):
    """Given top cells that all miss (the 4 level-1 cells farthest from each truth), the map
    search alone cannot find the poses; with the classical coarse stage (every level-1 cell on
    a 4-px band, the best 32 as candidates) it finds what the exhaustive search of every cell
    finds, as a coarse-to-fine search would."""
    import dataclasses

    from cryosphere.imaging import preprocess
    from cryosphere.imaging.particles import read_particle_set
    from cryosphere.poses.search import local_search, map_search

    data, folder, _ = particle_run
    pset = read_particle_set(folder / "data" / "particles.star")
    images, pixel = preprocess.prepare_images(data.noisy_images, data.pixel_size, target_size=16)
    level_1 = grids.healpix_so3_grid(1)
    distance = rotations.geodesic_distance_deg(data.rotations[:, None], level_1[None])
    missing = np.argsort(-distance, axis=1)[:, :4]
    every = np.tile(np.arange(len(level_1)), (len(images), 1))
    base = map_search.MapRefinement(
        folder / "data" / "volume.mrc", level=2, max_shift_px=2, blur_sigma_px=0.5,
        resolution_angstrom=2 * pixel, classical_resolution_px=4.0,
    )  # fmt: skip
    exhaustive = map_search.MapSearch(base, pset, 16, 1)(images, data.ctf, pixel, every)
    agree = {}
    for cells in (0, 32):
        search = map_search.MapSearch(dataclasses.replace(base, classical_cells=cells), pset, 16, 1)
        width = local_search.child_cells(1, 2).shape[1]
        assert search.candidate_count(4) == (4 + cells) * width
        found = search(images, data.ctf, pixel, missing)
        same = found.match.best_index == exhaustive.match.best_index
        agree[cells] = float(np.mean(same))
    errors = predictions.pose_errors_deg(
        grids.healpix_so3_grid(2)[exhaustive.match.best_index], data.rotations, data.symmetry_ops
    )
    assert np.median(errors) < grids.grid_nearest_neighbour_spacing_deg(2)
    assert agree[0] <= 0.1 and agree[32] >= 0.75, agree


def test_the_prescreen_keeps_the_cells_the_search_needs(particle_run):
    """The network's 12 top cells put the 4 level-1 cells nearest each truth last, after the 8
    farthest: searching the first 4 misses the poses; the low-pass pre-screen (4-px band,
    keep 4) of all 12 keeps the near ones, and the search then finds what searching every cell
    finds (where that lies among them)."""
    import dataclasses

    from cryosphere.imaging import preprocess
    from cryosphere.imaging.particles import read_particle_set
    from cryosphere.poses.search import local_search, map_search

    data, folder, _ = particle_run
    pset = read_particle_set(folder / "data" / "particles.star")
    images, pixel = preprocess.prepare_images(data.noisy_images, data.pixel_size, target_size=16)
    level_1 = grids.healpix_so3_grid(1)
    distance = rotations.geodesic_distance_deg(data.rotations[:, None], level_1[None])
    order = np.argsort(distance, axis=1)
    top = np.concatenate([order[:, ::-1][:, :8], order[:, :4][:, ::-1]], axis=1)  # near last
    every = np.tile(np.arange(len(level_1)), (len(images), 1))
    base = map_search.MapRefinement(
        folder / "data" / "volume.mrc", level=2, max_shift_px=2, blur_sigma_px=0.5,
        resolution_angstrom=2 * pixel,
    )  # fmt: skip
    exhaustive = map_search.MapSearch(base, pset, 16, 1)(images, data.ctf, pixel, every)
    width = local_search.child_cells(1, 2).shape[1]
    plain = map_search.MapSearch(base, pset, 16, 1)(images, data.ctf, pixel, top[:, :4])
    screened = dataclasses.replace(base, prescreen_keep=4, prescreen_resolution_px=4.0)
    search = map_search.MapSearch(screened, pset, 16, 1)
    assert search.candidate_count(12) == 4 * width
    found = search(images, data.ctf, pixel, top)
    # scored where every cell's search lands among the near cells' children (8 of 12 here)
    reachable = grids.parent_cells(1, 2)[exhaustive.match.best_index][:, None] == top[:, 8:]
    reachable = reachable.any(axis=1)
    assert reachable.sum() >= 6
    best = exhaustive.match.best_index[reachable]
    agree_plain = np.mean(plain.match.best_index[reachable] == best)
    agree_screened = np.mean(found.match.best_index[reachable] == best)
    assert agree_plain <= 0.1 and agree_screened >= 0.75, (agree_plain, agree_screened)
    with pytest.raises(ValueError, match="prescreen_keep"):
        dataclasses.replace(base, prescreen_keep=0)
    with pytest.raises(ValueError, match="prescreen_resolution_px"):
        dataclasses.replace(base, prescreen_keep=4, prescreen_resolution_px=2.0)


@pytest.mark.parametrize("turns", [1, 4])
def test_the_network_in_chunks_gives_the_one_pass_answer(particle_run, monkeypatch, turns):
    """On the CPU ``predict`` runs the network on ``CPU_NETWORK_CHUNK`` images at a time (a
    cache-sized pass); the top cells and their probabilities are those of one pass over the
    batch, the last chunk short."""
    _, _, checkpoint = particle_run
    model = checkpoints.load_model(checkpoint)
    images = torch.as_tensor(
        np.random.default_rng(5).standard_normal((11, 16, 16)), dtype=torch.float32
    )
    with torch.inference_mode():
        monkeypatch.setattr(inference, "CPU_NETWORK_CHUNK", 1000)
        whole = inference._top_cells(model, images, 6, turns=turns)
        monkeypatch.setattr(inference, "CPU_NETWORK_CHUNK", 4)
        chunked = inference._top_cells(model, images, 6, turns=turns)
    assert chunked[1].shape == (11, 6)
    np.testing.assert_array_equal(chunked[1], whole[1])
    np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("size", "k"), [(4608, 20), (4608, 100), (576, 20), (72, 10), (100, 7)])
def test_top_k_by_groups_is_torch_topk(size, k):
    """The grouped top k equals torch.topk: on random rows, on rows whose k largest values
    all sit in one group (columns j, j + G/8, ...) or in k different ones, and where the
    grouping does not apply (k · 8 >= G, G not a multiple of 8)."""
    generator = torch.Generator().manual_seed(size + k)
    rows = torch.randn(6, size, generator=generator)
    width = size // predictions.TOP_K_GROUPS
    if size % predictions.TOP_K_GROUPS == 0:
        one_group = 5 + width * torch.arange(min(k, predictions.TOP_K_GROUPS))
        rows[0, one_group] += 10.0  # a whole group on top
        rows[1, torch.arange(k) * 3 % size] += 10.0  # the top spread over many groups
        rows[2, :] = rows[2, 0]  # every value tied
    values, indices = predictions.top_k_by_groups(rows, k)
    expected = torch.topk(rows, k, dim=1)
    assert torch.equal(values, expected.values)
    assert torch.equal(torch.gather(rows, 1, indices), values)  # the indices hold the values
    untied = [0, 1, 3, 4, 5]
    assert torch.equal(indices[untied], expected.indices[untied])
