"""Benchmark: a user's refinement, trained on with one command, then new particles predicted.

For each structure (default 1UBI and 1HVR; any ``--structure`` name or PDB/mmCIF path):

1. simulate a "refinement" of ``--n-particles`` particles and ``--n-heldout`` other ones as a
   microscope images them (:mod:`cryosphere.imaging.microscope`: CTF and shift in a padded
   field, then boxed; 64 px, blur 1 px, CTF 0.5-2.5 µm with astigmatism up to 500 Å, shifts
   ±3 px, SNR 0.05), each written as RELION 3.1 files (``particles.star`` with ``data_optics``,
   defocus and origins, an ``.mrcs`` stack, ``volume.mrc``); the refinement's poses and
   origins are the true ones (a perfect consensus refinement); the held-out particles are
   written as picked, with zero origins (their shifts are for the search to find, as for the
   oracle);
2. the user's path, as subprocesses: ``cryosphere train --star refinement/particles.star --map
   refinement/volume.mrc --minutes M`` (streamed from the map with the refinement's own
   statistics, the default), then ``cryosphere predict heldout/particles.star`` (network alone,
   its distribution averaged over four quarter turns, the default without a map) and
   ``cryosphere predict ... --map refinement/volume.mrc --max-shift 3`` (top 100 cells
   searched against the map with each particle's CTF); ``network_turns1_median_deg``: the
   network alone in one pass (``predict --turns 1``);
3. scores on the held-out particles (first ``--n-oracle`` of them): median geodesic error of
   the network alone, of the map search, and of the oracle, CTF-aware template matching over
   the whole level-2 grid with a ±3 px translation search
   (:func:`cryosphere.poses.search.matching.ctf_template_matching`, templates of the map blurred as
   the data; ``oracle_padded_median_deg``: the same with the padded-field model,
   ``mode="padded_ctf"``); ``top100_hit``: the share of particles whose true pose's cell is among the
   network's 100 most probable cells; FSC-0.5 (Å) of the CTF-corrected reconstructions from
   the searched poses centred by the searched shifts (``fsc05_searched_A``) and from the true
   poses and shifts (``fsc05_true_A``), all held-out particles.

Usage::

    python benchmarks/bench_refinement.py                                   # 2 × ~35 min
    python benchmarks/bench_refinement.py --n-particles 1000 --n-heldout 200 --minutes 3 \\
        --structures 1ubi --threads 1                                       # smoke run
    python benchmarks/bench_refinement.py --structures 1ubi --train-args "--box 32"  # 32-px net
    python benchmarks/bench_refinement.py --structures 1ubi --checkpoint keep/1ubi/run/model/checkpoint.pt

``predict --map`` searches at the particles' 64 px whatever the network's box
(``--search-box 64``).

Last line: one JSON object ``{"cases": [{"structure", "train_s", "network_median_deg",
"map_median_deg", "oracle_median_deg", "top100_hit", "fsc05_searched_A", "fsc05_true_A",
...}], "settings"}``. Targets (issue 23): network ≤ 2 × and map ≤ 1.1 × the oracle's median;
FSC-0.5 from searched poses within 1.15 × the true poses'.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_predict import REALISTIC
from bench_realistic import reconstruction_fsc05, searched_side_shift

SNR = 0.05


def _simulate(folder: Path, structure: str, n: int, seed: int, snr: float, picked: bool):
    from cryosphere.imaging.datasets import SimulationParameters
    from cryosphere.imaging.simulate import save_dataset, simulate_dataset

    params = SimulationParameters(
        structure=structure, n_projections=n, seed=seed, snr=snr, **REALISTIC
    )
    dataset = simulate_dataset(params, progress=False)
    save_dataset(dataset, folder, overwrite=True, write_origins=not picked)
    return dataset


def _cryosphere(args: list[str], threads: int) -> float:
    """Run ``python -m cryosphere ARGS`` (the user's command); returns its wall-clock seconds."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cryosphere", *args], env=env, text=True,
                          capture_output=True)  # fmt: skip
    print("   $ cryosphere", " ".join(args), flush=True)
    for line in (done.stdout + done.stderr).strip().splitlines()[-4:]:
        print("    ", line, flush=True)
    if done.returncode != 0:
        raise SystemExit(f"cryosphere {args[0]} failed ({done.returncode})")
    return time.perf_counter() - started


def _angles(star: Path) -> np.ndarray:
    from cryosphere.imaging.particles import read_particle_set

    return read_particle_set(star, require_angles=True).rotations()


