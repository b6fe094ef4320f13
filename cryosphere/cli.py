"""The ``cryosphere`` command: run the notebook series, list profiles.

Examples::

    cryosphere run                                  # quick profile on 1UBI -> runs/1ubi-quick
    cryosphere run --profile paper --structure 1hvr # the poster's setting on the C2 dimer
    cryosphere run -p epochs 50 -p snr 0.1 --name low-snr
    cryosphere run --structure path/to/model.cif
    cryosphere profiles
    cryosphere report runs/1ubi-quick                 # rebuild runs/1ubi-quick/report.html
    cryosphere predict particles.star --checkpoint model.pt -o predicted.star
    cryosphere predict particles.star --checkpoint model.pt -o refined.star \
        --map consensus.mrc --search-level 3 --max-shift 3   # network + local map search
    cryosphere train --star particles.star --map consensus.mrc --run-dir runs/mine
    torchrun --nproc_per_node 4 -m cryosphere train --particles p.star --map m.mrc --run-dir r \
        --steps 5000 --slots 4                      # streamed, 4 ranks (README: Beyond one machine)
    torchrun --nproc_per_node 4 -m cryosphere predict p.star --checkpoint r/model/checkpoint.pt \
        -o predicted.star                           # particles sharded over 4 ranks
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from typing import Any

from cryosphere import __version__, predict_command
from cryosphere.runs import execution
from cryosphere.runs.checks import RunLockedError


def _parse_value(text: str) -> Any:
    """``-p`` values: Python literals (numbers, lists, None, True) or plain strings."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryosphere",
        description="CryoSphere: SO(3) pose distributions for cryo-EM particle images.",
    )
    parser.add_argument("--version", action="version", version=f"cryosphere {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="execute the numbered notebooks into a run folder")
    run.add_argument("--profile", default="quick", help=f"one of {sorted(execution.PROFILES)}")
    run.add_argument(
        "--structure", default="1ubi", help="embedded name (1ubi, 1hvr, 5pti) or PDB/mmCIF path"
    )
    run.add_argument("--name", default=None, help="run folder name (default STRUCTURE-PROFILE)")
    run.add_argument("--runs-root", default="runs", help="folder holding run folders")
    run.add_argument("--notebooks", default=None, help="folder of the numbered notebooks")
    run.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="override a notebook parameter (repeatable), e.g. -p epochs 50",
    )
    run.add_argument("--overwrite", action="store_true", help="replace a run folder's old data")
    run.add_argument("--no-progress", action="store_true", help="hide per-cell progress bars")
    run.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per notebook (default: the cores, or OMP_NUM_THREADS); results "
        "repeat bit for bit for the same thread count",
    )

    commands.add_parser("profiles", help="print the profiles and their parameters")
    report = commands.add_parser(
        "report", help="rebuild RUN_DIR/report.html (one self-contained page) of a finished run"
    )
    report.add_argument("run_dir", help="a run folder holding summary.json")
    predict_command.add_parser(commands)
    _add_train_parser(commands)
    return parser


def _add_train_parser(commands: Any) -> None:
    fit = commands.add_parser(
        "train", help="train on a consensus refinement (particles with poses + its map)"
    )
    fit.add_argument(
        "--star",
        "--particles",
        dest="star",
        required=True,
        help="particles STAR file with refined angles (under torchrun write --particles: "
        "torchrun reads --star as its own --start-method)",
    )
    fit.add_argument("--map", required=True, help="the refinement's map (MRC, particles' box)")
    fit.add_argument("--run-dir", required=True, help="folder for model/checkpoint.pt and logs")
    fit.add_argument("--box", type=int, default=64, help="model box in px (Fourier crop)")
    fit.add_argument("--level", type=int, default=2, help="SO(3) grid level of the output")
    fit.add_argument("--epochs", type=int, default=50, help="passes over the training split")
    fit.add_argument(
        "--encoder-channels",
        type=int,
        nargs="+",
        default=None,
        help="channels of the residual encoder's stages (each halves the box; default: "
        "16 32 64 at a 64-px --box, as many stages as leave a 4-px feature map)",
    )
    fit.add_argument(
        "--lmax", type=int, default=4, help="the network's highest harmonic degree (1-8)"
    )
    fit.add_argument(
        "--so3-channels",
        type=int,
        default=None,
        help="channels of the network's SO(3) signal (default 16; 8 makes a faster proposer "
        "for predict --map, docs/benchmarks_search.md)",
    )
    fit.add_argument("--batch-size", type=int, default=32)
    fit.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="wall-clock budget of the whole command, preparation included; the step count is "
        "calibrated so the learning-rate schedule completes",
    )
    fit.add_argument(
        "--source",
        choices=("stream", "fixed"),
        default="stream",
        help="fresh particles from the map with the data's statistics, or the real images (docs/training_on_a_refinement.md)",
    )
    fit.add_argument(
        "--real-fraction",
        type=float,
        default=0.0,
        help="share of each streamed batch made of real training particles with their refined "
        "poses (default 0, docs/training_on_a_refinement.md)",
    )
    fit.add_argument("--max-particles", type=int, default=None, help="use the first N only")
    fit.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--no-progress", action="store_true", help="hide progress bars")
    fit.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimiser steps (default: --epochs passes over the training split); DDP under "
        "torchrun",
    )
    fit.add_argument(
        "--slots",
        type=int,
        default=1,
        help="batches of --batch-size per optimiser step (the global batch); the rank count "
        "must divide it",
    )
    fit.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="peak AdamW rate (default 1e-2, measured in docs/training_on_a_refinement.md)",
    )
    fit.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU; DDP trainer)")
    fit.add_argument(
        "--symmetry",
        "--sym",
        default="C1",
        help="the particle's point group, as RELION's --sym (C1, Cn, Dn, T, O, I; n-fold axis "
        "along z): validation counts every symmetry mate of a refined pose as right",
    )
    predict_command.add_particle_options(fit)


