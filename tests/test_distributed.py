"""Distributed training and prediction on 2 CPU processes (Gloo), against one process.

One 2-rank launch (module fixture) trains, predicts and meets bad input; the comparisons run
here in the test process on 1 rank. A second launch kills a rank during prediction.

Tolerance of the weight comparisons: the 2-rank run averages two half-batch gradients where
one process takes the mean over the whole batch, so the gradients differ by float32 rounding of
the sums (measured: ~1e-7 of their size). Adam turns a gradient ``g`` into a step of size
``≈ lr`` whose relative change for a relative change ``δ`` of ``g`` is ``≲ 2δ`` (away from
``g ≈ 0``), so after ``S`` steps the weights differ by at most ``2 δ Σ_s lr_s``. With a
generous ``δ = 1e-3`` (float32 cancellation in batch sums) this is ``TOL`` below; the runs
actually agree to ~3e-8, and training moves the weights by ``~Σ lr ≈ 3e-3``, a hundred times
more than ``TOL``. The loss is ``"bce"``: with ``"soft_ce"`` the parameters that shift every
logit by the same amount (the degree-0 output) have an exactly zero gradient, which Adam
normalises from float noise to a full step, so those few weights drift by ``~lr`` per step
between any two float orderings while the predicted distributions agree to 1e-8.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryosphere import cli
from cryosphere.geometry import rotations as geometry_rotations
from cryosphere.imaging.datasets import SimulationParameters
from cryosphere.imaging.projection import gaussian_blur, project_volume
from cryosphere.imaging.simulate import save_dataset, simulate_dataset
from cryosphere.poses import distributed as dd
from cryosphere.poses.labels import dataset_labels, sharded_labels, templates
from cryosphere.poses.network import checkpoints
from cryosphere.poses.network.model import ModelConfig, build_model
from cryosphere.poses.prediction import inference, sharded_prediction
from cryosphere.poses.search import map_search
from cryosphere.poses.training import data_parallel
from cryosphere.poses.training.fixed_stream import FixedSetStream
from cryosphere.poses.training.stream import SimulatedStream, StreamConfig
from cryosphere.poses.training.streamed import StreamTrainingConfig, train_on_stream

MODEL = ModelConfig(
    image_size=32,
    lmax=2,
    encoder="resnet",
    encoder_channels=(4, 8),
    sphere_channels=4,
    so3_channels=4,
    grid_level=1,
    per_image_normalisation=True,
)
CONFIG = StreamTrainingConfig(
    steps=4, eval_every=2, warmup_steps=1, learning_rate=1e-3, loss="bce", device="cpu"
)
STEP_LR = [1e-3 * (1 + 1) / 2] + [1e-3] * 3  # warm-up step, then at most the peak rate
TOL = 2 * 1e-3 * sum(STEP_LR)
LAUNCH_S = 90.0  # a launch that takes longer has hung


def _map_search(data: Path) -> map_search.MapRefinement:
    """The consensus-map search of the prediction tests (the set's own map, ±1 px)."""
    return map_search.MapRefinement(data / "volume.mrc", max_shift_px=1)


def _setup(volume: np.ndarray):
    stream = SimulatedStream(
        volume, 1.0, 1, StreamConfig(target="pose", batch_size=4, seed=2, reference_images=16)
    )
    return stream, stream.heldout(8)


def _write_error(folder: Path, name: str, rank: int, call) -> None:
    try:
        call()
    except dd.RankError as error:
        (folder / f"{name}_rank{rank}.txt").write_text(str(error))


def _two_rank_worker(context: dd.DistributedContext, volume: np.ndarray, folder: Path) -> None:
    """Both ranks: train 4 steps, train 2 steps (stopped), predict, then meet bad input."""
    stream, validation = _setup(volume)
    kw = dict(slots=2, progress=False, context=context)
    result = data_parallel.train_distributed(
        stream, MODEL, CONFIG, validation, run_dir=folder / "a", **kw
    )
    if context.writes:
        torch.save(result.model.state_dict(), folder / "a_weights.pt")
    data_parallel.train_distributed(
        stream, MODEL, CONFIG, validation, run_dir=folder / "b", stop_after=2, **kw
    )
    ckpt = checkpoints.checkpoint_path(folder / "a")
    data = folder / "data"
    predict = dict(batch_size=4, top_k=3, progress=False, context=context)
    sharded_prediction.predict_star_distributed(
        data / "particles.star", ckpt, data / "two.star", num_workers=1, **predict
    )
    sharded_prediction.predict_star_distributed(
        data / "particles.star", ckpt, data / "two_map.star", refine=_map_search(data), **predict
    )
    _labels(context, volume, folder)
    star = data / ("particles.star" if context.rank == 0 else "missing.star")
    for name, path in (("one", data / "one.star"), ("missing", star)):
        _write_error(
            folder,
            name,
            context.rank,
            lambda path=path, name=name: sharded_prediction.predict_star_distributed(
                path, ckpt, data / f"{name}_out.star", **predict
            ),
        )


def _label_set(volume: np.ndarray) -> SimpleNamespace:
    rotations = geometry_rotations.random_rotations(10, 8)
    clean = gaussian_blur(project_volume(volume, rotations), 1.0).numpy()
    return SimpleNamespace(clean_images=clean, rotations=rotations, symmetry_ops=np.eye(3)[None])


def _labels(context: dd.DistributedContext, volume: np.ndarray, folder: Path) -> None:
    bank = sharded_labels.template_bank_on_disk(
        volume, 1, 1.0, folder / "bank.npy", chunk=128, context=context
    )
    made = sharded_labels.compute_labels_sharded(_label_set(volume), bank, 1, context=context)
    if context.writes:
        np.savez(folder / "labels.npz", mse=made.mse, mask=made.mask, lam=made.lam)


def _killed_worker(context: dd.DistributedContext, folder: Path) -> None:
    """Rank 1 dies in its first prediction batch; rank 0 records how it ended."""
    if context.rank == 1:
        inference._top_cells = lambda *a, **k: __import__("os")._exit(3)
    data = folder / "data"
    _write_error(
        folder,
        "killed",
        context.rank,
        lambda: sharded_prediction.predict_star_distributed(
            data / "particles.star",
            checkpoints.checkpoint_path(folder / "a"),
            data / "killed.star",
            batch_size=4,
            progress=False,
            context=context,
        ),
    )


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, ubi_map_32):
    """The 2-rank launch's folder; the particle set in ``data/`` (12 images, 32 px, CTF)."""
    folder = tmp_path_factory.mktemp("distributed")
    dataset = simulate_dataset(
        SimulationParameters(n_projections=12, image_size=32, seed=6, ctf=True, snr=1.0),
        progress=False,
    )
    save_dataset(dataset, folder / "data")
    star = starfile.read(folder / "data" / "particles.star", always_dict=True)
    one = dict(star, particles=star["particles"].iloc[:1])
    starfile.write(one, folder / "data" / "one.star")
    missing = dict(star, particles=star["particles"].copy())
    missing["particles"]["rlnImageName"] = [f"{i + 1}@gone.mrcs" for i in range(12)]
    starfile.write(missing, folder / "data" / "missing.star")
    codes = dd.launch(_two_rank_worker, 2, (ubi_map_32[0], folder), timeout_s=LAUNCH_S)
    assert codes == [0, 0], f"ranks ended with {codes} (tracebacks above)"
    return folder


