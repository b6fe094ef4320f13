"""Benchmark: mixing a refinement's real particles into the streamed batches (``--real-fraction``).

For each SNR, a small simulated refinement (1UBI, 32 px, CTF 0.5-2.5 µm imaged in a padded
field, shifts ±2 px; ``--n-particles``, of which 40 % are held out) is trained on with
:func:`cryosphere.runs.refinement.train_on_refinement` (streamed from the map with the
refinement's statistics, level-1 grid, ``--steps`` steps of 16 particles) for each real
fraction ``F`` and seed, and scored on the held-out particles against their refined poses:
cross-entropy of the pose-kernel target (``val_loss``; a uniform guess scores log 576 = 6.36),
median error and the share whose refined cell is among the network's 100 most probable
(``topk_hit``). ``F = 0`` is the plain stream; the ``fixed`` row trains on the real particles
alone (``--source fixed``).

The refinement is simulated, so the stream's particle model is the data's own: this measures
what mixing costs or gains when the stream is right (memorising the real particles against
seeing more fresh ones), not what it would correct on data the simulation misses.

Usage::

    python benchmarks/bench_real_fraction.py --threads 1      # ~4 min on one thread
    python benchmarks/bench_real_fraction.py --threads 1 --steps 1000 --snrs 0.5 \\
        --fractions 0 0.1 0.25 0.5                            # the docs' table, ~5 min

Last line: one JSON object ``{"cases": [{"snr", "real_fraction", "seed", "val_loss",
"val_median_deg", "val_topk_hit"}], "means": [...], "settings"}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cryosphere import io
from cryosphere.imaging.datasets import SimulationParameters
from cryosphere.imaging.simulate import save_dataset, simulate_dataset
from cryosphere.poses.training.streamed import StreamTrainingConfig
from cryosphere.runs import refinement
from cryosphere.runs.series import stream_model_config


def _refinement(folder: Path, n: int, snr: float) -> Path:
    params = SimulationParameters(
        structure="1ubi", n_projections=n, image_size=32, snr=snr, seed=3, ctf=True,
        max_shift_px=2.0,
    )  # fmt: skip
    save_dataset(simulate_dataset(params, progress=False), folder)
    return folder


def _train(folder: Path, fraction: float | str, seed: int, steps: int) -> dict:
    run = folder / f"run_{fraction}_{seed}"
    source = "fixed" if fraction == "fixed" else "stream"
    start = time.perf_counter()
    refinement.train_on_refinement(
        folder / "particles.star",
        folder / "volume.mrc",
        run,
        model_config=stream_model_config(32, grid_level=1, channels=(8, 16)),
        training_config=StreamTrainingConfig(
            steps=steps, learning_rate=3e-3, warmup_steps=steps // 10, eval_every=steps, seed=seed
        ),
        source=source,
        real_fraction=0.0 if source == "fixed" else float(fraction),
        batch_size=16,
        validation_fraction=0.4,
        progress=False,
    )
    final = io.read_json(run / refinement.VALIDATION_FILE)["final"]
    return {
        "real_fraction": fraction,
        "seed": seed,
        "val_loss": round(final["val_loss"], 4),
        "val_median_deg": round(final["val_median_deg"], 2),
        "val_topk_hit": round(final["val_topk_hit"], 3),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-particles", type=int, default=250)
    parser.add_argument("--snrs", type=float, nargs="+", default=[5.0, 0.5])
    parser.add_argument("--fractions", nargs="+", default=["0", "0.25", "0.5", "fixed"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for snr in args.snrs:
            folder = _refinement(Path(tmp) / f"snr{snr}", args.n_particles, snr)
            for fraction in args.fractions:
                for seed in args.seeds:
                    case = {"snr": snr} | _train(folder, fraction, seed, args.steps)
                    print(json.dumps(case), flush=True)
                    cases.append(case)
    means = []
    for snr in args.snrs:
        for fraction in args.fractions:
            rows = [c for c in cases if c["snr"] == snr and c["real_fraction"] == fraction]
            means.append(
                {"snr": snr, "real_fraction": fraction}
                | {
                    k: round(float(np.mean([r[k] for r in rows])), 3)
                    for k in rows[0]
                    if k.startswith("val_")
                }
            )
    print(json.dumps({"cases": cases, "means": means, "settings": vars(args)}))


if __name__ == "__main__":
    main()
