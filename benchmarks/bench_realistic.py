"""Benchmark: the default pose network on realistic particles (CTF, shifts, SNR 0.05).

For each structure (default 1UBI and 1HVR, 64 px, blur 1 px, level-2 grid):

1. train the default streamed network (:func:`cryosphere.runs.series.stream_model_config`) on
   fresh particles of :class:`cryosphere.poses.training.stream.SimulatedStream` with
   :class:`~cryosphere.poses.training.stream.ParticleRealism`: a CTF per particle (mean defocus uniform
   in 0.5-2.5 µm, astigmatism up to 500 Å, 300 kV, Cs 2.7 mm, 10 % amplitude contrast), shifts
   uniform in ±3 px, SNR drawn log-uniformly in ``--train-snr``, network input phase-flipped and
   background-normalised as ``cryosphere predict`` does, CTF-aware Bayes targets; for
   ``--steps`` steps or ``--budget-min`` minutes, whichever comes first;
2. simulate ``--n-test`` held-out particles of the same kind at SNR 0.05 (another seed, never
   seen in training; :func:`cryosphere.imaging.simulate.simulate_dataset`), write them as a
   RELION 3.1 STAR file + MRC stack, and run :func:`cryosphere.poses.prediction.inference.predict_star`
   on them (the user's path: reading, preprocessing, network, top-k side file); its images/s
   is the ``predict`` figure (best of two calls);
3. score the predicted angles (symmetry-aware geodesic error) against CTF-aware template
   matching on the same level-2 grid with a ±3 px translation search
   (:func:`cryosphere.poses.search.matching.ctf_template_matching`, templates carrying each image's
   CTF), on the first ``--n-oracle`` particles;
4. reconstruct with CTF correction (Wiener ratio with each image's CTF,
   :func:`cryosphere.reconstruction.backprojection.backproject`, point group imposed) from the
   predicted poses weighted by their top-k probabilities and from the true poses, every image
   centred by its STAR origin (both use the same shifts, so the comparison is of poses), and
   give each map's FSC-0.5 resolution against the true map;
5. the network with the map (``refined_*`` keys, for the first ``--top-k``; ``searches`` for
   each): ``cryosphere predict --map`` on the same STAR file
   (:func:`~cryosphere.poses.prediction.inference.predict_star` with a
   :class:`~cryosphere.poses.search.map_search.MapSearch` of the map, prepared once: level 2, ±3 px
   translation search, each candidate carrying its particle's CTF, the default search band):
   pose error against the same template matching, ``top_k_hit`` (how often the template
   matcher's cell is among the network's top cells), ``predict_map_images_per_s`` (end to end,
   as ``predict_images_per_s``), and the FSC-0.5 of the reconstructions from the searched poses
   centred by the searched shifts (``refined_fsc05_A``; the origins ``predict --map`` writes)
   and from the search's 10 most probable candidates weighted by its posterior, each centred by
   its own searched shift (``refined_weighted_fsc05_A``, the side file's ``searched_*`` arrays).
6. the classical searches users run (``exhaustive_fast_*``, ``coarse_to_fine_*``: median
   error, its ratio to the oracle's, images per CPU-second; :func:`classical_rows`), on the
   oracle's particles, so that the network's advantage (or its absence) shows in the same run;
7. what a refinement program reports, for the true poses (``true_*``) and the searched ones
   (``refined_*``, centred by the searched shifts): the gold-standard resolution
   (``*_half_fsc0143_A``, FSC-0.143 between half maps of a seeded random split) and the
   FSC-0.5 against the true map of the full map Wiener-filtered with the per-shell SSNR of
   those halves (``*_ssnr_fsc05_A``, :func:`cryosphere.reconstruction.ssnr.ssnr_reconstruct`).
   The particles are simulated as a microscope images them: CTF and shift in a padded field,
   then boxed (:mod:`cryosphere.imaging.microscope`, the default since issue 23).

Usage::

    python benchmarks/bench_realistic.py                              # ~30 min a structure
    python benchmarks/bench_realistic.py --budget-min 3 --n-test 500  # smoke run
    # one structure per process (one thread each), then one summary:
    python benchmarks/bench_realistic.py --structures 1ubi --threads 1 > ubi.log &
    python benchmarks/bench_realistic.py --structures 1hvr --threads 1 > hvr.log; wait
    python benchmarks/bench_realistic.py --combine ubi.log hvr.log

Last line: one JSON object ``{"cases": [{"structure", "model_median_deg", "oracle_median_deg",
"ratio", "fsc05_predicted_A", "fsc05_true_A", ...}], "predict_images_per_s", "train_s",
"images_seen", "steps", "training", "settings"}`` (``predict_images_per_s``: the slowest
structure's; ``train_s``, ``images_seen`` and ``steps`` summed over structures).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from _shared import best_rate, combine_summaries
from bench_predict import REALISTIC

SNR_TEST = 0.05


def _train(
    dataset, args, run_dir: Path, resume: bool, model_box: int | None = None, channels=None,
    so3_channels: int | None = None,
):  # fmt: skip
    """The network trained on the realistic stream of ``dataset`` (its map, optics and
    symmetry), at ``model_box`` px (None: the particles' box; the network's input is then
    Fourier-cropped from the simulated particles, as ``predict`` crops them), with encoder
    ``channels`` per stage (None: the box's default, ``encoders.default_encoder_channels``)
    and ``so3_channels`` channels in the SO(3) layers (None: the default, 16)."""
    from cryosphere.poses.training.stream import ParticleRealism, SimulatedStream, StreamConfig
    from cryosphere.poses.training.streamed import StreamTrainingConfig, train_on_stream
    from cryosphere.runs.series import stream_model_config

    realism = ParticleRealism(pixel_size_angstrom=dataset.pixel_size, optics=dataset.parameters)
    config = StreamConfig(
        snr=tuple(args.train_snr), target="bayes", batch_size=args.batch_size, seed=0
    )
    stream = SimulatedStream(
        dataset.volume, REALISTIC["blur_sigma"], 2, config, dataset.symmetry_ops,
        realism=realism, model_box=model_box,
    )  # fmt: skip
    training = StreamTrainingConfig(
        steps=args.steps,
        learning_rate=args.learning_rate,
        warmup_steps=min(200, args.steps // 10),
        eval_every=max(1, min(250, args.steps // 10)),
        time_budget_s=args.budget_min * 60.0,
        device="cpu",
    )
    model_config = stream_model_config(
        model_box or REALISTIC["image_size"],
        channels=channels and tuple(channels),
        so3_channels=so3_channels,
    )
    validation = stream.heldout(200, snr=SNR_TEST)
    result = train_on_stream(
        stream,
        model_config,
        training,
        validation,
        dataset.symmetry_ops,
        run_dir=run_dir,
        resume=resume,
        progress=args.progress,
    )
    for row in result.history:
        print("  ", {k: round(v, 3) for k, v in row.items()}, flush=True)
    return stream, result


def _centred_particles(dataset, rotations, weights, centring_px):
    """The particles centred by ``centring_px`` (``(n, 2)`` or, per candidate, ``(n, r, 2)``:
    the shifts the search found; None: each one's true origin), one copy per candidate:
    ``(images, ctf, rotations, weights)`` ready for back-projection."""
    from cryosphere.imaging import ctf as ctf_module

    images, ctf = dataset.noisy_images, dataset.ctf
    if centring_px is None:  # centre by the origin (shift by +origin / pixel = -shift_px)
        centring_px = -dataset.shifts_px
    centring_px = np.asarray(centring_px, dtype=np.float64)
    if centring_px.ndim == 3:  # one copy of each particle per candidate, at its own shift
        n, r = centring_px.shape[:2]
        rows = np.repeat(np.arange(n), r)
        images, ctf = images[rows], ctf.subset(rows)
        rotations = np.asarray(rotations).reshape(n * r, 3, 3)
        weights = np.asarray(weights).reshape(n * r)
        centring_px = centring_px.reshape(n * r, 2)
    return ctf_module.shift_images(images, centring_px), ctf, rotations, weights


def reconstruction_fsc05(
    dataset, rotations, weights, regularisation: float, centring_px: np.ndarray | None = None
) -> float:
    """FSC-0.5 (Å) against the true map of the CTF-corrected reconstruction (one Wiener
    constant ``regularisation``) from ``rotations`` ``(n, 3, 3)`` or ``(n, r, 3, 3)`` with
    ``weights``; every particle is centred by ``centring_px`` (``(n, 2)`` or ``(n, r, 2)``) or,
    when None, by its true origin (the true poses' reconstruction)."""
    from cryosphere.reconstruction.backprojection import backproject
    from cryosphere.reconstruction.fsc import fourier_shell_correlation

    images, ctf, rotations, weights = _centred_particles(dataset, rotations, weights, centring_px)
    volume = backproject(
        images,
        rotations,
        weights,
        symmetry_ops=dataset.symmetry_ops,
        regularisation=regularisation,
        blur_sigma_px=REALISTIC["blur_sigma"],
        ctf=ctf,
        pixel_size_angstrom=dataset.pixel_size,
    )
    curve = fourier_shell_correlation(volume, dataset.volume, dataset.pixel_size)
    return curve.resolution(0.5)


def half_map_figures(
    dataset, rotations, weights, regularisation: float, centring_px: np.ndarray | None = None
) -> dict[str, float]:
    """What a refinement program reports, from the same particles as
    :func:`reconstruction_fsc05`: the gold-standard resolution (FSC-0.143 between two
    half maps of a seeded random split, Å) and the FSC-0.5 against the true map of the full
    map Wiener-filtered with the per-shell SSNR measured from those halves
    (:func:`cryosphere.reconstruction.ssnr.ssnr_reconstruct`), Å."""
    from cryosphere.reconstruction.fsc import fourier_shell_correlation
    from cryosphere.reconstruction.ssnr import ssnr_reconstruct

    images, ctf, rotations, weights = _centred_particles(dataset, rotations, weights, centring_px)
    halves = ssnr_reconstruct(
        images,
        rotations,
        dataset.pixel_size,
        weights,
        half_regularisation=regularisation,
        symmetry_ops=dataset.symmetry_ops,
        blur_sigma_px=REALISTIC["blur_sigma"],
        ctf=ctf,
        pixel_size_angstrom=dataset.pixel_size,
    )
    against_truth = fourier_shell_correlation(halves.volume, dataset.volume, dataset.pixel_size)
    return {
        "half_fsc0143_A": halves.half_fsc.resolution(0.143),
        "ssnr_fsc05_A": against_truth.resolution(0.5),
    }


def _predicted(star: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best rotations ``(n, 3, 3)``, top-k rotations ``(n, k, 3, 3)`` and weights ``(n, k)``."""
    import starfile

    from cryosphere.geometry import rotations as geometry_rotations
    from cryosphere.poses.prediction.inference import topk_path

    table = starfile.read(star, always_dict=True)["particles"]
    angles = table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    side = np.load(topk_path(star))
    k_angles = side["top_angles_deg"]
    top = geometry_rotations.matrices_from_relion_euler(k_angles.reshape(-1, 3)).reshape(
        *k_angles.shape[:2], 3, 3
    )
    weights = side["top_probability"].astype(np.float64)
    return (
        geometry_rotations.matrices_from_relion_euler(angles),
        top,
        weights / weights.sum(1, keepdims=True),
    )


def searched_side_shift(star: Path) -> np.ndarray:
    """``(n, 2)`` centring shifts px the map search wrote as origins into ``star``
    (``+origin / pixel`` centres a particle, RELION's sign)."""
    from cryosphere.imaging.particles import read_particle_set

    pset = read_particle_set(star)
    return np.asarray(pset.origins_angstrom) / pset.pixel_size_angstrom


def _predict_with_map(
    star: Path, n: int, checkpoint: Path, top_k: int, search
) -> tuple[Path, float]:
    """``cryosphere predict --map`` (``predict_star`` with the prepared ``search``: level 2,
    ±3 px, the default band) on ``star`` (``n`` particles) keeping ``top_k`` cells: the STAR
    written and images/s (one warm-up call, then the best of two)."""
    from cryosphere.poses.prediction import inference

    out = star.with_name(f"searched_top{top_k}.star")
    rate = best_rate(
        lambda: inference.predict_star(
            star,
            checkpoint,
            out,
            top_k=top_k,
            refine=search,
            device="cpu",
            progress=False,
            overwrite=True,
        ),  # fmt: skip
        n,
        2,
    )
    return out, rate


def classical_rows(star: Path, dataset, m: int) -> dict:
    """The classical searches users run, on the first ``m`` particles (the oracle's), end to
    end from the STAR file (level 2, the default band, ±3 px, each template with its
    particle's CTF; :mod:`cryosphere.poses.search.coarse_to_fine`): ``exhaustive_fast_*``
    (every cell on the project's fast kernel) and ``coarse_to_fine_*`` (level 1 on an 8-px
    band, the best 16 cells' children at level 2: bench_peers' tuned setting at 1UBI, SNR 0.05):
    median error (deg) and images per CPU-second."""
    import _classical

    from cryosphere.geometry import grids
    from cryosphere.poses.prediction import predictions
    from cryosphere.poses.search.coarse_to_fine import CoarseToFine

    ops, grid = dataset.symmetry_ops, grids.healpix_so3_grid(2)
    particles = _classical.load_particles(star, 64, dataset.rotations[:m], ops)
    templates = _classical.Templates(particles, REALISTIC["blur_sigma"])
    rows = {}
    for name, schedule in (
        ("exhaustive_fast", CoarseToFine(2, 2, keep=())),
        ("coarse_to_fine", CoarseToFine(1, 2, coarse_resolution_px=8.0, keep=16)),
    ):
        best, rate = _classical.coarse_to_fine_run(particles, templates, schedule, np.arange(m))
        errors = predictions.pose_errors_deg(grid[best], dataset.rotations[:m], ops)
        rows[f"{name}_median_deg"] = float(np.median(errors))
        rows[f"{name}_images_per_s"] = float(rate)
    return rows


def run_structure(name: str, args: argparse.Namespace, folder: Path) -> tuple[dict, dict]:
    """Train (or, with ``--run-dir``, reuse the model trained there), predict, score."""
    from bench_predict import write_particle_set

    from cryosphere.geometry import grids
    from cryosphere.imaging.particles import read_particle_set
    from cryosphere.poses.prediction import inference, predictions
    from cryosphere.poses.search import map_search, matching

    print(f"== {name}: simulating {args.n_test} held-out particles ...", flush=True)
    dataset = write_particle_set(folder / "data", name, args.n_test, seed=1000, snr=SNR_TEST)
    ops = dataset.symmetry_ops
    print(f"== {name} ({dataset.point_group}): training {args.steps} steps ...", flush=True)
    stream, result = _train(dataset, args, folder / "run", resume=args.run_dir is not None)
    star, out = folder / "data" / "particles.star", folder / "data" / "predicted.star"
    rate = best_rate(
        lambda: inference.predict_star(
            star, result.checkpoint, out, progress=False, overwrite=True
        ),
        args.n_test,
        1,
    )
    best, top, weights = _predicted(out)
    model_err = predictions.pose_errors_deg(best, dataset.rotations, ops)
    m = min(args.n_oracle, args.n_test)
    matched = matching.ctf_template_matching(
        dataset.noisy_images[:m],
        stream.templates,
        ctf=dataset.ctf.subset(np.arange(m)),
        pixel_size_angstrom=dataset.pixel_size,
        max_shift_px=REALISTIC["max_shift_px"],
    )
    grid = grids.healpix_so3_grid(2)
    oracle_err = predictions.pose_errors_deg(grid[matched.best_index], dataset.rotations[:m], ops)
    regularisation = args.regularisation if args.regularisation else 1.0 / SNR_TEST
    searches = {}
    refinement = map_search.MapRefinement(
        star.with_name("volume.mrc"), level=2, max_shift_px=REALISTIC["max_shift_px"],
        blur_sigma_px=REALISTIC["blur_sigma"],
        resolution_angstrom=args.search_resolution_px * dataset.pixel_size,
    )  # fmt: skip
    search = map_search.MapSearch(refinement, read_particle_set(star), REALISTIC["image_size"], 2)
    for k in args.top_k:
        searched, search_rate = _predict_with_map(star, args.n_test, result.checkpoint, k, search)
        refined, _, _ = _predicted(searched)
        refined_err = predictions.pose_errors_deg(refined, dataset.rotations, ops)
        searched_side = inference.load_topk(searched)
        top_index = searched_side.index
        hit = (top_index[:m] == matched.best_index[:, None]).any(axis=1)
        searches[k] = {
            "refine_top": int(k),
            "refined_median_deg": float(np.median(refined_err[:m])),
            "refined_ratio": float(np.median(refined_err[:m]) / np.median(oracle_err)),
            "refined_acc15": float(np.mean(refined_err < 15.0)),
            "top_k_hit": float(np.mean(hit)),
            "predict_map_images_per_s": search_rate,
            "refined_fsc05_A": reconstruction_fsc05(
                dataset, refined, None, regularisation, searched_side_shift(searched)
            ),
            "refined_weighted_fsc05_A": reconstruction_fsc05(
                dataset,
                searched_side.searched_rotations(),
                searched_side.searched_weights(),
                regularisation,
                searched_side.searched_shift_px,
            ),
        }
    print(f"== {name}: reconstructing from {args.n_test} particles ...", flush=True)
    case = {
        "structure": name,
        "model_median_deg": float(np.median(model_err[:m])),
        "oracle_median_deg": float(np.median(oracle_err)),
        "ratio": float(np.median(model_err[:m]) / np.median(oracle_err)),
        "fsc05_predicted_A": reconstruction_fsc05(dataset, top, weights, regularisation),
        "fsc05_true_A": reconstruction_fsc05(dataset, dataset.rotations, None, regularisation),
        "model_median_deg_all": float(np.median(model_err)),
        "model_acc15": float(np.mean(model_err < 15.0)),
        "oracle_acc15": float(np.mean(oracle_err < 15.0)),
        "n_test": int(args.n_test),
        "n_oracle": int(m),
        "pixel_size_A": dataset.pixel_size,
        "predict_images_per_s": rate,
        **searches[args.top_k[0]],
        "searches": list(searches.values()),
    }
    case["fsc_ratio"] = case["fsc05_predicted_A"] / case["fsc05_true_A"]
    case.update(classical_rows(star, dataset, m))
    for key in ("exhaustive_fast", "coarse_to_fine"):
        case[f"{key}_ratio"] = case[f"{key}_median_deg"] / case["oracle_median_deg"]
    first_search = star.with_name(f"searched_top{args.top_k[0]}.star")  # _predict_with_map's
    refined, _, _ = _predicted(first_search)
    for prefix, poses, centring in (
        ("true", dataset.rotations, None),
        ("refined", refined, searched_side_shift(first_search)),
    ):
        figures = half_map_figures(dataset, poses, None, regularisation, centring)
        case.update({f"{prefix}_{key}": value for key, value in figures.items()})
    training = {
        "structure": name,
        "train_s": result.train_seconds,
        "steps": result.steps_done,
        "images_seen": result.images_seen,
    }
    print("  ", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in case.items()})
    print("  ", training, flush=True)
    return case, training


def _summary(cases: list[dict], trainings: list[dict], settings: dict) -> dict:
    return {
        "cases": cases,
        "predict_images_per_s": float(min(c["predict_images_per_s"] for c in cases)),
        "train_s": float(sum(t["train_s"] for t in trainings)),
        "images_seen": int(sum(t["images_seen"] for t in trainings)),
        "steps": int(sum(t["steps"] for t in trainings)),
        "training": trainings,
        "settings": settings,
    }


def main(argv: list[str] | None = None) -> dict:
    from cryosphere.poses.search.map_search import DEFAULT_SEARCH_RESOLUTION_PX

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", nargs="+", default=["1ubi", "1hvr"])
    parser.add_argument("--train-snr", type=float, nargs=2, default=[0.03, 0.5])
    parser.add_argument("--steps", type=int, default=12000)
    parser.add_argument("--budget-min", type=float, default=30.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--n-oracle", type=int, default=500)
    parser.add_argument(
        "--regularisation", type=float, default=None, help="Wiener constant (default 1 / SNR)"
    )
    parser.add_argument(
        "--top-k",
        type=int,
        nargs="+",
        default=[100, 50, 10],
        help="network cells searched against the map (refined_* keys: the first)",
    )
    parser.add_argument(
        "--search-resolution-px",
        type=float,
        default=DEFAULT_SEARCH_RESOLUTION_PX,
        help="the map search's resolution limit in px of the 64-px box (default: predict --map's; "
        "2: every frequency)",
    )
    parser.add_argument(
        "--run-dir",
        default=None,
        help="keep the trained model in RUN_DIR/<structure>/run and reuse it on the next call",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--progress", action="store_true", help="tqdm bar while training")
    parser.add_argument(
        "--combine",
        nargs="+",
        default=None,
        help="instead of running: merge the last JSON lines of earlier runs' logs",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.combine:
        summary = combine_summaries(args.combine, _summary)
    else:
        cases, trainings = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.structures:
                case, training = run_structure(name, args, Path(args.run_dir or tmp) / name)
                cases.append(case)
                trainings.append(training)
        settings = {**vars(args), "torch_threads": torch.get_num_threads()}
        summary = _summary(cases, trainings, settings)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
