"""Real particle sets: particle files of other programs and their memory-mapped MRC stacks.

:func:`read_particle_set` dispatches on the file's suffix (:data:`PARTICLE_READERS`): ``.star``
is read as RELION writes it (:func:`read_relion_star`, 3.0 with one table and optics columns
per particle, 3.1/4/5 with ``data_optics`` + ``data_particles`` and any other tables; the
tables' meaning: :mod:`cryosphere.imaging.formats.relion_star`); a cryoSPARC ``.cs`` file is
first turned into RELION's tables (:mod:`cryosphere.imaging.formats.cryosparc`). A reader for another
format registers itself there and returns the same :class:`ParticleSet`. Images are
named ``index@stack.mrcs`` (1-based); relative stacks are found as RELION finds them (beside
the STAR file, then in its enclosing folders, or in ``project_dir``). Stacks are opened with
``mrcfile.mmap``, so only the images asked for are read: 10⁵-10⁶ particles never have to fit
in memory.

Everything is checked before any image is read (headers only), and a bad set raises a
``ValueError`` (``FileNotFoundError`` for missing files) naming the problem and the fix: a
missing stack (naming the folders tried), a file that is not an MRC stack or is shorter than
its header says, an index past the end of a stack, non-square images, stacks of mixed box
sizes, and, with ``require_angles``, a file without Euler angles. The STAR file's pixel size
wins over the stack headers (a disagreeing header gives one warning naming both). mrcfile's
header warnings are given once per message, not once per opening.

Pixel sizes: optics groups with different pixel sizes are not merged: :class:`StackReader`
Fourier-resamples every image to the set's :attr:`ParticleSet.pixel_size_angstrom` (the finest
of the groups, :func:`cryosphere.imaging.preprocess.resample_images`) as it reads it, so everything downstream
(CTF, origins in Å, the network's box) sees one pixel size.

Conventions: angles (rot, tilt, psi) in degrees, RELION ZYZ (:mod:`cryosphere.geometry.rotations`);
origins in Å with RELION's sign (shifting an image by ``+origin / pixel_size`` centres the
particle, :mod:`cryosphere.imaging.ctf`); defocus in Å.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile
from tqdm.auto import tqdm

from cryosphere.geometry import rotations as geometry_rotations
from cryosphere.imaging.ctf import CTFParameters
from cryosphere.imaging.formats import cryosparc, relion_star
from cryosphere.imaging.preprocess import common_pixel_size, resample_images

__all__ = [
    "PARTICLE_READERS",
    "ParticleSet",
    "StackReader",
    "read_particle_set",
    "read_relion_star",
]

_ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
_PIXEL_TOLERANCE = 0.01


@dataclass(frozen=True)
class ParticleSet:
    """A particle file, checked against its stacks.

    Attributes:
        star_path: the particle file (a STAR file for RELION).
        tables: every table as read (``"optics"``, ``"particles"`` or ``""`` for RELION 3.0;
            others, e.g. RELION 5's ``"general"``, kept for the output).
        particles_key: key of the particles table in ``tables``.
        relion_format: ``"3.0"`` (no optics table) or ``"3.1"`` (3.1, 4 and 5).
        stacks: the distinct stack files, resolved.
        stack_index: ``(n,)`` int64 index into ``stacks`` per particle.
        slice_index: ``(n,)`` int64 0-based image index in its stack.
        image_size: box size ``N`` in px.
        pixel_size_angstrom: Å per pixel of the images as :class:`StackReader` returns them
            (the finest of the optics groups' pixel sizes).
        angles_deg: ``(n, 3)`` RELION (rot, tilt, psi) or None when absent.
        origins_angstrom: ``(n, 2)`` (x, y) origins in Å, RELION's sign; zeros when absent.
        ctf: per-particle CTF or None when the set has no defocus.
        image_pixel_angstrom: ``(n,)`` each particle's own pixel size in its stack (Å); None:
            all ``pixel_size_angstrom``.
        origin_convention: ``"angstrom"`` (rlnOriginXAngst/YAngst) or ``"pixel"``
            (rlnOriginX/Y): how origins are written back.
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
    image_pixel_angstrom: np.ndarray | None = None
    origin_convention: str = "angstrom"

    @property
    def particles(self) -> pd.DataFrame:
        """The particles table as read (every column)."""
        return self.tables[self.particles_key]

    def __len__(self) -> int:
        return int(self.stack_index.shape[0])

    def particle_pixels(self) -> np.ndarray:
        """``(n,)`` each particle's own pixel size in its stack (Å)."""
        if self.image_pixel_angstrom is None:
            return np.full(len(self), self.pixel_size_angstrom)
        return self.image_pixel_angstrom

    def image_names(self, indices: np.ndarray) -> list[str]:
        """rlnImageName of rows ``indices`` (for messages)."""
        names = self.particles["rlnImageName"].to_numpy()
        return [str(names[int(i)]) for i in np.asarray(indices).reshape(-1)]

    def rotations(self) -> np.ndarray:
        """``(n, 3, 3)`` poses from the Euler angles; ValueError when the set has none."""
        if self.angles_deg is None:
            raise ValueError(
                f"{self.star_path} has no rlnAngleRot/Tilt/Psi columns; poses come from a "
                "refinement (e.g. RELION 3D auto-refine) of these particles"
            )
        return geometry_rotations.matrices_from_relion_euler(self.angles_deg)


def _warn_once(messages: dict[str, list[Path]]) -> None:
    for message, paths in messages.items():
        where = f"{paths[0]}" + (f" and {len(paths) - 1} more stacks" if len(paths) > 1 else "")
        warnings.warn(f"mrcfile: {message} ({where})", stacklevel=4)


def _stack_headers(stacks: list[Path]) -> list[tuple[int, int, int, float]]:
    """``(nx, ny, n_images, pixel Å)`` per stack, from the headers only; the file is checked
    to be an MRC file holding the bytes its header announces."""
    out, messages = [], {}
    for path in stacks:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with mrcfile.open(path, header_only=True, permissive=True) as mrc:
                    header = mrc.header
                    if header is None or bytes(header.map) != b"MAP ":
                        raise ValueError("it is not an MRC file (no 'MAP ' mark in its header)")
                    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
                    pixel = float(mrc.voxel_size.x)
                    mode, extended = int(header.mode), int(header.nsymbt)
        except ValueError as error:
            raise ValueError(f"{path} is not a readable MRC stack: {error}") from error
        for warning in caught:
            messages.setdefault(str(warning.message), []).append(path)
        item = {0: 1, 1: 2, 2: 4, 6: 2, 12: 2}.get(mode)
        if item is None:
            raise ValueError(
                f"{path} has MRC mode {mode}; CryoSphere reads real images (0-2, 6, 12)"
            )
        expected = 1024 + extended + nx * ny * max(nz, 1) * item
        size = path.stat().st_size
        if size < expected:
            raise ValueError(
                f"{path} is truncated: its header announces {nz} images of {nx}x{ny} px "
                f"({expected} bytes) but the file holds {size} bytes; copy or extract it again"
            )
        out.append((nx, ny, nz, pixel))
    _warn_once(messages)
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
            f"row {i + 1} of {source} asks for image {int(slice_index[i]) + 1} of {path}, which "
            f"holds {int(counts[stack_index[i]])} images; the STAR file and the stack do not match"
        )
    return sizes[0], [h[3] for h in headers]


def _pixel_sizes(particles, optics, headers_pixel, stack_index, source, override) -> np.ndarray:
    """Per-particle pixel size (Å): the STAR file's, else ``override``, else the headers'."""
    values = relion_star.pixel_sizes(particles, optics, source, override)
    header = np.asarray(headers_pixel, dtype=np.float64)[stack_index]
    if values is None:
        if np.any(header <= 0):
            raise ValueError(
                f"{source} states no pixel size (rlnImagePixelSize) and the stack headers have "
                "none; add rlnImagePixelSize to the STAR file or pass --pixel-size"
            )
        return header
    stated = header > 0
    off = stated & (np.abs(header - values) > _PIXEL_TOLERANCE * values)
    if np.any(off):
        i = int(np.flatnonzero(off)[0])
        warnings.warn(
            f"{source} gives a pixel size of {values[i]:g} Å but the stack header says "
            f"{header[i]:g} Å; the STAR file's {values[i]:g} Å is used",
            stacklevel=4,
        )
    return values


def read_relion_star(
    star_path: str | os.PathLike[str],
    *,
    require_angles: bool = False,
    project_dir: str | os.PathLike[str] | None = None,
    pixel_size_angstrom: float | None = None,
) -> ParticleSet:
    """Read and check a RELION 3.0 or 3.1+ particle STAR file and its stacks' headers; a
    cryoSPARC ``.cs`` file is read as the RELION 3.1 tables of
    :func:`cryosphere.imaging.formats.cryosparc.relion_tables_from_cryosparc`.

    Args:
        require_angles: ValueError unless the file has rlnAngleRot/Tilt/Psi.
        project_dir: the RELION project folder relative stacks are named from (None: found
            as RELION would, :func:`cryosphere.imaging.formats.relion_star.resolve_stacks`), or the
            cryoSPARC project folder a ``.cs`` file's ``blob/path`` is relative to.
        pixel_size_angstrom: Å per pixel when the file states none (it wins otherwise).
    """
    source = Path(star_path)
    if source.suffix == cryosparc.CRYOSPARC_SUFFIX:
        tables = cryosparc.relion_tables_from_cryosparc(source, project_dir=project_dir)
    else:
        tables = dict(starfile.read(source, always_dict=True))
    key = relion_star.particles_table(tables, source)
    particles = tables[key]
    optics = tables.get("optics") if isinstance(tables.get("optics"), pd.DataFrame) else None
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
    slice_index, names = relion_star.parse_image_names(list(particles["rlnImageName"]))
    files = relion_star.resolve_stacks(names, source, project_dir)
    stacks = list(dict.fromkeys(files[name] for name in names))
    position = {p: i for i, p in enumerate(stacks)}
    stack_index = np.array([position[files[name]] for name in names], dtype=np.int64)
    box, header_pixels = _check_stacks(stacks, stack_index, slice_index, source)
    stated = relion_star.per_particle(particles, optics, "rlnImageSize", source)
    if stated is not None and np.any(stated != box):
        raise ValueError(
            f"{source} states rlnImageSize {sorted({int(s) for s in stated})} but the stacks "
            f"hold {int(box)}-px images; fix the optics table"
        )
    pixels = _pixel_sizes(
        particles, optics, header_pixels, stack_index, source, pixel_size_angstrom
    )
    common = common_pixel_size(pixels)
    mixed = bool(np.any(np.abs(pixels - common) > 1e-6 * common))
    return ParticleSet(
        star_path=source,
        tables=tables,
        particles_key=key,
        relion_format="3.0" if optics is None else "3.1",
        stacks=tuple(stacks),
        stack_index=stack_index,
        slice_index=slice_index,
        image_size=int(box),
        pixel_size_angstrom=float(common) if mixed else float(pixels[0]),
        angles_deg=angles,
        origins_angstrom=relion_star.origins_angstrom(particles, optics, pixels),
        ctf=relion_star.ctf_parameters(particles, optics, source),
        image_pixel_angstrom=pixels if mixed else None,
        origin_convention=relion_star.origin_convention(particles, optics),
    )


#: File suffix -> reader ``(path, *, require_angles, project_dir, pixel_size_angstrom) ->
#: ParticleSet``; other formats register their reader here.
PARTICLE_READERS: dict[str, Callable[..., ParticleSet]] = {
    ".star": read_relion_star,
    cryosparc.CRYOSPARC_SUFFIX: read_relion_star,  # converted to RELION's tables
}


def read_particle_set(
    star_path: str | os.PathLike[str],
    *,
    require_angles: bool = False,
    project_dir: str | os.PathLike[str] | None = None,
    pixel_size_angstrom: float | None = None,
) -> ParticleSet:
    """Read and check a particle file by its suffix (:data:`PARTICLE_READERS`; module
    docstring). Keywords as :func:`read_relion_star`."""
    source = Path(star_path)
    if not source.is_file():
        what = "STAR file" if source.suffix.lower() == ".star" else "particle file"
        raise FileNotFoundError(f"no {what} at {source}; check the path")
    reader = PARTICLE_READERS.get(source.suffix.lower())
    if reader is None:
        raise ValueError(
            f"{source}: CryoSphere reads particle files ending in "
            f"{', '.join(sorted(PARTICLE_READERS))}, not {source.suffix or 'no suffix'}"
        )
    return reader(
        source,
        require_angles=require_angles,
        project_dir=project_dir,
        pixel_size_angstrom=pixel_size_angstrom,
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
            with warnings.catch_warnings():  # given once by read_particle_set
                warnings.simplefilter("ignore")
                self._open[stack] = mrcfile.mmap(
                    self.particle_set.stacks[stack], mode="r", permissive=True
                )
        data = self._open[stack].data
        if data is None:
            raise ValueError(
                f"{self.particle_set.stacks[stack]} holds no readable images (truncated or not "
                "an MRC stack)"
            )
        return data[None] if data.ndim == 2 else data

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Images of particles ``indices`` (rows of the STAR file): ``(k, N, N)`` float32 at
        the set's ``pixel_size_angstrom`` (other optics groups Fourier-resampled)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n_pix = self.particle_set.image_size
        out = np.empty((indices.shape[0], n_pix, n_pix), dtype=np.float32)
        stacks = self.particle_set.stack_index[indices]
        for stack in np.unique(stacks):
            rows = np.flatnonzero(stacks == stack)
            slices = self.particle_set.slice_index[indices[rows]]
            order = np.argsort(slices, kind="stable")
            out[rows[order]] = self._data(int(stack))[slices[order]]
        pixels = self.particle_set.image_pixel_angstrom
        if pixels is not None:  # optics groups of other pixel sizes: to the set's one
            target = self.particle_set.pixel_size_angstrom
            own = pixels[indices]
            for pixel in np.unique(own):
                if abs(pixel - target) > 1e-6 * target:
                    rows = np.flatnonzero(own == pixel)
                    out[rows] = resample_images(out[rows], float(pixel), target).numpy()
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
