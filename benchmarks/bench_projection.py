"""Benchmark: 4,608 projections of a 64³ map (the level-2 SO(3) grid), ours vs torch-fourier-slice.

Both projectors run in the same process on the same map and poses, after one warm-up call each;
the best of ``--repeats`` timings is kept. The peer is torch-fourier-slice's ``project_3d_to_2d``
given ``Rᵀ`` (its matrices sample the volume at ``M·x``), so both make the same images; their
correlation is printed as a check.

Usage: python benchmarks/bench_projection.py [--threads 2] [--repeats 3]
The last line printed is one JSON object (ours_s, peer_s, speedup, ...).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch_fourier_slice import project_3d_to_2d

from cryosphere.geometry import grids
from cryosphere.imaging import atoms as imaging_atoms
from cryosphere.imaging import structure
from cryosphere.imaging.projection import project_volume
from cryosphere.imaging.simulate import auto_pixel_size


def best_time(function, repeats: int) -> tuple[float, torch.Tensor]:
    function()  # warm-up
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    atoms = imaging_atoms.load_structure("1ubi")
    volume = structure.coulomb_potential_map(atoms, 64, auto_pixel_size(atoms, 64))
    poses = grids.healpix_so3_grid(2)
    volume_t = torch.as_tensor(volume)
    transposed = torch.tensor(poses.transpose(0, 2, 1), dtype=torch.float32)

    ours_s, ours = best_time(lambda: project_volume(volume_t, poses), args.repeats)
    peer_s, peer = best_time(lambda: project_3d_to_2d(volume_t, transposed), args.repeats)
    correlation = float(np.corrcoef(ours.numpy().ravel(), peer.numpy().ravel())[0, 1])
    result = {
        "n_projections": len(poses),
        "map_size": 64,
        "threads": args.threads,
        "ours_s": round(ours_s, 3),
        "peer_s": round(peer_s, 3),
        "speedup": round(peer_s / ours_s, 2),
        "ours_projections_per_s": round(len(poses) / ours_s, 1),
        "correlation_with_peer": round(correlation, 5),
        "targets": {"ours_s_max": 2.0, "speedup_min": 9.0},
    }
    print(
        f"ours: {ours_s:.3f} s   torch-fourier-slice: {peer_s:.3f} s   speedup {peer_s / ours_s:.1f}x"
    )
    print(f"correlation ours vs peer over all pixels: {correlation:.5f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
