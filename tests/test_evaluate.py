"""Pose metrics, baselines and the equivariance test (cryosphere.poses.evaluation.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryosphere.geometry import grids, point_groups, rotations
from cryosphere.imaging.projection import gaussian_blur, project_volume
from cryosphere.poses.evaluation import equivariance
from cryosphere.poses.evaluation import metrics as evaluate
from cryosphere.poses.labels import landscape, soft_maps
from cryosphere.poses.labels import templates as labels_templates
from cryosphere.poses.network.harmonics import wigner_d_flat
from cryosphere.poses.network.model import ModelConfig
from cryosphere.poses.training import fixed_set

TINY = ModelConfig(image_size=32, lmax=3, conv_channels=(4, 8), sphere_channels=4, so3_channels=4)


# --------------------------------------------------------------------------------------------
# pose metrics
# --------------------------------------------------------------------------------------------
def test_right_rotation_by_30_degrees_is_a_30_degree_error():
    R = rotations.random_rotations(50, seed=0)
    total, _, _ = evaluate.pose_error_parts_deg(R @ rotations.rotation_about_z(30.0), R)
    np.testing.assert_allclose(total, 30.0, atol=1e-6)


def test_error_splits_into_viewing_and_in_plane_parts():
    R = rotations.random_rotations(40, seed=1)
    # a left rotation about the optical axis changes only the in-plane angle
    total, viewing, in_plane = evaluate.pose_error_parts_deg(
        rotations.rotation_about_z(25.0) @ R, R
    )
    np.testing.assert_allclose(in_plane, 25.0, atol=1e-6)
    np.testing.assert_allclose(viewing, 0.0, atol=1e-5)
    np.testing.assert_allclose(total, 25.0, atol=1e-6)
    # a left rotation about an in-plane axis tilts the viewing direction by its angle, no twist
    tilt = rotations.rotation_about_axis(np.array([1.0, 0.0, 0.0]), 40.0)
    total, viewing, in_plane = evaluate.pose_error_parts_deg(tilt @ R, R)
    np.testing.assert_allclose(viewing, 40.0, atol=1e-6)
    np.testing.assert_allclose(in_plane, 0.0, atol=1e-5)
    # the viewing part is the angle between the viewing directions
    P = rotations.random_rotations(40, seed=2)
    _, viewing, _ = evaluate.pose_error_parts_deg(P, R)
    cosine = np.sum(rotations.viewing_directions(P) * rotations.viewing_directions(R), axis=1)
    np.testing.assert_allclose(viewing, np.degrees(np.arccos(np.clip(cosine, -1, 1))), atol=1e-6)


def test_symmetry_aware_error_of_a_c2_mate_is_zero():
    ops = point_groups.point_group("C2", rotations.random_rotations(1, seed=3)[0])
    R = rotations.random_rotations(20, seed=4)
    total, viewing, in_plane = evaluate.pose_error_parts_deg(R @ ops[1], R, ops)
    np.testing.assert_allclose(total, 0.0, atol=1e-5)
    np.testing.assert_allclose(viewing, 0.0, atol=1e-5)
    plain, _, _ = evaluate.pose_error_parts_deg(R @ ops[1], R)
    np.testing.assert_allclose(plain, 180.0, atol=1e-5)  # a C2 operator is a half turn


def test_log_likelihood_of_uniform_and_peaked_distributions():
    level = 1
    G = grids.healpix_so3_grid_size(level)
    R = rotations.random_rotations(10, seed=5)
    uniform = np.full((10, G), 1.0 / G)
    ll = evaluate.true_pose_log_likelihood(uniform, R, level)
    np.testing.assert_allclose(ll, -math.log(math.pi**2))
    np.testing.assert_allclose(evaluate.UNIFORM_LOG_LIKELIHOOD, -2.2894, atol=1e-4)
    peaked = np.zeros((10, G))
    peaked[np.arange(10), grids.nearest_grid_indices(R, grids.healpix_so3_grid(level))] = 1.0
    np.testing.assert_allclose(
        evaluate.true_pose_log_likelihood(peaked, R, level), math.log(G / math.pi**2)
    )
    metrics = evaluate.pose_metrics(R, R, probabilities=peaked, level=level)
    assert metrics["median_deg"] < 1e-4 and metrics["acc15"] == 1.0
    assert metrics["log_likelihood"] == pytest.approx(math.log(G / math.pi**2))


def test_uniform_guess_has_the_expected_error_statistics():
    R = rotations.random_rotations(4000, seed=6)
    metrics = evaluate.pose_metrics(evaluate.uniform_poses(4000, seed=7), R)
    # Haar measure: P(angle < t) = (t - sin t) / π: median ≈ 132.3°, mean = 90° + 360°/π² ≈
    # 126.5°, acc@15° ≈ 0.0016
    assert metrics["median_deg"] == pytest.approx(132.3, abs=3.0)
    assert metrics["mean_deg"] == pytest.approx(90 + 360 / math.pi**2, abs=3.0)
    assert metrics["acc15"] < 0.01 and metrics["acc30"] < 0.03
    assert np.array_equal(evaluate.uniform_poses(5, 1), evaluate.uniform_poses(5, 1))


def test_accuracy_curve_counts_errors_below_each_threshold():
    curve = evaluate.accuracy_curve(np.array([1.0, 10.0, 20.0, 100.0]), np.array([5, 15, 180]))
    np.testing.assert_allclose(curve, [0.25, 0.5, 1.0])


def test_bad_pose_input_is_refused():
    R = rotations.random_rotations(3, seed=0)
    with pytest.raises(ValueError, match="differ in count"):
        evaluate.pose_error_parts_deg(R[:2], R)
    with pytest.raises(ValueError, match="NaN"):
        evaluate.pose_error_parts_deg(np.full((3, 3, 3), np.nan), R)
    with pytest.raises(ValueError, match=r"shape \(n, G\)"):
        evaluate.true_pose_log_likelihood(np.ones((3, 5)), R, 1)
    with pytest.raises(ValueError, match="level is needed"):
        evaluate.pose_metrics(R, R, probabilities=np.ones((3, 576)) / 576)


# --------------------------------------------------------------------------------------------
# template matching
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def templates_level1(ubi_map_32):
    volume, pixel = ubi_map_32
    return labels_templates.template_bank(volume, level=1, blur_sigma=1.0, pixel_size=pixel)


def test_template_matching_on_noise_free_images_finds_the_nearest_grid_cell(
    ubi_map_32, templates_level1
):
    volume, _ = ubi_map_32
    grid = grids.healpix_so3_grid(1)
    cells = np.random.default_rng(0).choice(len(grid), 24, replace=False)
    on_grid = gaussian_blur(project_volume(volume, grid[cells]), 1.0).numpy()
    found = evaluate.template_matched_poses(on_grid, templates_level1, level=1)
    np.testing.assert_allclose(found, grid[cells], atol=1e-12)
    # off-grid poses: the best-matching template is the geodesically nearest cell
    R = rotations.random_rotations(40, seed=8)
    images = gaussian_blur(project_volume(volume, R), 1.0).numpy()
    found = evaluate.template_matched_poses(images, templates_level1, level=1)
    nearest = grids.nearest_grid_indices(R, grid)
    assert np.mean(np.all(np.isclose(found, grid[nearest]), axis=(1, 2))) >= 0.75
    spacing = grids.grid_nearest_neighbour_spacing_deg(1)
    assert np.mean(rotations.geodesic_distance_deg(found, R) < 2 * spacing) >= 0.9
    with pytest.raises(ValueError, match="do not match"):
        evaluate.template_matched_poses(images, templates_level1, level=2)


def test_template_matching_beats_uniform_on_noisy_images(small_dataset):
    level = 1
    templates = labels_templates.dataset_templates(small_dataset, level)
    tm = evaluate.template_matched_poses(small_dataset.noisy_images, templates, level)
    G = grids.healpix_so3_grid_size(level)
    table = evaluate.compare_pose_estimators(
        small_dataset.rotations,
        small_dataset.symmetry_ops,
        model_probabilities=np.full((len(tm), G), 1.0 / G),
        model_poses=evaluate.uniform_poses(len(tm), seed=1),
        template_poses=tm,
        level=level,
    )
    assert set(table) == {"model", "template_matching", "uniform"}
    assert table["template_matching"]["median_deg"] < table["uniform"]["median_deg"] / 2
    assert table["uniform"]["log_likelihood"] == pytest.approx(-math.log(math.pi**2))


# --------------------------------------------------------------------------------------------
# equivariance
# --------------------------------------------------------------------------------------------
class _PoseOracle:
    """An analytic predictor fed poses instead of images: its logit signal is the character
    ``f(S) = sum_l tr(D_l((X R)^T S))`` of the (optionally left-offset) pose ``X R``, held as SO(3)
    harmonic coefficients. ``X = I`` is exactly equivariant; any other ``X`` breaks it."""

    def __init__(self, lmax: int, level: int, offset: np.ndarray | None = None):
        self.lmax = lmax
        self.offset = np.eye(3) if offset is None else offset
        grid = grids.healpix_so3_grid(level)
        self.grid_wigner = torch.from_numpy(wigner_d_flat(grid, lmax).T.copy()).float()

    def eval(self):
        return self

    def coefficients(self, poses: torch.Tensor) -> torch.Tensor:
        R = self.offset @ np.asarray(poses, dtype=np.float64)
        return torch.from_numpy(wigner_d_flat(R, self.lmax)).float() / 10.0


@pytest.mark.parametrize("kind", equivariance.ROTATION_KINDS)
def test_equivariance_is_zero_for_an_equivariant_predictor_and_large_for_a_broken_one(kind):
    R, Q = equivariance.equivariance_pairs(12, kind, seed=1)
    exact = equivariance.model_equivariance_mse(_PoseOracle(3, level=1), R, Q @ R, Q)
    assert exact.max() < 1e-10
    broken_predictor = _PoseOracle(
        3, 1, offset=rotations.rotation_about_axis(np.array([1, 1, 0]), 70)
    )
    broken = equivariance.model_equivariance_mse(broken_predictor, R, Q @ R, Q)
    assert broken.mean() > 1e-3


def test_pairs_are_seeded_and_in_plane_pairs_turn_about_z():
    R, Q = equivariance.equivariance_pairs(10, "in_plane", seed=3)
    R2, Q2 = equivariance.equivariance_pairs(10, "in_plane", seed=3)
    assert np.array_equal(R, R2) and np.array_equal(Q, Q2)
    np.testing.assert_allclose(Q[:, :, 2], np.tile([0.0, 0.0, 1.0], (10, 1)), atol=1e-12)
    _, Q_out = equivariance.equivariance_pairs(10, "out_of_plane", seed=3)
    assert np.abs(Q_out[:, 2, 2] - 1).max() > 0.1
    with pytest.raises(ValueError, match="kind must be"):
        equivariance.equivariance_pairs(3, "sideways")


def test_grid_left_translation_by_an_in_plane_step_is_an_exact_permutation():
    level = 1
    G = grids.healpix_so3_grid_size(level)
    values = np.random.default_rng(0).random((3, G))
    step = 360.0 / (6 * 2**level)
    Q = rotations.rotation_about_z(2 * step)
    there = equivariance.left_translate_grid_values(values, Q, level)
    assert not np.allclose(there, values)
    np.testing.assert_array_equal(np.sort(there, axis=1), np.sort(values, axis=1))
    back = equivariance.left_translate_grid_values(there, Q.T, level)
    np.testing.assert_array_equal(back, values)


def test_model_is_exactly_equivariant_to_quarter_turns(ubi_map_32):
    volume, _ = ubi_map_32
    model = fixed_set.untrained_model(np.random.default_rng(0).random((4, 32, 32)), TINY)
    R = rotations.random_rotations(6, seed=2)
    Q = np.broadcast_to(rotations.rotation_about_z(90.0), (6, 3, 3))
    images_R = project_volume(volume, R).numpy()
    images_QR = project_volume(volume, Q @ R).numpy()
    assert equivariance.model_equivariance_mse(model, images_R, images_QR, Q).max() < 1e-10


def test_equivariance_table_rows_and_label_floor(ubi_map_32, templates_level1, small_dataset):
    volume, _ = ubi_map_32
    R = rotations.random_rotations(30, seed=9)
    mse = landscape.mse_landscape(gaussian_blur(project_volume(volume, R), 1.0), templates_level1)
    lam = soft_maps.tune_lambda(mse, grids.healpix_so3_grid(1), R, radius_deg=30.0)
    random_model = fixed_set.untrained_model(small_dataset.noisy_images, TINY)
    result = equivariance.equivariance_table(
        volume,
        1.0,
        random_model=random_model,
        templates=templates_level1,
        level=1,
        lam=lam,
        n_pairs=6,
        seed=0,
    )
    rows = result.rows()
    assert {(r["predictor"], r["rotation"]) for r in rows} == {
        (p, k) for p in ("random", "labels") for k in equivariance.ROTATION_KINDS
    }
    for row in rows:
        assert row["min"] <= row["mean"] <= row["max"] and row["n_pairs"] == 6
    # the label maps are equivariant up to the grid: far below the untrained network
    assert result.mean("labels", "out_of_plane") < result.mean("random", "out_of_plane") / 5
    again = equivariance.equivariance_table(
        volume, 1.0, templates=templates_level1, level=1, lam=lam, n_pairs=6, seed=0
    )
    np.testing.assert_array_equal(again.mse["labels"]["in_plane"], result.mse["labels"]["in_plane"])
    record = result.to_dict()
    assert "sigmoid" in record["protocol"]["compared"] and len(record["rows"]) == 4
    with pytest.raises(ValueError, match="needs lam"):
        equivariance.equivariance_table(volume, 1.0, templates=templates_level1, level=1)
    with pytest.raises(ValueError, match="at least one"):
        equivariance.equivariance_table(volume, 1.0)


def test_equivariance_example_matches_the_table_entry(ubi_map_32, small_dataset):
    volume, _ = ubi_map_32
    random_model = fixed_set.untrained_model(small_dataset.noisy_images, TINY)
    table = equivariance.equivariance_table(
        volume, 1.0, random_model=random_model, n_pairs=3, kinds=["out_of_plane"], seed=2
    )
    example = equivariance.model_equivariance_example(
        random_model, volume, 1.0, "out_of_plane", n_pairs=3, index=1, seed=2
    )
    assert example["map_QR"].shape == (grids.healpix_so3_grid_size(2),)
    assert example["mse"] == pytest.approx(table.mse["random"]["out_of_plane"][1], rel=1e-5)


def test_log_likelihood_counts_every_symmetry_mate():
    level, G = 1, 576
    grid = grids.healpix_so3_grid(level)
    ops = point_groups.point_group("C2")
    R = rotations.random_rotations(6, 21)
    own = grids.nearest_grid_indices(R, grid)
    mate = grids.nearest_grid_indices(R @ ops[1], grid)
    on_mate = np.zeros((6, G))
    on_mate[np.arange(6), mate] = 1.0
    on_own = np.zeros((6, G))
    on_own[np.arange(6), own] = 1.0
    split = 0.5 * (on_mate + on_own)
    expected = math.log(G / (2 * math.pi**2))
    for probs in (on_mate, on_own, split):
        np.testing.assert_allclose(
            evaluate.true_pose_log_likelihood(probs, R, level, ops), expected, atol=1e-12
        )
    uniform = np.full((6, G), 1.0 / G)
    np.testing.assert_allclose(
        evaluate.true_pose_log_likelihood(uniform, R, level, ops), -math.log(math.pi**2)
    )
    # without the group, the mass on the mate is not seen
    assert np.all(np.isneginf(evaluate.true_pose_log_likelihood(on_mate, R, level)))


def test_snr_study_scores_extra_models_on_the_same_images(tmp_path):
    from cryosphere.poses.network.model import ModelConfig, build_model
    from cryosphere.runs import snr_study
    from cryosphere.runs.pipeline import Run
    from cryosphere.runs.run_config import RunConfig

    flat = dict(structure="1ubi", n_projections=10, image_size=32, seed=2, grid_level=1, lmax=2)
    config = RunConfig.from_flat({**flat, "epochs": 1, "batch_size": 8})
    extra = build_model(ModelConfig(image_size=32, lmax=2, grid_level=1, encoder="resnet"))
    rows = snr_study.snr_study(
        Run(config, tmp_path, progress=False), [1.0, 0.5], extra_models={"other": extra}
    )
    assert [row["snr"] for row in rows] == [1.0, 0.5]
    for row in rows:
        assert set(row) == {"snr", "model", "template_matching", "uniform", "other"}
        assert row["other"]["n"] == row["model"]["n"]
        assert 0 <= row["other"]["median_deg"] <= 180 and row["other"]["log_likelihood"] is not None


def test_evaluate_imports_nothing_from_training():
    """Metrics depend on no training code: importing evaluate leaves labels, train and the run
    layer unimported (fresh interpreter); the SNR study, which trains, is reached lazily."""
    import ast
    import subprocess
    import sys

    code = (
        "import sys, cryosphere.poses.evaluation.metrics as e; "
        "print(sorted(m for m in sys.modules if m.startswith('cryosphere')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded = ast.literal_eval(out)
    assert "cryosphere.poses.evaluation.metrics" in loaded
    for training in (
        "cryosphere.poses.training.fixed_set",
        "cryosphere.poses.labels.dataset_labels",
        "cryosphere.poses.training.settings",
        "cryosphere.poses.labels.templates",
        "cryosphere.imaging.simulate",
        "cryosphere.runs",
    ):
        assert training not in loaded, f"evaluate imports {training}"
    assert not hasattr(evaluate, "accuracy_vs_snr")  # it trains: cryosphere.runs.snr_study