def _max_difference(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_block_range_and_rank_slots_cover_everything_once():
    for n, world, align in ((12, 2, 4), (10, 3, 1), (5, 4, 2), (1, 3, 1)):
        blocks = [dd.block_range(n, r, world, align) for r in range(world)]
        assert [i for a, b in blocks for i in range(a, b)] == list(range(n))
        assert all(a % align == 0 for a, b in blocks if b > a)
    assert [list(data_parallel.rank_slots(4, r, 2)) for r in range(2)] == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="divides slots"):
        data_parallel.rank_slots(3, 0, 2)


def test_fixed_set_slots_draw_their_own_shards_and_one_slot_is_unchanged():
    n = 10
    images = np.arange(n, dtype=np.float32)[:, None, None] * np.ones((1, 4, 4), np.float32)
    args = (images, np.ones((n, 3), np.float32), np.tile(np.eye(3), (n, 1, 1)), 3)
    dealt = FixedSetStream(*args, seed=1, slots=2)
    assert dealt.per_epoch == 2 and dealt.description()["slots"] == 2
    drawn = [[dealt.batch(s, k).images[:, 0, 0].int().tolist() for s in range(2)] for k in (0, 1)]
    assert all(len(b) == 3 for slot in drawn for b in slot)  # equal shares, the last wrapped
    for k, shard in enumerate((range(0, 5), range(5, 10))):  # each slot its contiguous shard,
        assert sorted(sum(drawn[k], [])[:5]) == list(shard)  # each image once before the wrap
    # a stream holding slot 1's shard only draws slot 1's batches, and refuses slot 0
    second = FixedSetStream(
        images[5:], args[1][5:], args[2][5:], 3, seed=1, slots=2, shard_sizes=[5, 5],
        held_slots=range(1, 2),
    )  # fmt: skip
    assert [second.batch(s, 1).images[:, 0, 0].int().tolist() for s in range(2)] == drawn[1]
    assert second.description() == dealt.description()
    with pytest.raises(ValueError, match="read by another rank"):
        second.batch(0, 0)
    plain = FixedSetStream(*args, seed=1)  # one slot: the order of rank 0, as before slots
    order = np.random.default_rng([1, 0, 0]).permutation(n)
    assert plain.batch(3).images[:, 0, 0].int().tolist() == order[9:].tolist()
    assert "slots" not in plain.description()


