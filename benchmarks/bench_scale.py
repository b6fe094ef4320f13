"""Benchmark: memory and throughput of ``cryosphere predict`` on a large stack, 1 and 2 ranks.

1. Generates ``--n-particles`` (default 100,000) white-noise images of ``--box`` px (64:
   1.6 GB at 100,000) into one memory-mapped MRC stack in a temporary folder, chunk by chunk
   (the generator never holds more than one chunk), with a RELION 3.1 STAR file (no CTF) and a
   subset STAR file of its first ``--rate-particles`` rows.
2. Writes an untrained checkpoint of ``ModelConfig(image_size=box, grid_level=--level)`` (the
   network's cost does not depend on its training).
3. Runs ``python -m cryosphere predict`` over the whole set on 1 rank (``--threads`` torch
   threads, ``--workers`` DataLoader readers) and samples the resident memory of its process
   tree every 0.1 s (/proc; the sum over processes counts shared library pages once per
   process, so it is an upper bound); peak = ``predict_peak_rss_gb``.
4. Throughput (images/s, as printed by the command: reading, preprocessing, network, writing)
   on the subset, on 1 rank (``--threads`` threads) and on 2 ranks under torchrun (threads
   split between them), ``images_per_s_1_rank`` / ``images_per_s_2_ranks``, and on 1 rank with
   1 thread (``images_per_s_1_rank_1_thread``: on a loaded machine 2 threads in one process can
   be slower than 1, so the rank comparison needs it); the CPUs may be shared with other work,
   so repeat on a quiet machine before comparing.

Usage: nice -n 15 python benchmarks/bench_scale.py [--n-particles 10000] [--keep]
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile

from cryosphere.imaging import atoms as imaging_atoms
from cryosphere.imaging import structure
from cryosphere.imaging.simulate import auto_pixel_size
from cryosphere.poses.network.model import ModelConfig
from cryosphere.poses.training.stream import SimulatedStream, StreamConfig
from cryosphere.poses.training.streamed import StreamTrainingConfig, train_on_stream

PIXEL_A = 1.5


def write_stack(folder: Path, n: int, box: int, chunk: int = 4096) -> Path:
    """``n`` noise images into ``folder/particles.mrcs`` (memory-mapped, chunk by chunk)."""
    path = folder / "particles.mrcs"
    rng = np.random.default_rng(0)
    with mrcfile.new_mmap(path, shape=(n, box, box), mrc_mode=2, overwrite=True) as mrc:
        mrc.set_image_stack()
        mrc.voxel_size = PIXEL_A
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            mrc.data[start:stop] = rng.standard_normal((stop - start, box, box), np.float32)
            mrc.flush()
    return path


def write_star(folder: Path, name: str, n: int, box: int) -> Path:
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnImagePixelSize": [PIXEL_A],
            "rlnImageSize": [box],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
        }
    )
    particles = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@particles.mrcs" for i in range(n)],
            "rlnOpticsGroup": np.ones(n, dtype=int),
        }
    )
    path = folder / name
    starfile.write({"optics": optics, "particles": particles}, path)
    return path


def write_checkpoint(folder: Path, box: int, level: int) -> Path:
    atoms = imaging_atoms.load_structure("1ubi")
    volume = structure.coulomb_potential_map(atoms, box, auto_pixel_size(atoms, box))
    stream = SimulatedStream(volume, 1.0, level, StreamConfig(target="pose", reference_images=16))
    result = train_on_stream(
        stream,
        ModelConfig(image_size=box, grid_level=level),
        StreamTrainingConfig(steps=0, device="cpu"),
        stream.heldout(4),
        run_dir=folder / "run",
        progress=False,
    )
    return result.checkpoint


def _tree_rss_bytes(root: int) -> tuple[int, int]:
    """(sum, max) resident bytes over ``root`` and its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            parent, pages = int(fields[1]), int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
        rss[int(entry)] = pages * os.sysconf("SC_PAGE_SIZE")
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    values = [rss.get(pid, 0) for pid in tree]
    return sum(values), max(values)


def run_measured(command: list[str], env: dict[str, str]) -> tuple[str, float, float]:
    """Run ``command``; return (stdout, peak summed RSS GB, peak single-process RSS GB)."""
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peaks = [0, 0]

    def sample() -> None:
        while process.poll() is None:
            total, single = _tree_rss_bytes(process.pid)
            peaks[0], peaks[1] = max(peaks[0], total), max(peaks[1], single)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = process.communicate()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{err[-3000:]}")
    return out, peaks[0] / 1e9, peaks[1] / 1e9


def images_per_s(stdout: str) -> float:
    match = re.search(r"\(([\d.]+) images/s\)", stdout)
    if match is None:
        raise RuntimeError(f"no throughput in the output: {stdout!r}")
    return float(match.group(1))


def predict_command(star: Path, ckpt: Path, out: Path, args, ranks: int) -> list[str]:
    tail = [
        "-m", "cryosphere", "predict", str(star), "--checkpoint", str(ckpt), "-o", str(out),
        "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--no-progress",
        "--device", "cpu", "--overwrite",
    ]  # fmt: skip
    if ranks == 1:
        return [sys.executable, *tail]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", *tail]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-particles", type=int, default=100_000)
    parser.add_argument("--rate-particles", type=int, default=4096)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--level", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--folder", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()
    folder = Path(args.folder or tempfile.mkdtemp(prefix="bench_scale_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        stack = write_stack(folder, args.n_particles, args.box)
        star = write_star(folder, "particles.star", args.n_particles, args.box)
        rate_n = min(args.rate_particles, args.n_particles)
        subset = write_star(folder, "subset.star", rate_n, args.box)
        ckpt = write_checkpoint(folder, args.box, args.level)
        print(
            f"generated {stack.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - started:.0f} s"
        )
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
        out, peak_sum, peak_one = run_measured(
            predict_command(star, ckpt, folder / "all.star", args, 1), env
        )
        full_rate = images_per_s(out)
        print(f"1 rank, {args.n_particles} particles: {out.strip()}; peak RSS {peak_sum:.2f} GB")
        rates = {}
        for ranks, threads in ((1, args.threads), (2, max(1, args.threads // 2)), (1, 1)):
            out, rank_sum, _ = run_measured(
                predict_command(subset, ckpt, folder / f"subset{ranks}.star", args, ranks),
                dict(env, OMP_NUM_THREADS=str(threads)),
            )
            rates[ranks, threads] = (images_per_s(out), rank_sum)
            print(f"{ranks} rank(s) x {threads} threads, {rate_n} particles: {out.strip()}")
        two = max(1, args.threads // 2)
        record = {
            "n_particles": args.n_particles,
            "box_px": args.box,
            "stack_gb": round(stack.stat().st_size / 1e9, 3),
            "predict_peak_rss_gb": round(peak_sum, 3),
            "predict_peak_rss_one_process_gb": round(peak_one, 3),
            "images_per_s_full_set_1_rank": round(full_rate, 1),
            "rate_particles": rate_n,
            "images_per_s_1_rank": round(rates[1, args.threads][0], 1),
            "images_per_s_2_ranks": round(rates[2, two][0], 1),
            "images_per_s_1_rank_1_thread": round(rates[1, 1][0], 1),
            "peak_rss_2_ranks_gb": round(rates[2, two][1], 3),
            "threads": args.threads,
            "workers": args.workers,
            "batch_size": args.batch_size,
            "cpu_count": os.cpu_count(),
            "load_average_1min": round(os.getloadavg()[0], 2),
        }
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
