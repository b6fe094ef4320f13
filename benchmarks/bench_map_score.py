"""Benchmark: how the map search scores a candidate (scale and noise model), on kept particles.

On the held-out particles of a kept ``bench_refinement.py --keep DIR`` run (``DIR/<structure>/
heldout``, its map ``DIR/<structure>/refinement/volume.mrc``), every level-2 cell is searched
(±3 px, each template with its particle's CTF, blurred by ``--blur`` px, the default band) with
each way of scoring, and the median geodesic error of the best cell is printed:

* ``free_white``: a free positive scale per candidate, white noise with σ from the best
  residual (``local_search.search_candidates``, ``score="scaled"``);
* ``free_background``: a free scale, whitened by the backgrounds' spectrum, shifts summed
  (``posterior.search_candidates_whitened``);
* ``fitted_white`` / ``fitted_background``: one scale for every particle, fitted by
  ``local_search.fitted_scale`` at the free-scale search's cells (``score="fitted"``);
* ``map_search``: what ``predict --map`` does (``map_search.MapSearch``, ``scale="fitted"``:
  the fitted scale and the backgrounds' spectrum less the modelled signal);
* ``oracle``: ``matching.ctf_template_matching`` on images on the map's scale (known for a
  simulation: the bench_refinement oracle).

Usage::

    python benchmarks/bench_map_score.py keep/1ubi --n 300 --threads 1     # ~3 min

Last line: one JSON object ``{"structure", "n", "fitted_scale", "medians": {...}}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> dict:
    from cryosphere.geometry import grids
    from cryosphere.imaging.particles import StackReader, read_particle_set
    from cryosphere.imaging.simulate import load_dataset
    from cryosphere.poses.labels.templates import template_bank
    from cryosphere.poses.prediction.predictions import pose_errors_deg
    from cryosphere.poses.search import local_search, map_search, matching
    from cryosphere.poses.search import posterior as sp
    from cryosphere.poses.search.noise import background_noise_spectrum

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kept", type=Path, help="DIR/<structure> of bench_refinement --keep DIR")
    parser.add_argument("--n", type=int, default=300, help="held-out particles searched")
    parser.add_argument("--blur", type=float, default=1.0, help="template blur, px")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    held, map_path = args.kept / "heldout", args.kept / "refinement" / "volume.mrc"
    truth = load_dataset(held)
    pset = read_particle_set(held / "particles.star")
    n = min(args.n, len(pset))
    with StackReader(pset) as reader:
        images = torch.as_tensor(reader.read(np.arange(n)))
    ctf, pixel = pset.ctf.subset(np.arange(n)), pset.pixel_size_angstrom
    refinement = map_search.MapRefinement(map_path, 2, 3.0, blur_sigma_px=args.blur)
    search = map_search.MapSearch(refinement, pset, pset.image_size, 2)
    grid = grids.healpix_so3_grid(2)
    every = np.tile(np.arange(len(grid)), (n, 1))
    kwargs = dict(ctf=ctf, pixel_size_angstrom=pixel, max_shift_px=3.0)
    noise = background_noise_spectrum(images)
    cells = {}
    free = local_search.search_candidates(images, every, search.spectra, score="scaled", **kwargs)
    cells["free_white"] = free.match.best_index
    cells["free_background"] = sp.search_candidates_whitened(
        images, every, search.spectra, noise, score="scaled", **kwargs
    ).match.best_index
    scale = local_search.fitted_scale(images, free.match.best_index, search.spectra, **kwargs)
    fitted = kwargs | {"score": "fitted", "scale": scale}
    cells["fitted_white"] = local_search.search_candidates(
        images, every, search.spectra, **fitted
    ).match.best_index
    cells["fitted_background"] = sp.search_candidates_whitened(
        images, every, search.spectra, noise, **fitted
    ).match.best_index
    level_1 = np.tile(np.arange(grids.healpix_so3_grid_size(1)), (n, 1))
    default = map_search.MapSearch(refinement, pset, pset.image_size, 1)
    cells["map_search"] = default(images, ctf, pixel, level_1).match.best_index
    templates = template_bank(search.volume, 2, args.blur)
    cells["oracle"] = matching.ctf_template_matching(
        images, templates, ctf=ctf, pixel_size_angstrom=pixel, max_shift_px=3.0
    ).best_index
    medians = {
        name: float(np.median(pose_errors_deg(grid[c], truth.rotations[:n], truth.symmetry_ops)))
        for name, c in cells.items()
    }
    for name, value in medians.items():
        print(f"{name:18s} {value:6.2f} deg", flush=True)
    summary = {
        "structure": args.kept.name,
        "n": n,
        "fitted_scale": scale,
        "map_search_scale": default.data_scale,
        "medians": medians,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
