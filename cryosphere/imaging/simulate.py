"""Particle datasets: simulate projection images of a structure, save them as a run folder, load.

A dataset is made in four steps, all seeded:

1. the Coulomb-potential map of the structure on an ``N³`` grid (:mod:`cryosphere.imaging.structure`);
2. ``n`` uniform random poses ``R`` (``x_mic = R @ x_vol``);
3. clean images: projections (line integrals, :func:`cryosphere.imaging.projection.project_volume`)
   blurred by a Gaussian of ``blur_sigma`` pixels;
4. noisy images: clean images plus white Gaussian noise with ``σ² = var(clean stack) / snr``,
   the variance taken over all pixels of the clean stack.

Run-folder files (:data:`SIMULATION_FILES`): ``volume.mrc`` (the map with its voxel size),
``particles.mrcs`` (noisy stack), ``particles_clean.mrcs`` (clean stack), ``particles.star``
(RELION 3.1+ optics and particles tables, Euler angles in degrees), ``poses.npy`` (the exact
float64 pose matrices) and ``simulation.json`` (parameters and derived values, written last).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cryosphere import io
from cryosphere.geometry import so3
from cryosphere.imaging import structure
from cryosphere.imaging.projection import add_gaussian_noise, gaussian_blur, project_volume

__all__ = [
    "SIMULATION_FILES",
    "SimulationParameters",
    "ParticleDataset",
    "auto_pixel_size",
    "simulate_dataset",
    "save_dataset",
    "load_dataset",
    "load_or_simulate",
    "run_folder_table",
]

SIMULATION_FILES = {
    "volume": "volume.mrc",
    "noisy": "particles.mrcs",
    "clean": "particles_clean.mrcs",
    "star": "particles.star",
    "poses": "poses.npy",
    "record": "simulation.json",
}


@dataclass(frozen=True)
class SimulationParameters:
    """What makes a simulated dataset.

    Attributes
    ----------
    structure
        Embedded structure name (``"1ubi"``, ``"1hvr"``, ``"5pti"``) or a PDB/mmCIF path.
    n_projections
        Number of images.
    image_size
        Box size ``N`` in pixels (images ``N × N``, map ``N³``); at least 16.
    pixel_size
        Å per pixel; ``None`` picks the smallest multiple of 0.05 Å that fits the structure.
    snr
        Signal-to-noise ratio, ``var(clean stack) / σ²_noise``; must be > 0.
    blur_sigma
        Gaussian blur of the clean images, standard deviation in pixels (>= 0).
    extra_b_factor
        Extra B-factor (Å²) added to every atom when computing the map.
    symmetry
        ``"auto"`` (detect from the chains), a point-group name such as ``"C2"``, or ``None``.
    seed
        Seed for poses and noise.
    """

    structure: str = "1ubi"
    n_projections: int = 100
    image_size: int = 64
    pixel_size: float | None = None
    snr: float = 1.0
    blur_sigma: float = 1.0
    extra_b_factor: float = 0.0
    symmetry: str | None = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_types(self)
        if int(self.n_projections) < 1:
            raise ValueError(f"n_projections must be >= 1, got {self.n_projections}")
        if int(self.image_size) < 16:
            raise ValueError(
                f"image_size must be at least 16 pixels, got {self.image_size}; "
                "use 64 or more for meaningful pose labels"
            )
        if self.pixel_size is not None and not self.pixel_size > 0:
            raise ValueError(f"pixel_size must be positive (Å) or None, got {self.pixel_size}")
        if not (self.snr > 0 and math.isfinite(self.snr)):
            raise ValueError(f"snr must be a positive number, got {self.snr}")
        if not (self.blur_sigma >= 0 and math.isfinite(self.blur_sigma)):
            raise ValueError(f"blur_sigma must be >= 0 pixels, got {self.blur_sigma}")
        if not self.extra_b_factor >= 0:
            raise ValueError(f"extra_b_factor must be >= 0 Å², got {self.extra_b_factor}")

    def to_dict(self) -> dict[str, Any]:
        """Parameters as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> SimulationParameters:
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError`` naming them."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(record) - names)
        if unknown:
            raise TypeError(f"unknown simulation parameters {unknown}; valid: {sorted(names)}")
        return cls(**record)


_INTEGER_FIELDS = ("n_projections", "image_size", "seed")
_NUMBER_FIELDS = ("snr", "blur_sigma", "extra_b_factor")


