"""Benchmark: what stating the true shifts as origins gives ``predict`` (the old held-out sets).

The same simulated realistic particles (:data:`bench_predict.REALISTIC`: CTF 0.5-2.5 µm, shifts
±3 px, blur 1 px, 64 px) are written twice as RELION files: with each particle's true shift as
its origin (``rlnOriginX/YAngst``, as the benchmarks wrote held-out sets before 0.3, and as a
refinement states them) and as picked (zero origins,
``save_dataset(write_origins=False)``). ``predict`` centres the images by their origins before
the network sees them, so the first set hands it the shifts a search must otherwise find. For
each set it prints the median symmetry-aware error of the network alone and of ``predict --map``
(±3 px, templates blurred by 1 px, each ``--top-k``).

Usage::

    python benchmarks/bench_origins.py CHECKPOINT --structure 1hvr --n 1000 --threads 1

``CHECKPOINT``: a network trained on the realistic stream for that structure (e.g. the one
``bench_peers.py`` trains, or ``bench_realistic.py --run-dir``). Last line: one JSON object
``{"structure", "snr", "n", "sets": {"true_origins": {...}, "picked": {...}}}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> dict:
    from bench_predict import REALISTIC

    from cryosphere.geometry import grids
    from cryosphere.imaging.datasets import SimulationParameters
    from cryosphere.imaging.particles import read_particle_set
    from cryosphere.imaging.simulate import save_dataset, simulate_dataset
    from cryosphere.poses.prediction import inference, predictions
    from cryosphere.poses.search import map_search

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--structure", default="1hvr")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--snr", type=float, default=0.05)
    parser.add_argument("--top-k", type=int, nargs="+", default=[100, 10])
    parser.add_argument("--seed", type=int, default=4242)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    params = SimulationParameters(
        structure=args.structure, n_projections=args.n, seed=args.seed, snr=args.snr, **REALISTIC
    )
    data = simulate_dataset(params, progress=False)
    grid = grids.healpix_so3_grid(2)

    def median(cells: np.ndarray) -> float:
        errors = predictions.pose_errors_deg(grid[cells], data.rotations, data.symmetry_ops)
        return float(np.median(errors))

    sets = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, origins in (("true_origins", True), ("picked", False)):
            folder = Path(tmp) / name
            save_dataset(data, folder, write_origins=origins)
            star = folder / "particles.star"
            out = folder / "predicted.star"
            inference.predict_star(
                star, args.checkpoint, out, device="cpu", progress=False, top_k=max(args.top_k)
            )
            row = {"network_median_deg": median(inference.load_topk(out).index[:, 0])}
            refinement = map_search.MapRefinement(
                star.with_name("volume.mrc"), level=2, max_shift_px=REALISTIC["max_shift_px"],
                blur_sigma_px=REALISTIC["blur_sigma"],
            )  # fmt: skip
            for k in args.top_k:  # a fresh search each: its scale fitted anew
                search = map_search.MapSearch(refinement, read_particle_set(star), 64, 2)
                searched = folder / f"searched_{k}.star"
                inference.predict_star(
                    star, args.checkpoint, searched, device="cpu", progress=False, top_k=k,
                    refine=search, contrast="white",
                )  # fmt: skip
                with np.load(inference.topk_path(searched)) as side:
                    row[f"map_top{k}_median_deg"] = median(side["refined_index"])
            sets[name] = row
            print(name, {key: round(value, 2) for key, value in row.items()}, flush=True)
    summary = {"structure": args.structure, "snr": args.snr, "n": args.n, "sets": sets}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
