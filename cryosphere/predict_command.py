"""The ``cryosphere predict`` command (:func:`add_parser`, :func:`run`) and the particle
options it shares with ``cryosphere train`` (:func:`add_particle_options`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_particle_options(command: Any) -> None:
    """Reading other programs' particle files: ``--contrast`` (docs/cryosparc_and_contrast.md),
    ``--project-dir``, ``--pixel-size``, ``--skip-bad`` (docs/particles.md)."""
    command.add_argument(
        "--contrast",
        default="auto",
        choices=["auto", "white", "dark"],
        help="protein white (the map's sign) or dark; auto: decided against the map",
    )
    command.add_argument(
        "--project-dir",
        "--datadir",
        dest="project_dir",
        default=None,
        help="folder the image paths are relative to (RELION's project folder, default: found "
        "beside the STAR file or in its enclosing folders; a cryoSPARC .cs's blob/path)",
    )
    command.add_argument(
        "--pixel-size",
        type=float,
        default=None,
        help="Å per pixel when the STAR file states none (it wins otherwise)",
    )
    command.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out particles whose images hold NaN or infinite pixels (listed) instead of "
        "refusing the set",
    )


def add_parser(commands: Any) -> None:
    """The ``predict`` subcommand's parser on ``commands`` (argparse subparsers)."""
    predict = commands.add_parser(
        "predict", help="predict poses for a RELION particle STAR file with a trained model"
    )
    predict.add_argument("star", help="RELION 3.0 or 3.1+ particles STAR file, or cryoSPARC .cs")
    predict.add_argument("--checkpoint", required=True, help="CryoSphere checkpoint (.pt)")
    predict.add_argument("-o", "--output", required=True, help="STAR file to write")
    predict.add_argument("--batch-size", type=int, default=256, help="images per batch")
    predict.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    predict.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="cells kept per particle (default 10; with --map 100, the cells searched: README "
        "'Real particles' measures 10, 50 and 100)",
    )
    predict.add_argument(
        "--ctf-correction",
        default="auto",
        choices=["auto", "phase_flip", "wiener", "none"],
        help="auto: phase flip when the STAR file has defocus values",
    )
    predict.add_argument("--crop", type=int, default=None, help="real-space crop (px) first")
    predict.add_argument(
        "--no-normalise", action="store_true", help="skip the background normalisation"
    )
    predict.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    predict.add_argument(
        "--workers", type=int, default=1, help="reader processes per rank (0: read in-process)"
    )
    predict.add_argument(
        "--bf16",
        action="store_true",
        help="the network under bfloat16 autocast (GPUs; CPUs with AVX-512 BF16); the "
        "search stays float32",
    )
    predict.add_argument(
        "--turns",
        type=int,
        default=None,
        choices=[1, 2, 4],
        help="average the network's distribution over this many quarter turns of each image "
        "(default 4 without --map, measured sharper; 1 with --map, where the map decides)",
    )
    predict.add_argument(
        "--map",
        default=None,
        help="consensus map (MRC, the particles' box and pixel size): search each particle's "
        "top cells against its projections with the particle's CTF",
    )
    predict.add_argument(
        "--search-level",
        type=int,
        default=None,
        help="grid level of the map search (default: the network's; one finer: the children "
        "of its top cells)",
    )
    predict.add_argument(
        "--keep",
        type=int,
        default=None,
        help="with a finer --search-level: score the top cells first and search the children "
        "of only the best KEEP (coarse to fine)",
    )
    predict.add_argument(
        "--max-shift",
        type=float,
        default=0.0,
        help="translation search of the map search, px of the network's box; writes origins",
    )
    predict.add_argument(
        "--map-blur",
        type=float,
        default=None,
        help="Gaussian blur (px of the network's box) of the map's templates (default: the "
        "envelope `cryosphere train --star --map` measured against this same map file, "
        "recorded in the checkpoint; else 0, right for a reconstruction of these particles)",
    )
    predict.add_argument(
        "--classical-cells",
        type=int,
        default=0,
        help="with --map: also search the children of the best N cells of a classical coarse "
        "search (every cell one level coarser, 8-px band), a safety net where the network's "
        "top cells miss (default 0: the network's cells only)",
    )
    predict.add_argument(
        "--prescreen",
        type=int,
        default=None,
        metavar="N",
        help="with --map: score the network's top cells on a low-pass band first (12 px, "
        "--prescreen-resolution) and search only the best N on the full band: the accuracy "
        "of --top-k cells at the cost of N (e.g. --top-k 100 --prescreen 10)",
    )
    predict.add_argument(
        "--prescreen-resolution",
        type=float,
        default=12.0,
        metavar="PX",
        help="the pre-screen's band, px of the network's box (default 12)",
    )
    predict.add_argument(
        "--search-box",
        type=int,
        default=None,
        metavar="PX",
        help="with --map: search at this box (even, at most the particles'; default the "
        "network's): a 32-px network proposes, the map decides at 64 px; the px options "
        "above are then px of this box",
    )
    predict.add_argument(
        "--map-scale",
        choices=("fitted", "free"),
        default="fitted",
        help="with --map: the particles' amplitude against the map, one scale fitted on the "
        "first batch (default, as refinement programs correct a group's scale) or a free scale "
        "per candidate (docs/training_on_a_refinement.md)",
    )
    predict.add_argument(
        "--resolution",
        type=float,
        default=None,
        help="finest detail (Å) the map search compares: images and templates low-passed "
        "there (default: 3 px of the network's box; 2 px or less: every frequency)",
    )
    predict.add_argument(
        "--overwrite", action="store_true", help="replace an existing output STAR file"
    )
    add_particle_options(predict)


