"""Tests for cryosphere.imaging.structure: loading, Coulomb maps and point-group detection."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from cryosphere.imaging.atoms import (
    EMBEDDED_STRUCTURES,
    atom_masses,
    atom_positions,
    centre_of_mass,
    embedded_structure_path,
    load_structure,
    minimum_box_size,
)
from cryosphere.imaging.chain_symmetry import (
    chain_ca_positions,
    detect_point_group,
    in_symmetry_frame,
    resolve_point_group,
    symmetry_rotation_between_chains,
)
from cryosphere.imaging.structure import coulomb_potential_map


def _residue_names(structure) -> set[str]:
    return {res.name for chain in structure[0] for res in chain}


def _n_waters(structure) -> int:
    return sum(res.is_water() for chain in structure[0] for res in chain)


def _elements(structure) -> set[str]:
    return {atom.element.name for chain in structure[0] for res in chain for atom in res}


@pytest.fixture(scope="module")
def ubi():
    return load_structure("1ubi")


@pytest.fixture(scope="module")
def hvr():
    return load_structure("1hvr")


@pytest.fixture(scope="module")
def hvr_map(hvr):
    return coulomb_potential_map(hvr, 48, 1.5, extra_b_factor=50.0)


# ------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("name", sorted(EMBEDDED_STRUCTURES))
def test_embedded_paths_exist_and_load(name):
    path = embedded_structure_path(name.upper())
    assert path.is_file()
    structure = load_structure(name.upper())
    assert len(structure) == 1
    assert len(atom_positions(structure)) > 300
    assert _n_waters(structure) == 0
    assert not _elements(structure) & {"H", "D"}


def test_load_ubiquitin_counts(ubi):
    positions = atom_positions(ubi)
    assert positions.shape[1] == 3 and positions.dtype == np.float64
    assert 550 <= len(positions) <= 700  # 76 residues, ~600 heavy atoms
    assert [chain.name for chain in ubi[0]] == ["A"]
    with_water = load_structure("1ubi", keep_waters=True)
    assert "HOH" in _residue_names(with_water)
    assert len(atom_positions(with_water)) > len(positions)


def test_load_from_path_matches_name(ubi):
    from_path = load_structure(embedded_structure_path("1ubi"))
    np.testing.assert_allclose(atom_positions(from_path), atom_positions(ubi))
    from_str = load_structure(str(embedded_structure_path("1ubi")))
    assert len(atom_positions(from_str)) == len(atom_positions(ubi))


def test_load_gzipped_mmcif():
    path = embedded_structure_path("5pti")
    assert path.name.endswith(".cif.gz")
    bpti = load_structure(path)
    n = len(atom_positions(bpti))
    assert 420 <= n <= 520  # 58 residues
    assert _n_waters(bpti) == 0 and "PO4" not in _residue_names(bpti)
    # 5PTI is a joint X-ray/neutron model: heavy water (DOD) and deuterium atoms
    assert "DOD" in _residue_names(load_structure(path, keep_waters=True))
    assert len(atom_positions(load_structure(path, keep_hydrogens=True))) > 1.5 * n


def test_1hvr_ligand_filtering(hvr):
    names = _residue_names(hvr)
    assert "XK2" not in names and "HOH" not in names
    assert "CSO" in names  # modified residue inside the chain is polymer: kept
    assert [chain.name for chain in hvr[0]] == ["A", "B"]
    with_ligand = load_structure("1hvr", keep_ligands=True)
    assert "XK2" in _residue_names(with_ligand)
    assert len(atom_positions(with_ligand)) == len(atom_positions(hvr)) + 46


def test_assembly_builds_and_unknown_name_raises():
    assembled = load_structure("1hvr", assembly="1")
    assert len(atom_positions(assembled)) == len(atom_positions(load_structure("1hvr")))
    with pytest.raises(ValueError, match="available assemblies: '1'"):
        load_structure("1hvr", assembly="7")


def test_masses_and_centre_of_mass(ubi):
    masses = atom_masses(ubi)
    assert masses.shape == (len(atom_positions(ubi)),)
    assert 7000 < masses.sum() < 9500  # ubiquitin heavy atoms ~8 kDa
    com = centre_of_mass(ubi)
    weighted = (atom_positions(ubi) * masses[:, None]).sum(0) / masses.sum()
    np.testing.assert_allclose(com, weighted)


def test_missing_path_raises():
    with pytest.raises(FileNotFoundError, match="neither an embedded structure name"):
        load_structure("/nonexistent/nothing.pdb")
    with pytest.raises(FileNotFoundError, match="1ubi"):
        load_structure("not_a_structure")


def test_garbage_files_raise(tmp_path):
    pdb = tmp_path / "garbage.pdb"
    pdb.write_text("this is not a PDB file\nat all\n")
    with pytest.raises(ValueError):
        load_structure(pdb)
    cif = tmp_path / "garbage.cif"
    cif.write_text("data_x\nloop_ 'unterminated\n")
    with pytest.raises(ValueError):
        load_structure(cif)
    txt = tmp_path / "model.txt"
    txt.write_text("ATOM\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_structure(txt)


def test_only_waters_raises(tmp_path):
    lines = [
        "HETATM    1  O   HOH A 101      10.000  10.000  10.000  1.00 20.00           O",
        "HETATM    2  O   HOH A 102      13.000  10.000  10.000  1.00 20.00           O",
        "END",
    ]
    path = tmp_path / "waters.pdb"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="keep_waters"):
        load_structure(path)
    assert len(atom_positions(load_structure(path, keep_waters=True))) == 2


def test_bad_model_index_raises():
    with pytest.raises(ValueError, match="model_index"):
        load_structure("1ubi", model_index=3)


# ------------------------------------------------------------------------------ maps


def test_map_shape_dtype_centre(ubi):
    n, pixel = 64, 1.0
    volume = coulomb_potential_map(ubi, n, pixel)
    assert volume.shape == (n, n, n) and volume.dtype == np.float32
    assert volume.sum() > 0 and volume.min() >= 0
    grid = np.indices(volume.shape).reshape(3, -1).astype(np.float64)
    centre = (grid * volume.reshape(1, -1)).sum(axis=1) / volume.sum()
    np.testing.assert_allclose(centre, [n // 2] * 3, atol=1.0)
    # [z, y, x] order: the map's density-weighted second moments match the atoms' own
    pos = atom_positions(ubi) - centre_of_mass(ubi)
    spread_atoms = pos.var(axis=0)  # x, y, z
    offsets = (grid - n // 2) * pixel
    spread_map = ((offsets**2) * volume.reshape(1, -1)).sum(axis=1) / volume.sum()
    order = np.argsort(spread_atoms)  # x, y, z ranking
    assert list(np.argsort(spread_map[::-1])) == list(order)


def test_map_is_deterministic(ubi):
    a = coulomb_potential_map(ubi, 48, 1.5)
    b = coulomb_potential_map(ubi, 48, 1.5)
    np.testing.assert_array_equal(a, b)


def test_map_sum_scales_with_atom_count(ubi, hvr, hvr_map):
    ubi_map = coulomb_potential_map(ubi, 48, 1.5, extra_b_factor=50.0)
    ratio_sum = hvr_map.sum() / ubi_map.sum()
    ratio_atoms = len(atom_positions(hvr)) / len(atom_positions(ubi))
    assert 0.8 * ratio_atoms < ratio_sum < 1.2 * ratio_atoms


def test_extra_b_factor_blurs(ubi):
    sharp = coulomb_potential_map(ubi, 48, 1.5)
    blurred = coulomb_potential_map(ubi, 48, 1.5, extra_b_factor=100.0)
    assert blurred.max() < 0.7 * sharp.max()
    assert blurred.sum() == pytest.approx(sharp.sum(), rel=0.05)


def test_map_argument_errors(ubi):
    needed = minimum_box_size(ubi, 1.0)
    assert 16 <= needed <= 64
    with pytest.raises(ValueError, match=f"box_size >= {needed}"):
        coulomb_potential_map(ubi, needed - 2, 1.0)
    coulomb_potential_map(ubi, needed, 1.0)  # the reported minimum is enough
    with pytest.raises(ValueError, match="at least 16"):
        coulomb_potential_map(ubi, 8, 10.0)
    with pytest.raises(ValueError, match="pixel_size"):
        coulomb_potential_map(ubi, 32, 0.0)
    with pytest.raises(ValueError, match="extra_b_factor"):
        coulomb_potential_map(ubi, 64, 1.0, extra_b_factor=-1.0)


# ------------------------------------------------------------------------------ symmetry


def _rotation_about(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def test_1hvr_is_c2_about_frame_z(hvr):
    name, frame = detect_point_group(hvr)
    assert name == "C2"
    np.testing.assert_allclose(frame.T @ frame, np.eye(3), atol=1e-10)
    assert np.linalg.det(frame) == pytest.approx(1.0)
    com = centre_of_mass(hvr)
    a = chain_ca_positions(hvr, "A") - com
    b = chain_ca_positions(hvr, "B") - com
    assert a.shape == b.shape == (99, 3)
    g = _rotation_about(frame[:, 2], math.pi)
    rmsd = np.sqrt(((a @ g.T - b) ** 2).sum(axis=1).mean())
    assert rmsd < 1.0
    # the chain-to-chain superposition is a ~180° rotation about the same axis
    r = symmetry_rotation_between_chains(hvr, "B", "A")
    angle = math.degrees(math.acos(np.clip((np.trace(r) - 1) / 2, -1, 1)))
    assert angle > 175.0
    np.testing.assert_allclose(r @ frame[:, 2], frame[:, 2], atol=0.05)


def test_1ubi_is_c1(ubi):
    name, frame = detect_point_group(ubi)
    assert name == "C1"
    np.testing.assert_array_equal(frame, np.eye(3))


def test_resolve_point_group(hvr, ubi):
    assert resolve_point_group(hvr, "auto")[0] == "C2"
    name, frame = resolve_point_group(hvr, "c2")
    assert name == "C2"
    np.testing.assert_allclose(frame, detect_point_group(hvr)[1])
    assert resolve_point_group(hvr, None)[0] == "C1"
    assert resolve_point_group(hvr, "C1")[0] == "C1"
    with pytest.warns(UserWarning, match="differs"):
        name, frame = resolve_point_group(ubi, "C3")
    assert name == "C3"
    np.testing.assert_array_equal(frame, np.eye(3))
    with pytest.raises(ValueError):
        resolve_point_group(ubi, "X7")


def test_1hvr_map_is_c2_invariant(hvr, hvr_map):
    _, frame = detect_point_group(hvr)
    g = _rotation_about(frame[:, 2], math.pi)
    n = hvr_map.shape[0]
    idx = np.indices(hvr_map.shape).reshape(3, -1).astype(np.float64)  # k, j, i
    xyz = idx[::-1] - n // 2
    rotated = g @ xyz + n // 2  # voxel coordinates of g x, (x, y, z)
    resampled = map_coordinates(hvr_map, rotated[::-1], order=1, mode="constant")
    corr = np.corrcoef(resampled, hvr_map.reshape(-1))[0, 1]
    assert corr > 0.95
    # a rotation that is not a symmetry correlates much worse
    wrong = _rotation_about(frame[:, 0], math.pi / 2) @ xyz + n // 2
    corr_wrong = np.corrcoef(
        map_coordinates(hvr_map, wrong[::-1], order=1, mode="constant"), hvr_map.reshape(-1)
    )[0, 1]
    assert corr_wrong < corr - 0.1


def test_in_symmetry_frame_puts_the_2_fold_along_z_of_the_map(hvr, hvr_map):
    aligned, name = in_symmetry_frame(hvr)
    assert name == "C2"
    np.testing.assert_allclose(detect_point_group(aligned)[1], np.eye(3), atol=1e-3)
    np.testing.assert_allclose(centre_of_mass(aligned), centre_of_mass(hvr), atol=1e-3)
    assert len(list(aligned[0].all())) == len(list(hvr[0].all()))
    n = 48

    def half_turn_about_z_correlation(volume):  # (x, y) -> (-x, -y) about voxel n // 2
        turned = np.roll(volume[:, ::-1, ::-1], 1, axis=(1, 2))  # indexed [z, y, x]
        return np.corrcoef(turned.ravel(), volume.ravel())[0, 1]

    assert (
        half_turn_about_z_correlation(coulomb_potential_map(aligned, n, 1.5, extra_b_factor=50.0))
        > 0.95
    )
    assert half_turn_about_z_correlation(hvr_map) < 0.5  # the deposited frame is oblique
    # a monomer is returned unchanged (a copy)
    copy, name = in_symmetry_frame(load_structure("1ubi"))
    assert name == "C1"


def _synthetic_oligomer(rotations: list[np.ndarray], offset: np.ndarray):
    """Copies of ubiquitin, shifted by ``offset`` from the origin and rotated by each matrix."""
    import gemmi

    base = load_structure("1ubi")
    model = base[0]
    template = model["A"].clone()
    shift = offset - centre_of_mass(base)
    for res in template:
        for atom in res:
            atom.pos = gemmi.Position(*(np.array(atom.pos.tolist()) + shift))
    while len(model) > 0:
        del model[0]
    for k, rot in enumerate(rotations):
        chain = template.clone()
        chain.name = "ABCDEFGH"[k]
        for res in chain:
            for atom in res:
                atom.pos = gemmi.Position(*(rot @ np.array(atom.pos.tolist())))
        model.add_chain(chain)
    base.setup_entities()
    return base


def test_synthetic_c3_and_d2():
    axis = np.array([1.0, 2.0, 2.0]) / 3.0
    c3 = [_rotation_about(axis, 2 * math.pi * k / 3) for k in range(3)]
    structure = _synthetic_oligomer(c3, np.array([20.0, 0.0, -10.0]))
    name, frame = detect_point_group(structure)
    assert name == "C3"
    assert abs(frame[:, 2] @ axis) == pytest.approx(1.0, abs=1e-6)

    two_folds = [np.eye(3)] + [_rotation_about(np.eye(3)[i], math.pi) for i in range(3)]
    structure = _synthetic_oligomer(two_folds, np.array([15.0, 12.0, 9.0]))
    name, frame = detect_point_group(structure)
    assert name == "D2"
    np.testing.assert_allclose(np.abs(frame.T @ np.eye(3)).max(axis=1), 1.0, atol=1e-6)
