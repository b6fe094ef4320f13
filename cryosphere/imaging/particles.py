"""Real particle sets: RELION particle STAR files and their memory-mapped MRC stacks.

Reads RELION 3.0 files (one table; optics columns per particle, origins ``rlnOriginX/Y`` in
pixels) and RELION 3.1/4/5 files (``data_optics`` + ``data_particles``; origins
``rlnOriginXAngst/YAngst`` in Å) with ``starfile``; images are named ``index@stack.mrcs``
(1-based index, path relative to the STAR file's folder unless absolute) and may come from many
stacks. Stacks are opened with ``mrcfile.mmap``, so only the images asked for are read: a set of
10⁵-10⁶ particles never has to fit in memory.

Everything is checked before any image is read (headers only), and a bad set raises a
``ValueError`` (``FileNotFoundError`` for missing files) naming the problem and the fix: a
missing stack, an index past the end of a stack, non-square images, stacks of mixed box sizes,
a box size or pixel size that disagrees with the MRC header (1 % tolerance; a header pixel size
of 0 counts as unset), several pixel sizes in one set, and, with ``require_angles``, a STAR file
without Euler angles.

Conventions: angles (rot, tilt, psi) in degrees, RELION ZYZ (:mod:`cryosphere.geometry.rotations`);
origins in Å with RELION's sign (shifting an image by ``+origin / pixel_size`` centres the
particle, :mod:`cryosphere.imaging.ctf`); defocus in Å.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile
from tqdm.auto import tqdm

from cryosphere.geometry import rotations as geometry_rotations
from cryosphere.imaging import cryosparc
from cryosphere.imaging.ctf import CTFParameters

__all__ = ["ParticleSet", "StackReader", "read_particle_set", "parse_image_names"]

_ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
_PIXEL_TOLERANCE = 0.01


@dataclass(frozen=True)
class ParticleSet:
    """A particle STAR file, checked against its stacks.

    Attributes:
        star_path: the STAR file.
        tables: every table as read (``"optics"``, ``"particles"`` or ``""`` for RELION 3.0).
        particles_key: key of the particles table in ``tables``.
        relion_format: ``"3.0"`` (no optics table) or ``"3.1"`` (3.1, 4 and 5).
        stacks: the distinct stack files, resolved.
        stack_index: ``(n,)`` int64 index into ``stacks`` per particle.
        slice_index: ``(n,)`` int64 0-based image index in its stack.
        image_size: box size ``N`` in px.
        pixel_size_angstrom: Å per pixel.
        angles_deg: ``(n, 3)`` RELION (rot, tilt, psi) or None when absent.
        origins_angstrom: ``(n, 2)`` (rlnOriginXAngst, rlnOriginYAngst); zeros when absent.
        ctf: per-particle CTF or None when the set has no defocus.
    """

    star_path: Path
    tables: dict[str, pd.DataFrame]
    particles_key: str
    relion_format: str
    stacks: tuple[Path, ...]
    stack_index: np.ndarray
    slice_index: np.ndarray
    image_size: int
    pixel_size_angstrom: float
    angles_deg: np.ndarray | None
    origins_angstrom: np.ndarray
    ctf: CTFParameters | None

    @property
    def particles(self) -> pd.DataFrame:
        """The particles table as read (every column)."""
        return self.tables[self.particles_key]

    def __len__(self) -> int:
        return int(self.stack_index.shape[0])

    def rotations(self) -> np.ndarray:
        """``(n, 3, 3)`` poses from the Euler angles; ValueError when the set has none."""
        if self.angles_deg is None:
            raise ValueError(
                f"{self.star_path} has no rlnAngleRot/Tilt/Psi columns; poses come from a "
                "refinement (e.g. RELION 3D auto-refine) of these particles"
            )
        return geometry_rotations.matrices_from_relion_euler(self.angles_deg)


def parse_image_names(names: list[str], star_folder: Path) -> tuple[np.ndarray, list[Path]]:
    """``index@path`` names -> ``(0-based indices (n,), stack paths (n,))``; relative paths are
    taken from ``star_folder``."""
    indices = np.empty(len(names), dtype=np.int64)
    paths: list[Path] = []
    cache: dict[str, Path] = {}
    for i, name in enumerate(names):
        number, sep, stack = str(name).partition("@")
        if not sep or not number.strip().isdigit() or int(number) < 1 or not stack:
            raise ValueError(
                f"rlnImageName {name!r} (row {i + 1}) is not of the form index@stack.mrcs with "
                "a 1-based index; fix the STAR file"
            )
        indices[i] = int(number) - 1
        if stack not in cache:
            path = Path(stack)
            cache[stack] = path if path.is_absolute() else star_folder / path
        paths.append(cache[stack])
    return indices, paths


def _particles_table(tables: dict[str, pd.DataFrame], source: Path) -> str:
    if "particles" in tables:
        return "particles"
    holding = [k for k, t in tables.items() if isinstance(t, pd.DataFrame) and "rlnImageName" in t]
    if len(holding) != 1:
        raise ValueError(
            f"{source} has no particles table (data_particles, or one table with "
            f"rlnImageName); found tables {sorted(tables)}"
        )
    return holding[0]


def _per_particle(
    particles: pd.DataFrame, optics: pd.DataFrame | None, label: str, source: Path
) -> np.ndarray | None:
    """Column ``label`` per particle, from the particles table or through its optics group."""
    if label in particles:
        return particles[label].to_numpy(np.float64)
    if optics is None or label not in optics:
        return None
    if "rlnOpticsGroup" not in particles or "rlnOpticsGroup" not in optics:
        raise ValueError(f"{source}: particles and optics tables need rlnOpticsGroup")
    lookup = dict(
        zip(optics["rlnOpticsGroup"].astype(int), optics[label].astype(float), strict=True)
    )
    groups = particles["rlnOpticsGroup"].astype(int).to_numpy()
    missing = sorted(set(groups) - set(lookup))
    if missing:
        raise ValueError(f"{source}: optics groups {missing} are not in the data_optics table")
    return np.array([lookup[g] for g in groups], dtype=np.float64)


def _single_value(values: np.ndarray, what: str, source: Path) -> float:
    if np.ptp(values) > _PIXEL_TOLERANCE * float(values.max()):
        raise ValueError(
            f"{source} mixes {what}s {sorted(set(np.round(values, 4)))}; process one "
            "value at a time (split the set by optics group)"
        )
    return float(values[0])


def _ctf_from(particles, optics, source: Path) -> CTFParameters | None:
    u = _per_particle(particles, optics, "rlnDefocusU", source)
    if u is None:
        return None
    fields = {"defocus_u_angstrom": u}
    for name, label, default in (
        ("defocus_v_angstrom", "rlnDefocusV", u),
        ("defocus_angle_deg", "rlnDefocusAngle", 0.0),
        ("voltage_kv", "rlnVoltage", None),
        ("spherical_aberration_mm", "rlnSphericalAberration", None),
        ("amplitude_contrast", "rlnAmplitudeContrast", None),
        ("b_factor", "rlnCtfBfactor", 0.0),
    ):
        value = _per_particle(particles, optics, label, source)
        if value is None and default is None:
            raise ValueError(
                f"{source} has rlnDefocusU but no {label}; a CTF needs the voltage, Cs and "
                "amplitude contrast (add them to data_optics)"
            )
        fields[name] = value if value is not None else np.broadcast_to(default, u.shape)
    return CTFParameters(**fields)


def _stack_headers(stacks: list[Path]) -> list[tuple[int, int, int, float]]:
    """``(nx, ny, n_images, pixel Å)`` per stack, from the headers only."""
    out = []
    for path in stacks:
        if not path.is_file():
            raise FileNotFoundError(
                f"stack {path} named in the STAR file does not exist; rlnImageName paths are "
                "relative to the STAR file's folder"
            )
        try:
            with mrcfile.open(path, header_only=True, permissive=True) as mrc:
                header = mrc.header
                nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
                pixel = float(mrc.voxel_size.x)
        except ValueError as error:
            raise ValueError(f"{path} is not a readable MRC stack: {error}") from error
        out.append((nx, ny, nz, pixel))
    return out


def _check_stacks(
    stacks: list[Path], stack_index: np.ndarray, slice_index: np.ndarray, source: Path
) -> tuple[int, list[float]]:
    headers = _stack_headers(stacks)
    for path, (nx, ny, _, _) in zip(stacks, headers, strict=True):
        if nx != ny:
            raise ValueError(f"{path} holds {nx}x{ny} px images; CryoSphere needs square images")
    sizes = sorted({h[0] for h in headers})
    if len(sizes) > 1:
        raise ValueError(
            f"the stacks of {source} have mixed box sizes {sizes} px; re-extract them at one box"
        )
    counts = np.array([h[2] for h in headers])
    past = slice_index >= counts[stack_index]
    if np.any(past):
        i = int(np.flatnonzero(past)[0])
        path = stacks[stack_index[i]]
        raise ValueError(
            f"row {i + 1} of {source} asks for image {slice_index[i] + 1} of {path}, which holds "
            f"{counts[stack_index[i]]} images; the STAR file and the stack do not match"
        )
    return sizes[0], [h[3] for h in headers]


def _pixel_size(particles, optics, headers_pixel, source: Path) -> float:
    values = _per_particle(particles, optics, "rlnImagePixelSize", source)
    if values is None and {"rlnDetectorPixelSize", "rlnMagnification"} <= set(particles):
        values = (
            particles["rlnDetectorPixelSize"].to_numpy(float)
            * 1e4
            / particles["rlnMagnification"].to_numpy(float)
        )
    header = [p for p in headers_pixel if p > 0]
    if values is None:
        if not header:
            raise ValueError(
                f"{source} states no pixel size (rlnImagePixelSize) and the stack headers have "
                "none; add rlnImagePixelSize to the STAR file"
            )
        return _single_value(np.array(header), "pixel size", source)
    pixel = _single_value(values, "pixel size", source)
    for value in header:
        if abs(value - pixel) > _PIXEL_TOLERANCE * pixel:
            raise ValueError(
                f"{source} gives a pixel size of {pixel:g} Å but a stack header says {value:g} Å; "
                "fix rlnImagePixelSize or the MRC header (e.g. relion_image_handler --angpix)"
            )
    return pixel


def read_particle_set(
    star_path: str | os.PathLike[str],
    *,
    require_angles: bool = False,
    project_dir: str | os.PathLike[str] | None = None,
) -> ParticleSet:
    """Read and check a RELION 3.0 or 3.1+ particle STAR file and its stacks' headers; a
    cryoSPARC ``.cs`` file is read as the RELION 3.1 tables of
    :func:`cryosphere.imaging.cryosparc.relion_tables_from_cryosparc` (``project_dir``: the
    cryoSPARC project folder its image paths are relative to)."""
    source = Path(star_path)
    if not source.is_file():
        raise FileNotFoundError(f"no STAR file at {source}; check the path")
    if source.suffix == cryosparc.CRYOSPARC_SUFFIX:
        tables = cryosparc.relion_tables_from_cryosparc(source, project_dir=project_dir)
    else:
        tables = dict(starfile.read(source, always_dict=True))
    key = _particles_table(tables, source)
    particles = tables[key]
    optics = tables.get("optics")
    if len(particles) == 0:
        raise ValueError(f"{source} holds no particles")
    angles = None
    if set(_ANGLES) <= set(particles):
        angles = particles[list(_ANGLES)].to_numpy(np.float64)
    elif require_angles:
        raise ValueError(
            f"{source} has no rlnAngleRot/Tilt/Psi columns; training needs poses from a "
            "consensus refinement of these particles (e.g. RELION 3D auto-refine)"
        )
    slice_index, paths = parse_image_names(list(particles["rlnImageName"]), source.parent)
    stacks = list(dict.fromkeys(paths))
    position = {p: i for i, p in enumerate(stacks)}
    stack_index = np.array([position[p] for p in paths], dtype=np.int64)
    box, header_pixels = _check_stacks(stacks, stack_index, slice_index, source)
    stated = _per_particle(particles, optics, "rlnImageSize", source)
    if stated is not None and np.any(stated != box):
        raise ValueError(
            f"{source} states rlnImageSize {sorted(set(stated.astype(int)))} but the stacks hold "
            f"{box}-px images; fix the optics table"
        )
    pixel = _pixel_size(particles, optics, header_pixels, source)
    if {"rlnOriginXAngst", "rlnOriginYAngst"} <= set(particles):
        origins = particles[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(np.float64)
    elif {"rlnOriginX", "rlnOriginY"} <= set(particles):
        origins = particles[["rlnOriginX", "rlnOriginY"]].to_numpy(np.float64) * pixel
    else:
        origins = np.zeros((len(particles), 2))
    return ParticleSet(
        star_path=source,
        tables=tables,
        particles_key=key,
        relion_format="3.0" if optics is None else "3.1",
        stacks=tuple(stacks),
        stack_index=stack_index,
        slice_index=slice_index,
        image_size=int(box),
        pixel_size_angstrom=pixel,
        angles_deg=angles,
        origins_angstrom=origins,
        ctf=_ctf_from(particles, optics, source),
    )


class StackReader:
    """Reads particle images of a :class:`ParticleSet` from memory-mapped stacks.

    Keeps at most ``max_open`` stacks mapped (least recently used closed first). Use as a
    context manager or call :meth:`close`.
    """

    def __init__(self, particle_set: ParticleSet, max_open: int = 64):
        self.particle_set = particle_set
        self.max_open = max(1, int(max_open))
        self._open: OrderedDict[int, mrcfile.mrcmemmap.MrcMemmap] = OrderedDict()

    def _data(self, stack: int) -> np.ndarray:
        if stack in self._open:
            self._open.move_to_end(stack)
        else:
            if len(self._open) >= self.max_open:
                self._open.popitem(last=False)[1].close()
            self._open[stack] = mrcfile.mmap(
                self.particle_set.stacks[stack], mode="r", permissive=True
            )
        data = self._open[stack].data
        return data[None] if data.ndim == 2 else data

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Images of particles ``indices`` (rows of the STAR file): ``(k, N, N)`` float32."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n_pix = self.particle_set.image_size
        out = np.empty((indices.shape[0], n_pix, n_pix), dtype=np.float32)
        stacks = self.particle_set.stack_index[indices]
        for stack in np.unique(stacks):
            rows = np.flatnonzero(stacks == stack)
            slices = self.particle_set.slice_index[indices[rows]]
            order = np.argsort(slices, kind="stable")
            out[rows[order]] = self._data(int(stack))[slices[order]]
        return out

    def batches(
        self, batch_size: int = 256, progress: bool = False
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(indices (k,), images (k, N, N))`` over the set in STAR order."""
        n = len(self.particle_set)
        starts = range(0, n, int(batch_size))
        for start in tqdm(starts, desc="particles", disable=not progress, unit="batch"):
            indices = np.arange(start, min(start + int(batch_size), n))
            yield indices, self.read(indices)

    def close(self) -> None:
        """Close every memory map."""
        while self._open:
            self._open.popitem()[1].close()

    def __enter__(self) -> StackReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
