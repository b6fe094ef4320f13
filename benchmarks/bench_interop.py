"""Benchmark: particles simulated and written by an independent simulator, read with no flags.

ASPIRE (``aspire`` on PyPI, pinned :data:`ASPIRE_REQUIREMENT`) is installed by this script in its
own virtual environment (``--venv``, default ``~/.cache/cryosphere-bench/aspire-venv``; no torch
there) the first time. For each structure (default 1UBI):

1. the map: CryoSphere's Coulomb-potential map of the shipped structure
   (:func:`cryosphere.imaging.structure.coulomb_potential_map`, ``--box`` px at the automatic
   pixel size), saved as MRC;
2. ASPIRE loads it (``Volume.load``) and simulates ``--n`` particles with its ``Simulation``:
   uniform random poses, its own CTF (``CTFFilter``, 300 kV, Cs 2.7 mm, 10 % amplitude
   contrast, seven mean defoci 0.8-2.0 µm with 400 Å of astigmatism along x; ASPIRE's CTF is
   −1 × RELION's, so protein is dark), its own shifts (``offsets``, uniform in ``±--shift`` px),
   its random amplitudes, its white noise at ``--snr`` (``WhiteNoiseAdder.from_snr``, ASPIRE's
   SNR definition), and writes them with its own STAR writer (``ImageSource.save``: RELION 3.1
   optics + particles, MRC stacks);
3. CryoSphere reads ASPIRE's STAR file with no flags: the first ``--n - --n-test`` particles are
   a "refinement" (ASPIRE's angles and origins as refined poses) for ``cryosphere train``
   (``--steps`` steps, ``--model-box`` px, level-2 grid, ``--contrast`` left at ``auto``), the
   last ``--n-test`` are predicted by the network alone and by ``cryosphere predict --map``
   (the network's ``--top-k`` top cells, default 100, searched against the map, shifts up to
   the ASPIRE shift; ``top_k_hit``: how often the oracle's cell is among them);
4. the oracle: every cell of the same level-2 grid searched for the same test particles, at
   the same box, every template carrying the particle's CTF, with the same shift search, the
   detected contrast and the map search's own score (``"scaled"``: a free amplitude per
   template, since another program's particles come in their own units;
   :func:`cryosphere.poses.search.coarse_to_fine.exhaustive_search` on the whole half-plane).
   An MSE oracle without that amplitude (``ctf_template_matching``, as this benchmark had it)
   scored background-normalised ASPIRE particles against map-unit templates and gave 102° at
   64 px, with the map search at 18.8°.

The map search's centring shifts (``predict`` recentres by the stated origin and searches
the rest; their sum) are compared with ASPIRE's origins (``origin_vs_found_*``: in RELION's
sign they agree; with the opposite sign the recentring moves the particle away). Errors are geodesic angles to ASPIRE's own poses (its STAR angles read as RELION's). Target:
``map_median_deg`` ≤ 1.1 × ``oracle_median_deg``.

Usage::

    python benchmarks/bench_interop.py                                   # full size (~1 h)
    python benchmarks/bench_interop.py --n 320 --n-test 64 --steps 150 --model-box 32  # ~5 min

Last line: one JSON object ``{"cases": [{"source", "n", "contrast_detected",
"oracle_median_deg", "map_median_deg", "network_median_deg", "predict_map_images_per_s", ...}],
"settings"}``.
"""

from __future__ import annotations

import argparse
import contextlib
import io as _io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import starfile
import torch

from cryosphere import cli, io
from cryosphere.geometry import grids
from cryosphere.geometry import rotations as geometry_rotations
from cryosphere.imaging import atoms as imaging_atoms
from cryosphere.imaging import preprocess, structure
from cryosphere.imaging.particles import StackReader, read_particle_set
from cryosphere.imaging.simulate import auto_pixel_size
from cryosphere.poses.prediction import inference
from cryosphere.poses.search import coarse_to_fine, contrast, map_search

ASPIRE_REQUIREMENT = "aspire==0.14.3"
DEFAULT_VENV = Path.home() / ".cache" / "cryosphere-bench" / "aspire-venv"

