"""cryoSPARC particle files (``.cs``) read as RELION 3.1 particle tables.

A ``.cs`` file is a numpy structured array saved with ``np.save`` (one row per particle, field
names such as ``uid``, ``blob/path``, ``ctf/df1_A``); a job's output often splits the fields of
one particle set over the ``.cs`` file and a *passthrough* file beside it
(``J12_passthrough_particles.cs``), which are joined on ``uid`` (the main file's fields win).
They are read with numpy itself (``np.load``), not ``cryosparc-tools``: the format is a plain
structured array, numpy reads it in one call, and the library would add a client for a running
cryoSPARC instance, HTTP dependencies and its own ``Dataset`` type for what is here five lines.

:func:`relion_tables_from_cryosparc` turns the rows into the ``{"optics", "particles"}`` tables
of a RELION 3.1 STAR file (what :func:`cryosphere.imaging.particles.read_particle_set` reads,
and what ``cryosphere predict`` writes back), so a ``.cs`` file goes through the same checks
and CTF, pose and origin code as a STAR file. Columns read (cryoSPARC field -> RELION label):

============================  ==========================================================
``blob/path``, ``blob/idx``   ``rlnImageName`` = ``idx+1@PATH`` (0-based index in cryoSPARC;
                              PATH resolved, absolute: see *Image paths*)
``blob/psize_A``              ``rlnImagePixelSize`` (Å)
``blob/shape``                ``rlnImageSize`` (px; ``(ny, nx)``)
``ctf/accel_kv``              ``rlnVoltage`` (kV)
``ctf/cs_mm``                 ``rlnSphericalAberration`` (mm)
``ctf/amp_contrast``          ``rlnAmplitudeContrast``
``ctf/df1_A``, ``ctf/df2_A``  ``rlnDefocusU``, ``rlnDefocusV`` (Å, positive underfocus)
``ctf/df_angle_rad``          ``rlnDefocusAngle`` (radians -> degrees, from the x axis)
``ctf/phase_shift_rad``       ``rlnPhaseShift`` (radians -> degrees)
``ctf/bfactor``               ``rlnCtfBfactor`` (Å²)
``ctf/scale``                 ``rlnCtfScalefactor``
``alignments3D/pose``         ``rlnAngleRot/Tilt/Psi`` (see *Poses*)
``alignments3D/shift``        ``rlnOriginXAngst/YAngst`` (see *Shifts*)
``alignments3D/split``        ``rlnRandomSubset`` (0/1 -> 1/2)
``uid``                       ``rlnCryoSparcUid`` (kept, to map results back)
============================  ==========================================================

Optics groups are the distinct (voltage, Cs, amplitude contrast, pixel size, box) tuples.
Higher-order aberrations (``ctf/tilt_A``, ``ctf/trefoil_A``, ``ctf/tetra_A``, ``ctf/anisomag``)
are not read.

Poses
-----
``alignments3D/pose`` is a rotation vector ``v`` (axis · angle, radians). With
``Rodrigues(v) = exp([v]×)`` the standard right-handed rotation by ``|v|`` about ``v / |v|``,
cryoSPARC's matrix maps microscope coordinates to volume coordinates, so the CryoSphere (and
RELION) pose, which maps volume to microscope coordinates (:mod:`cryosphere.geometry.rotations`),
is its transpose::

    R = Rodrigues(v)ᵀ = Rodrigues(−v)

This is the conversion of pyem's ``csparc2star`` (its ``expmap`` builds ``Rodrigues(v)ᵀ`` and
reads it as RELION's matrix) and of cryoDRGN's ``parse_pose_csparc`` (``expmap`` then a
transpose, into the frame of its RELION reader). Example: ``v = (0, π/2, 0)`` is RELION's
``(rot, tilt, psi) = (0°, 90°, 0°)``. ``tests/test_cryosparc.py`` checks it against RELION
angles on known particles, by pose and by image.

Shifts
------
``alignments3D/shift`` ``(sx, sy)`` is in pixels of the blob and has RELION's origin sign:
shifting the image by ``+shift`` centres the particle (pyem copies it to ``rlnOriginX/Y``,
cryoDRGN reads it with the sign of RELION origins). So ``rlnOriginXAngst = sx · psize_A``;
a particle whose content sits ``d`` px from the box centre has ``shift = −d``.

Contrast
--------
A ``.cs`` file does not say whether protein is white or dark in its particles; CryoSphere
decides it from the data (``--contrast auto``, :mod:`cryosphere.poses.search.contrast`).

Image paths
-----------
``blob/path`` is relative to the cryoSPARC project folder (``J5/extract/…_particles.mrc``);
a leading ``>`` (cryoSPARC's mark on some imported paths) is dropped. With ``project_dir`` the
path is taken from there; without, from the ``.cs`` file's folder and then each enclosing
folder, the first where the file exists (a job's ``.cs`` sits in ``PROJECT/J12/``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cryosphere.geometry.rotations import relion_euler_from_matrices

__all__ = [
    "CRYOSPARC_SUFFIX",
    "read_cs",
    "relion_tables_from_cryosparc",
    "rotations_from_cryosparc_poses",
    "cryosparc_poses_from_rotations",
]

CRYOSPARC_SUFFIX = ".cs"

# (cryoSPARC field, RELION label, factor) of the per-particle and optics columns
_PARTICLE_FIELDS = (
    ("ctf/df1_A", "rlnDefocusU", 1.0),
    ("ctf/df2_A", "rlnDefocusV", 1.0),
    ("ctf/df_angle_rad", "rlnDefocusAngle", 180.0 / np.pi),
    ("ctf/phase_shift_rad", "rlnPhaseShift", 180.0 / np.pi),
    ("ctf/bfactor", "rlnCtfBfactor", 1.0),
    ("ctf/scale", "rlnCtfScalefactor", 1.0),
)
_OPTICS_FIELDS = (
    ("ctf/accel_kv", "rlnVoltage"),
    ("ctf/cs_mm", "rlnSphericalAberration"),
    ("ctf/amp_contrast", "rlnAmplitudeContrast"),
    ("blob/psize_A", "rlnImagePixelSize"),
)


def _skew(v: np.ndarray) -> np.ndarray:
    out = np.zeros(v.shape[:-1] + (3, 3))
    out[..., 0, 1], out[..., 0, 2] = -v[..., 2], v[..., 1]
    out[..., 1, 0], out[..., 1, 2] = v[..., 2], -v[..., 0]
    out[..., 2, 0], out[..., 2, 1] = -v[..., 1], v[..., 0]
    return out


def rotations_from_cryosparc_poses(poses: np.ndarray) -> np.ndarray:
    """CryoSphere poses ``(n, 3, 3)`` (volume -> microscope, RELION's matrix) from cryoSPARC
    rotation vectors ``(n, 3)`` (radians): ``Rodrigues(v)ᵀ`` (module docstring)."""
    v = np.asarray(poses, dtype=np.float64).reshape(-1, 3)
    angle = np.linalg.norm(v, axis=1)
    safe = np.where(angle > 0, angle, 1.0)
    k = _skew(v / safe[:, None])
    s, c = np.sin(angle)[:, None, None], np.cos(angle)[:, None, None]
    rodrigues = np.eye(3) + s * k + (1.0 - c) * (k @ k)
    return np.swapaxes(rodrigues, -1, -2)


def cryosparc_poses_from_rotations(rotations: np.ndarray) -> np.ndarray:
    """cryoSPARC rotation vectors ``(n, 3)`` (radians) of CryoSphere poses ``(n, 3, 3)``: the
    inverse of :func:`rotations_from_cryosparc_poses` (angles in [0, π])."""
    r = np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
    inverse = np.swapaxes(r, -1, -2)  # Rodrigues(v)
    cos = np.clip((np.trace(inverse, axis1=1, axis2=2) - 1.0) / 2.0, -1.0, 1.0)
    angle = np.arccos(cos)
    axis = np.stack(
        [
            inverse[:, 2, 1] - inverse[:, 1, 2],
            inverse[:, 0, 2] - inverse[:, 2, 0],
            inverse[:, 1, 0] - inverse[:, 0, 1],
        ],
        axis=1,
    )
    out = np.zeros((r.shape[0], 3))
    regular = np.sin(angle) > 1e-6
    out[regular] = (axis[regular] / (2.0 * np.sin(angle[regular]))[:, None]) * angle[regular, None]
    near_pi = ~regular & (angle > 1.0)  # angle ≈ π: the axis from the symmetric part
    for i in np.flatnonzero(near_pi):
        b = (inverse[i] + np.eye(3)) / 2.0
        column = int(np.argmax(np.diag(b)))
        unit = b[:, column] / np.sqrt(max(b[column, column], 1e-300))
        out[i] = unit * angle[i]
    return out


def read_cs(path: str | os.PathLike[str]) -> np.ndarray:
    """The structured array of a ``.cs`` file; ValueError when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no cryoSPARC file at {path}; check the path")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ValueError(
            f"{path} is not a cryoSPARC .cs file (a numpy structured array): {error}"
        ) from error
    if not isinstance(data, np.ndarray) or data.dtype.names is None or data.ndim != 1:
        raise ValueError(f"{path} is not a cryoSPARC .cs file: it holds no table of particles")
    if "uid" not in data.dtype.names:
        raise ValueError(f"{path} has no uid field; it is not a cryoSPARC particle file")
    return data


