"""Score again the distributions a calibration run kept (``bench_calibration.py --save``), and
measure a temperature on them without touching the particles it is scored on.

For every kept case the script prints the plain scores and, for each network source, the
scores after a temperature (``calibration.fit_temperature``) fitted by *cross-fitting*: the
particles are split in two halves (even and odd rows), the temperature fitted on one half
scores the other and vice versa, and the two halves' tempered distributions are scored
together. Prints one JSON object last: ``{"cases": [{"case", "source", "temperature",
"ece", "coverage90", "log_likelihood", "mean_confidence", "hit_rate", "n"}]}``
(``temperature`` 1 for the plain rows; the two halves' temperatures otherwise).

    python benchmarks/rescore_calibration.py calibration.npz --level 1
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from cryosphere.poses.evaluation import calibration


def _cross_fitted(probabilities, poses, level, ops):
    """The tempered distributions, each half's temperature fitted on the other half."""
    halves = [np.arange(0, len(poses), 2), np.arange(1, len(poses), 2)]
    out = np.empty_like(probabilities, dtype=np.float64)
    taus = []
    for fit, score in (halves, halves[::-1]):
        tau = calibration.fit_temperature(probabilities[fit], poses[fit], level, ops)
        out[score] = calibration.tempered(probabilities[score], tau)
        taus.append(round(tau, 3))
    return out, taus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("saved", help="the .npz of bench_calibration.py --save")
    parser.add_argument("--level", type=int, default=1, help="the run's --level")
    args = parser.parse_args()
    saved = np.load(args.saved)
    rows = []
    for key in sorted(saved.files):
        if key.endswith(("_poses", "_symmetry_ops")):
            continue
        structure, snr, rest = key.split("_", 2)
        truth = "on_grid" if rest.startswith("on_grid") else "off_grid"
        noise, source = rest[len(truth) + 1 :].split("_", 1)
        poses = saved[f"{structure}_{snr}_{truth}_poses"].astype(np.float64)
        ops = saved[f"{structure}_symmetry_ops"].astype(np.float64)
        probabilities = saved[key].astype(np.float64)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        versions = [(1.0, probabilities)]
        if source.startswith("network"):
            tempered, taus = _cross_fitted(probabilities, poses, args.level, ops)
            versions.append((taus, tempered))
        for tau, p in versions:
            summary = calibration.calibration_summary(p, poses, args.level, ops).to_dict()
            row = {"case": f"{structure} snr={snr} {truth} {noise}", "source": source,
                   "temperature": tau, **summary}  # fmt: skip
            rows.append(row)
            print(
                f"{row['case']:32s} {source:15s} T={str(tau):16s} ECE {row['ece']:.3f}  "
                f"cov90 {row['coverage90']:.2f}  LL {row['log_likelihood']:+.2f}  "
                f"conf {row['mean_confidence']:.2f} hit {row['hit_rate']:.2f}",
                flush=True,
            )
    print(json.dumps({"cases": rows}))


if __name__ == "__main__":
    main()
