"""The network's calibration against its training: one network trained on fresh particles in
white or coloured noise (``--noise``, the same for training and test), scored on Haar-random
(off-grid) particles at each test SNR (docs/calibration.md).

The knobs are the training SNR range (``--snr-lo``, ``--snr-hi``: log-uniform per image),
the encoder (``--channels``), the harmonic degree (``--lmax``), the sphere and SO(3) channels
(``--sphere-channels``), the steps, the learning-rate schedule and the target (``--target``:
``"pose"`` of width 2°, or ``"bayes"``, the white-noise posterior integrated over each cell's
level-``--bayes-level`` templates, default 2); the network, the particles (32 px, blur 1 px,
level-1 cells) and the default target are those of ``bench_calibration.py``. Compare the
log-likelihood with that benchmark's ``bayes`` rows.
Prints one JSON line per test SNR (and ``--turns``): ``{"args", "train_s", "snr", "turns",
"ece", "cov90", "LL", "conf", "hit"}``; ``--turns 4`` also scores the network's distribution
averaged over quarter turns of each image (``predict --turns``). ``--temperature-particles n``
also fits a temperature (``calibration.fit_temperature``) on ``n`` further fresh particles at each
test SNR, never the scored ones, and prints the tempered scores too (``"temperature"`` in the
record; 1 for the plain ones).

    OMP_NUM_THREADS=1 python benchmarks/bench_network_calibration.py --structure 1hvr \\
        --snr-lo 0.05 --snr-hi 0.2 --test-snrs 0.1 --channels 32,64 --sphere-channels 32 \\
        --steps 15000 --schedule cosine
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from bench_calibration import _particles, structure_and_group, train_network

from cryosphere.geometry import rotations
from cryosphere.imaging import structure
from cryosphere.imaging.simulate import auto_pixel_size
from cryosphere.poses.evaluation import calibration
from cryosphere.poses.prediction.predictions import predict, turn_averaged_log_probabilities

IMAGE_SIZE = 32
LEVEL = 1
TEST_PARTICLES = 600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structure", default="1hvr")
    parser.add_argument("--snr-lo", type=float, default=0.05)
    parser.add_argument("--snr-hi", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--channels", default="8,16", help="resnet stage channels, a,b")
    parser.add_argument("--lmax", type=int, default=3)
    parser.add_argument(
        "--activation-level", type=int, default=None,
        help="HEALPix level of the SO(3) activation grid (default: 1 up to lmax 4, else 2)",
    )  # fmt: skip
    parser.add_argument("--sphere-channels", type=int, default=8)
    parser.add_argument("--target", default="pose", choices=["pose", "bayes"])
    parser.add_argument(
        "--bayes-level", type=int, default=LEVEL + 1,
        help="the bayes target's template level (1: the posterior at the cell centres)",
    )  # fmt: skip
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--schedule", default="constant", choices=["constant", "cosine"])
    parser.add_argument("--test-snrs", default="1,0.1", help="comma-separated")
    parser.add_argument(
        "--noise", default="white", choices=["white", "coloured"],
        help="bench_calibration's white or coloured (low-frequency heavy) noise",
    )  # fmt: skip
    parser.add_argument(
        "--turns", type=int, default=1, help="also score the average over 2 or 4 quarter turns"
    )
    parser.add_argument(
        "--temperature-particles", type=int, default=0,
        help="fit a temperature on this many further particles per test SNR (0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--save", default=None,
        help="write the scored particles' poses and distributions (and the temperature "
        "particles') to this .npz, to score them again",
    )  # fmt: skip
    parser.add_argument(
        "--frame", default="symmetry", choices=["symmetry", "deposited"],
        help="as bench_calibration.py --frame",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    atoms, ops = structure_and_group(args.structure, args.frame)
    volume = structure.coulomb_potential_map(atoms, IMAGE_SIZE, auto_pixel_size(atoms, IMAGE_SIZE))
    bayes_level = args.bayes_level if args.target == "bayes" and args.bayes_level > LEVEL else None
    started = time.perf_counter()
    network = train_network(
        volume,
        LEVEL,
        ops,
        (args.snr_lo, args.snr_hi),
        channels=[int(c) for c in args.channels.split(",")],
        lmax=args.lmax,
        sphere_channels=args.sphere_channels,
        steps=args.steps,
        learning_rate=args.lr,
        schedule=args.schedule,
        batch_size=args.batch,
        noise=args.noise,
        activation_level=args.activation_level,
        target=args.target,
        bayes_level=bayes_level,
    )
    train_s = time.perf_counter() - started
    rng = np.random.default_rng(123)
    saved: dict[str, np.ndarray] = {}
    for snr in (float(s) for s in args.test_snrs.split(",")):
        poses = rotations.random_rotations(TEST_PARTICLES, rng)
        images, _ = _particles(volume, poses, snr, args.noise, rng)
        outputs = {1: predict(network, images).probabilities}
        if args.turns > 1:
            with torch.no_grad():
                log_p = turn_averaged_log_probabilities(
                    network.eval(), torch.from_numpy(images).float(), args.turns
                )
            outputs[args.turns] = log_p.exp().numpy()
        scored = [(turns, 1.0, probabilities) for turns, probabilities in outputs.items()]
        if args.temperature_particles > 0:
            fit_rng = np.random.default_rng(456)
            fit_poses = rotations.random_rotations(args.temperature_particles, fit_rng)
            fit_images, _ = _particles(volume, fit_poses, snr, args.noise, fit_rng)
            fit_probabilities = predict(network, fit_images).probabilities
            tau = calibration.fit_temperature(fit_probabilities, fit_poses, LEVEL, ops)
            scored.append((1, tau, calibration.tempered(outputs[1], tau)))
            saved[f"fit_poses_{snr:g}"] = fit_poses
            saved[f"fit_probabilities_{snr:g}"] = fit_probabilities.astype(np.float32)
        saved[f"poses_{snr:g}"] = poses
        saved[f"probabilities_{snr:g}"] = outputs[1].astype(np.float32)
        for turns, tau, probabilities in scored:
            summary = calibration.calibration_summary(probabilities, poses, LEVEL, ops)
            record = {
                "args": vars(args),
                "train_s": round(train_s),
                "snr": snr,
                "turns": turns,
                "temperature": round(tau, 3),
                "ece": summary.ece,
                "cov90": summary.coverage90,
                "LL": summary.log_likelihood,
                "conf": summary.mean_confidence,
                "hit": summary.hit_rate,
            }
            print(json.dumps(record), flush=True)
    if args.save:
        np.savez_compressed(args.save, symmetry_ops=ops, **saved)


if __name__ == "__main__":
    main()