def _passthrough_candidates(path: Path) -> list[Path]:
    """``*passthrough*.cs`` files beside ``path``; those of its job (``J12`` in
    ``P3_J12_particles.cs``) when there are others."""
    found = sorted(p for p in path.parent.glob("*passthrough*.cs") if p != path)
    jobs = {t for t in path.stem.split("_") if t[:1] == "J" and t[1:].isdigit()}
    same_job = [p for p in found if jobs & set(p.stem.split("_"))]
    return same_job or found


def _merge_passthrough(main: np.ndarray, extra: np.ndarray, source: Path) -> dict:
    """Columns ``{field: (n, ...) array}`` of ``main`` plus those only in ``extra``, by uid."""
    columns = {name: main[name] for name in main.dtype.names}
    new = [n for n in extra.dtype.names if n not in columns]
    if not new:
        return columns
    order = np.argsort(extra["uid"], kind="stable")
    position = np.searchsorted(extra["uid"][order], main["uid"])
    position = np.minimum(position, len(order) - 1)
    rows = order[position]
    missing = extra["uid"][rows] != main["uid"]
    if np.any(missing):
        raise ValueError(
            f"the passthrough file {source} lacks {int(missing.sum())} of the particles' uids; "
            "pass the passthrough file of the same job"
        )
    for name in new:
        columns[name] = extra[name][rows]
    return columns