# Runs in ASPIRE's virtual environment: arguments as one JSON object on the command line.
_ASPIRE_SCRIPT = """
import json, sys
import numpy as np
from aspire.noise import WhiteNoiseAdder
from aspire.operators import CTFFilter
from aspire.source import Simulation
from aspire.volume import Volume

a = json.loads(sys.argv[1])
vol = Volume.load(a["map"], dtype=np.float32)
filters = [
    CTFFilter(voltage=300, defocus_u=d + 200, defocus_v=d - 200, defocus_ang=0.0,
              Cs=2.7, alpha=0.1)
    for d in np.linspace(8000.0, 20000.0, 7)
]
rng = np.random.default_rng(a["seed"])
sim = Simulation(
    L=vol.resolution, n=a["n"], vols=vol, unique_filters=filters, seed=a["seed"],
    offsets=rng.uniform(-a["shift"], a["shift"], (a["n"], 2)),
    noise_adder=WhiteNoiseAdder.from_snr(a["snr"], seed=a["seed"]),
    pixel_size=vol.pixel_size,
)
sim.save(a["star"], overwrite=True)
print(json.dumps({"aspire_true_snr": float(sim.true_snr())}))
"""


def ensure_aspire(venv: Path) -> Path:
    """The Python of a virtual environment holding ASPIRE, made (pip, PyPI) when missing."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import aspire; print(aspire.__version__)"]
    if python.is_file() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"installing {ASPIRE_REQUIREMENT} into {venv} (once)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", ASPIRE_REQUIREMENT], check=True
    )  # fmt: skip
    return python


def simulate_with_aspire(python: Path, map_path: Path, star: Path, args) -> dict:
    """ASPIRE's particles of ``map_path`` written by ASPIRE to ``star``; its reported SNR."""
    star.parent.mkdir(parents=True, exist_ok=True)
    settings = dict(
        map=str(map_path), star=str(star), n=args.n, shift=args.shift, snr=args.snr, seed=args.seed
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(
        [str(python), "-c", _ASPIRE_SCRIPT, json.dumps(settings)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"ASPIRE failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def split_star(star: Path, n_test: int) -> tuple[Path, Path]:
    """ASPIRE's STAR file cut into a training and a test file beside it (same stacks)."""
    tables = starfile.read(star, always_dict=True)
    particles = tables["particles"]
    paths = []
    for name, rows in (("train", particles.iloc[:-n_test]), ("test", particles.iloc[-n_test:])):
        path = star.with_name(f"{star.stem}_{name}.star")
        starfile.write({**tables, "particles": rows.reset_index(drop=True)}, path)
        paths.append(path)
    return paths[0], paths[1]


def _angles(star: Path) -> np.ndarray:
    table = starfile.read(star, always_dict=True)["particles"]
    return geometry_rotations.matrices_from_relion_euler(
        table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(np.float64)
    )


def _oracle(test_star: Path, map_path: Path, args, sign: float, shift_px: float) -> np.ndarray:
    """Cells ``(n,)`` of the exhaustive CTF-aware search of the level-2 grid (module docstring)."""
    pset = read_particle_set(test_star)
    with StackReader(pset) as reader:
        images = reader.read(np.arange(len(pset)))
    prepared, pixel = preprocess.prepare_images(
        sign * images, pset.pixel_size_angstrom, target_size=args.model_box
    )
    volume = preprocess.reference_map(map_path, pset, args.model_box)
    spectra = coarse_to_fine.band_spectra(volume, 2, None)
    found = coarse_to_fine.exhaustive_search(
        prepared, spectra, keep_top=1, ctf=pset.ctf, pixel_size_angstrom=pixel,
        max_shift_px=shift_px, score="scaled",
    )  # fmt: skip
    return found.match.best_index


def run_case(name: str, args, folder: Path, python: Path) -> dict:
    atoms = imaging_atoms.load_structure(name)
    pixel = auto_pixel_size(atoms, args.box)
    map_path = folder / f"{name}_map.mrc"
    io.write_map(map_path, structure.coulomb_potential_map(atoms, args.box, pixel), pixel)
    star = folder / "aspire" / "particles.star"
    start = time.perf_counter()
    aspire_info = simulate_with_aspire(python, map_path, star, args)
    simulate_s = time.perf_counter() - start
    train_star, test_star = split_star(star, args.n_test)
    run_dir = folder / "run"
    train_argv = [
        "train", "--star", str(train_star), "--map", str(map_path), "--run-dir", str(run_dir),
        "--box", str(args.model_box), "--level", "2", "--steps", str(args.steps),
        "--batch-size", str(args.batch_size), "--no-progress",
    ]  # fmt: skip
    start = time.perf_counter()
    log = _io.StringIO()
    with contextlib.redirect_stderr(log):
        status = cli.main(train_argv)
    if status != 0:
        raise SystemExit(f"cryosphere train failed: {log.getvalue()[-2000:]}")
    train_s = time.perf_counter() - start
    checkpoint = run_dir / "model" / "checkpoint.pt"
    net_star = folder / "network.star"
    with contextlib.redirect_stderr(_io.StringIO()):
        status = cli.main(["predict", str(test_star), "--checkpoint", str(checkpoint), "-o",
                           str(net_star), "--no-progress", "--workers", "0", "--overwrite"])  # fmt: skip
    if status != 0:
        raise SystemExit(f"cryosphere predict failed with status {status}")
    shift_px = np.ceil(args.shift * args.model_box / args.box)
    map_star = folder / "map.star"
    refine = map_search.MapRefinement(
        map_path, max_shift_px=float(shift_px), classical_cells=args.classical_cells
    )
    with contextlib.redirect_stderr(_io.StringIO()):
        summary = inference.predict_star(
            test_star, checkpoint, map_star, top_k=args.top_k, refine=refine, progress=False,
            overwrite=True,
        )  # fmt: skip
    detected = map_star.read_text().splitlines()[0].removeprefix("# CryoSphere: ")
    sign = -1.0 if detected.startswith("contrast dark") else 1.0
    truth = _angles(test_star)
    oracle_cells = _oracle(test_star, map_path, args, sign, shift_px)
    oracle = grids.healpix_so3_grid(2)[oracle_cells]
    side = inference.load_topk(map_star)
    network_cells = side.index
    test_set = read_particle_set(test_star)
    stated = test_set.origins_angstrom / (test_set.pixel_size_angstrom * args.box / args.model_box)
    # the side file's shifts are whole origins (stated + the shift searched), model px
    found = np.load(inference.topk_path(map_star))["shift_px"]
    top_k_hit = float(np.mean(np.any(network_cells == oracle_cells[:, None], axis=1)))
    errors = {
        key: geometry_rotations.geodesic_distance_deg(rotations, truth)
        for key, rotations in (
            ("oracle", oracle), ("map", _angles(map_star)), ("network", _angles(net_star))
        )
    }  # fmt: skip
    medians = {k: float(np.median(v)) for k, v in errors.items()}
    return {
        "source": f"ASPIRE {aspire_version(python)} ({name}, {args.box} px, SNR {args.snr})",
        "n": args.n_test,
        "n_train": args.n - args.n_test,
        "contrast_detected": detected.split(" (")[0].removeprefix("contrast "),
        "contrast_trained": contrast.recorded_contrast(checkpoint),
        "contrast_detail": detected,
        "oracle_median_deg": medians["oracle"],
        "map_median_deg": medians["map"],
        "network_median_deg": medians["network"],
        "map_over_oracle": medians["map"] / medians["oracle"],
        "target_met": medians["map"] <= 1.1 * medians["oracle"],
        "predict_map_images_per_s": summary.images_per_s,
        "top_k": args.top_k,
        "classical_cells": args.classical_cells,
        "top_k_hit": top_k_hit,
        # ASPIRE's rlnOriginX/YAngst against the shift the map search found to centre each
        # particle (RELION's sign: equal; the opposite sign: twice the shift apart)
        "origin_vs_found_median_px": float(np.median(np.abs(found - stated))),
        "origin_negated_vs_found_median_px": float(np.median(np.abs(found + stated))),
        "aspire_true_snr": aspire_info["aspire_true_snr"],
        "simulate_s": simulate_s,
        "train_s": train_s,
    }


def aspire_version(python: Path) -> str:
    probe = [str(python), "-c", "import aspire; print(aspire.__version__)"]
    return subprocess.run(probe, capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", nargs="+", default=["1ubi"])
    parser.add_argument("--box", type=int, default=64, help="particle box (px)")
    parser.add_argument("--model-box", type=int, default=64, help="network box (px)")
    parser.add_argument("--n", type=int, default=3000, help="particles ASPIRE simulates")
    parser.add_argument("--n-test", type=int, default=500, help="the last N are predicted")
    parser.add_argument("--snr", type=float, default=0.05)
    parser.add_argument("--shift", type=float, default=3.0, help="ASPIRE offsets, ± px")
    parser.add_argument("--steps", type=int, default=3000, help="training steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--top-k", type=int, default=100, help="network cells the map search scores (predict)"
    )
    parser.add_argument(
        "--classical-cells",
        type=int,
        default=0,
        help="predict --map --classical-cells: the best N cells of a classical coarse stage "
        "searched beside the network's (0: the network's cells only)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--out", type=Path, default=None, help="keep the files here")
    args = parser.parse_args(argv)
    if not 0 < args.n_test < args.n:
        parser.error("--n-test must lie between 0 and --n")
    torch.set_num_threads(args.threads)
    python = ensure_aspire(args.venv)
    cases = []
    with tempfile.TemporaryDirectory() as scratch:
        root = args.out or Path(scratch)
        for name in args.structures:
            case = run_case(name, args, root / name, python)
            print(json.dumps(case), file=sys.stderr)
            cases.append(case)
    result = {"cases": cases, "settings": {k: str(v) for k, v in vars(args).items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
