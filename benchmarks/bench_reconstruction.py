"""Benchmark: back-project 4,608 images of 64 px, ours vs torch-fourier-slice, same run.

The images are noise-free projections of the 1UBI map (64³) at the level-2 SO(3) grid poses.
Both back-projectors run in the same process on the same images after one warm-up call each
(on a 256-image subset); the best of ``--repeats`` timings is kept. The peer is
torch-fourier-slice's ``backproject_2d_to_3d`` given ``Rᵀ`` (its matrices sample the volume at
``M·x``; checked in tests/test_reconstruct.py). Each map's FSC against the ground-truth map is
summarised by its mean over shells 1 .. 2/3 Nyquist and its resolution at 0.143 and 0.5.

Usage: python benchmarks/bench_reconstruction.py [--threads 2] [--repeats 1] [--device cpu]
The last line printed is one JSON object (ours_s, peer_s, speedup, FSC figures).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch_fourier_slice import backproject_2d_to_3d

from cryosphere.geometry import grids
from cryosphere.imaging import atoms as imaging_atoms
from cryosphere.imaging import structure
from cryosphere.imaging.projection import project_volume
from cryosphere.imaging.simulate import auto_pixel_size
from cryosphere.reconstruction.backprojection import backproject
from cryosphere.reconstruction.fsc import fourier_shell_correlation


def best_time(function, repeats: int) -> tuple[float, torch.Tensor]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        if result.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    atoms = imaging_atoms.load_structure("1ubi")
    pixel = auto_pixel_size(atoms, 64)
    volume = structure.coulomb_potential_map(atoms, 64, pixel)
    poses = grids.healpix_so3_grid(2)
    images = project_volume(volume, poses, device=device)
    transposed = torch.as_tensor(
        poses.transpose(0, 2, 1).copy(), dtype=torch.float32, device=device
    )

    def ours(n: int | None = None) -> torch.Tensor:
        return backproject(images[:n], poses[:n], regularisation=0.0, device=device)

    def peer(n: int | None = None) -> torch.Tensor:
        return backproject_2d_to_3d(images[:n], transposed[:n])

    ours(256), peer(256)  # warm-up
    ours_s, ours_map = best_time(ours, args.repeats)
    peer_s, peer_map = best_time(peer, args.repeats)
    result = {
        "n_images": len(poses),
        "image_size": 64,
        "device": str(device),
        "threads": args.threads,
        "ours_s": round(ours_s, 3),
        "peer_s": round(peer_s, 3),
        "speedup": round(peer_s / ours_s, 2),
    }
    for name, recon in (("ours", ours_map), ("peer", peer_map)):
        curve = fourier_shell_correlation(recon.cpu(), volume, pixel)
        result[f"{name}_fsc_mean_to_2/3_nyquist"] = round(float(curve.fsc[1:22].mean()), 5)
        result[f"{name}_fsc_nyquist_shell"] = round(float(curve.fsc[-1]), 4)
        result[f"{name}_resolution_0.143_angstrom"] = round(curve.resolution(0.143), 3)
        result[f"{name}_resolution_0.5_angstrom"] = round(curve.resolution(0.5), 3)
    print(f"pixel size {pixel:.2f} Å, Nyquist {2 * pixel:.2f} Å")
    print(f"ours  {ours_s:8.2f} s  ({len(poses) / ours_s:7.1f} images/s)")
    print(f"peer  {peer_s:8.2f} s  ({len(poses) / peer_s:7.1f} images/s)")
    print(f"speedup (peer / ours): {peer_s / ours_s:.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
