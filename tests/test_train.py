"""Training loop, checkpoints, resume, prediction and bad input (cryosphere.poses.training.fixed_set)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cryosphere import io
from cryosphere.geometry import grids, point_groups
from cryosphere.geometry import rotations as geometry_rotations
from cryosphere.imaging.projection import project_volume
from cryosphere.poses.network import checkpoints
from cryosphere.poses.network.model import ModelConfig
from cryosphere.poses.prediction import predictions
from cryosphere.poses.training import fixed_set, settings, streamed

TINY = ModelConfig(image_size=32, lmax=3, conv_channels=(4, 8), sphere_channels=4, so3_channels=4)
SMALL = ModelConfig(image_size=32, lmax=4, conv_channels=(8, 16), sphere_channels=8, so3_channels=8)


def _geodesic_mask(rotations: np.ndarray, q: float, level: int = 2) -> np.ndarray:
    """Top-q fraction of grid cells nearest (geodesic) to each true pose: (n, G) float32 0/1."""
    grid = grids.healpix_so3_grid(level)
    d = geometry_rotations.geodesic_distance_deg(rotations[:, None], grid[None])
    return (d <= np.quantile(d, q, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def few_views(ubi_map_32):
    """96 noise-free 32-px images: 4 viewing directions, uniformly random in-plane angles."""
    volume, _ = ubi_map_32
    rng = np.random.default_rng(0)
    views = geometry_rotations.random_rotations(4, seed=1)
    R = geometry_rotations.rotation_about_z(rng.uniform(0, 360, 96)) @ views[rng.integers(0, 4, 96)]
    images = project_volume(volume, R).numpy()
    return images, _geodesic_mask(R, 0.02), R


@pytest.fixture(scope="module")
def random_poses(ubi_map_32):
    volume, _ = ubi_map_32
    R = geometry_rotations.random_rotations(24, seed=7)
    images = project_volume(volume, R).numpy()
    return images, _geodesic_mask(R, 0.05), R


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------------
def test_tiny_training_learns(few_views):
    """Loss falls and the validation error beats a uniform guess (median ~126 deg)."""
    images, mask, R = few_views
    cfg = settings.TrainingConfig(epochs=6, batch_size=8, learning_rate=3e-3, seed=0)
    result = fixed_set.train_model(images, mask, R, None, SMALL, cfg, progress=False)
    hist = result.history
    assert len(hist) == 6
    assert hist[-1]["train_loss"] < 0.5 * hist[0]["train_loss"]
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]
    # measured ~18 deg after 6 epochs; an untrained network gives ~120 deg
    assert hist[-1]["val_median_deg"] < 60.0
    untrained = fixed_set.untrained_model(images, SMALL, cfg)
    base = predictions.predict(untrained, images[result.validation_indices])
    base_err = np.median(
        predictions.pose_errors_deg(base.best_rotation, R[result.validation_indices])
    )
    assert base_err > hist[-1]["val_median_deg"] + 20.0


def test_same_seed_gives_identical_weights(random_poses):
    images, mask, R = random_poses
    cfg = settings.TrainingConfig(epochs=2, batch_size=8, seed=3, device="cpu")
    a = fixed_set.train_model(images, mask, R, None, TINY, cfg, progress=False)
    b = fixed_set.train_model(images, mask, R, None, TINY, cfg, progress=False)
    assert _same_weights(a.model, b.model)
    c = fixed_set.train_model(
        images, mask, R, None, TINY, dataclasses.replace(cfg, seed=4), progress=False
    )
    assert not _same_weights(a.model, c.model)


def test_untrained_model_is_the_starting_point(random_poses):
    images, mask, R = random_poses
    cfg = settings.TrainingConfig(epochs=0, seed=5)
    result = fixed_set.train_model(images, mask, R, None, TINY, cfg, progress=False)
    assert _same_weights(result.model, fixed_set.untrained_model(images, TINY, cfg))


def test_resume_equals_uninterrupted_run(random_poses, tmp_path):
    images, mask, R = random_poses
    full = settings.TrainingConfig(epochs=4, batch_size=8, seed=1, device="cpu")
    straight = fixed_set.train_model(
        images, mask, R, None, TINY, full, run_dir=tmp_path / "a", progress=False
    )
    # "killed" after epoch 2: train 2 epochs, then resume to 4 from the checkpoint
    fixed_set.train_model(
        images,
        mask,
        R,
        None,
        TINY,
        dataclasses.replace(full, epochs=2),
        run_dir=tmp_path / "b",
        progress=False,
    )
    assert torch.load(tmp_path / "b/model/checkpoint.pt", weights_only=True)["epoch"] == 2
    resumed = fixed_set.train_model(
        images, mask, R, None, TINY, full, run_dir=tmp_path / "b", progress=False
    )
    assert _same_weights(straight.model, resumed.model)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]
    log = checkpoints.read_training_log(tmp_path / "b")
    assert [row["epoch"] for row in log] == [1, 2, 3, 4]
    assert np.allclose([r["val_loss"] for r in log], [h["val_loss"] for h in straight.history])
    # finished run: loading again trains nothing and returns the same weights
    again = fixed_set.train_model(
        images, mask, R, None, TINY, full, run_dir=tmp_path / "b", progress=False
    )
    assert _same_weights(again.model, straight.model)
    # the device is not part of a run's identity: a CPU run reloads with device=None (auto)
    auto = fixed_set.train_model(
        images,
        mask,
        R,
        None,
        TINY,
        dataclasses.replace(full, device=None),
        run_dir=tmp_path / "b",
        progress=False,
    )
    assert len(auto.history) == 4
    # the checkpoint reloads to the same network
    loaded = checkpoints.load_model(tmp_path / "b/model/checkpoint.pt")
    with torch.no_grad():
        assert torch.equal(
            loaded(torch.from_numpy(images[:3])), straight.model(torch.from_numpy(images[:3]))
        )
    # resuming with another configuration or other data is refused
    with pytest.raises(ValueError, match="model config"):
        fixed_set.train_model(
            images,
            mask,
            R,
            None,
            dataclasses.replace(TINY, lmax=2),
            full,
            run_dir=tmp_path / "b",
            progress=False,
        )
    with pytest.raises(ValueError, match="training config"):
        fixed_set.train_model(
            images,
            mask,
            R,
            None,
            TINY,
            dataclasses.replace(full, learning_rate=1e-2),
            run_dir=tmp_path / "b",
            progress=False,
        )
    with pytest.raises(ValueError, match="different images"):
        fixed_set.train_model(
            images[::-1].copy(), mask, R, None, TINY, full, run_dir=tmp_path / "b", progress=False
        )


def test_soft_ce_loss_and_symmetric_errors(random_poses):
    images, mask, R = random_poses
    logits = torch.randn(3, 10)
    onehot = torch.zeros(3, 10)
    onehot[:, 2] = 5.0  # normalised per row
    expected = torch.nn.functional.cross_entropy(logits, torch.full((3,), 2))
    assert torch.allclose(settings.compute_loss(logits, onehot, "soft_ce"), expected)
    soft = mask / mask.sum(1, keepdims=True)
    cfg = settings.TrainingConfig(epochs=2, batch_size=8, loss="soft_ce")
    result = fixed_set.train_model(images, soft, R, None, TINY, cfg, progress=False)
    assert np.isfinite(result.history[-1]["train_loss"])
    # symmetry-aware errors: R @ g is a perfect prediction under C2
    ops = point_groups.point_group("C2")
    errors = predictions.pose_errors_deg(R @ ops[1], R, ops)
    assert np.allclose(errors, 0.0, atol=1e-6)
    assert np.all(predictions.pose_errors_deg(R @ ops[1], R) > 179.0)


def test_predict_and_save(random_poses, tmp_path):
    images, mask, R = random_poses
    model = fixed_set.untrained_model(images, TINY)
    preds = predictions.predict(model, images, batch_size=10)
    G = grids.healpix_so3_grid_size(2)
    assert preds.probabilities.shape == (24, G) and preds.coefficients.shape == (24, 84)
    assert np.allclose(preds.probabilities.sum(1), 1.0, atol=1e-5)
    assert np.array_equal(preds.best_index, preds.logits.argmax(1))
    assert np.array_equal(preds.best_rotation, grids.healpix_so3_grid(2)[preds.best_index])
    assert np.allclose(preds.best_probability, preds.probabilities.max(1))
    npz, star = predictions.save_predictions(tmp_path, preds, 2.0, 32, true_rotations=R)
    stored = np.load(npz)
    assert np.array_equal(stored["best_index"], preds.best_index)
    assert stored["errors_deg"].shape == (24,)
    table = io.read_particles_star(star)
    angles = geometry_rotations.matrices_from_relion_euler(table["angles_deg"])
    assert geometry_rotations.geodesic_distance_deg(angles, preds.best_rotation).max() < 1e-3
    assert np.allclose(
        table["particles"]["rlnMaxValueProbDistribution"], preds.best_probability, atol=1e-6
    )
    assert predictions.predict(model, images[:0]).probabilities.shape == (0, G)


def test_bad_input(random_poses, tmp_path):
    images, mask, R = random_poses
    cfg = settings.TrainingConfig(epochs=1, batch_size=8)
    with pytest.raises(ValueError, match="empty dataset"):
        fixed_set.train_model(images[:0], mask[:0], R[:0], None, TINY, cfg, progress=False)
    with pytest.raises(ValueError, match="image_size"):
        fixed_set.train_model(images, mask, R, None, dataclasses.replace(TINY, image_size=64), cfg)
    with pytest.raises(ValueError, match="targets"):
        fixed_set.train_model(images, mask[:, :100], R, None, TINY, cfg, progress=False)
    with pytest.raises(ValueError, match="lmax"):
        dataclasses.replace(TINY, lmax=9)
    with pytest.raises(ValueError, match="loss"):
        settings.TrainingConfig(loss="mse")
    with pytest.raises(ValueError, match="validation_fraction"):
        settings.TrainingConfig(validation_fraction=1.0)
    result = fixed_set.train_model(
        images, mask, R, None, TINY, cfg, run_dir=tmp_path, progress=False
    )
    ckpt = result.checkpoint
    assert ckpt.exists() and (tmp_path / "model/training_log.csv").exists()
    model = checkpoints.load_model(ckpt)
    # images of the wrong size for the checkpoint
    with pytest.raises(ValueError, match="32x32"):
        predictions.predict(model, np.zeros((2, 64, 64), np.float32))
    # a checkpoint from another architecture
    record = torch.load(ckpt, weights_only=True)
    other = dict(record, architecture="someone.else/v7")
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="architecture"):
        checkpoints.load_model(tmp_path / "other.pt")
    # weights that do not match the stored configuration
    mismatched = dict(record, model_config=dict(record["model_config"], lmax=2))
    torch.save(mismatched, tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match="do not match"):
        checkpoints.load_model(tmp_path / "mismatch.pt")
    torch.save({"weights": 1}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a CryoSphere checkpoint"):
        checkpoints.load_model(tmp_path / "plain.pt")
    with pytest.raises(FileNotFoundError):
        checkpoints.load_model(tmp_path / "missing.pt")


def test_split_indices():
    train_idx, val_idx = settings.split_indices(10, 0.2, seed=0)
    assert len(val_idx) == 2 and len(train_idx) == 8
    assert np.array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(10))
    again = settings.split_indices(10, 0.2, seed=0)
    assert np.array_equal(again[1], val_idx)
    assert len(settings.split_indices(3, 0.1, seed=0)[1]) == 1
    assert len(settings.split_indices(1, 0.5, seed=0)[1]) == 0


def test_learning_rate_schedules(random_poses, monkeypatch):
    """A fixed-set run is a streamed run of ``epochs × ceil(n_train / batch)`` steps: constant
    rate, or cosine per step down to 1 % (no warm-up)."""
    with pytest.raises(ValueError, match="lr_schedule"):
        settings.TrainingConfig(lr_schedule="step")
    images, mask, R = random_poses
    cosine = settings.TrainingConfig(epochs=2, batch_size=8, lr_schedule="cosine")
    seen, real = [], streamed.learning_rate_at_step

    def recording(config, step):
        seen.append((config.steps, config.warmup_steps, real(config, step)))
        return seen[-1][2]

    monkeypatch.setattr(streamed, "learning_rate_at_step", recording)
    fixed_set.train_model(images, mask, R, None, TINY, cosine, progress=False)
    # 24 images, 20 % held out: 19 training images, 3 batches of 8 per epoch, 6 steps
    assert [(s, w) for s, w, _ in seen] == [(6, 0)] * 6
    rates = [r for _, _, r in seen]
    assert rates[0] == pytest.approx(1e-3)
    assert rates[3] == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))
    assert all(x > y for x, y in zip(rates, rates[1:], strict=False))


def test_the_poster_data_order_is_kept(random_poses):
    """Epoch e of the fixed-set trainer reads the (e+1)-th torch.randperm of a generator seeded
    seed + 1, as the poster's trainer always has (its published results stay bit for bit)."""
    images, mask, R = random_poses
    split = fixed_set._TrainingSplit(images[:19], mask[:19], R[:19], 8, seed=4, fingerprint="x")
    generator = torch.Generator().manual_seed(5)
    expected = [torch.randperm(19, generator=generator).numpy() for _ in range(3)]
    assert all(np.array_equal(split.epoch_permutation(e), expected[e]) for e in (2, 0, 1))
    batches = [split.batch(step) for step in range(6)]
    assert [b.images.shape[0] for b in batches] == [8, 8, 3, 8, 8, 3]
    assert torch.equal(batches[4].images, torch.from_numpy(images[:19][expected[1][8:16]]))


