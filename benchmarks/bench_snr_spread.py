"""Benchmark: the SNR range of the streamed training on a refinement (``snr_spread``).

``cryosphere train --star --map`` streams particles whose SNR is log-uniform in ``[snr / s,
snr · s]`` around the data's measured SNR (``s = 2`` by default). A wider range shows the
network easier particles too; this measures whether that helps. For each ``--spreads`` value
it trains the streamed default network with
:func:`cryosphere.runs.refinement.train_on_refinement` on a kept ``bench_refinement.py --keep
DIR`` refinement (``DIR/<structure>/refinement``) for ``--steps`` steps of 32, same seed, and
prints the held-out real particles' validation at every evaluation (median error, top-100
hit of the refined pose's cell).

Usage::

    python benchmarks/bench_snr_spread.py keep/1ubi --steps 1500 --spreads 2 10   # ~10 min

Last line: one JSON object ``{"cases": [{"snr_spread", "seconds", "final": {...}}],
"settings"}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    from cryosphere.poses.training.streamed import StreamTrainingConfig
    from cryosphere.runs.refinement import train_on_refinement

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kept", type=Path, help="DIR/<structure> of bench_refinement --keep DIR")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--spreads", type=float, nargs="+", default=[2.0, 10.0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    refinement = args.kept / "refinement"
    config = StreamTrainingConfig(
        steps=args.steps,
        warmup_steps=args.steps // 10,
        eval_every=max(1, args.steps // 6),
        device="cpu",
        seed=0,
    )
    cases = []
    for spread in args.spreads:
        with tempfile.TemporaryDirectory() as run_dir:
            start = time.perf_counter()
            result = train_on_refinement(
                refinement / "particles.star", refinement / "volume.mrc", run_dir,
                training_config=config, snr_spread=spread, progress=False, resume=False,
            )  # fmt: skip
            seconds = time.perf_counter() - start
        for row in result.history:
            print(f"spread {spread:g}", {k: round(v, 3) for k, v in row.items()}, flush=True)
        cases.append({"snr_spread": spread, "seconds": seconds, "final": result.history[-1]})
    summary = {"cases": cases, "settings": {k: str(v) for k, v in vars(args).items()}}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
