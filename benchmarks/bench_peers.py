"""Benchmark: the network (+ map) side by side with the classical searches users run, and cryoPARES.

For each structure, box, SNR and search level, on the same held-out realistic particles (CTF
with defocus 0.5-2.5 µm, shifts ±3 px of the box, blur 1 px; written as a RELION STAR file +
MRC stack + map, as picked: zero origins, the shifts left for every method to find), every
method reads the STAR file
and searches at the network's box (64 px: a 128-px set is Fourier-cropped, as ``predict``
does; the map search's band, 3 px of that box, lies inside it, so nothing the search compares
is lost), ±3 px of the particles' box, each template carrying its particle's CTF:

* ``exhaustive``: every cell of the level on the default band
  (:func:`cryosphere.poses.search.coarse_to_fine.exhaustive_search`, the fast kernel);
* ``coarse_to_fine``: :func:`~cryosphere.poses.search.coarse_to_fine.coarse_to_fine_search`, its
  knobs (coarse level, coarse band, kept cells) tuned on ``--n-tune`` other particles to its
  best speed at <= 1.05x the exhaustive median error there (:mod:`_classical`);
* ``network``: ``cryosphere predict`` (the most probable level-2 cell of the distribution
  averaged over four quarter turns, its default without a map, end to end);
* ``network+map``: ``cryosphere predict --map`` (``--top-k`` cells of the network searched at
  the level, or one row per count in ``--map-top-k``; level 3: their children, coarse to fine
  from the ``--map-keep`` best);
  with ``--prescreen-keep P``: ``predict --map --top-k K --prescreen P``, the network's
  ``--top-k`` cells scored on the tuned coarse band first, only the best ``P`` searched on the
  default band (``prescreen_keep`` in the row); with ``--bf16`` each of those again with the
  network under bfloat16 autocast (``predict --bf16``; ``"bf16": true`` in the row);
* ``cryopares``, ``cryopares+refine``: with ``--cryopares`` (``benchmarks/peers/cryopares``:
  its own venv, trained on a simulated refinement of ``--cryopares-train`` particles for
  ``--budget-min`` minutes, the same budget as the network).

``images_per_s`` is per CPU-second (process time: the machine is shared) and end to end for
every row (reading, preprocessing, search; the network's and cryoPARES' include their
model), one thread by default, the fastest of ``--repeats`` timed runs (3, the tuning
trials too; ``exhaustive`` once: each run takes ~50 s); the template projection
(``setup_s``, once per map and level) is not in it, and every method is given the particles'
contrast (``predict --contrast white``: deciding it costs ~0.4 s per run, not per image). ``median_deg`` is the symmetry-aware
geodesic error to the true pose, ``ratio_to_exhaustive`` its ratio to ``exhaustive``'s.

Usage::

    python benchmarks/bench_peers.py                        # the full grid (hours)
    python benchmarks/bench_peers.py --structures 1ubi --snrs 0.05 --boxes 64 --levels 2 \\
        --n-test 300 --n-tune 100 --budget-min 2            # small run (~6 min)

Last line: ``{"cases": [{"structure", "snr", "box", "level", "method", "median_deg",
"ratio_to_exhaustive", "images_per_s", "speed_vs_coarse_to_fine", ...}], "tuning": [...],
"settings": {...}}`` (``speed_vs_coarse_to_fine``: images/s over the tuned coarse-to-fine
search's in the same case).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from _classical import cpu_rate


def _network(structure: str, args, folder: Path, data) -> tuple[Path, dict]:
    """A checkpoint and how it was trained: ``--checkpoint``, untrained (``--budget-min 0``),
    or trained on the realistic stream for ``--budget-min`` minutes or ``--steps`` steps
    (bench_realistic's recipe)."""
    from bench_predict import write_untrained_checkpoint
    from bench_realistic import _train

    if args.checkpoint:
        return Path(args.checkpoint), {"checkpoint": str(args.checkpoint)}
    if args.budget_min <= 0:
        return write_untrained_checkpoint(folder / "untrained", args.network_box), {"steps": 0}
    train_args = argparse.Namespace(
        train_snr=(0.03, 0.5), batch_size=64, steps=args.steps, learning_rate=2e-3,
        budget_min=args.budget_min, progress=False,
    )  # fmt: skip
    print(f"== {structure}: training the network for {args.budget_min} min ...", flush=True)
    result = _train(data, train_args, folder / "run", resume=False, model_box=args.network_box,
                    channels=args.network_channels,
                    so3_channels=args.network_so3_channels)[1]  # fmt: skip
    return result.checkpoint, {
        "structure": structure, "steps": result.steps_done, "images_seen": result.images_seen,
        "train_s": result.train_seconds, "network_box": args.network_box,
        "network_channels": args.network_channels,
        "network_so3_channels": args.network_so3_channels,
    }  # fmt: skip


def _network_rows(case, particles, checkpoint, args, tuned, blur_px):
    """``network`` and ``network+map`` rows of one case (one per ``--map-top-k`` and per
    ``--prescreen-keep``)."""
    from cryosphere.imaging.particles import read_particle_set
    from cryosphere.poses.prediction import inference
    from cryosphere.poses.search import map_search

    star, n, level = particles.star, len(particles.rotations), case["level"]
    out = star.with_name("predicted.star")
    widest = max([args.top_k, *(args.map_top_k or [])])  # the side file holds every k's cells
    rows = []
    rate, _ = cpu_rate(
        lambda: inference.predict_star(
            star, checkpoint, out, device="cpu", progress=False, top_k=widest, overwrite=True
        ),
        n,
        warm_up=True,
        repeats=args.repeats,
    )
    side = inference.load_topk(out)
    errors = particles.errors(side.index[:, 0], 2)
    rows.append({**case, "method": "network", "median_deg": float(np.median(errors)),
                 "images_per_s": rate})  # fmt: skip
    keep = None if level == 2 else args.map_keep
    refinement = map_search.MapRefinement(
        star.with_name("volume.mrc"), level=level, max_shift_px=particles.max_shift_px,
        blur_sigma_px=blur_px, keep=keep, box=particles.box,  # the classical searches' box
    )  # fmt: skip
    searched = star.with_name("searched.star")

    def map_row(refinement, top_k: int, bf16: bool = False, **fields) -> dict:
        """``predict --map`` timed with a freshly prepared search (its scale fitted anew), the
        fastest of ``--repeats`` runs, each with its own; ``bf16``: the network under bfloat16
        autocast (``predict --bf16``), the search not."""
        # contrast given, as the classical searches are given it: ``auto`` would add a fixed
        # ~0.4 s per run (a search of 48 particles), not a cost per image
        rate, _ = cpu_rate(
            lambda search: inference.predict_star(
                star, checkpoint, searched, device="cpu", progress=False, top_k=top_k,
                refine=search, overwrite=True, contrast="white", bf16=bf16,
            ),
            n,
            repeats=args.repeats,
            prepare=lambda: map_search.MapSearch(
                refinement, read_particle_set(star), particles.box, 2
            ),
        )  # fmt: skip
        with np.load(inference.topk_path(searched)) as side_file:
            errors = particles.errors(side_file["refined_index"], level)
        return {**case, "method": "network+map", "median_deg": float(np.median(errors)),
                "images_per_s": rate, "top_k": top_k, "map_keep": keep, "bf16": bf16,
                **fields}  # fmt: skip

    for top_k in sorted(set(args.map_top_k or [args.top_k]), reverse=True):
        rows.append(map_row(refinement, top_k))
    # the network's top cells pre-screened on the classical search's coarse band, the best few
    # searched on the fine band (``predict --map --top-k K --prescreen P``)
    for prescreen, bf16 in itertools.product(args.prescreen_keep, (False, True)[: 1 + args.bf16]):
        screened = dataclasses.replace(
            refinement, prescreen_keep=prescreen,
            prescreen_resolution_px=tuned.coarse_resolution_px,
        )  # fmt: skip
        rows.append(map_row(screened, args.top_k, bf16, prescreen_keep=prescreen,
                            prescreen_resolution_px=tuned.coarse_resolution_px))  # fmt: skip
    return rows, side


def run_case(structure, box, snr, levels, args, folder, checkpoints, tuning_log):
    import _classical
    from bench_predict import REALISTIC

    from cryosphere.imaging.datasets import SimulationParameters
    from cryosphere.imaging.simulate import save_dataset, simulate_dataset

    def simulate(sub: str, n: int, seed: int, size: int = box):
        params = SimulationParameters(
            structure=structure, n_projections=n, seed=seed, snr=snr,
            **dict(REALISTIC, image_size=size),
        )  # fmt: skip
        data = simulate_dataset(params, progress=False)
        save_dataset(data, folder / sub, overwrite=True, write_origins=False)  # as picked
        return data

    print(f"== {structure} {box} px SNR {snr}: simulating ...", flush=True)
    test = simulate("test", args.n_test, 1000 + int(snr * 1000))
    tune = simulate("tune", args.n_tune, 2000 + int(snr * 1000))
    if structure not in checkpoints:
        net_data = test if box == 64 else simulate("n64", 8, 3, 64)
        checkpoints[structure], trained = _network(
            structure, args, folder.parent / structure, net_data
        )
        print(f"   network: {trained}", flush=True)
        checkpoints.setdefault("trainings", []).append(trained)
    ops = test.symmetry_ops
    particles = _classical.load_particles(
        folder / "test" / "particles.star", 64, test.rotations, ops
    )
    tuning = _classical.load_particles(folder / "tune" / "particles.star", 64, tune.rotations, ops)
    blur_px = REALISTIC["blur_sigma"] * 64 / box  # the simulation's blur at the search box
    templates = _classical.Templates(particles, blur_px)
    rows = []
    for level in levels:
        case = {"structure": structure, "snr": snr, "box": box, "level": level,
                "n_test": args.n_test}  # fmt: skip
        cells, rate = _classical.exhaustive(particles, templates, level, args.resolution_px)
        reference = float(np.median(particles.errors(cells, level)))
        rows.append({**case, "method": "exhaustive", "median_deg": reference, "images_per_s": rate})
        print(f"   L{level} exhaustive: {reference:.2f}°, {rate:.1f} img/s", flush=True)
        keeps = (4, 8, 16, 32, 64) if level == 2 else (4, 8, 16, 32)
        resolutions = (
            tuple(args.coarse_resolutions) if level == 2 else tuple(args.coarse_resolutions[:2])
        )
        tuned, trials = _classical.tune_coarse_to_fine(
            tuning, templates, level, args.resolution_px, resolutions, keeps,
            repeats=args.repeats,
        )  # fmt: skip
        tuning_log.append({**case, "trials": trials, "chosen": _classical.describe(tuned)})
        found, rate = _classical.coarse_to_fine_run(
            particles, templates, tuned, repeats=args.repeats
        )
        c2f, rate_c2f = particles.errors(found, level), rate
        rows.append({**case, "method": "coarse_to_fine", "median_deg": float(np.median(c2f)),
                     "images_per_s": rate, "agree_with_exhaustive": float(np.mean(found == cells)),
                     **{f"tuned_{k}": v for k, v in _classical.describe(tuned).items()}})  # fmt: skip
        network_rows, side = _network_rows(
            case, particles, checkpoints[structure], args, tuned, blur_px
        )
        hit = float(np.mean((side.index[:, :10] == cells[:, None]).any(1))) if level == 2 else None
        for row in network_rows:
            if level == 2 and row["method"] == "network+map":  # exhaustive's cell among the k
                row["top_k_hit"] = float(
                    np.mean((side.index[:, : row["top_k"]] == cells[:, None]).any(1))
                )
        rows.extend({**row, "top10_hit": hit} for row in network_rows)
        if args.cryopares and level == 2:
            from peers.cryopares import run_cryopares

            rows.extend(run_cryopares.rows(case, folder, particles, args))
        for row in rows:
            if row["level"] == level and row["box"] == box and row["snr"] == snr:
                row["ratio_to_exhaustive"] = row["median_deg"] / reference
                # the speed target reads against the tuned classical search
                row["speed_vs_coarse_to_fine"] = row["images_per_s"] / rate_c2f
                row["setup_s"] = templates.setup_s
        print(f"   templates: {templates.setup_s:.1f} s", flush=True)
    return rows


def _setting(row: dict) -> str:
    """The network+map row's cells: `` k=100`` or `` k=100 -> 10`` (pre-screened)."""
    if "top_k" not in row:
        return ""
    screened = f" -> {row['prescreen_keep']}" if row.get("prescreen_keep") else ""
    hit = f" (hit {row['top_k_hit']:.2f})" if row.get("top_k_hit") is not None else ""
    return f"  k={row['top_k']}{screened}{hit}{' bf16' if row.get('bf16') else ''}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", nargs="+", default=["1ubi", "1hvr"])
    parser.add_argument("--snrs", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument("--boxes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--levels", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--n-tune", type=int, default=200)
    parser.add_argument(
        "--budget-min", type=float, default=30.0, help="network training; 0: untrained"
    )
    parser.add_argument("--steps", type=int, default=12000)
    parser.add_argument("--checkpoint", default=None, help="use this trained network instead")
    parser.add_argument(
        "--network-box", type=int, default=64,
        help="the trained network's box (px): 32 proposes from Fourier-cropped particles, the "
        "map search and the classical searches stay at 64 (predict --map --search-box 64)",
    )  # fmt: skip
    parser.add_argument(
        "--network-channels", type=int, nargs="+", default=None,
        help="the trained network's encoder channels per stage (default by box: 16 32 64 at "
        "64 px, 16 32 at 32 px: a 4-px last feature map)",
    )  # fmt: skip
    parser.add_argument(
        "--network-so3-channels", type=int, default=None,
        help="the trained network's SO(3) channels (default 16; 8 halves the SO(3) activation, "
        "the largest part of a 32-px network's forward pass)",
    )  # fmt: skip
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument(
        "--map-top-k", type=int, nargs="+", default=None,
        help="one network+map row per count of the network's cells searched (default: --top-k)",
    )  # fmt: skip
    parser.add_argument("--map-keep", type=int, default=10, help="level 3: coarse-to-fine keep")
    parser.add_argument(
        "--prescreen-keep", type=int, nargs="*", default=[10, 5],
        help="network+map rows with the --top-k cells pre-screened on the tuned coarse band, "
        "the best N searched (predict --map --prescreen N)",
    )  # fmt: skip
    parser.add_argument(
        "--bf16", action="store_true",
        help="also time each pre-screened network+map row with the network under bfloat16 "
        "autocast (predict --bf16: the search stays float32; fast on CPUs with AVX-512 BF16)",
    )  # fmt: skip
    parser.add_argument("--resolution-px", type=float, default=3.0, help="the fine band (px of 64)")
    parser.add_argument("--coarse-resolutions", type=float, nargs="+", default=[6.0, 8.0, 12.0])
    parser.add_argument("--cryopares", action="store_true", help="add cryoPARES' rows")
    parser.add_argument("--cryopares-train", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--repeats", type=int, default=3,
        help="time coarse_to_fine, its tuning trials, network and network+map this many times "
        "and keep the fastest (exhaustive: once)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases, tuning, checkpoints = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for structure in args.structures:
            for box in args.boxes:
                for snr in args.snrs:
                    folder = Path(tmp) / structure / f"{box}px_snr{snr}"
                    cases += run_case(structure, box, snr, args.levels, args, folder,
                                      checkpoints, tuning)  # fmt: skip
    for row in cases:
        print(f"{row['structure']} {row['box']} px SNR {row['snr']} L{row['level']} "
              f"{row['method']:16s} {row['median_deg']:7.2f}° {row['ratio_to_exhaustive']:5.2f}x "
              f"{row['images_per_s']:9.1f} img/s {row['speed_vs_coarse_to_fine']:5.2f}x c2f"
              f"{_setting(row)}")  # fmt: skip
    summary = {"cases": cases, "tuning": tuning, "training": checkpoints.get("trainings", []),
               "settings": {**vars(args), "torch_threads": torch.get_num_threads()}}  # fmt: skip
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
