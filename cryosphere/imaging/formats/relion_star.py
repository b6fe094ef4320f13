"""What a RELION particle STAR file says, read as RELION reads it.

:mod:`cryosphere.imaging.particles` checks the stacks and holds the set; this module turns the
tables of a RELION 3.0 file (one table, optics columns per particle) or a RELION 3.1/4/5 file
(``data_optics`` + ``data_particles``, possibly with other tables such as RELION 5's
``data_general``) into per-particle arrays:

* **Image names** ``index@path``: a relative ``path`` is looked for as RELION does, relative to
  its project folder (the folder it runs in, which holds ``Extract/``, ``Refine3D/`` ...). With
  ``project_dir`` given, there first; then beside the STAR file; then in each enclosing folder
  of the STAR file up to the file system's root: the first folder where the relative path
  exists is the project folder (:func:`resolve_stacks`). A stack found nowhere gets a
  ``FileNotFoundError`` naming every place tried.
* **Pixel size** per particle (:func:`pixel_sizes`): ``rlnImagePixelSize`` of the particle's
  optics group (3.1+), or ``rlnDetectorPixelSize · 10⁴ / rlnMagnification`` (3.0: µm and
  magnification). The STAR file wins over the MRC header, which programs often leave at 0 or
  1 Å; ``pixel_size_angstrom`` (``--pixel-size``) serves only when the STAR file states none.
* **CTF** per particle (:func:`ctf_parameters`): rlnDefocusU/V/Angle, rlnVoltage,
  rlnSphericalAberration, rlnAmplitudeContrast (missing: RELION's default 0.1, with a
  warning), rlnPhaseShift (deg), rlnCtfBfactor (Å²), rlnCtfScalefactor, and
  rlnCtfDataAreCtfPremultiplied of the optics group.
* **Origins** (:func:`origins_angstrom`): ``rlnOriginXAngst/YAngst`` (Å, 3.1+) or
  ``rlnOriginX/Y`` (px, 3.0, converted with each particle's own pixel size); the convention
  found is kept so that refined origins go back in it (:func:`write_origins`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from cryosphere.imaging.ctf import CTFParameters

__all__ = [
    "DEFAULT_AMPLITUDE_CONTRAST",
    "particles_table",
    "per_particle",
    "parse_image_names",
    "resolve_stacks",
    "pixel_sizes",
    "ctf_parameters",
    "origins_angstrom",
    "origin_convention",
    "write_origins",
]

#: RELION's amplitude contrast when a file states none (``CTF::read``'s default).
DEFAULT_AMPLITUDE_CONTRAST = 0.1


def particles_table(tables: dict, source: Path) -> str:
    """Key of the particles table: ``"particles"``, else the one DataFrame with rlnImageName."""
    if isinstance(tables.get("particles"), pd.DataFrame):
        return "particles"
    holding = [k for k, t in tables.items() if isinstance(t, pd.DataFrame) and "rlnImageName" in t]
    if len(holding) != 1:
        raise ValueError(
            f"{source} has no particles table (data_particles, or one table with "
            f"rlnImageName); found tables {sorted(str(k) for k in tables)}"
        )
    return holding[0]


def per_particle(
    particles: pd.DataFrame, optics: pd.DataFrame | None, label: str, source: Path
) -> np.ndarray | None:
    """Column ``label`` per particle ``(n,)`` float64, from the particles table or through its
    optics group; None when neither has it."""
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
    missing = sorted(int(g) for g in set(groups.tolist()) - set(lookup))
    if missing:
        raise ValueError(f"{source}: optics groups {missing} are not in the data_optics table")
    return np.array([lookup[g] for g in groups], dtype=np.float64)


def parse_image_names(names: list[str]) -> tuple[np.ndarray, list[str]]:
    """``index@path`` names -> ``(0-based indices (n,) int64, stack path strings (n,))``."""
    indices = np.empty(len(names), dtype=np.int64)
    stacks: list[str] = []
    for i, name in enumerate(names):
        number, sep, stack = str(name).partition("@")
        if not sep or not number.strip().isdigit() or int(number) < 1 or not stack:
            raise ValueError(
                f"rlnImageName {name!r} (row {i + 1}) is not of the form index@stack.mrcs with "
                "a 1-based index; fix the STAR file"
            )
        indices[i] = int(number) - 1
        stacks.append(stack.strip())
    return indices, stacks


def _bases(star_folder: Path, project_dir: Path | None) -> list[Path]:
    """Folders a relative stack path is tried in, in order (module docstring)."""
    folder = star_folder.resolve()
    bases = [] if project_dir is None else [Path(project_dir).resolve()]
    bases += [folder, *folder.parents]
    return list(dict.fromkeys(bases))


def resolve_stacks(
    stack_names: list[str], star_path: Path, project_dir: str | Path | None = None
) -> dict[str, Path]:
    """Each distinct stack name -> its file (module docstring); FileNotFoundError naming the
    places tried for the first stack found nowhere."""
    if project_dir is not None and not Path(project_dir).is_dir():
        raise FileNotFoundError(f"the project folder {project_dir} does not exist")
    bases = _bases(star_path.parent, None if project_dir is None else Path(project_dir))
    found: dict[str, Path] = {}
    working: list[Path] = []  # folders that held earlier stacks: tried first
    for name in dict.fromkeys(stack_names):
        path = Path(name)
        if path.is_absolute():
            candidates = [path]
        else:
            candidates = [base / path for base in dict.fromkeys([*working, *bases])]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            tried = ", ".join(str(c) for c in candidates[:6])
            more = (
                f" and {len(candidates) - 6} more enclosing folders" if len(candidates) > 6 else ""
            )
            raise FileNotFoundError(
                f"stack {name} named in {star_path} does not exist; tried {tried}{more}; "
                "give the RELION project folder with --project-dir"
            )
        if not path.is_absolute():
            base = Path(*hit.parts[: len(hit.parts) - len(path.parts)])
            if base not in working:
                working.insert(0, base)
        found[name] = hit
    return found


def pixel_sizes(
    particles: pd.DataFrame,
    optics: pd.DataFrame | None,
    source: Path,
    override_angstrom: float | None = None,
) -> np.ndarray | None:
    """Per-particle pixel size ``(n,)`` Å stated by the STAR file (module docstring), or
    ``override_angstrom`` when it states none; None when neither gives one."""
    values = per_particle(particles, optics, "rlnImagePixelSize", source)
    if values is None:
        detector = per_particle(particles, optics, "rlnDetectorPixelSize", source)
        magnification = per_particle(particles, optics, "rlnMagnification", source)
        if detector is not None and magnification is not None:
            values = detector * 1e4 / magnification
    if values is None:
        if override_angstrom is None:
            return None
        if not override_angstrom > 0:
            raise ValueError(f"--pixel-size must be positive (Å), got {override_angstrom}")
        return np.full(len(particles), float(override_angstrom))
    if not np.all(np.isfinite(values) & (values > 0)):
        raise ValueError(f"{source} states a pixel size that is not a positive number")
    if override_angstrom is not None and np.any(np.abs(values - override_angstrom) > 0.01 * values):
        raise ValueError(
            f"--pixel-size {override_angstrom:g} Å disagrees with the {values[0]:g} Å "
            f"stated in {source}; the STAR file's pixel size is used: drop --pixel-size"
        )
    return values


def ctf_parameters(particles: pd.DataFrame, optics, source: Path) -> CTFParameters | None:
    """Per-particle CTF (module docstring); None without rlnDefocusU."""
    u = per_particle(particles, optics, "rlnDefocusU", source)
    if u is None:
        return None
    fields = {"defocus_u_angstrom": u}
    for name, label, default in (
        ("defocus_v_angstrom", "rlnDefocusV", u),
        ("defocus_angle_deg", "rlnDefocusAngle", 0.0),
        ("voltage_kv", "rlnVoltage", None),
        ("spherical_aberration_mm", "rlnSphericalAberration", None),
        ("amplitude_contrast", "rlnAmplitudeContrast", DEFAULT_AMPLITUDE_CONTRAST),
        ("b_factor", "rlnCtfBfactor", 0.0),
        ("phase_shift_deg", "rlnPhaseShift", 0.0),
        ("scale_factor", "rlnCtfScalefactor", 1.0),
        ("premultiplied", "rlnCtfDataAreCtfPremultiplied", 0.0),
    ):
        value = per_particle(particles, optics, label, source)
        if value is None and default is None:
            raise ValueError(
                f"{source} has rlnDefocusU but no {label}; a CTF needs the voltage and Cs "
                "(add them to data_optics)"
            )
        if value is None and label == "rlnAmplitudeContrast":
            warnings.warn(
                f"{source} has no rlnAmplitudeContrast; using RELION's default "
                f"{DEFAULT_AMPLITUDE_CONTRAST:g}",
                stacklevel=3,
            )
        fields[name] = value if value is not None else np.broadcast_to(default, u.shape)
    try:
        return CTFParameters(**fields)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from error


def origin_convention(particles: pd.DataFrame, optics: pd.DataFrame | None) -> str:
    """``"angstrom"`` (rlnOriginXAngst/YAngst) or ``"pixel"`` (rlnOriginX/Y): the columns the
    file has, else the convention of its RELION version (3.0: pixels)."""
    if {"rlnOriginXAngst", "rlnOriginYAngst"} <= set(particles):
        return "angstrom"
    if {"rlnOriginX", "rlnOriginY"} <= set(particles):
        return "pixel"
    return "pixel" if optics is None else "angstrom"


def origins_angstrom(particles: pd.DataFrame, optics, pixel_angstrom: np.ndarray) -> np.ndarray:
    """``(n, 2)`` origins (x, y) in Å with RELION's sign; zeros when the file has none."""
    if {"rlnOriginXAngst", "rlnOriginYAngst"} <= set(particles):
        return particles[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(np.float64)
    if {"rlnOriginX", "rlnOriginY"} <= set(particles):
        pixels = particles[["rlnOriginX", "rlnOriginY"]].to_numpy(np.float64)
        return pixels * np.asarray(pixel_angstrom, dtype=np.float64)[:, None]
    return np.zeros((len(particles), 2))


def write_origins(
    table: pd.DataFrame, origins: np.ndarray, convention: str, pixel_angstrom: np.ndarray
) -> None:
    """Set ``table``'s origin columns to ``origins`` ``(n, 2)`` Å in ``convention``
    (``"pixel"``: divided by each particle's pixel size); a file holding both kinds gets both,
    consistent."""
    origins = np.asarray(origins, dtype=np.float64)
    both = {"rlnOriginXAngst", "rlnOriginX"} <= set(table)
    if convention == "angstrom" or both:
        table["rlnOriginXAngst"], table["rlnOriginYAngst"] = origins[:, 0], origins[:, 1]
    if convention == "pixel" or both:
        pixels = origins / np.asarray(pixel_angstrom, dtype=np.float64)[:, None]
        table["rlnOriginX"], table["rlnOriginY"] = pixels[:, 0], pixels[:, 1]
