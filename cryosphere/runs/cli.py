"""The ``cryosphere`` command: run the notebook series, list profiles.

Examples::

    cryosphere run                                  # quick profile on 1UBI -> runs/1ubi-quick
    cryosphere run --profile paper --structure 1hvr # the poster's setting on the C2 dimer
    cryosphere run -p epochs 50 -p snr 0.1 --name low-snr
    cryosphere run --structure path/to/model.cif
    cryosphere profiles
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from typing import Any

from cryosphere import __version__, runs
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
    run.add_argument("--profile", default="quick", help=f"one of {sorted(runs.PROFILES)}")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cryosphere`` console command; returns the exit status."""
    args = _build_parser().parse_args(argv)
    if args.command == "profiles":
        print(json.dumps(runs.PROFILES, indent=2))
        return 0
    overrides = {name: _parse_value(value) for name, value in args.parameter}
    try:
        plan = runs.plan_run(
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
        summary = runs.execute_run(
            plan, overwrite=args.overwrite, progress=not args.no_progress, threads=args.threads
        )
    except (ValueError, FileExistsError, PermissionError, RunLockedError) as error:
        print(f"cryosphere run: {error}", file=sys.stderr)
        return 2
    except runs.RunStepError as error:
        print(f"cryosphere run: {error}", file=sys.stderr)
        return 1
    print(f"done in {summary['total_s']:.0f} s; summary: {plan.run_dir / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