def _text(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _resolve(stack: str, cs_path: Path, project_dir: Path | None) -> Path:
    relative = Path(stack[1:] if stack.startswith(">") else stack)
    if relative.is_absolute():
        places = [relative]
    elif project_dir is not None:
        places = [Path(project_dir) / relative]
    else:
        folder = cs_path.resolve().parent
        places = [p / relative for p in (folder, *folder.parents)]
    for place in places:
        if place.is_file():
            return place.resolve()
    tried = ", ".join(str(p) for p in places[:4]) + (" …" if len(places) > 4 else "")
    raise FileNotFoundError(
        f"stack {relative} named in {cs_path} (blob/path) is not found (tried {tried}); "
        "blob/path is relative to the cryoSPARC project folder: pass --project-dir PROJECT"
    )


def _optics(columns: dict, n: int, source: Path) -> tuple[pd.DataFrame, np.ndarray]:
    missing = [f for f, _ in _OPTICS_FIELDS if f not in columns]
    if missing:
        raise ValueError(
            f"{source} (and its passthrough file) lacks {', '.join(missing)}; export the "
            "particles with their CTF and blob fields (or pass the job's passthrough file)"
        )
    values = np.stack([np.asarray(columns[f], np.float64) for f, _ in _OPTICS_FIELDS], axis=1)
    if "blob/shape" in columns:
        shape = np.asarray(columns["blob/shape"]).reshape(n, -1)
        box = shape[:, -1].astype(np.float64)
    else:
        box = np.full(n, np.nan)
    keys = np.concatenate([np.round(values, 6), box[:, None]], axis=1)
    unique, group = np.unique(keys, axis=0, return_inverse=True)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": [f"opticsGroup{i + 1}" for i in range(len(unique))],
            "rlnOpticsGroup": np.arange(1, len(unique) + 1),
        }
    )
    for column, (_, label) in enumerate(_OPTICS_FIELDS):
        optics[label] = unique[:, column]
    if not np.any(np.isnan(unique[:, -1])):
        optics["rlnImageSize"] = unique[:, -1].astype(np.int64)
    return optics, group.reshape(-1) + 1


