"""Particle datasets: simulate projection images of a structure, save them as a run folder, load.

A dataset is made in four steps, all seeded:

1. the Coulomb-potential map of the structure on an ``N³`` grid (:mod:`cryosphere.imaging.structure`);
2. ``n`` uniform random poses ``R`` (``x_mic = R @ x_vol``);
3. clean images: projections (line integrals, :func:`cryosphere.imaging.projection.project_volume`)
   blurred by a Gaussian of ``blur_sigma`` pixels;
4. noisy images: clean images plus white Gaussian noise with ``σ² = var(clean stack) / snr``,
   the variance taken over all pixels of the clean stack.

Optional realism (all off by default, so default datasets are unchanged bit for bit): with
``ctf=True`` each clean image is multiplied in Fourier space by its own CTF
(:mod:`cryosphere.imaging.ctf`; mean defocus uniform in ``[defocus_min_angstrom,
defocus_max_angstrom]``, astigmatism up to ``max_astigmatism_angstrom``); ``max_shift_px > 0``
moves each particle by a sub-pixel shift uniform in ``±max_shift_px`` per axis; ``contrast_sigma
> 0`` scales each clean image by ``exp(contrast_sigma · z)``, ``z ~ N(0, 1)``. These draws use
their own generator (seeded by ``[seed, 1]``), so the poses and the noise draws do not change.
The clean stack is ``contrast · shift(CTF(blur(projection)))`` and the SNR is measured on it.
With ``ctf_field="padded"`` (the default) the shift and the CTF act in a field padded by the
rule of :mod:`cryosphere.imaging.microscope` and the result is boxed, as a microscope images a
particle; ``ctf_field="box"`` applies them inside the particle box (circular: the CTF's
delocalised signal wraps round), as datasets made before the padded field were.
``noise_spectrum="mtf"`` colours the noise by the pixel-MTF model
(:func:`cryosphere.imaging.microscope.pixel_mtf_power`), keeping its variance.

Run-folder files (:data:`SIMULATION_FILES`): ``volume.mrc`` (the map with its voxel size),
``particles.mrcs`` (noisy stack), ``particles_clean.mrcs`` (clean stack), ``particles.star``
(RELION 3.1+ optics and particles tables, Euler angles in degrees), ``poses.npy`` (the exact
float64 pose matrices) and ``simulation.json`` (parameters and derived values, written last).
With CTF or shifts on, the STAR file also carries rlnDefocusU/V/Angle (and rlnCtfBfactor) and
the RELION origins of the shifts (``rlnOriginXAngst = −shift_x · pixel_size``, see
:mod:`cryosphere.imaging.ctf`), and :data:`REALISM_FILE` holds the exact arrays.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import gemmi
import numpy as np
import torch

from cryosphere import io
from cryosphere.geometry import point_groups
from cryosphere.geometry import rotations as geometry_rotations
from cryosphere.imaging import atoms as imaging_atoms
from cryosphere.imaging import chain_symmetry, microscope, structure
from cryosphere.imaging import ctf as ctf_module
from cryosphere.imaging.datasets import ParticleDataset, SimulationParameters
from cryosphere.imaging.projection import add_gaussian_noise, gaussian_blur, project_volume

__all__ = [
    "SIMULATION_FILES",
    "REALISM_FILE",
    "auto_pixel_size",
    "simulate_dataset",
    "save_dataset",
    "load_dataset",
    "load_or_simulate",
    "run_folder_table",
    "realism_star_columns",
]

SIMULATION_FILES = {
    "volume": "volume.mrc",
    "noisy": "particles.mrcs",
    "clean": "particles_clean.mrcs",
    "star": "particles.star",
    "poses": "poses.npy",
    "record": "simulation.json",
}
#: Exact per-particle CTF parameters, shifts (px) and contrast factors; only when one is on.
REALISM_FILE = "ctf_shifts.npz"


def auto_pixel_size(
    atom_structure: gemmi.Structure, image_size: int, margin_angstrom: float = 4.0
) -> float:
    """Smallest multiple of 0.05 Å per pixel at which the structure fits the box.

    The structure fits when every atom lies within ``N * pixel / 2 - margin`` of the centre of
    mass; the margin leaves room for the atoms' scattering profiles.
    """
    positions = imaging_atoms.atom_positions(atom_structure)
    radius = float(
        np.linalg.norm(positions - imaging_atoms.centre_of_mass(atom_structure), axis=1).max()
    )
    pixel = 2.0 * (radius + margin_angstrom) / image_size
    return math.ceil(pixel / 0.05 - 1e-9) * 0.05


def simulate_dataset(
    parameters: SimulationParameters,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> ParticleDataset:
    """Make a dataset from ``parameters`` (deterministic for a given seed).

    ``device`` runs the projection, blur, CTF and noise there (default: CPU); the arrays come
    back to the CPU. The poses and the noise are drawn on the CPU, so a GPU changes the images
    only by the float error of its FFTs and interpolation.
    """
    atoms = imaging_atoms.load_structure(parameters.structure)
    structure.check_imageable(atoms, repr(parameters.structure))
    pixel_size = parameters.pixel_size or auto_pixel_size(atoms, parameters.image_size)
    volume = structure.coulomb_potential_map(
        atoms, parameters.image_size, pixel_size, extra_b_factor=parameters.extra_b_factor
    )
    group_name, frame = chain_symmetry.resolve_point_group(atoms, parameters.symmetry)
    symmetry_ops = point_groups.point_group(group_name, frame)
    rng = np.random.default_rng(parameters.seed)
    rotations = geometry_rotations.random_rotations(parameters.n_projections, rng)
    projections = project_volume(volume, rotations, progress=progress, device=device)
    clean = gaussian_blur(projections, parameters.blur_sigma)
    noise_seed = int(rng.integers(2**31))
    realism: dict[str, Any] = {}
    if parameters.realism:
        clean, realism = _add_realism(clean, parameters, float(pixel_size))
    noisy, sigma = add_gaussian_noise(clean, parameters.snr, seed=noise_seed)
    if parameters.noise_spectrum == "mtf":
        power = microscope.pixel_mtf_power(parameters.image_size)
        noisy = clean + microscope.colour_noise(noisy - clean, power)
    return ParticleDataset(
        parameters=parameters,
        volume=np.asarray(volume, dtype=np.float32),
        pixel_size=float(pixel_size),
        rotations=rotations,
        clean_images=clean.cpu().numpy(),
        noisy_images=noisy.cpu().numpy(),
        noise_sigma=sigma,
        point_group=group_name,
        symmetry_ops=symmetry_ops,
        **realism,
    )


def draw_realism(
    parameters: SimulationParameters, n: int, rng: np.random.Generator
) -> dict[str, Any]:
    """The per-particle draws of ``parameters``' CTF, shift and contrast fields, in that order
    from ``rng``: ``"ctf"`` (:class:`~cryosphere.imaging.ctf.CTFParameters`), ``"shifts_px"``
    ``(n, 2)`` and ``"contrast"`` ``(n,)``, each present only when its field is on."""
    drawn: dict[str, Any] = {}
    if parameters.ctf:
        drawn["ctf"] = ctf_module.random_ctf_parameters(
            n,
            rng,
            defocus_range_angstrom=(
                parameters.defocus_min_angstrom,
                parameters.defocus_max_angstrom,
            ),
            max_astigmatism_angstrom=parameters.max_astigmatism_angstrom,
            voltage_kv=parameters.voltage_kv,
            spherical_aberration_mm=parameters.spherical_aberration_mm,
            amplitude_contrast=parameters.amplitude_contrast,
            b_factor=parameters.ctf_b_factor,
        )
    if parameters.max_shift_px > 0:
        drawn["shifts_px"] = ctf_module.random_shifts_px(n, rng, parameters.max_shift_px)
    if parameters.contrast_sigma > 0:
        drawn["contrast"] = np.exp(parameters.contrast_sigma * rng.standard_normal(n))
    return drawn


def _add_realism(
    clean: torch.Tensor, parameters: SimulationParameters, pixel_size: float
) -> tuple[torch.Tensor, dict[str, Any]]:
    """CTF, shifts and contrast of the module docstring; returns the images and the draws."""
    rng = np.random.default_rng([int(parameters.seed), 1])
    n, size = clean.shape[0], clean.shape[-1]
    drawn = draw_realism(parameters, n, rng)
    if parameters.ctf and parameters.ctf_field == "padded":
        clean = microscope.image_in_field(
            clean, drawn["ctf"], pixel_size, shifts_px=drawn.get("shifts_px")
        )
    elif parameters.ctf:
        transfer = ctf_module.ctf_2d(drawn["ctf"], size, pixel_size, device=clean.device)
        clean = ctf_module.apply_ctf(clean, transfer)
    if parameters.max_shift_px > 0 and not (parameters.ctf and parameters.ctf_field == "padded"):
        clean = ctf_module.shift_images(clean, drawn["shifts_px"])
    if parameters.contrast_sigma > 0:
        clean = (
            clean
            * torch.as_tensor(drawn["contrast"], dtype=torch.float32, device=clean.device)[
                :, None, None
            ]
        )
    return clean, drawn


def realism_star_columns(
    dataset: ParticleDataset, write_origins: bool = True
) -> dict[str, np.ndarray]:
    """Per-particle STAR columns of a dataset's CTF and shifts (empty when both are off):
    rlnDefocusU/V (Å), rlnDefocusAngle (deg), rlnCtfBfactor (Å², when non-zero) and, with
    ``write_origins``, rlnOriginXAngst/YAngst (Å, RELION's sign: ``−shift · pixel_size``)."""
    columns: dict[str, np.ndarray] = {}
    if dataset.ctf is not None:
        columns["rlnDefocusU"] = dataset.ctf.defocus_u_angstrom
        columns["rlnDefocusV"] = dataset.ctf.defocus_v_angstrom
        columns["rlnDefocusAngle"] = dataset.ctf.defocus_angle_deg
        if np.any(dataset.ctf.b_factor != 0):
            columns["rlnCtfBfactor"] = dataset.ctf.b_factor
    if dataset.shifts_px is not None and write_origins:
        origins = ctf_module.origin_angstrom_from_shift_px(dataset.shifts_px, dataset.pixel_size)
        columns["rlnOriginXAngst"] = origins[:, 0]
        columns["rlnOriginYAngst"] = origins[:, 1]
    return columns


def _stored_parameters(run_dir: Path) -> SimulationParameters | None:
    record_path = run_dir / SIMULATION_FILES["record"]
    if not record_path.is_file():
        return None
    return SimulationParameters.from_dict(io.read_json(record_path)["parameters"])


def save_dataset(
    dataset: ParticleDataset,
    run_dir: str | os.PathLike[str],
    overwrite: bool = False,
    *,
    write_origins: bool = True,
) -> dict[str, Path]:
    """Write ``dataset`` into ``run_dir`` (see :data:`SIMULATION_FILES`); return the paths.

    ``write_origins``: the STAR file states each particle's true shift as its origin, as a
    refinement would (default). False writes the particles as picked, with zero origins:
    new particles whose shifts a search must find (the shifts stay in the realism file, for
    scoring only). Anything that reads the STAR file then sees them uncentred.

    A run folder that already holds a dataset made with other parameters is an error
    (``FileExistsError``, nothing written) unless ``overwrite`` is true. Each file is written
    atomically; ``simulation.json`` comes last, so a folder with it is complete.
    """
    folder = Path(run_dir)
    stored = _stored_parameters(folder)
    if stored is not None and stored != dataset.parameters and not overwrite:
        raise FileExistsError(
            f"{folder} already holds a dataset simulated with other parameters "
            f"({stored}); choose another run folder or pass overwrite=True"
        )
    folder.mkdir(parents=True, exist_ok=True)
    paths = {key: folder / name for key, name in SIMULATION_FILES.items()}
    io.write_map(paths["volume"], dataset.volume, dataset.pixel_size)
    io.write_stack(paths["noisy"], dataset.noisy_images, dataset.pixel_size)
    io.write_stack(paths["clean"], dataset.clean_images, dataset.pixel_size)
    with io.atomic_path(paths["poses"]) as tmp:
        np.save(tmp, dataset.rotations)
    realism = dataset.parameters.realism
    if realism:
        arrays = {} if dataset.ctf is None else dataclasses.asdict(dataset.ctf)
        for name in ("shifts_px", "contrast"):
            if getattr(dataset, name) is not None:
                arrays[name] = getattr(dataset, name)
        io.write_npz(folder / REALISM_FILE, **arrays)
    elif (folder / REALISM_FILE).exists():
        (folder / REALISM_FILE).unlink()  # left by an overwritten dataset with CTF
    optics = dataset.parameters
    io.write_particles_star(
        paths["star"],
        geometry_rotations.relion_euler_from_matrices(dataset.rotations),
        stack_name=SIMULATION_FILES["noisy"],
        pixel_size=dataset.pixel_size,
        image_size=dataset.image_size,
        extra_columns=realism_star_columns(dataset, write_origins) if realism else None,
        voltage_kv=optics.voltage_kv,
        spherical_aberration_mm=optics.spherical_aberration_mm,
        amplitude_contrast=optics.amplitude_contrast,
    )
    io.write_json(
        paths["record"],
        {
            "parameters": dataset.parameters.to_dict(),
            "pixel_size": dataset.pixel_size,
            "image_size": dataset.image_size,
            "n_projections": len(dataset),
            "noise_sigma": dataset.noise_sigma,
            "point_group": dataset.point_group,
            "symmetry_ops": dataset.symmetry_ops,
            "files": SIMULATION_FILES,
        },
    )
    return paths


def load_dataset(run_dir: str | os.PathLike[str]) -> ParticleDataset:
    """Load a dataset written by :func:`save_dataset` (bit-identical arrays)."""
    folder = Path(run_dir)
    record_path = folder / SIMULATION_FILES["record"]
    if not record_path.is_file():
        raise FileNotFoundError(
            f"{folder} holds no simulated dataset ({SIMULATION_FILES['record']} is missing); "
            "run notebook 01 or cryosphere.imaging.simulate.load_or_simulate first"
        )
    try:
        record = io.read_json(record_path)
        volume, pixel_size = io.read_map(folder / SIMULATION_FILES["volume"])
        noisy, _ = io.read_stack(folder / SIMULATION_FILES["noisy"])
        clean, _ = io.read_stack(folder / SIMULATION_FILES["clean"])
        rotations = np.load(folder / SIMULATION_FILES["poses"])
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(
            f"{folder} holds a damaged dataset ({error}); simulate it again: notebook 01 with "
            "overwrite=True, load_or_simulate(..., overwrite=True) or cryosphere run --overwrite"
        ) from error
    n = int(record["n_projections"])
    if rotations.shape != (n, 3, 3) or len(noisy) != n or len(clean) != n:
        raise ValueError(
            f"{folder} holds a damaged dataset: {n} images recorded, but {len(noisy)} noisy, "
            f"{len(clean)} clean images and {len(rotations)} poses on disk; simulate it again "
            "(overwrite=True, or cryosphere run --overwrite)"
        )
    parameters = SimulationParameters.from_dict(record["parameters"])
    realism: dict[str, Any] = {}
    if parameters.realism:
        with np.load(folder / REALISM_FILE) as stored:
            arrays = {key: stored[key] for key in stored.files}
        for name in ("shifts_px", "contrast"):
            if name in arrays:
                realism[name] = arrays.pop(name)
        if arrays:
            realism["ctf"] = ctf_module.CTFParameters(**arrays)
    return ParticleDataset(
        parameters=parameters,
        volume=volume,
        pixel_size=float(record["pixel_size"]),
        rotations=rotations,
        clean_images=clean,
        noisy_images=noisy,
        noise_sigma=float(record["noise_sigma"]),
        point_group=str(record["point_group"]),
        symmetry_ops=np.asarray(record["symmetry_ops"], dtype=np.float64),
        **realism,
    )


def load_or_simulate(
    run_dir: str | os.PathLike[str],
    parameters: SimulationParameters,
    overwrite: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> ParticleDataset:
    """Load the dataset in ``run_dir`` if it was made with ``parameters``, else make and save it
    (on ``device``, see :func:`simulate_dataset`).

    A folder holding a dataset made with other parameters raises ``FileExistsError`` before any
    work starts, unless ``overwrite`` is true.
    """
    folder = Path(run_dir)
    stored = _stored_parameters(folder)
    if stored == parameters:
        return load_dataset(folder)
    if stored is not None and not overwrite:
        raise FileExistsError(
            f"{folder} already holds a dataset simulated with other parameters "
            f"({stored}); choose another run folder or pass overwrite=True"
        )
    dataset = simulate_dataset(parameters, progress=progress, device=device)
    save_dataset(dataset, folder, overwrite=True)
    return dataset


def run_folder_table(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """What the simulation wrote in ``run_dir``: one dict per file (file, bytes, contents)."""
    folder = Path(run_dir)
    contents = {
        "volume": "Coulomb-potential map (MRC, voxel size in header)",
        "noisy": "noisy particle images (MRC stack)",
        "clean": "noise-free particle images (MRC stack)",
        "star": "RELION 3.1+ particles: optics table, Euler angles (degrees)",
        "poses": "exact pose matrices R (n, 3, 3), float64",
        "record": "parameters and derived values",
    }
    return [
        {
            "file": name,
            "bytes": (folder / name).stat().st_size if (folder / name).exists() else None,
            "contents": contents[key],
        }
        for key, name in SIMULATION_FILES.items()
    ]