def run(args: argparse.Namespace) -> int:
    """``cryosphere predict``: the exit status (2 with a one-line message on bad input)."""
    from cryosphere.poses import distributed
    from cryosphere.poses.prediction import sharded_prediction  # torch only when needed

    try:
        refine = None
        if args.map is not None:
            from cryosphere.poses.search.map_search import MapRefinement

            blur = args.map_blur
            if blur is None:
                from cryosphere.poses.search.map_search import recorded_map_envelope

                blur = recorded_map_envelope(args.checkpoint, args.map, args.search_box)
                if blur is not None:
                    print(
                        f"cryosphere: map templates blurred by {blur:g} px, the envelope "
                        "training measured against this map (--map-blur to change)",
                        file=sys.stderr,
                    )
            refine = MapRefinement(
                args.map,
                args.search_level,
                args.max_shift,
                blur_sigma_px=blur or 0.0,
                keep=args.keep,
                resolution_angstrom=args.resolution,
                classical_cells=args.classical_cells,
                scale=args.map_scale,
                prescreen_keep=args.prescreen,
                prescreen_resolution_px=args.prescreen_resolution,
                box=args.search_box,
            )
        context = distributed.init_from_env(args.device)
        summary = sharded_prediction.predict_star_distributed(
            args.star,
            args.checkpoint,
            args.output,
            batch_size=args.batch_size,
            device=args.device,
            top_k=args.top_k or (100 if args.map is not None else 10),
            ctf_correction=args.ctf_correction,
            crop_size=args.crop,
            normalise=not args.no_normalise,
            progress=not args.no_progress,
            num_workers=args.workers,
            bf16=args.bf16,
            refine=refine,
            turns=args.turns,
            context=context,
            contrast=args.contrast,
            project_dir=args.project_dir,
            pixel_size_angstrom=args.pixel_size,
            skip_bad=args.skip_bad,
            overwrite=args.overwrite,
        )
        distributed.shutdown(context)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"cryosphere predict: {error}", file=sys.stderr)
        return 2
    if not context.writes:
        return 0
    if summary.skipped:
        print(
            f"left out {len(summary.skipped)} particles with NaN or infinite pixels: "
            + ", ".join(summary.skipped)
        )
    print(
        f"{summary.n_images} particles in {summary.seconds:.1f} s "
        f"({summary.images_per_s:.0f} images/s): {summary.star}, {summary.topk}"
    )
    return 0