def relion_tables_from_cryosparc(
    cs_path: str | os.PathLike[str],
    *,
    passthrough: str | os.PathLike[str] | None = None,
    project_dir: str | os.PathLike[str] | None = None,
) -> dict[str, pd.DataFrame]:
    """The RELION 3.1 ``{"optics", "particles"}`` tables of a cryoSPARC particle file.

    Args:
        cs_path: the ``.cs`` file.
        passthrough: its passthrough file; None: the one ``*passthrough*.cs`` beside it (of
            the same job when several), if any.
        project_dir: the cryoSPARC project folder ``blob/path`` is relative to; None: searched
            upwards from the ``.cs`` file's folder.

    Returns:
        ``optics`` (one row per optics group) and ``particles`` (one row per particle, in the
        file's order), labelled as in the module docstring; ``rlnImageName`` holds absolute
        stack paths. Raises ValueError / FileNotFoundError naming the problem and the fix.
    """
    source = Path(cs_path)
    main = read_cs(source)
    if len(main) == 0:
        raise ValueError(f"{source} holds no particles")
    columns = {name: main[name] for name in main.dtype.names}
    extra = [Path(passthrough)] if passthrough is not None else _passthrough_candidates(source)
    if len(extra) > 1:
        raise ValueError(
            f"several passthrough files beside {source} ({', '.join(p.name for p in extra)}); "
            "name the right one (passthrough=...)"
        )
    if extra:
        columns = _merge_passthrough(main, read_cs(extra[0]), extra[0])
    for field in ("blob/path", "blob/idx"):
        if field not in columns:
            raise ValueError(
                f"{source} has no {field} field: it does not name the particle images; use the "
                "particles output of the job (with its passthrough file)"
            )
    n = len(main)
    project = None if project_dir is None else Path(project_dir)
    if project is not None and not project.is_dir():
        raise FileNotFoundError(f"--project-dir {project} is not a folder")
    resolved: dict[str, Path] = {}
    names = []
    for stack, index in zip(_text(columns["blob/path"]), columns["blob/idx"], strict=True):
        if stack not in resolved:
            resolved[stack] = _resolve(stack, source, project)
        names.append(f"{int(index) + 1:06d}@{resolved[stack]}")
    optics, group = _optics(columns, n, source)
    particles = pd.DataFrame({"rlnImageName": names, "rlnOpticsGroup": group})
    for field, label, factor in _PARTICLE_FIELDS:
        if field in columns:
            particles[label] = np.asarray(columns[field], np.float64) * factor
    pixel = np.asarray(columns["blob/psize_A"], np.float64)
    if "alignments3D/pose" in columns:
        rotations = rotations_from_cryosparc_poses(columns["alignments3D/pose"])
        angles = relion_euler_from_matrices(rotations)
        for i, label in enumerate(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
            particles[label] = angles[:, i]
    if "alignments3D/shift" in columns:
        shift = np.asarray(columns["alignments3D/shift"], np.float64).reshape(n, 2)
        particles["rlnOriginXAngst"] = shift[:, 0] * pixel
        particles["rlnOriginYAngst"] = shift[:, 1] * pixel
    if "alignments3D/split" in columns:
        particles["rlnRandomSubset"] = np.asarray(columns["alignments3D/split"], np.int64) + 1
    particles["rlnCryoSparcUid"] = np.asarray(main["uid"], np.uint64)
    return {"optics": optics, "particles": particles}
