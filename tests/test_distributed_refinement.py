"""Training on a refinement's real particles (``--source fixed``) on 2 CPU ranks (Gloo): each
rank reads only the shards of its own slots, and the weights are those of one process. Also
real particles mixed into the streamed batches (``real_fraction``).

The refinement is laid out as RELION 3.1 writes it (:mod:`relion_layouts`: a project folder,
two stacks under ``Extract/``, ``Refine3D/job002/run_data.star`` and its map). One training
particle of rank 1's shard is damaged (NaN pixels): without ``skip_bad`` only rank 1 fails (rank
0 never reads it); with ``skip_bad`` the run goes on, the shard sizes gathered from the ranks.

Tolerance: as in ``tests/test_distributed.py`` (2 half-batch gradients against one mean, float
rounding ~1e-7, Adam steps of ``≲ lr``), except that ``soft_ce`` gives the parameters that
shift every logit alike (the degree-0 output) an exactly zero gradient, which Adam normalises
from float noise to a full step: those drift by up to ``lr`` a step between two float orders
(measured: ``output_bias`` 6e-5 and ``so3_conv.kernels.0`` 9e-5 apart, every other weight
within 3e-8, ``TOL`` is 7e-6). So those two are held to ``Σ lr``, the others to ``TOL``, and the
distributions the two models predict must agree to 1e-5 of their peak.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import relion_layouts as rl
import torch

from cryosphere import cli, io
from cryosphere.imaging import structure
from cryosphere.imaging.atoms import load_structure
from cryosphere.poses import distributed as dd
from cryosphere.poses.network import checkpoints
from cryosphere.poses.network.model import ModelConfig, build_model
from cryosphere.poses.training.fixed_stream import FixedSetStream, MixedStream, shard_bounds
from cryosphere.poses.training.streamed import StreamTrainingConfig
from cryosphere.runs import refinement

PIXEL = 1.8  # Å
N_PARTICLES = 24  # 2 held out (10 %), 22 training: shards of 11 and 11 (one damaged)
MODEL = ModelConfig(
    image_size=16,
    lmax=2,
    encoder="resnet",
    encoder_channels=(4, 8),
    sphere_channels=4,
    so3_channels=4,
    grid_level=1,
    per_image_normalisation=True,
)
CONFIG = StreamTrainingConfig(steps=4, eval_every=2, warmup_steps=1, device="cpu", seed=3)
STEP_LR = [1e-3 * (1 + 1) / 2] + [1e-3] * 3  # warm-up step, then at most the peak rate
TOL = 2 * 1e-3 * sum(STEP_LR)
DEGREE_ZERO = ("output_bias", "so3_conv.kernels.0")  # zero soft_ce gradient (docstring)
LAUNCH_S = 180.0


def _optics():
    return {
        "rlnOpticsGroupName": "opticsGroup1",
        "rlnOpticsGroup": 1,
        "rlnMicrographOriginalPixelSize": PIXEL / 2,
        "rlnVoltage": 300.0,
        "rlnSphericalAberration": 2.7,
        "rlnAmplitudeContrast": 0.1,
        "rlnImagePixelSize": PIXEL,
        "rlnImageSize": 32,
        "rlnImageDimensionality": 2,
    }


def _damaged_row() -> int:
    """A training particle (STAR row) in the middle of slot 1's shard."""
    train, _ = refinement._split(N_PARTICLES, 500, 0.1, CONFIG.seed)
    start, stop = shard_bounds(len(train), 2)[1]
    return int(train[(start + stop) // 2])


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A RELION 3.1 project: 24 particles of 1UBI (32 px) in two stacks, CTF, shifts ±2 px."""
    folder = tmp_path_factory.mktemp("relion_project")
    volume = structure.coulomb_potential_map(load_structure("1ubi"), 32, PIXEL)
    rng = np.random.default_rng(5)
    cells = rng.choice(4608, N_PARTICLES, replace=False)
    shifts = rng.uniform(-2, 2, (N_PARTICLES, 2))
    ctfs = [
        {"defocus_u": u, "defocus_v": u - 500.0, "angle_deg": a}
        for u, a in zip(
            rng.uniform(8000, 20000, N_PARTICLES), rng.uniform(0, 180, N_PARTICLES), strict=True
        )
    ]
    images, rotations = rl.particles(volume, PIXEL, cells, shifts, ctfs, snr=2.0, seed=6)
    images[_damaged_row()] = np.nan
    rows, half = [], N_PARTICLES // 2
    for stack, part in (("a", slice(0, half)), ("b", slice(half, N_PARTICLES))):
        name = f"Extract/job001/Movies/{stack}.mrcs"
        rl.write_stack(folder / name, images[part], header_pixel=PIXEL)
        for i, k in enumerate(range(N_PARTICLES)[part]):
            rows.append(
                {
                    "rlnImageName": f"{i + 1:06d}@{name}",
                    "rlnMicrographName": f"MotionCorr/job000/Movies/{stack}.mrc",
                    "rlnOpticsGroup": 1,
                    **rl.ctf_row(ctfs[k]),
                    **rl.angles_row(rotations[k]),
                    "rlnOriginXAngst": float(-shifts[k, 0] * PIXEL),
                    "rlnOriginYAngst": float(-shifts[k, 1] * PIXEL),
                }
            )
    star = folder / "Refine3D/job002/run_data.star"
    blocks = [rl.loop_block("optics", [_optics()]), rl.loop_block("particles", rows)]
    rl.write_star(star, "30001", blocks)
    io.write_map(folder / "Refine3D/job002/run_class001.mrc", volume, PIXEL)
    return folder


def _train(folder: Path, run: Path, **kw):
    return refinement.train_on_refinement(
        folder / "Refine3D/job002/run_data.star",
        folder / "Refine3D/job002/run_class001.mrc",
        run,
        model_config=MODEL,
        training_config=CONFIG,
        source="fixed",
        batch_size=4,
        slots=2,
        progress=False,
        contrast="white",
        **kw,
    )


def _two_rank_worker(context: dd.DistributedContext, folder: Path) -> None:
    try:  # the damaged particle is in rank 1's shard: only rank 1 meets it
        _train(folder, folder / "refused", skip_bad=False)
    except dd.RankError as error:
        (folder / f"refused_rank{context.rank}.txt").write_text(str(error))
    result = _train(folder, folder / "two", skip_bad=True)
    if context.writes:
        torch.save(result.model.state_dict(), folder / "two_weights.pt")


@pytest.fixture(scope="module")
def two_ranks(project):
    codes = dd.launch(_two_rank_worker, 2, (project,), timeout_s=LAUNCH_S)
    assert codes == [0, 0], f"ranks ended with {codes} (tracebacks above)"
    return project


def _rows(runs) -> list[int]:
    return [row for start, stop in runs for row in range(start, stop)]


def test_each_rank_reads_only_its_share(two_ranks):
    bad = _damaged_row()
    train, validation = refinement._split(N_PARTICLES, 500, 0.1, CONFIG.seed)
    bounds = shard_bounds(len(train), 2)
    record = io.read_json(two_ranks / "two" / refinement.SHARDS_FILE)
    assert record["world_size"] == 2 and [r["rank"] for r in record["ranks"]] == [0, 1]
    for rank, part in enumerate(record["ranks"]):
        share = [int(i) for i in train[slice(*bounds[rank])] if i != bad]
        assert part["slots"] == [rank, rank + 1]
        assert _rows(part["rows"]) == share and part["n_read"] == len(share)
    read = [_rows(part["rows"]) for part in record["ranks"]]
    assert not set(read[0]) & set(read[1])  # disjoint halves of the training split
    assert len(read[0]) == 11 and len(read[1]) == 10  # the damaged particle left out
    assert not set(sum(read, [])) & set(validation.tolist())
    # without skip_bad the damaged particle stops the run on rank 1 alone: rank 0 never read it
    for rank in (0, 1):
        message = (two_ranks / f"refused_rank{rank}.txt").read_text()
        assert "failed on 1 of 2 ranks: rank 1: ValueError" in message and "rank 0" not in message
    assert not (two_ranks / "refused" / "model").exists()


def test_two_ranks_train_as_one_process_with_the_same_slots(two_ranks, tmp_path):
    alone = _train(two_ranks, tmp_path / "one", skip_bad=True)
    one_record = io.read_json(tmp_path / "one" / refinement.SHARDS_FILE)
    assert one_record["world_size"] == 1 and one_record["ranks"][0]["n_read"] == 21
    two_state = torch.load(two_ranks / "two_weights.pt", weights_only=True)
    mine, initial = alone.model.state_dict(), build_model(MODEL, seed=CONFIG.seed).state_dict()
    for name in mine:
        difference = float((mine[name].double() - two_state[name].double()).abs().max())
        assert difference < (sum(STEP_LR) if name in DEGREE_ZERO else TOL), name
    moved = max(float((mine[k].double() - initial[k].double()).abs().max()) for k in mine)
    assert moved > 100 * TOL  # the runs did learn something (measured 2.5e-3)
    # the distributions the two models predict agree (the degree-0 drift shifts all logits)
    two = build_model(MODEL, seed=0)
    two.load_state_dict(two_state)
    images = torch.randn(6, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p_one = torch.softmax(alone.model.eval()(images), dim=1)
        p_two = torch.softmax(two.eval()(images), dim=1)
    assert float((p_one - p_two).abs().max()) < 1e-5 * float(p_one.max())
    validation = io.read_json(two_ranks / "two" / refinement.VALIDATION_FILE)
    assert validation["source"] == "fixed" and validation["steps"] == 4
    assert validation["n_train"] == 22 and validation["images_seen"] == 4 * 2 * 4


def test_mixed_stream_puts_real_particles_of_the_slot_shard_after_the_fresh_ones():
    n = 8
    images = np.arange(n, dtype=np.float32)[:, None, None] * np.ones((1, 4, 4), np.float32)
    poses = np.tile(np.eye(3), (n, 1, 1))
    real = FixedSetStream(images, np.ones((n, 3), np.float32), poses, 1, seed=2, slots=2)
    fresh = FixedSetStream(-1 - images, np.zeros((n, 3), np.float32), poses, 3, seed=5, slots=2)
    mixed = MixedStream(fresh, real)
    for step in range(4):
        for slot in (0, 1):
            batch = mixed.batch(step, slot)
            values = batch.images[:, 0, 0].tolist()
            assert values[:3] == fresh.batch(step, slot).images[:, 0, 0].tolist()
            assert values[3] == real.batch(step, slot).images[0, 0, 0] and 4 * slot <= values[3]
            assert values[3] < 4 * slot + 4  # slot k's real particles come from shard k
            assert batch.targets.sum(1).tolist() == [0, 0, 0, 3]
            assert np.isnan(batch.noise_sigma[3]) and not np.isnan(batch.noise_sigma[:3]).any()
    assert mixed.slots == 2 and mixed.description()["real"] == real.description()


def test_real_fraction_mixes_real_particles_into_the_stream(project, tmp_path, capsys):
    run = tmp_path / "mixed"
    result = refinement.train_on_refinement(
        project / "Refine3D/job002/run_data.star",
        project / "Refine3D/job002/run_class001.mrc",
        run,
        model_config=MODEL,
        training_config=dataclasses.replace(CONFIG, steps=2),
        real_fraction=0.25,
        batch_size=4,
        progress=False,
        contrast="white",
        skip_bad=True,
    )
    assert result.steps_done == 2 and result.images_seen == 8
    stream = checkpoints.load_checkpoint(result.checkpoint)["stream_identity"]["stream"]
    assert stream["kind"] == "mixed" and stream["simulated"]["config"]["batch_size"] == 3
    assert stream["real"]["kind"] == "fixed" and stream["real"]["batch_size"] == 1
    assert io.read_json(run / refinement.VALIDATION_FILE)["real_per_batch"] == 1
    assert io.read_json(run / refinement.SHARDS_FILE)["ranks"][0]["n_read"] == 21
    for fraction, source, message in ((0.1, "stream", "got 0.1"), (0.5, "fixed", "streamed")):
        with pytest.raises(ValueError, match=message):
            refinement.train_on_refinement(
                project / "x.star", project / "x.mrc", tmp_path / "bad", batch_size=4,
                real_fraction=fraction, source=source,
            )  # fmt: skip
    argv = ["train", "--star", str(project / "x.star"), "--map", str(project / "x.mrc")]
    argv += ["--run-dir", str(tmp_path / "bad"), "--real-fraction", "1.0"]
    assert cli.main(argv) == 2  # the command refuses it in one line, before reading
    assert "real_fraction must be 0 or give 1 .. 31" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
