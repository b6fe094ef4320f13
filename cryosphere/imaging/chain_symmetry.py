"""Point-group symmetry of a complex from its chains.

:func:`detect_point_group` finds the rotations about the centre of mass that map the complex
onto itself: identical chains (same polymer entity, or the same sequence) are superposed on
their Cα atoms (C4' for nucleic acids) with a Kabsch fit that keeps the centre of mass fixed,
and a candidate rotation is kept when it maps every chain onto a chain of the same kind with a
Cα RMSD below the tolerance. The set of kept rotations is classified as ``Cn`` (all share one
axis) or ``Dn`` (one n-fold axis and n perpendicular 2-folds). The symmetry frame is a (3, 3)
matrix whose columns are the frame's x, y, z axes in the centred coordinate frame: z is the
principal n-fold axis, for ``Dn`` x lies along a 2-fold axis, for ``Cn`` x points from the axis
towards the first chain of the symmetric group. Cubic groups (T, O, I) are not classified;
their largest cyclic subgroup is returned with a warning. Rotations act on (x, y, z) column
vectors; an operation ``g`` of the volume satisfies ``V(g x) = V(x)``.
"""

from __future__ import annotations

import math
import re
import warnings

import gemmi
import numpy as np

from cryosphere.imaging.atoms import centre_of_mass

__all__ = [
    "chain_ca_positions",
    "symmetry_rotation_between_chains",
    "detect_point_group",
    "resolve_point_group",
    "in_symmetry_frame",
]

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
    groups = _chain_groups(structure)
    com = centre_of_mass(structure)
    traces = {}
    for group in groups:
        for name in group:
            keys, pos = _chain_trace(structure, name)
            traces[name] = (keys, pos - com)
    if not groups or len(max(groups, key=len)) < 2:
        return "C1", np.eye(3)
    reference_group = max(groups, key=len)
    operations = _self_maps(reference_group, groups, traces, rmsd_tolerance_angstrom)
    if not operations:
        return "C1", np.eye(3)
    order = len(operations) + 1
    axes_angles = [_axis_angle(rotation) for rotation in operations]
    clusters = _axis_clusters(axes_angles)
    ref_centroid = traces[reference_group[0]][1].mean(axis=0)
    if len(clusters) == 1:
        return f"C{order}", _frame(_cluster_axis(clusters[0], axes_angles), ref_centroid)
    dihedral = _dihedral_group(order, clusters, axes_angles)
    if dihedral is not None:
        return dihedral
    largest = max(clusters, key=len)
    name = f"C{len(largest) + 1}"
    warnings.warn(
        f"found {order} symmetry operations that do not form a cyclic or dihedral group "
        f"(cubic groups are not classified); returning the largest cyclic subgroup {name}",
        stacklevel=2,
    )
    return name, _frame(_cluster_axis(largest, axes_angles), ref_centroid)


_Traces = dict[str, tuple[list[tuple], np.ndarray]]


def _maps_onto_itself(
    rotation: np.ndarray, groups: list[list[str]], traces: _Traces, tolerance: float
) -> bool:
    """Whether ``rotation`` maps every chain onto a distinct chain of its group with a trace
    RMSD below ``tolerance`` Å (traces centred on the centre of mass)."""
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
            if best >= tolerance or best_name in targets:
                return False
            targets.add(best_name)
    return True


def _self_maps(
    reference_group: list[str], groups: list[list[str]], traces: _Traces, tolerance: float
) -> list[np.ndarray]:
    """Rotations superposing the first chain of ``reference_group`` on each other chain of it
    that map the whole complex onto itself (:func:`_maps_onto_itself`)."""
    keys_r, pos_r = traces[reference_group[0]]
    operations: list[np.ndarray] = []
    for other in reference_group[1:]:
        keys_o, pos_o = traces[other]
        a, b = _matched(keys_r, pos_r, keys_o, pos_o)
        if not _enough(len(a), len(keys_r), len(keys_o)):
            continue
        rotation = _kabsch_about_origin(a, b)
        if _maps_onto_itself(rotation, groups, traces, tolerance):
            operations.append(rotation)
    return operations


def _axis_clusters(axes_angles: list[tuple[np.ndarray, float]]) -> list[list[int]]:
    """Indices of the operations grouped by axis (within 15°, either sign)."""
    cos_tol = math.cos(math.radians(15.0))
    clusters: list[list[int]] = []
    for i, (axis, _) in enumerate(axes_angles):
        for cluster in clusters:
            if abs(axis @ axes_angles[cluster[0]][0]) > cos_tol:
                cluster.append(i)
                break
        else:
            clusters.append([i])
    return clusters


def _cluster_axis(cluster: list[int], axes_angles: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """Mean unit axis of a cluster, signs aligned with its first axis, canonical sign."""
    first = axes_angles[cluster[0]][0]
    total = sum(np.sign(axes_angles[i][0] @ first) * axes_angles[i][0] for i in cluster)
    return _canonical_sign(total / np.linalg.norm(total))


def _dihedral_group(
    order: int, clusters: list[list[int]], axes_angles: list[tuple[np.ndarray, float]]
) -> tuple[str, np.ndarray] | None:
    """``("Dn", frame)`` when the ``order - 1`` operations are an n-fold axis and n
    perpendicular 2-folds (within 15°), else None."""
    sin_tol = math.sin(math.radians(15.0))
    if order % 2 != 0 or order < 4:
        return None
    n = order // 2
    for principal in clusters:
        if n > 2 and len(principal) != n - 1:
            continue
        if n == 2 and len(principal) != 1:
            continue
        z = _cluster_axis(principal, axes_angles)
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
    return None


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


def in_symmetry_frame(
    structure: gemmi.Structure, symmetry: str | None = "auto"
) -> tuple[gemmi.Structure, str]:
    """A copy of ``structure`` rotated about its centre of mass into its symmetry frame
    (:func:`resolve_point_group`), and the group's name.

    In that frame the group's axes are the coordinate axes (n-fold along z; for ``Dn`` a
    2-fold along x), as RELION expects a symmetric map, so ``point_groups.point_group(name)``
    in its standard frame describes the copy's map. The level-``L`` HEALPix SO(3) grid is then
    closed under C2, C4, D2 and D4 (``R_c g`` is another cell's centre), which symmetry-aware
    cell measures (orbit folding, :mod:`cryosphere.poses.evaluation.calibration`) need to be
    exact. Atom positions are rotated (ADPs with them); nothing else changes.
    """
    name, frame = resolve_point_group(structure, symmetry)
    rotated = structure.clone()
    if name == "C1":
        return rotated, name
    com = centre_of_mass(structure)
    inverse = np.asarray(frame, dtype=np.float64).T  # volume → symmetry frame coordinates
    translation = com - inverse @ com  # about the centre of mass: it stays where it was
    transform = gemmi.Transform(gemmi.Mat33(inverse.tolist()), gemmi.Vec3(*translation.tolist()))
    for model in rotated:
        model.transform_pos_and_adp(transform)
    return rotated, name
