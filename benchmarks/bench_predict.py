"""Benchmark: ``cryosphere predict`` images/s on a written STAR + stack, stage by stage.

Writes a realistic particle set (``--structure``, 64 px, CTF with defocus 0.5-2.5 µm, shifts up
to ±3 px, SNR 0.05; :func:`cryosphere.imaging.simulate.simulate_dataset`) and a checkpoint of
the default streamed network (untrained: speed does not depend on the weights), then times in
one process, each after a warm-up call, best of ``--repeats``:

* ``predict_images_per_s``: :func:`cryosphere.poses.prediction.inference.predict_star` end to end
  (reading, preprocessing, network, top-k, writing the STAR and side file);
* its stages alone: reading the memory-mapped stack, preprocessing (Fourier crop, CTF phase
  flip, background normalisation), and the network with top-k;
* ``predict_map_top{10,50,100}_images_per_s`` (``_level3_``: 10 and 50): ``predict_star`` with
  the consensus map (``cryosphere predict --map``, its default band): the network's 10, 50 or
  100 most probable cells (their children on the level-3 grid) searched against the map's
  templates with each particle's CTF and a ±3 px translation search (``_top100_whole_band``:
  every frequency instead of the default band; ``_top100_turns4``: the
  network's distribution averaged over
  the four quarter turns of each image first, ``predict --turns 4``), with the map projected
  beforehand (``map_setup_s``, once per map: it does not grow with the particles); its peer is
  exhaustive CTF-aware template matching (:func:`cryosphere.poses.search.matching.
  ctf_template_matching`, same shifts, level 2) on ``--n-matching`` particles, and on the same
  particles the classical searches users run (:func:`classical_rates`: exhaustive on the fast
  kernel and coarse to fine, end to end from the STAR file);
* peers measured in the same run: the CTF from ``torch_ctf.calculate_ctf_2d`` against our
  :func:`cryosphere.imaging.ctf.ctf_2d`, and :func:`cryosphere.poses.prediction.predictions.predict` (the full
  softmax over the grid, as ``predict`` used before) against the top-k network stage.

Usage: python benchmarks/bench_predict.py [--n 2000] [--threads 2] [--batch-size 256]
The last line printed is one JSON object (predict_images_per_s, the stage rates, settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
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


def write_particle_set(
    folder: Path, structure: str, n: int, seed: int, snr: float = 0.05, picked: bool = True
):
    """Simulate ``n`` realistic particles (:data:`REALISTIC` at ``snr``) into ``folder``;
    returns the dataset. ``picked``: written as new particles are, with zero origins (their
    ±3 px shifts are for the search to find, as for the classical searches beside it); False:
    the true shifts written as origins, as a refinement states them."""
    from cryosphere.imaging.datasets import SimulationParameters
    from cryosphere.imaging.simulate import save_dataset, simulate_dataset

    params = SimulationParameters(
        structure=structure, n_projections=n, seed=seed, snr=snr, **REALISTIC
    )
    dataset = simulate_dataset(params, progress=False)
    save_dataset(dataset, folder, overwrite=True, write_origins=not picked)
    return dataset


def write_untrained_checkpoint(run_dir: Path, image_size: int) -> Path:
    """A checkpoint of the default streamed network before any step (``run_dir/model/``)."""
    from cryosphere.geometry import grids, rotations
    from cryosphere.poses.training.fixed_stream import FixedSetStream
    from cryosphere.poses.training.streamed import StreamTrainingConfig, train_on_stream
    from cryosphere.runs.series import stream_model_config

    G = grids.healpix_so3_grid_size(2)
    images = np.random.default_rng(0).standard_normal((8, image_size, image_size))
    stream = FixedSetStream(images, np.full((8, G), 1 / G), rotations.random_rotations(8, 0), 8)
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


def map_search_rates(star: Path, checkpoint: Path, n_matching: int) -> dict:
    """``predict_star --map`` images/s at levels 2 and 3 and exhaustive matching's (level 2)."""
    from cryosphere import io
    from cryosphere.imaging.particles import StackReader, read_particle_set
    from cryosphere.poses.labels import templates as labels_templates
    from cryosphere.poses.prediction import inference
    from cryosphere.poses.search import map_search, matching

    pset = read_particle_set(star)
    n, volume_path = len(pset), Path(star).with_name("volume.mrc")
    out = Path(star).with_name("bench_searched.star")
    rates = {}
    for level in (2, 3):
        refine = map_search.MapRefinement(
            volume_path, level=level, max_shift_px=REALISTIC["max_shift_px"], blur_sigma_px=1.0
        )
        setup = time.perf_counter()
        search = map_search.MapSearch(refine, pset, REALISTIC["image_size"], 2)
        setup = time.perf_counter() - setup
        suffix = "" if level == 2 else "_level3"
        rates[f"map_setup_s{suffix}"] = setup  # projecting the map once, at the search level
        for top_k in (10, 50, 100) if level == 2 else (10, 50):
            rates[f"predict_map{suffix}_top{top_k}_images_per_s"] = best_rate(
                lambda s=search, k=top_k: inference.predict_star(
                    star,
                    checkpoint,
                    out,
                    device="cpu",
                    progress=False,
                    refine=s,
                    top_k=k,
                    overwrite=True,
                ),
                n,
                1,
            )
        if level == 2:  # the same search on every frequency (no resolution limit)
            whole = map_search.MapSearch(
                dataclasses.replace(refine, resolution_angstrom=2 * pset.pixel_size_angstrom),
                pset,
                REALISTIC["image_size"],
                2,
            )
            rates["predict_map_top100_whole_band_images_per_s"] = best_rate(
                lambda s=whole: inference.predict_star(
                    star,
                    checkpoint,
                    out,
                    device="cpu",
                    progress=False,
                    refine=s,
                    top_k=100,
                    overwrite=True,
                ),
                n,
                1,
            )
            # the network averaged over the four quarter turns first
            rates["predict_map_top100_turns4_images_per_s"] = best_rate(
                lambda s=search: inference.predict_star(
                    star, checkpoint, out, device="cpu", progress=False, refine=s, top_k=100,
                    overwrite=True,
                    turns=4,
                ),
                n,
                1,
            )  # fmt: skip
    volume, _ = io.read_map(volume_path)
    templates = labels_templates.template_bank(volume, 2, 1.0)
    m = min(int(n_matching), n)
    with StackReader(pset) as reader:
        images = reader.read(np.arange(m))
    rates["peer_ctf_template_matching_images_per_s"] = best_rate(
        lambda: matching.ctf_template_matching(
            images,
            templates,
            ctf=pset.ctf.subset(np.arange(m)),
            pixel_size_angstrom=pset.pixel_size_angstrom,
            max_shift_px=REALISTIC["max_shift_px"],
        ),
        m,
        1,
    )
    rates.update(classical_rates(star, m))
    for top_k in (10, 50, 100):
        rates[f"map_search_top{top_k}_speedup_level2"] = (
            rates[f"predict_map_top{top_k}_images_per_s"]
            / rates["peer_ctf_template_matching_images_per_s"]
        )
    return rates