def test_cosine_schedule_resumes_like_an_uninterrupted_run(random_poses, tmp_path, monkeypatch):
    images, mask, R = random_poses
    full = settings.TrainingConfig(
        epochs=3, batch_size=8, seed=2, device="cpu", lr_schedule="cosine"
    )
    straight = fixed_set.train_model(images, mask, R, None, TINY, full, progress=False)
    # kill the run during epoch 2 (after epoch 1's checkpoint was written)
    real_evaluate, calls = streamed._validate, []

    def dying_evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(streamed, "_validate", dying_evaluate)
    with pytest.raises(KeyboardInterrupt):
        fixed_set.train_model(images, mask, R, None, TINY, full, run_dir=tmp_path, progress=False)
    monkeypatch.setattr(streamed, "_validate", real_evaluate)
    record = torch.load(tmp_path / "model/checkpoint.pt", weights_only=True)
    assert record["epoch"] == 1 and record["training_config"]["lr_schedule"] == "cosine"
    resumed = fixed_set.train_model(
        images, mask, R, None, TINY, full, run_dir=tmp_path, progress=False
    )
    assert _same_weights(resumed.model, straight.model)


def test_an_older_checkpoint_loads_but_does_not_resume(random_poses, tmp_path):
    """A checkpoint of the epochs trainer before 0.3 (no run identity; model config without
    the encoder keys of 0.1) still gives its network, and resuming it is refused plainly."""
    images, mask, R = random_poses
    config = settings.TrainingConfig(epochs=1, batch_size=8, seed=1, device="cpu")
    fixed_set.train_model(images, mask, R, None, TINY, config, run_dir=tmp_path, progress=False)
    path = checkpoints.checkpoint_path(tmp_path)
    record = torch.load(path, weights_only=True)
    for key in ("encoder", "encoder_channels", "encoder_blocks", "per_image_normalisation"):
        record["model_config"].pop(key)  # what 0.1 wrote
    del record["stream_identity"]
    torch.save(record, path)
    assert checkpoints.load_model(path).config == TINY
    more = dataclasses.replace(config, epochs=2)
    with pytest.raises(ValueError, match="older CryoSphere trainer.*new run folder"):
        fixed_set.train_model(images, mask, R, None, TINY, more, run_dir=tmp_path, progress=False)


def test_the_logged_loss_is_the_mean_over_the_epochs_images(random_poses):
    """With a vanishing learning rate the network does not move, so an epoch's train_loss is the
    untrained network's loss over all training images (batches 8, 8, 3 weighted by size)."""
    images, mask, R = random_poses
    config = settings.TrainingConfig(epochs=1, batch_size=8, learning_rate=1e-30, seed=3)
    result = fixed_set.train_model(images, mask, R, None, TINY, config, progress=False)
    train = result.train_indices
    model = fixed_set.untrained_model(images, TINY, config)
    with torch.no_grad():
        logits = model(torch.from_numpy(images[train]))
    expected = float(settings.compute_loss(logits, torch.from_numpy(mask[train]), "bce"))
    assert len(train) == 19 and result.history[0]["train_loss"] == pytest.approx(expected, rel=1e-5)
