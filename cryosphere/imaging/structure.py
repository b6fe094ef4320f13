"""Atomic structures: loading, Coulomb-potential maps and point-group symmetry.

Conventions
-----------
- Coordinates are in Å, vectors ordered (x, y, z).
- Volumes are float32 arrays ``(N, N, N)`` indexed ``[z, y, x]``. The rotation centre is voxel
  ``N // 2`` along each axis, and the structure's (occupancy-weighted) centre of mass is put
  there: the voxel at array index ``[k, j, i]`` sits at
  ``((i - N//2) * pixel_size, (j - N//2) * pixel_size, (k - N//2) * pixel_size)`` Å from the
  centre of mass.
- Rotation matrices act on (x, y, z) column vectors. A point-group operation ``g`` of the
  volume satisfies ``V(g x) = V(x)``; rotations found here are about the centre of mass.

Embedded structures
-------------------
Three small PDB entries ship with the package (see :data:`EMBEDDED_STRUCTURES`): ``1ubi``
(ubiquitin, one chain, no symmetry), ``1hvr`` (HIV-1 protease homodimer, C2, with a bound
inhibitor) and ``5pti`` (BPTI, gzipped mmCIF).

Point groups
------------
:func:`detect_point_group` finds the rotations about the centre of mass that map the complex
onto itself: identical chains (same polymer entity, or the same sequence) are superposed on
their Cα atoms (C4' for nucleic acids) with a Kabsch fit that keeps the centre of mass fixed,
and a candidate rotation is kept when it maps every chain onto a chain of the same kind with a
Cα RMSD below the tolerance. The set of kept rotations is classified as ``Cn`` (all share one
axis) or ``Dn`` (one n-fold axis and n perpendicular 2-folds). The symmetry frame is a (3, 3)
matrix whose columns are the frame's x, y, z axes in the centred coordinate frame: z is the
principal n-fold axis, for ``Dn`` x lies along a 2-fold axis, for ``Cn`` x points from the axis
towards the first chain of the symmetric group. Cubic groups (T, O, I) are not classified;
their largest cyclic subgroup is returned with a warning.
"""

from __future__ import annotations

import importlib.resources
import math
import os
import re
import warnings
from pathlib import Path

import gemmi
import numpy as np

__all__ = [
    "EMBEDDED_STRUCTURES",
    "embedded_structure_path",
    "load_structure",
    "atom_positions",
    "atom_masses",
    "centre_of_mass",
    "structure_radius",
    "minimum_box_size",
    "coulomb_potential_map",
    "chain_ca_positions",
    "symmetry_rotation_between_chains",
    "detect_point_group",
    "resolve_point_group",
    "MIN_ATOMS",
    "MAX_ATOMS",
    "check_imageable",
]

#: Embedded structure names -> file names inside ``cryosphere/data``.
EMBEDDED_STRUCTURES: dict[str, str] = {
    "1ubi": "1ubi.pdb",
    "1hvr": "1hvr.pdb",
    "5pti": "5pti.cif.gz",
}

#: Margin (Å) added to the largest atom distance from the centre of mass when checking that a
#: structure fits in a box: atoms' potentials extend past their centres.
EXTENT_MARGIN_ANGSTROM = 2.0

_SUPPORTED_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif")

#: Fewest atoms a particle may have: with fewer than 3 (or with every atom on one line) the map
#: is symmetric about an axis and the pose is undefined.
MIN_ATOMS = 3

#: Most atoms (after removing waters, ligands, hydrogens) a particle may have. Measured on 2
#: cores (1UBI copies, 48 px box): 60,200 atoms in 100 chains load in 0.4 s, map in 1.5 s and
#: need 2.3 s for symmetry detection; 180,600 atoms in 300 chains 1 s, 6 s and 20 s (0.6 GB).
#: Symmetry detection grows with the square of the number of identical chains. The limit is about twice a ribosome (~150,000 heavy
#: atoms); at the series' 32-64 px boxes such a particle already needs pixels of 6-10 Å.
MAX_ATOMS = 300_000


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def embedded_structure_path(name: str) -> Path:
    """Path of an embedded structure file, for a name in :data:`EMBEDDED_STRUCTURES`.

    The name is case-insensitive. Raises ``KeyError`` listing the names for an unknown one.
    """
    key = name.lower()
    if key not in EMBEDDED_STRUCTURES:
        raise KeyError(
            f"unknown embedded structure {name!r}; available: {sorted(EMBEDDED_STRUCTURES)}"
        )
    resource = importlib.resources.files("cryosphere") / "data" / EMBEDDED_STRUCTURES[key]
    return Path(str(resource))


