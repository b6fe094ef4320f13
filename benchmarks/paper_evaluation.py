"""The poster's evaluation at paper size: equivariance table and pose accuracy per structure and SNR.

For each structure (default 1UBI and 1HVR) and SNR (default 1 and 0.1): 400 images at 64 px,
labels on the level-2 grid (q = 0.05), the network trained for 200 epochs (lmax 4, Adam,
lr 1e-3 as in the poster unless ``--learning-rate`` is given), then

* the equivariance table (model, untrained network, label maps; in-plane and out-of-plane;
  ``--pairs`` pairs each; sigmoid probabilities, see :mod:`cryosphere.poses.evaluation.metrics`);
* pose accuracy on the validation split: model vs template matching vs uniform.

Each case lives in its own run folder ``<runs-root>/paper-<structure>-snr<snr>/`` (training
resumes from its checkpoint, so an interrupted run picks up where it stopped). Usage::

    python benchmarks/paper_evaluation.py                      # the full grid (about 20 min on 2 cores)
    python benchmarks/paper_evaluation.py --structures 1ubi --snrs 1 --epochs 5   # quick check

Prints one line per case and, as its last line, one JSON object with every case.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cryosphere.imaging.datasets import SimulationParameters
from cryosphere.poses.evaluation import equivariance, metrics
from cryosphere.poses.labels import dataset_labels
from cryosphere.poses.labels import templates as labels_templates
from cryosphere.poses.training import fixed_set
from cryosphere.runs.pipeline import Run
from cryosphere.runs.run_config import RunConfig


def evaluate_case(args: argparse.Namespace, structure: str, snr: float) -> dict:
    run_dir = Path(args.runs_root) / f"paper-{structure}-snr{snr:g}"
    start = time.perf_counter()
    flat = dict(
        structure=structure,
        n_projections=args.n_projections,
        image_size=args.image_size,
        snr=snr,
        blur_sigma=SimulationParameters.blur_sigma,
        seed=args.seed,
        lmax=args.lmax,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
    )
    run = Run(RunConfig.from_flat(flat), run_dir, progress=False).trained()
    dataset, pose_labels, result, predictions = run.dataset, run.labels, run.result, run.predictions
    trained_s = time.perf_counter() - start
    templates = labels_templates.dataset_templates(
        dataset, 2, cache_dir=dataset_labels.labels_dir(run_dir)
    )
    table = equivariance.equivariance_table(
        dataset.volume,
        dataset.parameters.blur_sigma,
        model=result.model,
        random_model=fixed_set.untrained_model(
            dataset.noisy_images, run.model_config, run.training_config
        ),
        templates=templates,
        level=2,
        lam=pose_labels.lam,
        n_pairs=args.pairs,
        seed=args.seed,
    )
    val = result.validation_indices
    accuracy = metrics.compare_pose_estimators(
        dataset.rotations[val],
        dataset.symmetry_ops,
        model_probabilities=predictions.probabilities[val],
        model_poses=predictions.best_rotation[val],
        template_poses=metrics.template_matched_poses(dataset.noisy_images[val], templates, 2),
        level=2,
        seed=args.seed,
    )
    ratio = table.mean("model", "out_of_plane") / table.mean("random", "out_of_plane")
    case = {
        "structure": structure,
        "point_group": dataset.point_group,
        "snr": snr,
        "run_dir": str(run_dir),
        "train_and_data_s": round(trained_s, 1),
        "equivariance": table.rows(),
        "model_to_random_out_of_plane": ratio,
        "accuracy": accuracy,
        "model_to_template_median": accuracy["model"]["median_deg"]
        / max(accuracy["template_matching"]["median_deg"], 1e-9),
    }
    print(
        f"{structure} snr {snr:g}: equivariance model/random {ratio:.3f}; median error model "
        f"{accuracy['model']['median_deg']:.1f} deg, template matching "
        f"{accuracy['template_matching']['median_deg']:.1f} deg, uniform "
        f"{accuracy['uniform']['median_deg']:.1f} deg ({trained_s:.0f} s)",
        flush=True,
    )
    for row in table.rows():
        print(
            f"    {row['rotation']:13s} {row['predictor']:7s} mean {row['mean']:.4f} "
            f"min {row['min']:.4f} max {row['max']:.4f}",
            flush=True,
        )
    return case


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", nargs="+", default=["1ubi", "1hvr"])
    parser.add_argument("--snrs", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--n-projections", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--lmax", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--pairs", type=int, default=100, help="equivariance pairs per kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs-root", default="runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = [evaluate_case(args, s, snr) for s in args.structures for snr in args.snrs]
    summary = {
        "n_projections": args.n_projections,
        "image_size": args.image_size,
        "epochs": args.epochs,
        "learning_rate": args.learning_rate,
        "cases": cases,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