def _check_types(parameters: SimulationParameters) -> None:
    """``TypeError`` naming a field of the wrong type (``"64"``, ``64.5``, ``True``…)."""
    for name in _INTEGER_FIELDS:
        value = getattr(parameters, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    for name in _NUMBER_FIELDS + ("pixel_size",):
        value = getattr(parameters, name)
        if name == "pixel_size" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must be a number, got {value!r}")
    if parameters.pixel_size is not None and not math.isfinite(parameters.pixel_size):
        raise ValueError(
            f"pixel_size must be a finite number of Å or None, got {parameters.pixel_size}"
        )


@dataclass
class ParticleDataset:
    """A simulated particle dataset.

    Attributes
    ----------
    parameters
        What made it.
    volume
        ``(N, N, N)`` float32 Coulomb-potential map ``[z, y, x]``, centre at voxel ``N // 2``.
    pixel_size
        Å per pixel (and per voxel).
    rotations
        ``(n, 3, 3)`` float64 poses ``R`` (``x_mic = R @ x_vol``).
    clean_images, noisy_images
        ``(n, N, N)`` float32 images ``[image, y, x]``.
    noise_sigma
        Standard deviation of the added noise (image units).
    point_group
        Point-group name used for the structure (``"C1"`` for none).
    symmetry_ops
        ``(K, 3, 3)`` point-group rotations in volume coordinates, identity first; poses
        ``R`` and ``R @ g`` give the same image.
    """

    parameters: SimulationParameters
    volume: np.ndarray
    pixel_size: float
    rotations: np.ndarray
    clean_images: np.ndarray
    noisy_images: np.ndarray
    noise_sigma: float
    point_group: str
    symmetry_ops: np.ndarray

    @property
    def image_size(self) -> int:
        """Box size ``N`` in pixels."""
        return int(self.volume.shape[0])

    def __len__(self) -> int:
        return int(self.rotations.shape[0])


def auto_pixel_size(atom_structure: Any, image_size: int, margin_angstrom: float = 4.0) -> float:
    """Smallest multiple of 0.05 Å per pixel at which the structure fits the box.

    The structure fits when every atom lies within ``N * pixel / 2 - margin`` of the centre of
    mass; the margin leaves room for the atoms' scattering profiles.
    """
    positions = structure.atom_positions(atom_structure)
    radius = float(
        np.linalg.norm(positions - structure.centre_of_mass(atom_structure), axis=1).max()
    )
    pixel = 2.0 * (radius + margin_angstrom) / image_size
    return math.ceil(pixel / 0.05 - 1e-9) * 0.05


def simulate_dataset(parameters: SimulationParameters, progress: bool = True) -> ParticleDataset:
    """Make a dataset from ``parameters`` (deterministic for a given seed)."""
    atoms = structure.load_structure(parameters.structure)
    structure.check_imageable(atoms, repr(parameters.structure))
    pixel_size = parameters.pixel_size or auto_pixel_size(atoms, parameters.image_size)
    volume = structure.coulomb_potential_map(
        atoms, parameters.image_size, pixel_size, extra_b_factor=parameters.extra_b_factor
    )
    group_name, frame = structure.resolve_point_group(atoms, parameters.symmetry)
    symmetry_ops = so3.point_group(group_name, frame)
    rng = np.random.default_rng(parameters.seed)
    rotations = so3.random_rotations(parameters.n_projections, rng)
    projections = project_volume(volume, rotations, progress=progress)
    clean = gaussian_blur(projections, parameters.blur_sigma)
    noisy, sigma = add_gaussian_noise(clean, parameters.snr, seed=int(rng.integers(2**31)))
    return ParticleDataset(
        parameters=parameters,
        volume=np.asarray(volume, dtype=np.float32),
        pixel_size=float(pixel_size),
        rotations=rotations,
        clean_images=clean.numpy(),
        noisy_images=noisy.numpy(),
        noise_sigma=sigma,
        point_group=group_name,
        symmetry_ops=symmetry_ops,
    )


def _stored_parameters(run_dir: Path) -> SimulationParameters | None:
    record_path = run_dir / SIMULATION_FILES["record"]
    if not record_path.is_file():
        return None
    return SimulationParameters.from_dict(io.read_json(record_path)["parameters"])


def save_dataset(
    dataset: ParticleDataset, run_dir: str | os.PathLike[str], overwrite: bool = False
) -> dict[str, Path]:
    """Write ``dataset`` into ``run_dir`` (see :data:`SIMULATION_FILES`); return the paths.

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
    io.write_particles_star(
        paths["star"],
        so3.relion_euler_from_matrices(dataset.rotations),
        stack_name=SIMULATION_FILES["noisy"],
        pixel_size=dataset.pixel_size,
        image_size=dataset.image_size,
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
    return ParticleDataset(
        parameters=SimulationParameters.from_dict(record["parameters"]),
        volume=volume,
        pixel_size=float(record["pixel_size"]),
        rotations=rotations,
        clean_images=clean,
        noisy_images=noisy,
        noise_sigma=float(record["noise_sigma"]),
        point_group=str(record["point_group"]),
        symmetry_ops=np.asarray(record["symmetry_ops"], dtype=np.float64),
    )


def load_or_simulate(
    run_dir: str | os.PathLike[str],
    parameters: SimulationParameters,
    overwrite: bool = False,
    progress: bool = True,
) -> ParticleDataset:
    """Load the dataset in ``run_dir`` if it was made with ``parameters``, else make and save it.

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
    dataset = simulate_dataset(parameters, progress=progress)
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
