"""Training on a refinement streamed from its map beats training on its fixed set of particles
(cryosphere.runs.refinement, cryosphere.poses.training.refinement_stream)."""

from __future__ import annotations

import numpy as np
import pytest

from cryosphere import io
from cryosphere.imaging.datasets import SimulationParameters
from cryosphere.imaging.simulate import save_dataset, simulate_dataset
from cryosphere.poses.training.streamed import StreamTrainingConfig
from cryosphere.runs import refinement
from cryosphere.runs.series import stream_model_config

LEVEL = 1  # 576 cells
STEPS = 300


@pytest.fixture(scope="module")
def small_refinement(tmp_path_factory):
    """250 particles of 1UBI, 32 px, CTF 0.5-2.5 µm in a padded field, shifts ±2 px, SNR 5."""
    folder = tmp_path_factory.mktemp("small_refinement")
    params = SimulationParameters(
        structure="1ubi", n_projections=250, image_size=32, snr=5.0, seed=3, ctf=True,
        max_shift_px=2.0,
    )  # fmt: skip
    save_dataset(simulate_dataset(params, progress=False), folder)
    return folder


def _train(folder, source):
    run = folder / source
    refinement.train_on_refinement(
        folder / "particles.star",
        folder / "volume.mrc",
        run,
        model_config=stream_model_config(32, grid_level=LEVEL, channels=(8, 16)),
        training_config=StreamTrainingConfig(
            steps=STEPS, learning_rate=3e-3, warmup_steps=30, eval_every=STEPS, seed=0
        ),
        source=source,
        batch_size=16,
        validation_fraction=0.4,
        progress=False,
    )
    return io.read_json(run / refinement.VALIDATION_FILE)["final"]


def test_streamed_default_beats_the_fixed_set_on_held_out_particles(small_refinement):
    streamed = _train(small_refinement, "stream")
    fixed = _train(small_refinement, "fixed")
    uniform = np.log(576)
    # measured: held-out cross-entropy at the refined poses (uniform 6.36) 6.27 streamed and
    # 9.10 fixed with 1 thread, the same order with 2 (the fixed set is memorised, far above
    # uniform). The top-100 hit of the refined cell (0.26 vs 0.22 with 1 thread, 0.28 vs 0.30
    # with 2; random 0.17) is within noise at 100 held-out particles and not asserted.
    assert streamed["val_loss"] < uniform + 0.05
    assert streamed["val_loss"] < fixed["val_loss"] - 2.0
    assert fixed["val_loss"] > uniform + 1.0


def test_topk_hit_counts_the_refined_pose_cell_among_the_network_top_cells():
    import torch

    from cryosphere.geometry import grids
    from cryosphere.geometry import rotations as geometry_rotations
    from cryosphere.poses.network.model import build_model
    from cryosphere.poses.training.refinement_stream import validation_scores

    model = build_model(stream_model_config(16, grid_level=LEVEL, channels=(4, 8)), seed=1)
    images = torch.randn(40, 16, 16, generator=torch.Generator().manual_seed(0))
    rotations = geometry_rotations.random_rotations(40, 2)
    grid = grids.healpix_so3_grid(LEVEL)
    with torch.no_grad():
        logits = model(images)
    cells = geometry_rotations.geodesic_distance_deg(rotations[:, None], grid[None]).argmin(axis=1)
    for k in (1, 50, 300, 576):
        top = torch.topk(logits, k, dim=1).indices.numpy()
        expected = np.mean((top == cells[:, None]).any(axis=1))
        scores = validation_scores(model, images, rotations, top_k=k)
        assert scores["val_topk_hit"] == pytest.approx(expected) and scores["top_k"] == k
    assert validation_scores(model, images, rotations, top_k=576)["val_topk_hit"] == 1.0


def test_topk_hit_with_a_point_group_counts_a_symmetry_mate_cell():
    """A C2 particle whose network proposes only its mate's cell is a hit under C2, a miss
    under C1 (``train --symmetry``)."""
    from cryosphere.geometry import grids
    from cryosphere.geometry import rotations as geometry_rotations
    from cryosphere.geometry.point_groups import point_group
    from cryosphere.poses.training.refinement_stream import topk_hit_rate

    grid = grids.healpix_so3_grid(LEVEL)
    ops = point_group("C2")
    rotations = geometry_rotations.random_rotations(30, 5)
    mate_cells = geometry_rotations.geodesic_distance_deg(
        (rotations @ ops[1])[:, None], grid[None]
    ).argmin(axis=1)
    own_cells = geometry_rotations.geodesic_distance_deg(rotations[:, None], grid[None]).argmin(
        axis=1
    )
    assert not np.any(mate_cells == own_cells)
    top = mate_cells[:, None]
    assert topk_hit_rate(top, rotations, grid) == 0.0
    assert topk_hit_rate(top, rotations, grid, ops) == 1.0
    assert topk_hit_rate(own_cells[:, None], rotations, grid, ops) == 1.0
