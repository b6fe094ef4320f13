"""Atomic structures: loading, Coulomb-potential maps and point-group symmetry.

One namespace for :mod:`~cryosphere.imaging.atoms` (structures in, atom coordinates) and
:mod:`~cryosphere.imaging.chain_symmetry` (point groups from chains); the maps and the
imageability check live here.

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
See :mod:`cryosphere.imaging.chain_symmetry`.
"""

from __future__ import annotations

import gemmi
import numpy as np

from cryosphere.imaging.atoms import (
    EXTENT_MARGIN_ANGSTROM,
    atom_positions,
    centre_of_mass,
    count_atoms,
    minimum_box_size,
    structure_radius,
)

__all__ = [
    "coulomb_potential_map",
    "MIN_ATOMS",
    "MAX_ATOMS",
    "check_imageable",
]

#: Fewest atoms a particle may have: with fewer than 3 (or with every atom on one line) the map
#: is symmetric about an axis and the pose is undefined.
MIN_ATOMS = 3

#: Most atoms (after removing waters, ligands, hydrogens) a particle may have. Measured on 2
#: cores (1UBI copies, 48 px box): 60,200 atoms in 100 chains load in 0.4 s, map in 1.5 s and
#: need 2.3 s for symmetry detection; 180,600 atoms in 300 chains 1 s, 6 s and 20 s (0.6 GB).
#: Symmetry detection grows with the square of the number of identical chains. The limit is about twice a ribosome (~150,000 heavy
#: atoms); at the series' 32-64 px boxes such a particle already needs pixels of 6-10 Å.
MAX_ATOMS = 300_000


def check_imageable(structure: gemmi.Structure, source: str = "the structure") -> int:
    """Refuse a structure CryoSphere cannot make particle images of; return its atom count.

    ``ValueError`` for fewer than :data:`MIN_ATOMS` atoms or atoms all on one line (the pose
    is undefined), and above :data:`MAX_ATOMS` atoms (memory and time; the message says how
    to proceed).
    """
    n_atoms = count_atoms(structure)
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
