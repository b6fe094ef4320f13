"""cryoPARES side by side: install it in its own venv, train it on a simulated refinement, predict.

cryoPARES (an Image2Sphere network for real particles, PyPI ``cryopares``) pins
``torch>=2.8,<2.9``; here only the CPU build of torch 2.13.0 lies on disk (an unpinned or 2.8
torch pulls a multi-GB CUDA build), so :func:`ensure_venv` makes
``~/.cache/cryosphere-bench/cryopares-venv`` with what we changed:

1. ``torch==2.13.0`` (CPU) instead of its pin, and every other requirement of the wheel's
   metadata as it states it; cryoPARES itself then with ``--no-deps``;
2. torchvision from PyPI is built against CUDA torch: its C ops (nms, roi_align: cryoPARES
   uses none of them) cannot load with the CPU torch, and its ``_meta_registrations.py``
   registers a fake ``torchvision::nms`` without checking that the op exists, so importing
   torchvision fails (``RuntimeError: operator torchvision::nms does not exist``). The venv's
   copy of that file is patched to skip those registrations when the ops are absent.

Then :func:`rows` (called by ``bench_peers.py --cryopares``): simulate ``--cryopares-train``
particles of the same kind (CTF, ±3 px, the case's SNR, another seed; STAR + stack + map),
``cryopares_train`` on them (one partition, CPU, one thread, the model of :data:`CPU_MODEL`,
``--budget-min`` CPU-minutes: as many epochs as fit, estimated from a one-epoch run) and ``cryopares_infer`` on the held-out STAR
file of the case, with ``--skip_localrefinement`` (``cryopares``) and with its local
refinement against the map (``cryopares+refine``). Errors: the poses of its STAR file
against the truth (symmetry-aware); images/s per CPU-second of the child processes.

Run alone: ``python benchmarks/peers/cryopares/run_cryopares.py --setup`` (makes the venv);
``--evaluate RUN_DIR TEST_STAR`` (a ``cryopares_train`` save dir, a simulated STAR file whose
angles are the truth) prints both inference rows as JSON.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

VERSION = "0.1.9"
VENV = Path(
    os.environ.get("CRYOPARES_VENV", Path.home() / ".cache/cryosphere-bench/cryopares-venv")
)
#: The model options for a CPU: its default (lmax 12, an output grid of 294,912 rotations)
#: spent > 3.6 CPU-minutes and 4.9 GB building the grid's Wigner-D matrices before its first
#: step here; these give an output grid of 4,608 rotations (our level 2).
CPU_MODEL = (
    "models.image2sphere.lmax=6",
    "models.image2sphere.so3components.so3outputgrid.hp_order=2",
    "models.image2sphere.so3components.s2conv.hp_order=3",
)
_GUARD = '@(torch.library.register_fake if torchvision.extension._has_ops() else (lambda name: (lambda fn: fn)))("torchvision::'


def _pip(*args: str) -> None:
    subprocess.run([str(VENV / "bin/python"), "-m", "pip", *args], check=True)


def ensure_venv() -> Path:
    """The cryoPARES venv, made once (module docstring: what differs from its pins)."""
    marker = VENV / "cryosphere-ready"
    if marker.is_file():
        return VENV
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    wheels = VENV / "wheels"
    _pip("download", "--no-deps", f"cryopares=={VERSION}", "-d", str(wheels))
    wheel = next(wheels.glob("cryopares-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith("METADATA"))
        lines = archive.read(meta).decode().splitlines()
    needs = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist")]
    needs = [n for n in needs if not n.startswith("torch<") and not n.startswith("torch>")]
    _pip("install", "torch==2.13.0", *needs)
    _pip("install", "--no-deps", str(wheel))
    for path in glob.glob(
        str(VENV / "lib/python*/site-packages/torchvision/_meta_registrations.py")
    ):
        text = Path(path).read_text()
        Path(path).write_text(text.replace('@torch.library.register_fake("torchvision::', _GUARD))
    marker.write_text(f"cryopares {VERSION}, torch 2.13.0 cpu\n")
    return VENV


def _child_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(command: list[str], log: Path) -> float:
    """Run a cryoPARES command (one thread); its CPU seconds. Raises with the log's tail."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    before = _child_cpu_s()
    with open(log, "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{command[0]} failed ({done.returncode}):\n{tail}")
    return _child_cpu_s() - before


def train(star: Path, out: Path, box: int, pixel: float, symmetry: str, epochs: int) -> float:
    """``cryopares_train`` for ``epochs`` epochs on one partition; its CPU seconds."""
    command = [
        str(VENV / "bin/cryopares_train"), "--symmetry", symmetry,
        "--particles_star_fname", str(star), "--particles_dir", str(star.parent),
        "--train_save_dir", str(out), "--image_size_px_for_nnet", str(box),
        "--sampling_rate_angs_for_nnet", f"{pixel:.4f}", "--n_epochs", str(epochs),
        "--batch_size", "32", "--num_dataworkers", "0", "--NOT_split_halves",
        "--config", "train.use_cuda=False", "train.n_cpus_if_no_cuda=1",
        "train.cuda_for_reconstruct=False", *CPU_MODEL,
    ]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    return _run(command, out / f"train_{epochs}.log")