def _resolve_source(source: str | os.PathLike[str]) -> Path:
    if isinstance(source, str) and source.lower() in EMBEDDED_STRUCTURES:
        return embedded_structure_path(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(source)!r} is neither an embedded structure name "
            f"({', '.join(sorted(EMBEDDED_STRUCTURES))}) nor an existing file"
        )
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    if not suffixes or suffixes[-1] not in _SUPPORTED_SUFFIXES:
        raise ValueError(
            f"cannot read {str(path)!r}: unsupported file type; use a PDB or mmCIF file named "
            f"*{', *'.join(_SUPPORTED_SUFFIXES)} (optionally gzipped, *.gz)"
        )
    return path


def _count_atoms(structure: gemmi.Structure) -> int:
    return sum(len(res) for model in structure for chain in model for res in chain)


def load_structure(
    source: str | os.PathLike[str],
    *,
    model_index: int = 0,
    assembly: str | None = None,
    keep_waters: bool = False,
    keep_ligands: bool = False,
    keep_hydrogens: bool = False,
) -> gemmi.Structure:
    """Read an atomic model and keep one model of it, optionally as a biological assembly.

    Parameters
    ----------
    source
        An embedded name (``"1ubi"``, ``"1hvr"``, ``"5pti"``; case-insensitive, checked first)
        or a path to a ``.pdb``/``.ent``/``.cif``/``.mmcif`` file, optionally gzipped.
    model_index
        Zero-based index of the model to keep (NMR ensembles have several).
    assembly
        Name of a biological assembly defined in the file (e.g. ``"1"``); the returned
        structure is that assembly, built by gemmi (copied chains get a number appended to
        their names). ``None`` keeps the deposited (asymmetric-unit) chains.
    keep_waters, keep_ligands, keep_hydrogens
        By default waters, ligands (every residue that is not part of a polymer entity;
        modified residues inside a chain are kept) and hydrogen atoms are removed.

    Returns
    -------
    gemmi.Structure with exactly one model. Alternative conformations are kept; their
    occupancies weight masses and the potential.

    Raises
    ------
    FileNotFoundError
        ``source`` is neither an embedded name nor an existing file.
    ValueError
        Unsupported or unparseable file, ``model_index`` out of range, unknown assembly name,
        or no atoms left after filtering.
    """
    path = _resolve_source(source)
    try:
        structure = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError, OSError) as exc:
        raise ValueError(
            f"cannot parse {str(path)!r} as a PDB/mmCIF structure (is it truncated or "
            f"damaged? download it again): {exc}"
        ) from exc
    n_models = len(structure)
    if n_models == 0 or _count_atoms(structure) == 0:
        raise ValueError(
            f"{str(path)!r} contains no atomic model (is it a valid PDB/mmCIF coordinate file?)"
        )
    if not isinstance(model_index, (int, np.integer)) or not -n_models <= model_index < n_models:
        raise ValueError(
            f"model_index={model_index!r} is out of range: {str(path)!r} has {n_models} "
            f"model(s); use 0..{n_models - 1}"
        )
    model_index = int(model_index) % n_models
    for i in reversed(range(n_models)):
        if i != model_index:
            del structure[i]

    structure.setup_entities()
    for model in structure:
        for chain in model:
            for i in reversed(range(len(chain))):
                residue = chain[i]
                if residue.is_water():
                    if not keep_waters:
                        del chain[i]
                elif residue.entity_type != gemmi.EntityType.Polymer and not keep_ligands:
                    del chain[i]
    if not keep_hydrogens:
        structure.remove_hydrogens()
    structure.remove_empty_chains()

    if assembly is not None:
        names = [a.name for a in structure.assemblies]
        if str(assembly) not in names:
            available = ", ".join(repr(n) for n in names) if names else "none"
            raise ValueError(
                f"unknown assembly {assembly!r} in {str(path)!r}; available assemblies: {available}"
            )
        structure.transform_to_assembly(str(assembly), gemmi.HowToNameCopiedChain.AddNumber)
        structure.setup_entities()

    if _count_atoms(structure) == 0:
        raise ValueError(
            f"no atoms left in model {model_index} of {str(path)!r} after removing waters, "
            "ligands and hydrogens; pass keep_waters=True, keep_ligands=True or "
            "keep_hydrogens=True, or choose another model_index"
        )
    return structure


