"""Calibration of pose distributions: the network, the search posterior and the exact Bayes
posterior, on- and off-grid, in white and coloured noise (docs/calibration.md).

For each structure (32 px by default) and SNR, particles are simulated with poses on the
level-``L`` grid's cell centres (``on_grid``) or Haar-random (``off_grid``), blurred, and given
white or coloured (low-frequency heavy, :mod:`cryosphere.imaging.microscope`) Gaussian noise at the
SNR. Three distributions over the level-``L`` cells are scored with
:func:`cryosphere.poses.evaluation.calibration.calibration_summary` (symmetry-aware):

* ``search``: :mod:`cryosphere.poses.search.posterior` over every level-``L'`` template
  (``L' = --search-level``), noise spectrum estimated from the particles' backgrounds, shifts
  summed over ±``--max-shift`` px, each cell's mass summed over its children, the most
  probable cells split down two more levels (``--refine 16 8``) and the 16 most probable
  level-4 cells scored at 8 sub-cube points each (``--quadrature 16``:
  :func:`~cryosphere.poses.search.posterior.refined_grid_posterior`);
* ``bayes``: the same with the *true* noise spectrum and the known (zero) shift: the exact
  posterior up to the integration over each cell on the ``L'`` grid;
* ``network``: a resnet (``--network-channels``, ``--network-lmax``) trained on a stream
  of fresh white-noise particles (``--network-steps``, cosine learning rate), one per SNR at
  that SNR within a factor ``--network-snr-spread`` (2, as ``cryosphere train --star --map``
  trains on the data's own SNR; 0: one network on [0.05, 1] for all), with the ``"pose"``
  target of width 2° (``--network-target``): in effect the truth's own cell, whose
  expectation given the image is the posterior *integrated* over each cell. ``--network-target
  bayes`` trains on that expectation itself, for white noise: the posterior integrated over
  each cell's templates one level finer (``--network-bayes-level``; 1UBI at SNR 0.1: 0.08-0.09
  nats closer to ``bayes`` than the ``"pose"`` target, docs/calibration.md); with
  ``--network-bayes-level`` equal to ``--level``, the posterior at the cell centres,
  overconfident where it is narrower than a cell.

A symmetric structure (1HVR: C2) is simulated in its symmetry frame by default (``--frame
symmetry``, :func:`cryosphere.imaging.chain_symmetry.in_symmetry_frame`: the 2-fold along z, where
the grid is closed under the group and folding each cell's mass onto its orbit is exact);
``--frame deposited`` keeps the deposited, oblique frame of the runs before it.

Off-grid cases (the calibration test) use ``--off-grid-particles`` (600), on-grid ones
``--n-particles`` (200): with the spread of confidences at SNR 1 a perfectly calibrated
posterior scores ECE ≈ 0.07 by chance on 200 particles, 0.04 on 600; each case reports this
floor (``ece_floor``, :func:`~cryosphere.poses.evaluation.calibration.ece_sampling_floor`).

Prints one line per case and, last, one JSON object
``{"cases": [{"structure", "snr", "truth", "noise", "source", "ece", "coverage90",
"log_likelihood", "ece_floor", ...}], "settings": {...}}``.

    OMP_NUM_THREADS=1 python benchmarks/bench_calibration.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from cryosphere.geometry import grids, point_groups, rotations
from cryosphere.imaging import atoms as imaging_atoms
from cryosphere.imaging import structure
from cryosphere.imaging.chain_symmetry import in_symmetry_frame, resolve_point_group
from cryosphere.imaging.microscope import coloured_noise, coloured_noise_spectrum
from cryosphere.imaging.projection import gaussian_blur, noise_sigma_for_snr, project_volume
from cryosphere.imaging.simulate import auto_pixel_size
from cryosphere.poses.evaluation import calibration
from cryosphere.poses.labels.templates import template_bank
from cryosphere.poses.network.model import ModelConfig
from cryosphere.poses.prediction.predictions import predict, turn_averaged_log_probabilities
from cryosphere.poses.search import noise as search_noise
from cryosphere.poses.search import posterior as sp
from cryosphere.poses.search.matching import template_spectra
from cryosphere.poses.training.stream import SimulatedStream, StreamConfig
from cryosphere.poses.training.streamed import StreamTrainingConfig, train_on_stream

BLUR_PX = 1.0


def train_network(
    volume, level, ops, snr_range, *, channels, lmax, sphere_channels, steps, learning_rate,
    schedule, target="pose", width_deg=2.0, seed=0, batch_size=32, noise="white",
    activation_level=None, bayes_level=None,
):  # fmt: skip
    """A resnet (``channels`` per stage, degree ``lmax``, ``sphere_channels`` sphere and SO(3)
    channels) trained ``steps`` steps on fresh particles of ``volume`` in ``noise`` (``"white"``
    or this benchmark's ``"coloured"`` spectrum), SNR log-uniform in ``snr_range``, on the
    level-``level`` ``target`` (``"pose"``: kernel ``width_deg``); warm-up of a tenth of the
    steps, then the ``schedule``. ``activation_level``: the SO(3) activation grid's level
    (None: the model's default for ``lmax``); ``bayes_level``: the ``"bayes"`` target's
    template level (``StreamConfig.bayes_level``; None: the cell centres)."""
    stream_config = StreamConfig(
        snr=tuple(snr_range),
        target=target,
        batch_size=batch_size,
        seed=seed,
        pose_width_deg=width_deg,
        bayes_level=bayes_level,
    )
    size = volume.shape[0]
    stream = SimulatedStream(
        volume, BLUR_PX, level, stream_config, symmetry_ops=ops,
        noise_power=None if noise == "white" else coloured_noise_spectrum(size, 1.0)[: size // 2 + 1],
    )  # fmt: skip
    config = ModelConfig(
        image_size=volume.shape[0],
        lmax=lmax,
        encoder="resnet",
        encoder_channels=tuple(channels),
        sphere_channels=sphere_channels,
        so3_channels=sphere_channels,
        grid_level=level,
        activation_grid_level=activation_level,
        per_image_normalisation=True,
    )
    training = StreamTrainingConfig(
        steps=steps,
        learning_rate=learning_rate,
        warmup_steps=max(1, steps // 10),
        eval_every=steps,
        lr_schedule=schedule,
    )
    result = train_on_stream(
        stream, config, training, stream.heldout(64), symmetry_ops=ops, progress=False
    )
    return result.model


def structure_and_group(name: str, frame: str):
    """The structure and its point group's operators ``(K, 3, 3)``: in its symmetry frame
    (``frame="symmetry"``: n-fold along z, where the level-L grid is closed under C2, C4, D2,
    D4 and orbit folding is exact) or as deposited (``"deposited"``: the group's axes oblique
    to the grid; a top cell's mate cell is then often not the cell nearest the mate pose)."""
    atoms = imaging_atoms.load_structure(name)
    if frame == "symmetry":
        atoms, group = in_symmetry_frame(atoms, "auto")
        return atoms, point_groups.point_group(group)
    group, axes = resolve_point_group(atoms, "auto")
    return atoms, point_groups.point_group(group, axes)


def _network(volume, level, ops, args, snr, noise):
    """The ``network`` source at ``snr`` in ``noise``: as ``cryosphere train --star --map``
    trains on the data's own SNR (log-uniform within a factor ``--network-snr-spread`` of it)
    and noise spectrum, each SNR (and with ``--network-noise matched`` each noise) gets its own
    network; a spread of 0 trains one network on the whole range [0.05, 1] instead.
    """
    spread = float(args.network_snr_spread)
    target, bayes_level = args.network_target, None
    if target == "bayes":
        finer = level + 1 if args.network_bayes_level is None else int(args.network_bayes_level)
        bayes_level = None if finer == level else finer
    return train_network(
        volume,
        level,
        ops,
        (0.05, 1.0) if spread == 0 else (snr / spread, snr * spread),
        channels=args.network_channels,
        lmax=args.network_lmax,
        sphere_channels=args.network_sphere_channels,
        steps=args.network_steps,
        learning_rate=args.network_lr,
        schedule=args.network_lr_schedule,
        target=target,
        width_deg=args.network_width_deg,
        seed=args.seed,
        noise=noise,
        activation_level=args.network_activation_level,
        bayes_level=bayes_level,
    )


def _particles(volume, poses, snr, noise, rng):
    clean = gaussian_blur(project_volume(volume, poses), BLUR_PX)
    sigma = noise_sigma_for_snr(clean, snr)
    if noise == "white":
        noisy = clean + torch.from_numpy(rng.standard_normal(clean.shape)).float() * sigma
        truth = np.full(clean.shape[-1], sigma**2)
    else:
        noisy = clean + coloured_noise(clean.shape, sigma, rng)
        truth = coloured_noise_spectrum(clean.shape[-1], sigma)
    return noisy.numpy(), search_noise.NoiseSpectrum(truth, clean.shape[-1])


def _posterior(images, volume, spectra, noise, args, max_shift):
    if not args.refine:
        return sp.grid_posterior(
            images, spectra, noise, args.level, args.search_level, max_shift_px=max_shift
        )
    return sp.refined_grid_posterior(
        images, volume, spectra, noise, args.level, args.search_level,
        blur_sigma_px=BLUR_PX, refine=tuple(args.refine), quadrature=tuple(args.quadrature),
        max_shift_px=max_shift,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", nargs="+", default=["1ubi", "1hvr"])
    parser.add_argument("--snrs", nargs="+", type=float, default=[1.0, 0.1])
    parser.add_argument("--n-particles", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--level", type=int, default=1)
    parser.add_argument("--search-level", type=int, default=2)
    parser.add_argument("--max-shift", type=float, default=1.0)
    parser.add_argument(
        "--refine", nargs="*", type=int, default=[16, 8],
        help="cells split one level finer per round (refined_grid_posterior); none: off",
    )  # fmt: skip
    parser.add_argument(
        "--quadrature", nargs="*", type=int, default=[16],
        help="most probable finest cells scored at 8 sub-cube points per round; none: off",
    )  # fmt: skip
    parser.add_argument("--off-grid-particles", type=int, default=600)
    parser.add_argument(
        "--search-noise", default="estimated", choices=["estimated", "true"],
        help="the search posterior's noise spectrum: from the backgrounds, or the true one "
        "(a diagnostic: what the estimate costs; shifts still summed)",
    )  # fmt: skip
    parser.add_argument("--network-steps", type=int, default=300)
    parser.add_argument("--network-lr", type=float, default=3e-3)
    parser.add_argument(
        "--network-target", default="pose", choices=["pose", "bayes"],
        help="pose: the truth's own cell (kernel --network-width-deg); bayes: the white-noise "
        "posterior integrated over each cell (--network-bayes-level)",
    )  # fmt: skip
    parser.add_argument(
        "--network-bayes-level", type=int, default=None,
        help="the bayes target's template level (default: --level + 1; --level: the posterior "
        "at the cell centres)",
    )  # fmt: skip
    parser.add_argument("--network-width-deg", type=float, default=2.0)
    parser.add_argument(
        "--network-snr-spread", type=float, default=2.0,
        help="one network per SNR, trained log-uniform in [snr/spread, snr*spread] (as train "
        "--star --map); 0: one network on [0.05, 1] for every SNR",
    )  # fmt: skip
    parser.add_argument(
        "--network-noise", default="white", choices=["white", "matched"],
        help="white: every network trains on white noise; matched: the coloured rows get a "
        "network trained on the coloured spectrum (as train --star --map trains on the data's)",
    )  # fmt: skip
    parser.add_argument(
        "--noises", nargs="+", default=["white", "coloured"], choices=["white", "coloured"]
    )
    parser.add_argument(
        "--network-turns", type=int, default=1, choices=[1, 2, 4],
        help="also score the network averaged over 2 or 4 quarter turns of each image "
        "(source network_turnsN, as predict --turns)",
    )  # fmt: skip
    parser.add_argument("--network-channels", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--network-lmax", type=int, default=4)
    parser.add_argument("--network-sphere-channels", type=int, default=32)
    parser.add_argument(
        "--network-activation-level", type=int, default=None,
        help="HEALPix level of the network's SO(3) activation grid (default: 1 up to lmax 4, "
        "else 2; level 1's 576 points fit lmax 6's 455 coefficients)",
    )  # fmt: skip
    parser.add_argument("--network-lr-schedule", default="cosine", choices=["constant", "cosine"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--save", default=None,
        help="write every case's distributions and poses to this .npz (to score them again)",
    )  # fmt: skip
    parser.add_argument(
        "--frame", default="symmetry", choices=["symmetry", "deposited"],
        help="simulate a symmetric structure in its symmetry frame (n-fold along z; exact "
        "orbit folding on the grid) or as deposited (the runs before the symmetry frame)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cases = []
    saved: dict[str, np.ndarray] = {}
    for name in args.structures:
        atoms, ops = structure_and_group(name, args.frame)
        pixel = auto_pixel_size(atoms, args.image_size)
        volume = structure.coulomb_potential_map(atoms, args.image_size, pixel)
        spectra = template_spectra(template_bank(volume, args.search_level, BLUR_PX))
        networks: dict[tuple[float, str], torch.nn.Module] = {}
        grid = grids.healpix_so3_grid(args.level)
        rng = np.random.default_rng([args.seed, len(name)])
        for snr in args.snrs:
            for truth in ("on_grid", "off_grid"):
                if truth == "on_grid":
                    poses = grid[rng.integers(0, len(grid), args.n_particles)]
                else:
                    poses = rotations.random_rotations(args.off_grid_particles, rng)
                for noise in args.noises:
                    network = None
                    if args.network_steps > 0:
                        trained_on = "white" if args.network_noise == "white" else noise
                        key = (snr if args.network_snr_spread else 0.0, trained_on)
                        if key not in networks:
                            t = time.perf_counter()
                            networks[key] = _network(volume, args.level, ops, args, snr, trained_on)
                            print(f"{name}: network for SNR {snr:g}, {trained_on} noise, trained "
                                  f"in {time.perf_counter() - t:.0f} s", flush=True)  # fmt: skip
                        network = networks[key]
                    images, true_noise = _particles(volume, poses, snr, noise, rng)
                    sources = {
                        "search": _posterior(
                            images,
                            volume,
                            spectra,
                            search_noise.background_noise_spectrum(images)
                            if args.search_noise == "estimated"
                            else true_noise,
                            args,
                            args.max_shift,
                        ),
                        "bayes": _posterior(images, volume, spectra, true_noise, args, 0.0),
                    }
                    if network is not None:
                        sources["network"] = predict(network, images).probabilities
                        if args.network_turns > 1:  # predict --turns: the quarter-turn average
                            with torch.no_grad():
                                log_p = turn_averaged_log_probabilities(
                                    network.eval(),
                                    torch.from_numpy(images).float(),
                                    args.network_turns,
                                )
                            sources[f"network_turns{args.network_turns}"] = log_p.exp().numpy()
                    for source, probabilities in sources.items():
                        summary = calibration.calibration_summary(
                            probabilities, poses, args.level, ops
                        )
                        confidence, _ = calibration.top_cell_confidence(
                            probabilities, poses, args.level, ops
                        )
                        case = {
                            "structure": name,
                            "snr": snr,
                            "truth": truth,
                            "noise": noise,
                            "source": source,
                            **summary.to_dict(),
                            "ece_floor": round(calibration.ece_sampling_floor(confidence), 4),
                        }
                        cases.append(case)
                        if args.save:
                            saved[f"{name}_{snr:g}_{truth}_{noise}_{source}"] = probabilities
                            saved[f"{name}_{snr:g}_{truth}_poses"] = poses
                            saved[f"{name}_symmetry_ops"] = ops
                        print(
                            f"{name} snr={snr:<5g} {truth:8s} {noise:8s} {source:7s} "
                            f"ECE {case['ece']:.3f} (floor {case['ece_floor']:.3f})  cov50 {case['coverage50']:.2f}  "
                            f"cov90 {case['coverage90']:.2f}  LL {case['log_likelihood']:+.2f}  "
                            f"conf {case['mean_confidence']:.2f} hit {case['hit_rate']:.2f}",
                            flush=True,
                        )
    if args.save:  # temporary file, then rename: never a half-written archive
        partial = f"{args.save}.partial.npz"
        np.savez_compressed(partial, **{k: np.asarray(v, np.float32) for k, v in saved.items()})
        os.replace(partial, args.save)
    settings = vars(args) | {"seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps({"cases": cases, "settings": settings}))


if __name__ == "__main__":
    main()