def infer(star: Path, checkpoint: Path, out: Path, reference_map: Path | None) -> float:
    """``cryopares_infer`` on ``star``; with ``reference_map`` its local refinement. CPU s."""
    command = [
        str(VENV / "bin/cryopares_infer"), "--particles_star_fname", str(star),
        "--particles_dir", str(star.parent), "--checkpoint_dir", str(checkpoint),
        "--results_dir", str(out), "--data_halfset", "allParticles",
        "--model_halfset", "allParticles", "--NOT_use_cuda", "--n_cpus_if_no_cuda", "1",
        "--num_dataworkers", "0", "--batch_size", "32", "--skip_reconstruction",
    ]  # fmt: skip
    command += ["--skip_localrefinement"] if reference_map is None else [
        "--reference_map", str(reference_map)
    ]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    return _run(command, out / "infer.log")


def _poses(results: Path, n: int) -> np.ndarray:
    import starfile

    from cryosphere.geometry import rotations

    stars = sorted(results.glob("*.star"))
    if not stars:
        raise RuntimeError(f"cryopares_infer wrote no STAR file in {results}")
    table = starfile.read(stars[0], always_dict=True)["particles"]
    names = table["rlnImageName"].str.split("@").str[0].astype(int).to_numpy() - 1
    angles = np.zeros((n, 3))
    angles[names] = table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    return rotations.matrices_from_relion_euler(angles)


def rows(case: dict, folder: Path, particles, args) -> list[dict]:
    """The ``cryopares`` and ``cryopares+refine`` rows of one bench_peers case (or one row
    ``cryopares`` with the error, when it cannot run)."""
    from bench_predict import REALISTIC

    from cryosphere.imaging.datasets import SimulationParameters
    from cryosphere.imaging.simulate import save_dataset, simulate_dataset
    from cryosphere.poses.prediction.predictions import pose_errors_deg

    try:
        ensure_venv()
        params = SimulationParameters(
            structure=case["structure"], n_projections=args.cryopares_train, seed=77,
            snr=case["snr"], **dict(REALISTIC, image_size=case["box"]),
        )  # fmt: skip
        data = simulate_dataset(params, progress=False)
        save_dataset(data, folder / "cryopares_train", overwrite=True)
        star = folder / "cryopares_train" / "particles.star"
        symmetry = "C1" if len(particles.symmetry_ops) == 1 else data.point_group
        start = time.perf_counter()
        one = train(star, folder / "cp_probe", case["box"], data.pixel_size, symmetry, 1)
        wall = time.perf_counter() - start
        epochs = max(1, int(args.budget_min * 60 / max(one, 1e-9)))
        print(
            f"   cryoPARES: one epoch {one:.0f} CPU s ({wall:.0f} s); training {epochs}", flush=True
        )
        run, cpu = folder / "cp_probe", one
        if epochs > 1:
            run = folder / "cp_run"
            cpu = train(star, run, case["box"], data.pixel_size, symmetry, epochs)
        trained = [p for p in sorted(run.glob("version_*")) if any(p.rglob("*.ckpt"))]
        if not trained:
            raise RuntimeError(f"cryopares_train left no checkpoint (*.ckpt) under {run}")
        checkpoint = trained[-1]
        out = []
        n = len(particles.rotations)
        for method, reference in (
            ("cryopares", None),
            ("cryopares+refine", particles.star.with_name("volume.mrc")),
        ):
            results = folder / f"cp_{method.replace('+', '_')}"
            seconds = infer(particles.star, checkpoint, results, reference)
            errors = pose_errors_deg(
                _poses(results, n), particles.rotations, particles.symmetry_ops
            )
            out.append({**case, "method": method, "median_deg": float(np.median(errors)),
                        "images_per_s": n / seconds, "train_cpu_s": cpu, "epochs": epochs})  # fmt: skip
        return out
    except Exception as error:  # noqa: BLE001 - the peer's failure is a result to report
        message = f"{type(error).__name__}: {error}"[-1500:]
        print(f"   cryoPARES could not run: {message}", flush=True)
        return [{**case, "method": "cryopares", "median_deg": float("nan"),
                 "images_per_s": float("nan"), "error": message}]  # fmt: skip


def evaluate(run: Path, test_star: Path, symmetry_ops=None) -> list[dict]:
    """A trained run (``cryopares_train``'s save dir) on a simulated STAR file whose angles are
    the true poses: median error and images per CPU-second, without and with refinement."""
    import starfile

    from cryosphere.geometry import rotations
    from cryosphere.poses.prediction.predictions import pose_errors_deg

    table = starfile.read(test_star, always_dict=True)["particles"]
    truth = rotations.matrices_from_relion_euler(
        table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    )
    trained = [p for p in sorted(Path(run).glob("version_*")) if any(p.rglob("*.ckpt"))]
    if not trained:
        raise SystemExit(f"no cryoPARES checkpoint (*.ckpt) under {run}")
    out = []
    for method, reference in (("cryopares", None), ("cryopares+refine", "volume.mrc")):
        results = Path(run) / f"infer_{method.replace('+', '_')}"
        ref = None if reference is None else Path(test_star).with_name(reference)
        seconds = infer(Path(test_star), trained[-1], results, ref)
        errors = pose_errors_deg(_poses(results, len(truth)), truth, symmetry_ops)
        out.append({"method": method, "median_deg": float(np.median(errors)),
                    "images_per_s": len(truth) / seconds, "n": len(truth)})  # fmt: skip
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help="make the venv and stop")
    parser.add_argument(
        "--evaluate", nargs=2, metavar=("RUN_DIR", "TEST_STAR"), help="predict a trained run"
    )
    options = parser.parse_args()
    if options.setup:
        print(ensure_venv())
    if options.evaluate:
        print(json.dumps(evaluate(Path(options.evaluate[0]), Path(options.evaluate[1]))))