def check_imageable(structure: gemmi.Structure, source: str = "the structure") -> int:
    """Refuse a structure CryoSphere cannot make particle images of; return its atom count.

    ``ValueError`` for fewer than :data:`MIN_ATOMS` atoms or atoms all on one line (the pose
    is undefined), and above :data:`MAX_ATOMS` atoms (memory and time; the message says how
    to proceed).
    """
    n_atoms = _count_atoms(structure)
    if n_atoms > MAX_ATOMS:
        raise ValueError(
            f"{source} has {n_atoms:,} atoms, more than CryoSphere images ({MAX_ATOMS:,}): "
            "symmetry detection grows with the square of the chain count and the box would "
            "need pixels of 10 Å or more; use a sub-complex (fewer chains or no assembly), or "
            "raise cryosphere.imaging.structure.MAX_ATOMS knowingly"
        )
    positions = atom_positions(structure) if n_atoms >= MIN_ATOMS else None
    spread = (
        np.linalg.svd(positions - positions.mean(axis=0), compute_uv=False)
        if positions is not None
        else np.zeros(3)
    )
    if n_atoms < MIN_ATOMS or spread[1] < 1e-3 * max(spread[0], 1e-12):
        raise ValueError(
            f"{source} has {n_atoms} atom(s){' on one line' if n_atoms >= MIN_ATOMS else ''}: "
            "its map is symmetric about an axis, so particle poses are undefined; use a model "
            f"of a molecule (at least {MIN_ATOMS} atoms not on one line)"
        )
    return n_atoms


# --------------------------------------------------------------------------------------------
# Atoms
# --------------------------------------------------------------------------------------------


def _atoms(structure: gemmi.Structure) -> list[gemmi.Atom]:
    if len(structure) == 0:
        raise ValueError("the structure has no model")
    return [atom for chain in structure[0] for res in chain for atom in res]


def atom_positions(structure: gemmi.Structure) -> np.ndarray:
    """Positions ``(n_atoms, 3)`` float64 in Å, (x, y, z), of the first model's atoms."""
    atoms = _atoms(structure)
    out = np.empty((len(atoms), 3), dtype=np.float64)
    for i, atom in enumerate(atoms):
        out[i] = (atom.pos.x, atom.pos.y, atom.pos.z)
    return out


def atom_masses(structure: gemmi.Structure) -> np.ndarray:
    """Atomic masses ``(n_atoms,)`` float64 in Da times occupancy, first model."""
    return np.array([atom.element.weight * atom.occ for atom in _atoms(structure)], np.float64)


def centre_of_mass(structure: gemmi.Structure) -> np.ndarray:
    """Mass-weighted (occupancy-weighted) centre of the first model, ``(3,)`` Å."""
    masses = atom_masses(structure)
    if masses.size == 0 or masses.sum() <= 0:
        raise ValueError("the structure has no atoms (or only zero-occupancy atoms)")
    return (atom_positions(structure) * masses[:, None]).sum(axis=0) / masses.sum()


def structure_radius(structure: gemmi.Structure) -> float:
    """Largest distance (Å) of an atom from the centre of mass."""
    centred = atom_positions(structure) - centre_of_mass(structure)
    return float(np.sqrt((centred**2).sum(axis=1)).max())


