"""Benchmark: pose labels of 400 images of a 64³ 1UBI map on the level-2 grid (4,608 cells).

Times the template bank (4,608 blurred projections), the MSE landscape (400 × 4,608, one
float32 matrix product per chunk) and the top-5 % masks, and measures the machine's own
float32 matrix-product throughput on the same shape (``torch.matmul`` of (400, 4096) by
(4096, 4608), best of ``--repeats``) in the same run, so the MSE step can be compared with it.
Each step is the best of ``--repeats`` runs after a warm-up. λ tuning is timed separately (it is
not part of the target).

Usage: python benchmarks/bench_labels.py [--threads 2] [--repeats 5]
The last line printed is one JSON object (templates_s, mse_s, mask_s, total_s, mse_gflops,
gemm_peak_gflops, mse_to_peak, ...). Targets on 2 cores: total_s <= 4, mse_to_peak >= 0.5.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cryosphere.geometry import grids
from cryosphere.imaging.datasets import SimulationParameters
from cryosphere.imaging.simulate import simulate_dataset
from cryosphere.poses.labels import landscape, soft_maps
from cryosphere.poses.labels import templates as labels_templates


def best_time(function, repeats: int):
    result = function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n-images", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    params = SimulationParameters(structure="1ubi", n_projections=args.n_images, image_size=64)
    dataset = simulate_dataset(params, progress=False)
    grids.healpix_so3_grid(2)  # build the cached grid (and import healpy) outside the timings
    n, size, level, q = len(dataset), dataset.image_size, 2, 0.05
    n_cells, n_pixels = grids.healpix_so3_grid_size(level), size * size

    templates_s, templates = best_time(
        lambda: labels_templates.template_bank(dataset.volume, level, params.blur_sigma),
        args.repeats,
    )
    mse_s, mse = best_time(
        lambda: landscape.mse_landscape(dataset.clean_images, templates), args.repeats
    )
    mask_s, mask = best_time(lambda: soft_maps.top_fraction_mask(mse, q), args.repeats)
    start = time.perf_counter()
    lam = soft_maps.tune_lambda(
        mse, grids.healpix_so3_grid(level), dataset.rotations, dataset.symmetry_ops
    )
    tune_s = time.perf_counter() - start

    a = torch.randn(n, n_pixels)
    b = torch.randn(n_cells, n_pixels)
    gemm_s, _ = best_time(lambda: torch.matmul(a, b.T), args.repeats)
    flops = 2.0 * n * n_cells * n_pixels
    total_s = templates_s + mse_s + mask_s
    result = {
        "n_images": n,
        "image_size": size,
        "level": level,
        "n_cells": n_cells,
        "threads": args.threads,
        "templates_s": round(templates_s, 3),
        "mse_s": round(mse_s, 3),
        "mask_s": round(mask_s, 3),
        "total_s": round(total_s, 3),
        "tune_lambda_s": round(tune_s, 3),
        "lam": lam,
        "mask_ones_per_row": int(mask.sum(axis=1)[0]),
        "mse_gflops": round(flops / mse_s / 1e9, 1),
        "gemm_s": round(gemm_s, 3),
        "gemm_peak_gflops": round(flops / gemm_s / 1e9, 1),
        "mse_to_peak": round(gemm_s / mse_s, 3),
    }
    print(f"templates ({n_cells} of {size}^3): {templates_s:.3f} s")
    print(f"MSE {n} x {n_cells}: {mse_s:.3f} s = {result['mse_gflops']} GFLOP/s")
    print(f"masks: {mask_s:.3f} s; λ tuning: {tune_s:.3f} s (λ = {lam:.4g})")
    print(
        f"matmul peak on the same shape: {result['gemm_peak_gflops']} GFLOP/s "
        f"(MSE at {100 * result['mse_to_peak']:.0f} %)"
    )
    print(f"total (templates + MSE + masks): {total_s:.3f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