def classical_rates(star: Path, m: int) -> dict:
    """The classical searches on the first ``m`` particles, end to end from the STAR file
    (level 2, the default band, ±3 px, each template with its particle's CTF):
    ``exhaustive_fast_images_per_s`` (every cell, :func:`cryosphere.poses.search.coarse_to_fine.
    exhaustive_search`) and ``coarse_to_fine_images_per_s`` (level 1 on an 8-px band, the
    best 16 cells' children at level 2: the issue's setting; bench_peers tunes it per case)."""
    import _classical

    from cryosphere.geometry import rotations
    from cryosphere.imaging.particles import read_particle_set
    from cryosphere.poses.search.coarse_to_fine import CoarseToFine

    angles = read_particle_set(star).angles_deg[:m]
    particles = _classical.load_particles(
        star, 64, rotations.matrices_from_relion_euler(angles), None
    )
    templates = _classical.Templates(particles, REALISTIC["blur_sigma"])
    subset = np.arange(m)
    out = {}
    schedules = {
        "exhaustive_fast": CoarseToFine(2, 2, keep=()),
        "coarse_to_fine": CoarseToFine(1, 2, coarse_resolution_px=8.0, keep=16),
    }
    for name, schedule in schedules.items():
        run = lambda s=schedule: _classical.coarse_to_fine_run(particles, templates, s, subset)  # noqa: E731
        out[f"{name}_images_per_s"] = best_rate(run, m, 1)
    return out


def predict_rates(star: Path, checkpoint: Path, batch_size: int, repeats: int) -> dict:
    """``predict_star`` images/s on ``star`` and the stage and peer rates (module docstring)."""
    from cryosphere.imaging import ctf, preprocess
    from cryosphere.imaging.particles import StackReader, read_particle_set
    from cryosphere.poses.network import checkpoints
    from cryosphere.poses.prediction import inference, predictions

    pset = read_particle_set(star)
    n, size, pixel = len(pset), pset.image_size, pset.pixel_size_angstrom
    model = checkpoints.load_model(checkpoint, device="cpu")
    out = Path(star).with_name("bench_predicted.star")
    rates = {"n_images": n}
    rates["predict_images_per_s"] = best_rate(
        lambda: inference.predict_star(
            star,
            checkpoint,
            out,
            batch_size=batch_size,
            device="cpu",
            progress=False,
            overwrite=True,
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
        lambda: predictions.predict(model, prepared, batch_size=batch_size), n, repeats
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
    parser.add_argument("--n-matching", type=int, default=200)
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
        rates.update(
            map_search_rates(folder / "data" / "particles.star", checkpoint, args.n_matching)
        )
    for key, value in rates.items():
        print(f"{key:40s} {value:10.1f}")
    summary = {**rates, "settings": {**vars(args), "torch_threads": torch.get_num_threads()}}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
