"""Benchmark: ``cryosphere predict`` images/s on a written STAR + stack, stage by stage.

Writes a realistic particle set (``--structure``, 64 px, CTF with defocus 0.5-2.5 µm, shifts up
to ±3 px, SNR 0.05; :func:`cryosphere.imaging.simulate.simulate_dataset`) and a checkpoint of
the default streamed network (untrained: speed does not depend on the weights), then times in
one process, each after a warm-up call, best of ``--repeats``:

* ``predict_images_per_s``: :func:`cryosphere.poses.inference.predict_star` end to end
  (reading, preprocessing, network, top-k, writing the STAR and side file);
* its stages alone: reading the memory-mapped stack, preprocessing (Fourier crop, CTF phase
  flip, background normalisation), and the network with top-k;
* peers measured in the same run: the CTF from ``torch_ctf.calculate_ctf_2d`` against our
  :func:`cryosphere.imaging.ctf.ctf_2d`, and :func:`cryosphere.poses.train.predict` (the full
  softmax over the grid, as ``predict`` used before) against the top-k network stage.

Usage: python benchmarks/bench_predict.py [--n 2000] [--threads 2] [--batch-size 256]
The last line printed is one JSON object (predict_images_per_s, the stage rates, settings).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from _shared import best_rate

REALISTIC = dict(
    image_size=64,
    blur_sigma=1.0,
    ctf=True,
    defocus_min_angstrom=5000.0,
    defocus_max_angstrom=25000.0,
    max_shift_px=3.0,
)


def write_particle_set(folder: Path, structure: str, n: int, seed: int, snr: float = 0.05):
    """Simulate ``n`` realistic particles (:data:`REALISTIC` at ``snr``) into ``folder``;
    returns the dataset."""
    from cryosphere.imaging.simulate import SimulationParameters, save_dataset, simulate_dataset

    params = SimulationParameters(
        structure=structure, n_projections=n, seed=seed, snr=snr, **REALISTIC
    )
    dataset = simulate_dataset(params, progress=False)
    save_dataset(dataset, folder, overwrite=True)
    return dataset


def write_untrained_checkpoint(run_dir: Path, image_size: int) -> Path:
    """A checkpoint of the default streamed network before any step (``run_dir/model/``)."""
    from cryosphere.geometry import so3
    from cryosphere.poses.stream import FixedSetStream
    from cryosphere.poses.stream_training import StreamTrainingConfig, train_on_stream
    from cryosphere.runs.series import stream_model_config

    G = so3.healpix_so3_grid_size(2)
    images = np.random.default_rng(0).standard_normal((8, image_size, image_size))
    stream = FixedSetStream(images, np.full((8, G), 1 / G), so3.random_rotations(8, 0), 8)
    config = StreamTrainingConfig(steps=0, device="cpu")
    result = train_on_stream(
        stream,
        stream_model_config(image_size),
        config,
        stream.batch(0),
        run_dir=run_dir,
        progress=False,
    )
    return result.checkpoint


def _torch_ctf(params, size: int, pixel: float) -> torch.Tensor:
    import torch_ctf

    def t(values):
        return torch.tensor(np.array(values), dtype=torch.float32)

    u, v = params.defocus_u_angstrom, params.defocus_v_angstrom
    return torch_ctf.calculate_ctf_2d(
        defocus=t((u + v) / 2e4),
        astigmatism=t((u - v) / 2e4),
        astigmatism_angle=t(params.defocus_angle_deg),
        voltage=t(params.voltage_kv),
        spherical_aberration=t(params.spherical_aberration_mm),
        amplitude_contrast=t(params.amplitude_contrast),
        phase_shift=t(np.zeros(len(params))),
        pixel_size=pixel,
        image_shape=(size, size),
        rfft=True,
        fftshift=False,
    )


def predict_rates(star: Path, checkpoint: Path, batch_size: int, repeats: int) -> dict:
    """``predict_star`` images/s on ``star`` and the stage and peer rates (module docstring)."""
    from cryosphere.imaging import ctf, preprocess
    from cryosphere.imaging.particles import StackReader, read_particle_set
    from cryosphere.poses import inference, train

    pset = read_particle_set(star)
    n, size, pixel = len(pset), pset.image_size, pset.pixel_size_angstrom
    model = train.load_model(checkpoint, device="cpu")
    out = Path(star).with_name("bench_predicted.star")
    rates = {"n_images": n}
    rates["predict_images_per_s"] = best_rate(
        lambda: inference.predict_star(
            star, checkpoint, out, batch_size=batch_size, device="cpu", progress=False
        ),
        n,
        repeats,
    )
    with StackReader(pset) as reader:
        images = torch.from_numpy(reader.read(np.arange(n)))
        rates["read_images_per_s"] = best_rate(lambda: reader.read(np.arange(n)), n, repeats)
    rates["preprocess_images_per_s"] = best_rate(
        lambda: preprocess.prepare_images(images, pixel, target_size=size, ctf=pset.ctf), n, repeats
    )
    prepared, _ = preprocess.prepare_images(images, pixel, target_size=size, ctf=pset.ctf)

    def network():
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                inference._top_cells(model, prepared[start : start + batch_size], 10)

    rates["network_topk_images_per_s"] = best_rate(network, n, repeats)
    rates["peer_train_predict_images_per_s"] = best_rate(
        lambda: train.predict(model, prepared, batch_size=batch_size), n, repeats
    )
    rates["ctf_images_per_s"] = best_rate(lambda: ctf.ctf_2d(pset.ctf, size, pixel), n, repeats)
    rates["peer_torch_ctf_images_per_s"] = best_rate(
        lambda: _torch_ctf(pset.ctf, size, pixel), n, repeats
    )
    return rates


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structure", default="1ubi")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_particle_set(folder / "data", args.structure, args.n, seed=1)
        checkpoint = write_untrained_checkpoint(folder / "run", REALISTIC["image_size"])
        rates = predict_rates(
            folder / "data" / "particles.star", checkpoint, args.batch_size, args.repeats
        )
    for key, value in rates.items():
        print(f"{key:36s} {value:10.0f}")
    summary = {**rates, "settings": {**vars(args), "torch_threads": torch.get_num_threads()}}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