def minimum_box_size(structure: gemmi.Structure, pixel_size: float) -> int:
    """Smallest box size N (voxels, at least 16) whose radius ``N * pixel_size / 2`` holds the
    structure: the largest atom distance from the centre of mass plus a 2 Å margin."""
    if not pixel_size > 0:
        raise ValueError(f"pixel_size must be > 0 Å, got {pixel_size}")
    extent = structure_radius(structure) + EXTENT_MARGIN_ANGSTROM
    return max(16, math.ceil(2.0 * extent / pixel_size - 1e-9))


# --------------------------------------------------------------------------------------------
# Coulomb potential
# --------------------------------------------------------------------------------------------


def coulomb_potential_map(
    structure: gemmi.Structure,
    box_size: int,
    pixel_size: float,
    *,
    extra_b_factor: float = 0.0,
) -> np.ndarray:
    """Coulomb potential of the first model sampled on a cubic grid.

    Each atom contributes gemmi's electron scattering factor (International Tables vol. C,
    table 4.3.2.2, five Gaussians) blurred by its B-factor (anisotropic ADPs if present) plus
    ``extra_b_factor``, weighted by its occupancy, evaluated in real space by
    ``gemmi.DensityCalculatorE`` on a P1 cell of ``box_size * pixel_size`` Å with exactly
    ``box_size`` grid points per axis. Values are in gemmi's units (Å⁻², the real-space
    electron scattering factor density), proportional to the potential; the integral of one
    atom's contribution (``sum * pixel_size**3``) is its scattering factor at zero angle in Å.

    Parameters
    ----------
    structure
        A gemmi structure (first model used).
    box_size
        N, voxels per axis, at least 16.
    pixel_size
        Voxel size in Å, > 0.
    extra_b_factor
        Additional isotropic B-factor in Å² (>= 0) applied to every atom: a Gaussian blur
        ``exp(-B s² / 4)`` in Fourier space (s in 1/Å).

    Returns
    -------
    float32 array ``(N, N, N)`` indexed ``[z, y, x]``, the centre of mass at voxel ``N // 2``.
    The grid is periodic, so the structure must fit in the box: ``ValueError`` naming the
    minimum box size otherwise.
    """
    if isinstance(box_size, bool) or not isinstance(box_size, (int, np.integer)):
        raise TypeError(f"box_size must be an integer, got {box_size!r}")
    box_size = int(box_size)
    if box_size < 16:
        raise ValueError(f"box_size must be at least 16 voxels, got {box_size}")
    if not (np.isfinite(pixel_size) and pixel_size > 0):
        raise ValueError(f"pixel_size must be a positive number of Å, got {pixel_size}")
    if not (np.isfinite(extra_b_factor) and extra_b_factor >= 0):
        raise ValueError(f"extra_b_factor must be >= 0 Å², got {extra_b_factor}")
    pixel_size = float(pixel_size)

    com = centre_of_mass(structure)
    extent = structure_radius(structure) + EXTENT_MARGIN_ANGSTROM
    if extent > box_size * pixel_size / 2:
        needed = minimum_box_size(structure, pixel_size)
        raise ValueError(
            f"the structure does not fit in a {box_size}^3 box at {pixel_size} Å/voxel: it "
            f"extends {extent:.1f} Å from its centre of mass (including a "
            f"{EXTENT_MARGIN_ANGSTROM} Å margin) but the box radius is "
            f"{box_size * pixel_size / 2:.1f} Å; use box_size >= {needed} or a larger "
            "pixel_size"
        )

    model = structure[0].clone()
    shift = (box_size // 2) * pixel_size - com
    model.transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(), gemmi.Vec3(*shift.tolist())))

    length = box_size * pixel_size
    calc = gemmi.DensityCalculatorE()
    calc.grid.set_unit_cell(gemmi.UnitCell(length, length, length, 90.0, 90.0, 90.0))
    calc.grid.spacegroup = gemmi.find_spacegroup_by_name("P 1")
    calc.grid.set_size(box_size, box_size, box_size)
    calc.blur = float(extra_b_factor)
    calc.add_model_density_to_grid(model)
    values = np.array(calc.grid, copy=True)  # indexed [x, y, z]
    return np.ascontiguousarray(values.transpose(2, 1, 0), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Chains and superposition
# --------------------------------------------------------------------------------------------

_TRACE_ATOMS = ("CA", "C4'")


def _chain_trace(structure: gemmi.Structure, chain_name: str) -> tuple[list[tuple], np.ndarray]:
    """Keys ``(seq number, insertion code, residue name)`` and trace-atom positions of the
    polymer residues of a chain (first model; first alternative conformation)."""
    model = structure[0]
    chains = [chain for chain in model if chain.name == chain_name]
    if not chains:
        names = sorted({chain.name for chain in model})
        raise ValueError(f"no chain {chain_name!r} in the structure; chains: {names}")
    keys: list[tuple] = []
    positions: list[tuple[float, float, float]] = []
    seen: set[tuple] = set()
    for chain in chains:
        for res in chain:
            if res.entity_type != gemmi.EntityType.Polymer and res.het_flag == "H":
                continue
            for atom_name in _TRACE_ATOMS:
                atom = res.find_atom(atom_name, "*")
                if atom is not None:
                    key = (res.seqid.num, res.seqid.icode, res.name)
                    if key not in seen:
                        seen.add(key)
                        keys.append(key)
                        positions.append((atom.pos.x, atom.pos.y, atom.pos.z))
                    break
    return keys, np.array(positions, dtype=np.float64).reshape(-1, 3)


def chain_ca_positions(structure: gemmi.Structure, chain_name: str) -> np.ndarray:
    """Cα positions ``(n_residues, 3)`` Å of a chain's polymer residues (C4' for nucleotides),
    in residue order, first model. Raises ``ValueError`` for an unknown chain."""
    return _chain_trace(structure, chain_name)[1]


def _kabsch_about_origin(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rotation R minimising sum |R a_i - b_i|² (no translation)."""
    h = a.T @ b
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    if d == 0:
        d = 1.0
    return vt.T @ np.diag([1.0, 1.0, d]) @ u.T


def _matched(
    keys_a: list[tuple], pos_a: np.ndarray, keys_b: list[tuple], pos_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    index_b = {k: i for i, k in enumerate(keys_b)}
    pairs = [(i, index_b[k]) for i, k in enumerate(keys_a) if k in index_b]
    if not pairs:
        return np.empty((0, 3)), np.empty((0, 3))
    ia, ib = np.array(pairs).T
    return pos_a[ia], pos_b[ib]


def _enough(n_matched: int, n_a: int, n_b: int) -> bool:
    return n_matched >= 3 and n_matched >= 0.5 * min(n_a, n_b)


def _rmsd(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).sum(axis=1).mean()))


def symmetry_rotation_between_chains(
    structure: gemmi.Structure, chain_a: str, chain_b: str
) -> np.ndarray:
    """Rotation ``(3, 3)`` about the centre of mass that best maps ``chain_a``'s Cα atoms onto
    ``chain_b``'s (least squares over residues with the same number and name).

    ``R @ (ca_a - com) ≈ ca_b - com``. Raises ``ValueError`` when fewer than 3 residues match.
    """
    com = centre_of_mass(structure)
    keys_a, pos_a = _chain_trace(structure, chain_a)
    keys_b, pos_b = _chain_trace(structure, chain_b)
    a, b = _matched(keys_a, pos_a, keys_b, pos_b)
    if len(a) < 3:
        raise ValueError(
            f"chains {chain_a!r} and {chain_b!r} share only {len(a)} residues (same number and "
            "name); at least 3 are needed for a superposition"
        )
    return _kabsch_about_origin(a - com, b - com)


# --------------------------------------------------------------------------------------------
# Point groups
# --------------------------------------------------------------------------------------------


def _axis_angle(rotation: np.ndarray) -> tuple[np.ndarray, float]:
    """Unit axis and angle in [0, pi] of a rotation matrix (axis arbitrary for identity)."""
    cos_angle = np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0)
    angle = float(np.arccos(cos_angle))
    skew = np.array(
        [
            rotation[2, 1] - rotation[1, 2],
            rotation[0, 2] - rotation[2, 0],
            rotation[1, 0] - rotation[0, 1],
        ]
    )
    if angle < 1e-8:
        return np.array([0.0, 0.0, 1.0]), 0.0
    if angle < np.pi - 1e-3:
        return skew / np.linalg.norm(skew), angle
    # Near 180°: R + I = 2 u u^T (approximately); take its dominant column.
    sym = (rotation + np.eye(3)) / 2.0
    col = int(np.argmax(np.diag(sym)))
    axis = sym[:, col] / np.linalg.norm(sym[:, col])
    if skew @ axis < 0:
        axis = -axis
    return axis, angle


def _canonical_sign(v: np.ndarray) -> np.ndarray:
    return v if v[int(np.argmax(np.abs(v)))] >= 0 else -v


def _perpendicular(v: np.ndarray, z: np.ndarray) -> np.ndarray | None:
    p = v - (v @ z) * z
    norm = np.linalg.norm(p)
    return None if norm < 1e-6 else p / norm


def _frame(z: np.ndarray, x_hint: np.ndarray | None) -> np.ndarray:
    z = z / np.linalg.norm(z)
    x = None if x_hint is None else _perpendicular(x_hint, z)
    if x is None:
        trial = np.eye(3)[int(np.argmin(np.abs(z)))]
        x = _perpendicular(trial, z)
    y = np.cross(z, x)
    return np.column_stack([x, y, z])


def _chain_groups(structure: gemmi.Structure) -> list[list[str]]:
    """Polymer chain names grouped by entity (or, failing that, by residue sequence)."""
    groups: dict[object, list[str]] = {}
    for chain in structure[0]:
        polymer = chain.get_polymer()
        if len(polymer) == 0 or chain.name in {n for g in groups.values() for n in g}:
            continue
        entity = structure.get_entity_of(polymer)
        sequence = tuple(res.name for res in polymer)
        key: object = ("entity", entity.name) if entity is not None else ("seq", sequence)
        groups.setdefault(key, []).append(chain.name)
    return list(groups.values())


def detect_point_group(
    structure: gemmi.Structure, *, rmsd_tolerance_angstrom: float = 2.0
) -> tuple[str, np.ndarray]:
    """Point group of a homo-oligomeric complex from its chains, and its symmetry frame.

    Rotations about the centre of mass are proposed by superposing the first chain of the
    largest group of identical chains onto each other chain of that group (Kabsch on matched
    Cα atoms); a rotation is kept when it maps every polymer chain onto a chain of the same
    kind with a Cα RMSD below ``rmsd_tolerance_angstrom``.

    Returns
    -------
    (name, frame): ``name`` is ``"Cn"`` or ``"Dn"`` (``"C1"`` for a monomer or when nothing
    matches); ``frame`` is a (3, 3) rotation matrix whose columns are the symmetry frame's
    x, y, z axes in the centred coordinate frame (z along the n-fold axis; for ``Dn`` x along a
    2-fold axis; for ``Cn`` x towards the first chain of the group; identity for ``C1``).
    For a cubic group (not classified) the largest cyclic subgroup is returned with a warning.
    """
    com = centre_of_mass(structure)
    traces = {}
    groups = _chain_groups(structure)
    for group in groups:
        for name in group:
            keys, pos = _chain_trace(structure, name)
            traces[name] = (keys, pos - com)
    if not groups:
        return "C1", np.eye(3)
    reference_group = max(groups, key=len)
    if len(reference_group) < 2:
        return "C1", np.eye(3)

    def maps_onto_itself(rotation: np.ndarray) -> bool:
        for group in groups:
            targets: set[str] = set()
            for name_x in group:
                keys_x, pos_x = traces[name_x]
                moved = pos_x @ rotation.T
                best, best_name = np.inf, None
                for name_y in group:
                    keys_y, pos_y = traces[name_y]
                    a, b = _matched(keys_x, moved, keys_y, pos_y)
                    if not _enough(len(a), len(keys_x), len(keys_y)):
                        continue
                    r = _rmsd(a, b)
                    if r < best:
                        best, best_name = r, name_y
                if best >= rmsd_tolerance_angstrom or best_name in targets:
                    return False
                targets.add(best_name)
        return True

    ref = reference_group[0]
    keys_r, pos_r = traces[ref]
    operations: list[tuple[np.ndarray, str]] = []
    for other in reference_group[1:]:
        keys_o, pos_o = traces[other]
        a, b = _matched(keys_r, pos_r, keys_o, pos_o)
        if not _enough(len(a), len(keys_r), len(keys_o)):
            continue
        rotation = _kabsch_about_origin(a, b)
        if maps_onto_itself(rotation):
            operations.append((rotation, other))
    if not operations:
        return "C1", np.eye(3)

    order = len(operations) + 1
    axes_angles = [_axis_angle(rot) for rot, _ in operations]
    cos_tol = math.cos(math.radians(15.0))
    clusters: list[list[int]] = []
    for i, (axis, _) in enumerate(axes_angles):
        for cluster in clusters:
            if abs(axis @ axes_angles[cluster[0]][0]) > cos_tol:
                cluster.append(i)
                break
        else:
            clusters.append([i])

    def cluster_axis(cluster: list[int]) -> np.ndarray:
        first = axes_angles[cluster[0]][0]
        total = sum(np.sign(axes_angles[i][0] @ first) * axes_angles[i][0] for i in cluster)
        return _canonical_sign(total / np.linalg.norm(total))

    ref_centroid = pos_r.mean(axis=0)
    if len(clusters) == 1:
        z = cluster_axis(clusters[0])
        return f"C{order}", _frame(z, ref_centroid)

    sin_tol = math.sin(math.radians(15.0))
    if order % 2 == 0 and order >= 4:
        n = order // 2
        for principal in clusters:
            if n > 2 and len(principal) != n - 1:
                continue
            if n == 2 and len(principal) != 1:
                continue
            z = cluster_axis(principal)
            twofolds = [i for c in clusters if c is not principal for i in c]
            if (
                len(twofolds) == n
                and all(len(c) == 1 for c in clusters if c is not principal)
                and all(
                    abs(axes_angles[i][0] @ z) < sin_tol
                    and abs(axes_angles[i][1] - np.pi) < math.radians(15.0)
                    for i in twofolds
                )
            ):
                return f"D{n}", _frame(z, axes_angles[twofolds[0]][0])

    largest = max(clusters, key=len)
    name = f"C{len(largest) + 1}"
    warnings.warn(
        f"found {order} symmetry operations that do not form a cyclic or dihedral group "
        f"(cubic groups are not classified); returning the largest cyclic subgroup {name}",
        stacklevel=2,
    )
    return name, _frame(cluster_axis(largest), ref_centroid)


_GROUP_NAME = re.compile(r"^([CD])(\d+)$", re.IGNORECASE)


def resolve_point_group(
    structure: gemmi.Structure, symmetry: str | None = "auto"
) -> tuple[str, np.ndarray]:
    """Point group and symmetry frame to use for a structure.

    - ``"auto"``: :func:`detect_point_group`.
    - ``None`` or ``"C1"``: ``("C1", identity)``.
    - a stated name (``"Cn"`` or ``"Dn"``, case-insensitive): if the detected group has the
      same name, its frame is used; otherwise the stated group is returned with the identity
      frame (its axes are assumed to be the coordinate axes) and a warning.
    """
    if symmetry is None:
        return "C1", np.eye(3)
    text = str(symmetry).strip()
    if text.lower() == "auto":
        return detect_point_group(structure)
    match = _GROUP_NAME.match(text)
    if (
        match is None
        or int(match.group(2)) < 1
        or (match.group(1).upper() == "D" and int(match.group(2)) < 2)
    ):
        raise ValueError(
            f"unknown point group {symmetry!r}; use 'auto', None, 'Cn' (n >= 1) or 'Dn' (n >= 2)"
        )
    name = f"{match.group(1).upper()}{int(match.group(2))}"
    if name == "C1":
        return "C1", np.eye(3)
    detected, frame = detect_point_group(structure)
    if detected == name:
        return name, frame
    warnings.warn(
        f"stated point group {name} differs from the detected {detected}; using {name} with "
        "its axes along the coordinate axes (identity frame)",
        stacklevel=2,
    )
    return name, np.eye(3)
