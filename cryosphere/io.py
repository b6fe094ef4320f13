"""Files that outside tools open: MRC maps and stacks, RELION STAR files, JSON records.

Every writer here is atomic: it writes to a temporary file in the destination folder and
renames it over the target only when the write succeeded, so an interrupted or failed write
never leaves a half-written file, and an existing file is kept until its replacement is whole.

Conventions
-----------
- Volumes are float32 arrays ``(N, N, N)`` indexed ``[z, y, x]`` (the MRC section order), with
  the voxel size in Å stored in the header.
- Image stacks are float32 arrays ``(n, N, N)`` indexed ``[image, y, x]`` written as ``.mrcs``
  (MRC image stacks, ``ispg = 0``) with the pixel size in Å.
- STAR files follow RELION 3.1+: a ``data_optics`` table and a ``data_particles`` table; Euler
  angles (``rlnAngleRot``, ``rlnAngleTilt``, ``rlnAnglePsi``) in degrees, ZYZ, with the matrix
  ``Rz(psi) @ Ry(tilt) @ Rz(rot)`` mapping reference (volume) to image coordinates, which is
  the package's pose convention (see :mod:`cryosphere.geometry.rotations`). Origins
  (``rlnOriginXAngst/YAngst``) follow RELION's sign: shifting the image by ``+origin`` centres
  the particle (:mod:`cryosphere.imaging.ctf`). Particle sets written by other programs
  (RELION 3.0 or 3.1+, many stacks, memory-mapped) are read by
  :mod:`cryosphere.imaging.particles`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import pandas as pd
import starfile

__all__ = [
    "atomic_path",
    "write_json",
    "read_json",
    "write_npz",
    "write_map",
    "read_map",
    "write_stack",
    "read_stack",
    "write_particles_star",
    "read_particles_star",
]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    The temporary file keeps the target's suffix so that libraries choosing a format from
    the name still work. On any exception the temporary file is removed and ``path`` is
    left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.stem}.", suffix=f".tmp{''.join(target.suffixes)}", dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():  # mkstemp makes 0600 files; give the result the usual permissions
            os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_json(path: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    """Write ``record`` as indented JSON, atomically. NumPy scalars and arrays are converted."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a JSON object written by :func:`write_json`.

    A file that is not valid JSON (truncated, edited by hand) raises ``ValueError`` naming it.
    """
    source = Path(path)
    try:
        return json.loads(source.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{source} is not valid JSON ({error}); it may be truncated or edited: delete it "
            "(or rerun with --overwrite) so that the step that writes it runs again"
        ) from error


def write_npz(path: str | os.PathLike[str], **arrays: Any) -> Path:
    """Write arrays to an uncompressed ``.npz`` file, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
    return Path(path)


def _check_finite(array: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} holds NaN or infinite values; fix the data before writing it")


def _write_mrc(
    path: str | os.PathLike[str],
    data: np.ndarray,
    size: tuple[str, float],
    what: str,
    stack: bool,
) -> Path:
    """Write float32 ``data`` as MRC atomically; ``size`` is ``(argument name, Å per voxel)``,
    refused unless positive; ``stack`` marks an image stack (``.mrcs``)."""
    name, angstrom = size
    if angstrom <= 0:
        raise ValueError(f"{name} must be positive (Å), got {angstrom}")
    _check_finite(data, what)
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(data)
            if stack:
                mrc.set_image_stack()
            mrc.voxel_size = float(angstrom)
    return Path(path)


def write_map(path: str | os.PathLike[str], volume: np.ndarray, voxel_size: float) -> Path:
    """Write a cubic volume ``(N, N, N)`` ``[z, y, x]`` as an MRC map with its voxel size in Å.

    The header origin is zero and the map is centred on voxel ``N // 2``, as RELION,
    cryoSPARC and ChimeraX expect for a reference map.
    """
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(
            f"a map must be a cubic 3D array (N, N, N), got shape {volume.shape}; "
            "pad or crop it to a cube first"
        )
    return _write_mrc(path, volume, ("voxel_size", voxel_size), "the map", stack=False)


def _open_mrc(path: str | os.PathLike[str]) -> tuple[np.ndarray, float]:
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"no MRC file at {source}; check the path")
    try:
        with mrcfile.open(source, permissive=False) as mrc:
            data = np.array(mrc.data, dtype=np.float32)
            voxel = float(mrc.voxel_size.x)
    except ValueError as error:
        raise ValueError(f"{source} is not a readable MRC file: {error}") from error
    return data, voxel


def read_map(path: str | os.PathLike[str]) -> tuple[np.ndarray, float]:
    """Read an MRC map; return ``(volume (N, N, N) float32 [z, y, x], voxel_size Å)``.

    Raises ``ValueError`` for a non-cubic map (naming its shape) and for NaN values.
    """
    volume, voxel = _open_mrc(path)
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(
            f"{path} holds a map of shape {volume.shape}; CryoSphere needs a cubic map "
            "(N, N, N): resample or pad it to a cube (e.g. relion_image_handler --new_box)"
        )
    _check_finite(volume, f"the map in {path}")
    return volume, voxel