def test_two_ranks_equal_one_rank_with_the_doubled_batch(two_ranks, ubi_map_32):
    stream, validation = _setup(ubi_map_32[0])
    alone = data_parallel.train_distributed(
        stream, MODEL, CONFIG, validation, slots=2, progress=False
    )
    two = torch.load(two_ranks / "a_weights.pt", weights_only=True)
    initial = build_model(MODEL, seed=CONFIG.seed).state_dict()
    assert _max_difference(alone.model.state_dict(), two) < TOL
    assert _max_difference(initial, two) > 100 * TOL  # the runs did learn something
    assert alone.images_seen == 4 * 2 * 4
    # rank 0 alone wrote one checkpoint and one log, atomically (no temporary files left)
    assert sorted(p.name for p in (two_ranks / "a" / "model").iterdir()) == [
        "checkpoint.pt",
        "training_log.csv",
    ]
    record = checkpoints.load_checkpoint(checkpoints.checkpoint_path(two_ranks / "a"))
    assert record["step"] == 4 and record["images_seen"] == 32
    assert record["stream_identity"]["slots"] == 2
    assert [row["step"] for row in record["history"]] == [2, 4]
    np.testing.assert_allclose(
        [r["val_loss"] for r in record["history"]],
        [r["val_loss"] for r in alone.history],
        rtol=1e-5,
    )


def test_a_two_rank_run_resumed_on_one_rank_ends_at_the_same_weights(two_ranks, ubi_map_32):
    stream, validation = _setup(ubi_map_32[0])
    run = two_ranks / "b_resumed"
    shutil.copytree(two_ranks / "b", run)
    assert checkpoints.load_checkpoint(checkpoints.checkpoint_path(run))["step"] == 2
    resumed = data_parallel.train_distributed(
        stream, MODEL, CONFIG, validation, slots=2, run_dir=run, progress=False
    )
    two = torch.load(two_ranks / "a_weights.pt", weights_only=True)
    assert resumed.steps_done == 4 and _max_difference(resumed.model.state_dict(), two) < TOL
    with pytest.raises(ValueError, match="other settings"):  # slots belong to the run
        data_parallel.train_distributed(stream, MODEL, CONFIG, validation, slots=4, run_dir=run)


def test_one_slot_on_one_process_is_train_on_stream(ubi_map_32):
    stream, validation = _setup(ubi_map_32[0])
    config = StreamTrainingConfig(steps=2, eval_every=2, warmup_steps=1, device="cpu")
    a = train_on_stream(stream, MODEL, config, validation, progress=False)
    b = data_parallel.train_distributed(stream, MODEL, config, validation, progress=False)
    assert _max_difference(a.model.state_dict(), b.model.state_dict()) < 1e-6
    assert a.history[-1]["val_loss"] == pytest.approx(b.history[-1]["val_loss"], rel=1e-6)
    bf16 = data_parallel.train_distributed(
        stream, MODEL, config, validation, progress=False, bf16=True, stop_after=1
    )
    weights = bf16.model.state_dict()  # the autocast path runs on CPU (speed unmeasured)
    assert bf16.steps_done == 1 and all(bool(torch.isfinite(v).all()) for v in weights.values())


