"""Benchmark: the default (streamed) pose network against template matching, per structure and SNR.

For each structure (default 1UBI and 1HVR, 64 px, blur 1 px, level-2 targets):

1. train the default setting (:func:`cryosphere.runs.series.stream_model_config`: residual
   encoder, lmax 4; :mod:`cryosphere.poses.training.stream`: fresh Haar-random particles every batch,
   SNR drawn log-uniformly in ``--train-snr``, Bayes-posterior targets, cosine schedule) for
   ``--steps`` steps or until ``--budget-min`` minutes have passed;
2. for each test SNR, draw ``--n-test`` fresh held-out particles (never seen in training) and
   score the model's most probable cell on the level-2 grid and on the level-3 grid (its
   harmonic output read on 36,864 cells), and exhaustive template matching on the same grid
   (symmetry-aware errors); the mean log-likelihood of the true pose
   ``log(Σ_mates p(cell) · G / (K π²))`` for the model and for the Bayes posterior of the
   simulation's own noise model on the level-2 cells (integrated over the level-3 templates
   inside each cell: the reference a calibrated model approaches);
3. the equivariance of the trained network against its untrained start (out-of-plane pairs):
   the MSE of the densities ``G · softmax`` after an exact Wigner-D left translation (not
   comparable across sharpness: a sharp model has large densities), and the scale-free shift
   between the most probable pose of ``I(Q R)`` and ``Q`` times that of ``I(R)``;
4. inference images/s at level 2 and level 3;
5. the network with the map (``refined_*`` keys for the first ``--refine-top``, ``searches``
   for each): the ``--refine-top`` most probable level-2 cells of the network, their children
   on the same level's grid
   (:func:`cryosphere.poses.search.local_search.candidate_cells`), scored against the map's templates
   (:func:`~cryosphere.poses.search.local_search.local_template_matching`, on the band of
   ``--search-resolution-px``, as ``cryosphere predict --map`` by default); ``top_k_hit`` is the
   fraction of images whose template-matching cell is among the candidates, and
   ``refined_images_per_s`` the rate of network + search; at level 3 also coarse to fine
   (``keep``): the top cells scored at level 2 first, then the children of the best ``--keep``;
   ``--turns 4``: the network's distribution averaged over the four quarter turns of each image
   first (``predict --turns``);
6. the classical coarse-to-fine search on the same images (``coarse_to_fine_*`` keys,
   :func:`cryosphere.poses.search.coarse_to_fine.coarse_to_fine_search`): every cell one level
   coarser on the band of ``--c2f-resolution-px``, the best ``--c2f-keep`` cells' children on
   the search band, without the network (benchmarks/bench_peers.py tunes it per case).

Usage::

    python benchmarks/bench_accuracy.py                       # acceptance run (~30 min a structure)
    python benchmarks/bench_accuracy.py --steps 200 --n-test 64 --structures 1ubi   # smoke run
    # one structure per process, then one summary:
    python benchmarks/bench_accuracy.py --structures 1ubi > ubi.log &
    python benchmarks/bench_accuracy.py --structures 1hvr > hvr.log; wait
    python benchmarks/bench_accuracy.py --combine ubi.log hvr.log

Prints figures as it goes, and as its last line one JSON object
``{"cases": [{"structure", "snr", "level", "model_median_deg", "oracle_median_deg", "ratio",
"acc15", "model_log_likelihood", "bayes_log_likelihood", ...}], "train_s", "images_seen",
"infer_images_per_s", ...}`` (``train_s`` and ``images_seen`` summed over structures; per
structure under ``"training"``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def _median(errors: np.ndarray) -> float:
    return float(np.median(errors))


def _infer_rate(model, images: torch.Tensor, level: int, repeats: int = 2) -> float:
    from cryosphere.poses.prediction import predictions

    predictions.predict(model, images[:64], level=level)  # warm-up (caches the level's Wigner rows)
    start = time.perf_counter()
    for _ in range(repeats):
        predictions.predict(model, images, level=level)
    return repeats * images.shape[0] / (time.perf_counter() - start)


def _mode_shift_deg(model, images_R, images_QR, Q, ops) -> np.ndarray:
    """Geodesic distance between the most probable pose for I(Q R) and Q times the most
    probable pose for I(R) (0 for an equivariant predictor), symmetry-aware."""
    from cryosphere.poses.prediction import predictions

    best_R = predictions.predict(model, images_R).best_rotation
    best_QR = predictions.predict(model, images_QR).best_rotation
    return predictions.pose_errors_deg(best_QR, Q @ best_R, ops)


def _equivariance(model, untrained, volume, blur, ops, n_pairs: int, seed: int) -> dict:
    from cryosphere.poses.evaluation import equivariance

    R, Q = equivariance.equivariance_pairs(n_pairs, "out_of_plane", seed)
    images_R = equivariance._images(volume, R, blur, 0.0, 0)
    images_QR = equivariance._images(volume, Q @ R, blur, 0.0, 0)
    trained = equivariance.model_equivariance_mse(model, images_R, images_QR, Q, output="density")
    random = equivariance.model_equivariance_mse(
        untrained, images_R, images_QR, Q, output="density"
    )
    shift_model = _mode_shift_deg(model, images_R, images_QR, Q, ops)
    shift_random = _mode_shift_deg(untrained, images_R, images_QR, Q, ops)
    return {
        "density_mse_model": float(trained.mean()),
        "density_mse_random": float(random.mean()),
        "model_to_random": float(trained.mean() / random.mean()),
        "mode_shift_median_deg_model": float(np.median(shift_model)),
        "mode_shift_median_deg_random": float(np.median(shift_random)),
    }


def _bayes_on_coarse_grid(images, templates_fine, sigma, fine_to_coarse, n_coarse) -> np.ndarray:
    """Bayes posterior of each image on the level-2 cells, integrated over the level-3
    templates inside each cell (cell-centre values alone are far too sharp at high SNR)."""
    from cryosphere.poses.training import targets as tg

    fine = tg.bayes_posterior(images, templates_fine, sigma).astype(np.float64)
    coarse = np.stack([np.bincount(fine_to_coarse, w, n_coarse) for w in fine])
    return np.maximum(coarse, 1e-300)


def _network_top_cells(model, images, top_k: int, turns: int) -> np.ndarray:
    """``(n, top_k)`` the network's most probable level-2 cells, as ``cryosphere predict``
    takes them (softmax on the top ``k`` logits only, batches of 256; averaged over ``turns``
    quarter turns when > 1)."""
    from cryosphere.poses.prediction import inference

    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    with torch.inference_mode():
        parts = [
            inference._top_cells(model, x[i : i + 256], top_k, turns=turns)[1]
            for i in range(0, len(x), 256)
        ]
    return np.concatenate(parts)


def _refined(model, images, spectra, top_k: int, level: int, keep=None, turns: int = 1):
    """Network top-k at level 2 + local template search at ``level`` (coarse to fine with
    ``keep``: ``spectra`` maps levels to template spectra): best cells, images/s, candidates
    (the top cells' children, before any coarse stage)."""
    from cryosphere.poses.search import local_search

    def network_and_search(x):
        top = _network_top_cells(model, x, top_k, turns)
        searched = top if keep is None else local_search.best_of_top_cells(x, top, spectra[2], keep)
        candidates = local_search.candidate_cells(searched, 2, level)
        return top, local_search.local_template_matching(x, candidates, spectra[level])

    network_and_search(images[:16])  # warm-up (thread pool, first allocations)
    seconds = []
    for _ in range(2):  # best of two: the machine is shared
        start = time.perf_counter()
        top, found = network_and_search(images)
        seconds.append(time.perf_counter() - start)
    rate = images.shape[0] / min(seconds)
    return found.best_index, rate, local_search.candidate_cells(top, 2, level)


def _coarse_to_fine(images, coarse, fine, level: int, args):
    """The classical coarse-to-fine search (every level-``level − 1`` cell on the band of
    ``--c2f-resolution-px``, the best ``--c2f-keep`` cells' children on the search band):
    best cells and images/s (best of two)."""
    from cryosphere.poses.search import coarse_to_fine

    schedule = coarse_to_fine.CoarseToFine(
        level - 1, level, coarse_resolution_px=args.c2f_resolution_px, keep=args.c2f_keep,
        fine_resolution_px=args.search_resolution_px,
    )  # fmt: skip
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        found = coarse_to_fine.coarse_to_fine_search(images, [coarse, fine], schedule)
        seconds.append(time.perf_counter() - start)
    return found.match.best_index, images.shape[0] / min(seconds)


def run_structure(name: str, args: argparse.Namespace) -> tuple[list[dict], dict]:
    from cryosphere.geometry import grids
    from cryosphere.imaging import datasets, simulate
    from cryosphere.poses.evaluation import metrics
    from cryosphere.poses.labels import landscape
    from cryosphere.poses.labels import templates as labels_templates
    from cryosphere.poses.network.model import build_model
    from cryosphere.poses.prediction import predictions
    from cryosphere.poses.search import map_search, matching
    from cryosphere.poses.training.stream import SimulatedStream, StreamConfig
    from cryosphere.poses.training.streamed import StreamTrainingConfig, train_on_stream
    from cryosphere.runs.series import stream_model_config

    params = datasets.SimulationParameters(
        structure=name, n_projections=1, image_size=args.image_size, blur_sigma=1.0
    )
    dataset = simulate.simulate_dataset(params, progress=False)
    ops = dataset.symmetry_ops
    low, high = args.train_snr
    stream = SimulatedStream(
        dataset.volume,
        1.0,
        2,
        StreamConfig(snr=(low, high), target=args.target, batch_size=args.batch_size, seed=0),
        ops,
    )
    templates = {2: stream.templates, 3: labels_templates.template_bank(dataset.volume, 3, 1.0)}
    band = map_search.band_max_frequency(args.search_resolution_px)
    spectra = {level: matching.template_spectra(bank, band) for level, bank in templates.items()}
    coarse_band = map_search.band_max_frequency(args.c2f_resolution_px)
    coarse_spectra = {
        1: matching.template_spectra(
            labels_templates.template_bank(dataset.volume, 1, 1.0), coarse_band
        ),
        2: matching.template_spectra(templates[2], coarse_band),
    }
    validation = stream.heldout(200, snr=0.1)
    model_config = stream_model_config(args.image_size, args.lmax, 2, tuple(args.channels))
    config = StreamTrainingConfig(
        steps=args.steps,
        learning_rate=args.learning_rate,
        warmup_steps=min(200, args.steps // 10),
        eval_every=max(1, args.steps // 10),
        time_budget_s=args.budget_min * 60.0,
        device=args.device,
    )
    print(f"== {name} ({dataset.point_group}): training {args.steps} steps ...", flush=True)
    run_dir = None if args.run_dir is None else f"{args.run_dir}/{name}"
    result = train_on_stream(
        stream, model_config, config, validation, ops, run_dir=run_dir, progress=args.progress
    )
    for row in result.history:
        print("  ", {k: round(v, 3) for k, v in row.items()}, flush=True)
    model = result.model.to("cpu")
    cases = []
    fine_to_coarse = grids.nearest_grid_indices(
        grids.healpix_so3_grid(3), grids.healpix_so3_grid(2)
    )
    for snr in args.snrs:
        test = stream.heldout(args.n_test, snr=snr, seed=1000 + int(snr * 1000))
        bayes = _bayes_on_coarse_grid(
            test.images, templates[3], test.noise_sigma, fine_to_coarse, len(stream.templates)
        )
        bayes_ll = float(np.mean(metrics.true_pose_log_likelihood(bayes, test.rotations, 2, ops)))
        for level in (2, 3):
            grid = grids.healpix_so3_grid(level)
            pred = predictions.predict(model, test.images, level=level)
            model_err = predictions.pose_errors_deg(pred.best_rotation, test.rotations, ops)
            matched = landscape.template_matching(test.images, templates[level])
            oracle_err = predictions.pose_errors_deg(grid[matched], test.rotations, ops)
            ll = metrics.true_pose_log_likelihood(pred.probabilities, test.rotations, level, ops)
            searches = []
            plans = [(k, None) for k in args.refine_top]
            if level > 2 and args.keep:
                plans += [(k, args.keep) for k in args.refine_top if k > args.keep]
            for k, keep in plans:
                refined, refined_rate, candidates = _refined(
                    model, test.images, spectra, k, level, keep, args.turns
                )
                refined_err = predictions.pose_errors_deg(grid[refined], test.rotations, ops)
                searches.append(
                    {
                        "refine_top": int(k),
                        "keep": keep,
                        "turns": int(args.turns),
                        "refined_median_deg": _median(refined_err),
                        "refined_ratio": _median(refined_err) / _median(oracle_err),
                        "refined_acc15": float(np.mean(refined_err < 15.0)),
                        "top_k_hit": float(np.mean((candidates == matched[:, None]).any(axis=1))),
                        "refined_images_per_s": refined_rate,
                    }
                )
            classical, classical_rate = _coarse_to_fine(
                test.images, coarse_spectra[level - 1], spectra[level], level, args
            )
            classical_err = predictions.pose_errors_deg(grid[classical], test.rotations, ops)
            case = {
                "structure": name,
                "snr": snr,
                "level": level,
                "coarse_to_fine_median_deg": _median(classical_err),
                "coarse_to_fine_ratio": _median(classical_err) / _median(oracle_err),
                "coarse_to_fine_images_per_s": classical_rate,
                "model_median_deg": _median(model_err),
                "oracle_median_deg": _median(oracle_err),
                "ratio": _median(model_err) / _median(oracle_err),
                "acc15": float(np.mean(model_err < 15.0)),
                "oracle_acc15": float(np.mean(oracle_err < 15.0)),
                "model_log_likelihood": float(np.mean(ll)),
                "bayes_log_likelihood": bayes_ll if level == 2 else None,
                "n_test": int(args.n_test),
                **searches[0],
                "searches": searches,
            }
            cases.append(case)
            print("  ", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in case.items()})
    images = stream.heldout(args.n_infer, snr=0.1, seed=99).images
    untrained = build_model(model_config, seed=config.seed)
    training = {
        "structure": name,
        "train_s": result.train_seconds,
        "steps": result.steps_done,
        "images_seen": result.images_seen,
        "infer_images_per_s_level2": _infer_rate(model, images, 2),
        "infer_images_per_s_level3": _infer_rate(model, images, 3),
        "equivariance_out_of_plane": _equivariance(
            model, untrained, dataset.volume, 1.0, ops, args.n_pairs, seed=0
        ),
    }
    print("  ", training, flush=True)
    return cases, training


def _summary(cases: list[dict], trainings: list[dict], settings: dict) -> dict:
    return {
        "cases": cases,
        "train_s": float(sum(t["train_s"] for t in trainings)),
        "images_seen": int(sum(t["images_seen"] for t in trainings)),
        "infer_images_per_s": float(min(t["infer_images_per_s_level2"] for t in trainings)),
        "infer_images_per_s_level3": float(min(t["infer_images_per_s_level3"] for t in trainings)),
        "training": trainings,
        "settings": settings,
    }


def _combine(paths: list[str]) -> dict:
    from _shared import combine_summaries

    summary = combine_summaries(paths, _summary)
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> dict:
    from cryosphere.poses.search.map_search import DEFAULT_SEARCH_RESOLUTION_PX

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", nargs="+", default=["1ubi", "1hvr"])
    parser.add_argument("--snrs", type=float, nargs="+", default=[1.0, 0.1, 0.03])
    parser.add_argument("--train-snr", type=float, nargs=2, default=[0.03, 1.0])
    parser.add_argument("--target", default="bayes", choices=["bayes", "pose", "soft"])
    parser.add_argument("--steps", type=int, default=12000)
    parser.add_argument("--budget-min", type=float, default=30.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--lmax", type=int, default=4)
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument(
        "--c2f-keep", type=int, default=16, help="the classical coarse-to-fine row's kept cells"
    )
    parser.add_argument(
        "--c2f-resolution-px", type=float, default=8.0, help="its coarse band (px of the box)"
    )
    parser.add_argument("--n-infer", type=int, default=2000)
    parser.add_argument("--n-pairs", type=int, default=100)
    parser.add_argument(
        "--refine-top",
        type=int,
        nargs="+",
        default=[100, 50],
        help="network cells kept for the local search (refined_* keys: the first)",
    )
    parser.add_argument(
        "--turns",
        type=int,
        default=1,
        choices=[1, 2, 4],
        help="network distribution averaged over quarter turns before the search",
    )
    parser.add_argument(
        "--search-resolution-px",
        type=float,
        default=DEFAULT_SEARCH_RESOLUTION_PX,
        help="the search's band, px of the 64-px box (default: predict --map's; 2: every "
        "frequency); template matching always uses every frequency",
    )
    parser.add_argument(
        "--keep",
        type=int,
        default=3,
        help="level 3 also coarse to fine: the children of the best KEEP top cells (0: no)",
    )
    parser.add_argument(
        "--run-dir",
        default=None,
        help="keep the trained model in RUN_DIR/<structure>/model and reuse it on the next call",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--progress", action="store_true", help="tqdm bar while training")
    parser.add_argument(
        "--combine",
        nargs="+",
        default=None,
        help="instead of running: merge the last JSON lines of earlier runs' logs (e.g. one "
        "structure per process) into one summary",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.combine:
        return _combine(args.combine)

    cases, trainings = [], []
    for name in args.structures:
        structure_cases, training = run_structure(name, args)
        cases.extend(structure_cases)
        trainings.append(training)
    settings = {**vars(args), "torch_threads": torch.get_num_threads()}
    summary = _summary(cases, trainings, settings)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
