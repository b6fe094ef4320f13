"""Atomic structures in: embedded entries, PDB/mmCIF files, biological assemblies, and the
atoms' positions, masses, centre of mass and extent.

Coordinates are in Å, vectors ordered (x, y, z). Three small PDB entries ship with the package
(:data:`EMBEDDED_STRUCTURES`): ``1ubi`` (ubiquitin, one chain, no symmetry), ``1hvr`` (HIV-1
protease homodimer, C2, with a bound inhibitor) and ``5pti`` (BPTI, gzipped mmCIF).
"""

from __future__ import annotations

import importlib.resources
import math
import os
from pathlib import Path

import gemmi
import numpy as np

__all__ = [
    "EMBEDDED_STRUCTURES",
    "EXTENT_MARGIN_ANGSTROM",
    "embedded_structure_path",
    "load_structure",
    "count_atoms",
    "atom_positions",
    "atom_masses",
    "centre_of_mass",
    "structure_radius",
    "minimum_box_size",
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


def count_atoms(structure: gemmi.Structure) -> int:
    """Number of atoms in every model of ``structure``."""
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
    structure, model_index = _read_one_model(path, model_index)
    _remove_residues(structure, keep_waters, keep_ligands, keep_hydrogens)
    if assembly is not None:
        _build_assembly(structure, assembly, path)
    if count_atoms(structure) == 0:
        raise ValueError(
            f"no atoms left in model {model_index} of {str(path)!r} after removing waters, "
            "ligands and hydrogens; pass keep_waters=True, keep_ligands=True or "
            "keep_hydrogens=True, or choose another model_index"
        )
    return structure


def _read_one_model(path: Path, model_index: int) -> tuple[gemmi.Structure, int]:
    """The structure in ``path`` with only model ``model_index`` left, and that index
    (a negative one counted from the end)."""
    try:
        structure = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError, OSError) as exc:
        raise ValueError(
            f"cannot parse {str(path)!r} as a PDB/mmCIF structure (is it truncated or "
            f"damaged? download it again): {exc}"
        ) from exc
    n_models = len(structure)
    if n_models == 0 or count_atoms(structure) == 0:
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
    return structure, model_index


def _remove_residues(
    structure: gemmi.Structure, keep_waters: bool, keep_ligands: bool, keep_hydrogens: bool
) -> None:
    """Remove waters, non-polymer residues and hydrogens (unless kept), then empty chains."""
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


def _build_assembly(structure: gemmi.Structure, assembly: str, path: Path) -> None:
    """Turn ``structure`` into its biological assembly ``assembly`` (copied chains numbered)."""
    names = [a.name for a in structure.assemblies]
    if str(assembly) not in names:
        available = ", ".join(repr(n) for n in names) if names else "none"
        raise ValueError(
            f"unknown assembly {assembly!r} in {str(path)!r}; available assemblies: {available}"
        )
    structure.transform_to_assembly(str(assembly), gemmi.HowToNameCopiedChain.AddNumber)
    structure.setup_entities()


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