def test_sharded_prediction_writes_the_star_of_one_rank(two_ranks):
    data = two_ranks / "data"
    ckpt = checkpoints.checkpoint_path(two_ranks / "a")
    inference.predict_star(
        data / "particles.star", ckpt, data / "one_rank.star", batch_size=4, top_k=3,
        progress=False,
    )  # fmt: skip

    one = starfile.read(data / "one_rank.star", always_dict=True)
    two = starfile.read(data / "two.star", always_dict=True)
    assert set(one) == set(two)
    for key in one:  # same rows, columns and values (float rounding in the last digit at most)
        pd.testing.assert_frame_equal(one[key], two[key], check_exact=False, atol=2e-6)
    a = np.load(data / "one_rank_topk.npz")
    b = np.load(data / "two_topk.npz")
    assert np.array_equal(a["top_index"], b["top_index"])
    assert np.array_equal(a["image_name"], b["image_name"])
    # the map search runs in each rank's batches: the same poses and origins as one rank
    inference.predict_star(
        data / "particles.star", ckpt, data / "one_map.star", batch_size=4, top_k=3,
        progress=False, refine=_map_search(data),
    )  # fmt: skip
    one = starfile.read(data / "one_map.star", always_dict=True)["particles"]
    two = starfile.read(data / "two_map.star", always_dict=True)["particles"]
    pd.testing.assert_frame_equal(one, two, check_exact=False, atol=2e-6)
    assert "rlnOriginXAngst" in two
    a, b = np.load(data / "one_map_topk.npz"), np.load(data / "two_map_topk.npz")
    assert np.array_equal(a["refined_index"], b["refined_index"])


def test_bad_input_fails_on_every_rank_and_writes_nothing(two_ranks):
    data = two_ranks / "data"
    for rank in (0, 1):
        too_many = (two_ranks / f"one_rank{rank}.txt").read_text()
        assert "2 ranks for 1 particles" in too_many and "at most 1 ranks" in too_many
        missing = (two_ranks / f"missing_rank{rank}.txt").read_text()
        assert "rank 1: FileNotFoundError" in missing and "gone.mrcs" in missing
        assert "rank 0" not in missing  # rank 0's files were fine
    assert not list(data.glob("one_out*")) and not list(data.glob("missing_out*"))


def test_a_killed_rank_ends_the_run_with_a_clear_error_and_no_output(two_ranks):
    codes = dd.launch(
        _killed_worker, 2, (two_ranks,), timeout_s=LAUNCH_S, collective_timeout_s=20.0
    )
    assert codes == [0, 3]
    message = (two_ranks / "killed_rank0.txt").read_text()
    assert "gathering the predictions failed" in message and "nothing was written" in message
    assert not list((two_ranks / "data").glob("killed*"))


def test_template_bank_on_disk_and_sharded_labels_equal_one_process(two_ranks, ubi_map_32):
    volume = ubi_map_32[0]
    assert not list(two_ranks.glob(".bank*"))  # the partial file was renamed
    bank = np.load(two_ranks / "bank.npy", mmap_mode="r")
    reference = templates.template_bank(volume, 1, 1.0)
    scale = float(np.abs(reference).max())
    np.testing.assert_allclose(bank, reference, rtol=0, atol=1e-5 * scale)
    made = dataset_labels.compute_labels(
        _label_set(volume), level=1, templates=reference, progress=False
    )
    got = np.load(two_ranks / "labels.npz")
    # float32 bound of mse_landscape: 2·eps·‖a−c‖·‖b−c‖ per pixel, ≤ 1e-5 of the largest MSE
    np.testing.assert_allclose(got["mse"], made.mse, rtol=0, atol=1e-5 * float(made.mse.max()))
    assert float(got["lam"]) == pytest.approx(made.lam, rel=1e-3)
    assert np.mean(got["mask"] == made.mask) > 0.999


def test_the_train_and_predict_commands(two_ranks, capsys):
    data, env = two_ranks / "data", dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    env.pop("WORLD_SIZE", None)
    common = [sys.executable, "-m", "cryosphere"]
    run = two_ranks / "cli_run"
    train_args = ["train", "--particles", str(data / "particles.star"), "--map"]
    train_args += [str(data / "volume.mrc"), "--run-dir", str(run), "--steps", "2", "--box", "32"]
    train_args += ["--level", "1", "--batch-size", "4", "--slots", "2", "--no-progress"]
    assert cli.main(train_args) == 0  # in this process: one rank
    assert "trained 2 steps (16 images, streamed)" in capsys.readouterr().out
    assert (
        checkpoints.load_checkpoint(checkpoints.checkpoint_path(run))["stream_identity"]["slots"]
        == 2
    )
    predict_args = ["predict", str(data / "particles.star"), "--checkpoint"]
    predict_args += [
        str(checkpoints.checkpoint_path(two_ranks / "a")),
        "-o",
        str(data / "cli.star"),
    ]
    predict_args += ["--batch-size", "4", "--top-k", "3", "--workers", "1", "--no-progress"]
    done = subprocess.run(
        common + predict_args, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = np.load(data / "cli_topk.npz"), np.load(data / "two_topk.npz")
    assert np.array_equal(a["top_index"], b["top_index"])