def write_stack(path: str | os.PathLike[str], images: np.ndarray, pixel_size: float) -> Path:
    """Write an image stack ``(n, N, N)`` ``[image, y, x]`` as an ``.mrcs`` file (pixel size Å)."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"an image stack must have shape (n, N, N), got {images.shape}")
    return _write_mrc(path, images, ("pixel_size", pixel_size), "the image stack", stack=True)


def read_stack(path: str | os.PathLike[str]) -> tuple[np.ndarray, float]:
    """Read an ``.mrcs`` stack; return ``(images (n, N, N) float32, pixel_size Å)``."""
    images, pixel = _open_mrc(path)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"{path} holds images of shape {images.shape[1:]}; they must be square")
    _check_finite(images, f"the image stack in {path}")
    return images, pixel


def write_particles_star(
    path: str | os.PathLike[str],
    relion_angles_deg: np.ndarray,
    *,
    stack_name: str,
    pixel_size: float,
    image_size: int,
    extra_columns: dict[str, np.ndarray] | None = None,
    voltage_kv: float = 300.0,
    spherical_aberration_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
) -> Path:
    """Write a RELION 3.1+ particles STAR file (optics + particles tables), atomically.

    Parameters
    ----------
    relion_angles_deg
        ``(n, 3)`` Euler angles (rot, tilt, psi) in degrees, RELION ZYZ convention.
    stack_name
        File name of the ``.mrcs`` stack, relative to the STAR file's folder; image ``i``
        (0-based) is written as ``{i+1:06d}@{stack_name}``.
    pixel_size, image_size
        Å per pixel and box size in pixels (``rlnImagePixelSize``, ``rlnImageSize``).
    extra_columns
        Further particle columns (RELION label without the ``rln`` prefix, or with it), each
        ``(n,)``; e.g. ``{"MaxValueProbDistribution": p}``, or per-particle CTF
        (``DefocusU``, ``DefocusV`` in Å, ``DefocusAngle`` in deg). ``OriginXAngst`` /
        ``OriginYAngst`` (Å, RELION's sign) replace the default zero origins.
    voltage_kv, spherical_aberration_mm, amplitude_contrast
        Optics of the ``data_optics`` table (kV, mm, fraction).
    """
    angles = np.asarray(relion_angles_deg, dtype=np.float64)
    if angles.ndim != 2 or angles.shape[1] != 3:
        raise ValueError(f"angles must have shape (n, 3), got {angles.shape}")
    n = angles.shape[0]
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnImagePixelSize": [float(pixel_size)],
            "rlnImageSize": [int(image_size)],
            "rlnImageDimensionality": [2],
            "rlnVoltage": [float(voltage_kv)],
            "rlnSphericalAberration": [float(spherical_aberration_mm)],
            "rlnAmplitudeContrast": [float(amplitude_contrast)],
        }
    )
    particles = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@{stack_name}" for i in range(n)],
            "rlnAngleRot": angles[:, 0],
            "rlnAngleTilt": angles[:, 1],
            "rlnAnglePsi": angles[:, 2],
            "rlnOriginXAngst": np.zeros(n),
            "rlnOriginYAngst": np.zeros(n),
            "rlnOpticsGroup": np.ones(n, dtype=int),
        }
    )
    for label, values in (extra_columns or {}).items():
        column = label if label.startswith("rln") else f"rln{label}"
        values = np.asarray(values)
        if values.shape != (n,):
            raise ValueError(f"column {column} must have shape ({n},), got {values.shape}")
        particles[column] = values
    with atomic_path(path) as tmp:
        starfile.write({"optics": optics, "particles": particles}, tmp, float_format="%.6f")
    return Path(path)


def read_particles_star(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a RELION 3.1+ particles STAR file.

    Returns a dict with ``angles_deg`` ``(n, 3)`` (rot, tilt, psi), ``pixel_size`` (Å),
    ``image_size`` (pixels), ``image_names`` (list of str) and ``particles`` (the full
    particles table as a DataFrame).
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"no STAR file at {source}; check the path")
    tables = starfile.read(source, always_dict=True)
    if "particles" not in tables or "optics" not in tables:
        raise ValueError(
            f"{source} is not a RELION 3.1+ particles file: it needs data_optics and "
            f"data_particles tables, found {sorted(tables)}"
        )
    particles = tables["particles"]
    optics = tables["optics"]
    angles = _star_angles(particles, source)
    return {
        "angles_deg": angles,
        "pixel_size": float(optics["rlnImagePixelSize"].iloc[0]),
        "image_size": int(optics["rlnImageSize"].iloc[0]),
        "image_names": list(particles["rlnImageName"]),
        "particles": particles,
    }


_ANGLE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")


def _star_angles(particles: pd.DataFrame, source: Path) -> np.ndarray:
    """``(n, 3)`` float64 (rot, tilt, psi) from a particles table; ``ValueError`` naming missing
    columns or the first row whose angles are not finite numbers."""
    missing = [name for name in _ANGLE_COLUMNS if name not in particles.columns]
    if missing:
        raise ValueError(
            f"{source} has no {', '.join(missing)} column(s); CryoSphere needs the particles' "
            "Euler angles (rot, tilt, psi in degrees): export them from the refinement that "
            "estimated the poses"
        )
    angles = particles[list(_ANGLE_COLUMNS)].apply(pd.to_numeric, errors="coerce")
    values = angles.to_numpy(np.float64)
    bad = np.flatnonzero(~np.all(np.isfinite(values), axis=1))
    if bad.size:
        row = particles.iloc[bad[0]][list(_ANGLE_COLUMNS)].tolist()
        raise ValueError(
            f"{source}: {bad.size} particle(s) have angles that are not finite numbers, the "
            f"first is row {bad[0] + 1} with (rot, tilt, psi) = {row}; fix or remove them"
        )
    return values