def run_structure(name: str, args: argparse.Namespace, folder: Path) -> dict:
    from cryosphere.geometry import grids
    from cryosphere.geometry.grids import nearest_grid_indices
    from cryosphere.poses.labels.templates import template_bank
    from cryosphere.poses.prediction import inference, predictions
    from cryosphere.poses.search import matching

    ref, held, run = folder / "refinement", folder / "heldout", folder / "run"
    print(f"== {name}: simulating {args.n_particles} + {args.n_heldout} particles ...", flush=True)
    refinement = _simulate(ref, name, args.n_particles, seed=11, snr=args.snr, picked=False)
    dataset = _simulate(held, name, args.n_heldout, seed=1011, snr=args.snr, picked=True)
    ops = dataset.symmetry_ops
    if args.checkpoint:  # a network trained before on this refinement (e.g. a --keep run's)
        checkpoint, train_s = Path(args.checkpoint), 0.0
        run = checkpoint.parent.parent
    else:
        train_s = _cryosphere(
            ["train", "--star", str(ref / "particles.star"), "--map", str(ref / "volume.mrc"),
             "--run-dir", str(run), "--minutes", str(args.minutes), "--device", "cpu",
             "--no-progress", "--seed", "0", *args.train_args.split()],
            args.threads,
        )  # fmt: skip
        checkpoint = run / "model" / "checkpoint.pt"
    star = held / "particles.star"
    # the map is the simulation's volume, without the particles' envelope: predict --map blurs
    # its templates by the envelope `train` measured against it (recorded in the checkpoint)
    _cryosphere(["predict", str(star), "--checkpoint", str(checkpoint), "-o",
                 str(held / "predicted.star"), "--device", "cpu", "--no-progress"],
                args.threads)  # fmt: skip
    _cryosphere(["predict", str(star), "--checkpoint", str(checkpoint), "-o",
                 str(held / "predicted_turns1.star"), "--turns", "1", "--device", "cpu",
                 "--no-progress"], args.threads)  # fmt: skip
    _cryosphere(["predict", str(star), "--checkpoint", str(checkpoint), "-o",
                 str(held / "searched.star"), "--map", str(ref / "volume.mrc"), "--max-shift",
                 str(REALISTIC["max_shift_px"]), "--top-k", "100", "--device", "cpu",
                 "--search-box", str(REALISTIC["image_size"]),  # whatever the network's box
                 "--no-progress"], args.threads)  # fmt: skip
    m = min(args.n_oracle, args.n_heldout)
    network_err = predictions.pose_errors_deg(
        _angles(held / "predicted.star"), dataset.rotations, ops
    )
    turns_err = predictions.pose_errors_deg(
        _angles(held / "predicted_turns1.star"), dataset.rotations, ops
    )
    searched = _angles(held / "searched.star")
    map_err = predictions.pose_errors_deg(searched, dataset.rotations, ops)
    print(f"== {name}: template matching {m} particles (the oracle) ...", flush=True)
    templates = template_bank(refinement.volume, 2, REALISTIC["blur_sigma"])
    grid = grids.healpix_so3_grid(2)

    def oracle_errors(mode: str) -> np.ndarray:
        found = matching.ctf_template_matching(
            dataset.noisy_images[:m],
            templates,
            ctf=dataset.ctf.subset(np.arange(m)),
            pixel_size_angstrom=dataset.pixel_size,
            max_shift_px=REALISTIC["max_shift_px"],
            mode=mode,
        )
        return predictions.pose_errors_deg(grid[found.best_index], dataset.rotations[:m], ops)

    oracle_err = oracle_errors("ctf_templates")  # templates carrying the in-box CTF
    padded_err = oracle_errors("padded_ctf")  # the padded-field model
    top = inference.load_topk(held / "searched.star").index
    true_cells = np.stack([nearest_grid_indices(dataset.rotations @ g, grid) for g in ops], 1)
    hit = (top[:, :, None] == true_cells[:, None, :]).any(axis=(1, 2))
    regularisation = 1.0 / args.snr
    print(f"== {name}: reconstructing from {args.n_heldout} particles ...", flush=True)
    validation = json.loads((run / "validation.json").read_text())
    case = {
        "structure": name,
        "train_s": train_s,
        "network_median_deg": float(np.median(network_err[:m])),
        "map_median_deg": float(np.median(map_err[:m])),
        "oracle_median_deg": float(np.median(oracle_err)),
        "top100_hit": float(np.mean(hit)),
        "fsc05_searched_A": reconstruction_fsc05(
            dataset, searched, None, regularisation, searched_side_shift(held / "searched.star")
        ),
        "fsc05_true_A": reconstruction_fsc05(dataset, dataset.rotations, None, regularisation),
        "network_turns1_median_deg": float(np.median(turns_err[:m])),
        "network_acc15": float(np.mean(network_err < 15.0)),
        "map_acc15": float(np.mean(map_err < 15.0)),
        "oracle_acc15": float(np.mean(oracle_err < 15.0)),
        "oracle_padded_median_deg": float(np.median(padded_err)),
        "validation_final": validation["final"],
        "steps": validation["steps"],
        "images_seen": validation["images_seen"],
        "n_oracle": int(m),
        "point_group": dataset.point_group,
        "pixel_size_A": dataset.pixel_size,
    }
    case["network_ratio"] = case["network_median_deg"] / case["oracle_median_deg"]
    case["network_turns1_ratio"] = case["network_turns1_median_deg"] / case["oracle_median_deg"]
    case["map_ratio"] = case["map_median_deg"] / case["oracle_median_deg"]
    case["fsc_ratio"] = case["fsc05_searched_A"] / case["fsc05_true_A"]
    print("  ", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in case.items()})
    return case


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", nargs="+", default=["1ubi", "1hvr"])
    parser.add_argument("--structure", action="append", default=[], help="add a structure")
    parser.add_argument("--n-particles", type=int, default=5000, help="the refinement's")
    parser.add_argument("--n-heldout", type=int, default=1000, help="new particles predicted")
    parser.add_argument("--n-oracle", type=int, default=1000, help="held-out scored")
    parser.add_argument("--minutes", type=float, default=20.0, help="cryosphere train --minutes")
    parser.add_argument("--snr", type=float, default=SNR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", default=None, help="keep the files in this folder")
    parser.add_argument(
        "--train-args", default="", help="more options for cryosphere train, e.g. '--box 32'"
    )
    parser.add_argument(
        "--checkpoint", default=None,
        help="score this network (trained on the same refinement, e.g. a --keep run's "
        "RUN/model/checkpoint.pt) instead of training one; one structure",
    )  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    structures = (args.structure if args.structure else []) or args.structures
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        for name in structures:
            cases.append(run_structure(name, args, base / Path(name).stem))
    settings = {k: v for k, v in vars(args).items() if k not in ("structure", "keep")}
    summary = {"cases": cases, "settings": settings | {"structures": structures}}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