def _training_config(args: argparse.Namespace) -> Any:
    """``--steps`` (warm-up 10 %, 20 validations) or the default schedule (steps from
    ``--epochs``); ``--learning-rate`` over the default when given."""
    from cryosphere.poses.training.streamed import StreamTrainingConfig
    from cryosphere.runs.refinement import LEARNING_RATE

    rate = LEARNING_RATE if args.learning_rate is None else args.learning_rate
    extra: dict[str, Any] = {"learning_rate": rate}
    if args.minutes is not None and not args.minutes > 0:
        raise ValueError(f"--minutes must be positive, got {args.minutes}")
    if args.steps is not None:
        extra |= {
            "steps": args.steps,
            "warmup_steps": min(100, args.steps // 10),
            "eval_every": max(1, args.steps // 20),
        }
    return StreamTrainingConfig(seed=args.seed, device=args.device, **extra)


def _train(args: argparse.Namespace) -> int:
    from cryosphere.runs import refinement, series

    try:
        result = refinement.train_on_refinement(
            args.star,
            args.map,
            args.run_dir,
            model_config=series.stream_model_config(
                args.box,
                lmax=args.lmax,
                grid_level=args.level,
                channels=args.encoder_channels and tuple(args.encoder_channels),
                so3_channels=args.so3_channels,
            ),
            training_config=_training_config(args),
            epochs=args.epochs if args.steps is None and args.minutes is None else None,
            minutes=args.minutes,
            source=args.source,
            real_fraction=args.real_fraction,
            batch_size=args.batch_size,
            max_particles=args.max_particles,
            slots=args.slots,
            bf16=args.bf16,
            progress=not args.no_progress,
            contrast=args.contrast,
            project_dir=args.project_dir,
            pixel_size_angstrom=args.pixel_size,
            skip_bad=args.skip_bad,
            symmetry=args.symmetry,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"cryosphere train: {error}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"trained {result.steps_done} steps ({result.images_seen} images, streamed); "
            f"checkpoint: {result.checkpoint}"
        )
        refinement.print_validation(args.run_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cryosphere`` console command; returns the exit status."""
    args = _build_parser().parse_args(argv)
    if args.command == "profiles":
        print(json.dumps(execution.PROFILES, indent=2))
        return 0
    if args.command == "predict":
        return predict_command.run(args)
    if args.command == "train":
        return _train(args)
    if args.command == "report":
        from cryosphere.runs import report

        try:
            print(f"report: {report.write_report(args.run_dir)}")
        except (ValueError, FileNotFoundError) as error:
            print(f"cryosphere report: {error}", file=sys.stderr)
            return 2
        return 0
    overrides = {name: _parse_value(value) for name, value in args.parameter}
    try:
        plan = execution.plan_run(
            profile=args.profile,
            structure=args.structure,
            overrides=overrides,
            name=args.name,
            runs_root=args.runs_root,
            notebooks_dir=args.notebooks,
            overwrite=args.overwrite,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"cryosphere run: {error}", file=sys.stderr)
        return 2
    print(f"run folder {plan.run_dir} (profile {plan.profile}, structure {plan.structure})")
    try:
        summary = execution.execute_run(
            plan, overwrite=args.overwrite, progress=not args.no_progress, threads=args.threads
        )
    except (ValueError, FileExistsError, PermissionError, RunLockedError) as error:
        print(f"cryosphere run: {error}", file=sys.stderr)
        return 2
    except execution.RunStepError as error:
        print(f"cryosphere run: {error}", file=sys.stderr)
        return 1
    print(f"done in {summary['total_s']:.0f} s; summary: {plan.run_dir / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
