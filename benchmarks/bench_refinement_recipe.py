"""Benchmark: the training recipe of ``cryosphere train --star --map`` (learning rate, SNR range).

``cryosphere train --star --map`` streams particles whose SNR is log-uniform in ``[snr / s,
snr · s]`` around the data's measured SNR (``s = 2`` by default) and trains at the peak
learning rate :data:`cryosphere.runs.refinement.LEARNING_RATE` (cosine schedule). For each
pair of ``--spreads`` and ``--learning-rates`` values this trains the streamed default network
at ``--box`` px with :func:`cryosphere.runs.refinement.train_on_refinement` on a kept
``bench_refinement.py --keep DIR`` refinement (``DIR/<structure>/refinement``) for ``--steps``
steps of 32 (warm-up 10 %), same seed, and prints the held-out real particles' validation
at every evaluation (cross-entropy at the refined poses, median error, acc@15°, top-100 hit
of the refined pose's cell). Run it alone, one process per core (``--threads``).

Usage::

    python benchmarks/bench_refinement_recipe.py keep/1ubi --box 32 --steps 4000 \\
        --learning-rates 1e-3 3e-3 6e-3 1.2e-2 2.4e-2                      # ~3 min a case
    python benchmarks/bench_refinement_recipe.py keep/1ubi --box 64 --steps 1500 \\
        --spreads 2 10 --learning-rates 1e-3                                # ~4 min a case

Last line: one JSON object ``{"cases": [{"snr_spread", "learning_rate", "seconds", "final":
{...}}], "settings"}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    from cryosphere.poses.training.streamed import StreamTrainingConfig
    from cryosphere.runs.refinement import LEARNING_RATE, train_on_refinement
    from cryosphere.runs.series import stream_model_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kept", type=Path, help="DIR/<structure> of bench_refinement --keep DIR")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--box", type=int, default=32, help="the network's box (train --box)")
    parser.add_argument("--spreads", type=float, nargs="+", default=[2.0])
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[LEARNING_RATE])
    parser.add_argument("--evaluations", type=int, default=8, help="validations per run")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    refinement = args.kept / "refinement"
    cases = []
    for spread, rate in itertools.product(args.spreads, args.learning_rates):
        config = StreamTrainingConfig(
            steps=args.steps,
            learning_rate=rate,
            warmup_steps=args.steps // 10,
            eval_every=max(1, args.steps // args.evaluations),
            device="cpu",
            seed=0,
        )
        with tempfile.TemporaryDirectory() as run_dir:
            start = time.perf_counter()
            result = train_on_refinement(
                refinement / "particles.star", refinement / "volume.mrc", run_dir,
                model_config=stream_model_config(args.box), training_config=config,
                snr_spread=spread, progress=False, resume=False,
            )  # fmt: skip
            seconds = time.perf_counter() - start
        for row in result.history:
            label = f"spread {spread:g} lr {rate:g}"
            print(label, {k: round(v, 3) for k, v in row.items()}, flush=True)
        cases.append(
            {"snr_spread": spread, "learning_rate": rate, "seconds": seconds,
             "final": result.history[-1]}
        )  # fmt: skip
    summary = {"cases": cases, "settings": {k: str(v) for k, v in vars(args).items()}}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
