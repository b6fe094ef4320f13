"""cryoSPARC ``.cs`` particle files (imaging.formats.cryosparc): files laid out as cryoSPARC writes them
(numpy structured arrays saved with ``np.save``, a passthrough file joined by uid, stacks named
relative to the project folder), read with cryoSPARC's rotation-vector and shift conventions."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch
from scipy.spatial.transform import Rotation

from cryosphere.geometry import grids
from cryosphere.geometry import rotations as geometry_rotations
from cryosphere.imaging import ctf as ctf_module
from cryosphere.imaging.datasets import SimulationParameters
from cryosphere.imaging.formats import cryosparc
from cryosphere.imaging.particles import StackReader, read_particle_set
from cryosphere.imaging.simulate import save_dataset, simulate_dataset
from cryosphere.poses.network.model import ModelConfig
from cryosphere.poses.prediction import inference
from cryosphere.poses.search import map_search
from cryosphere.poses.training import fixed_set, settings

TINY = ModelConfig(
    image_size=16, lmax=2, conv_channels=(4, 4), sphere_channels=4, so3_channels=4, grid_level=1
)

# the dtype of a cryoSPARC 4 particles output (a subset of its fields, same names and types)
_MAIN_DTYPE = [
    ("uid", "<u8"),
    ("alignments3D/split", "<u4"),
    ("alignments3D/shift", "<f4", (2,)),
    ("alignments3D/pose", "<f4", (3,)),
    ("alignments3D/psize_A", "<f4"),
    ("alignments3D/error", "<f4"),
    ("alignments3D/class_posterior", "<f4"),
    ("alignments3D/class", "<u4"),
]
_LOCATION = ("location/center_x_frac", "<f4")


def _passthrough_dtype(path_length: int) -> list:
    return [
        ("uid", "<u8"),
        ("blob/path", f"S{path_length}"),
        ("blob/idx", "<u4"),
        ("blob/shape", "<u4", (2,)),
        ("blob/psize_A", "<f4"),
        ("blob/sign", "<f4"),
        ("ctf/type", "S1"),
        ("ctf/exp_group_id", "<u4"),
        ("ctf/accel_kv", "<f4"),
        ("ctf/cs_mm", "<f4"),
        ("ctf/amp_contrast", "<f4"),
        ("ctf/df1_A", "<f4"),
        ("ctf/df2_A", "<f4"),
        ("ctf/df_angle_rad", "<f4"),
        ("ctf/phase_shift_rad", "<f4"),
        ("ctf/scale", "<f4"),
        ("ctf/bfactor", "<f4"),
        ("ctf/tilt_A", "<f4", (2,)),
        ("ctf/anisomag", "<f4", (4,)),
    ]


def _write_cs(path: Path, rows: np.ndarray) -> None:
    with open(path, "wb") as handle:  # np.save to a .cs name, as cryoSPARC does
        np.save(handle, rows)


def write_cryosparc_project(
    root: Path, data, order: np.ndarray, poses: bool = True, prefix: str = ">"
) -> Path:
    """A cryoSPARC project ``root/P7`` holding ``data``'s noisy images in an extraction job's
    ``.mrc`` stack (J3) and a refinement job's (J9) ``J9_particles.cs`` + passthrough. The
    ``.cs`` rows list the particles in ``order`` (blob/idx points into the stack); the
    passthrough's rows are in another order; blob/path starts with ``prefix`` (cryoSPARC marks
    some paths with ``>``). Returns the ``.cs`` path."""
    project = root / "P7"
    (project / "J3" / "extract").mkdir(parents=True)
    (project / "J9").mkdir()
    stack_rel = "J3/extract/012345678_mic001_particles.mrc"
    with mrcfile.new(project / stack_rel) as mrc:  # a 3-D .mrc, as cryoSPARC extracts
        mrc.set_data(np.asarray(data.noisy_images, np.float32))
        mrc.voxel_size = data.pixel_size
    n = len(order)
    uids = np.random.default_rng(1).integers(1, 2**63, n, dtype=np.uint64)
    # without poses: an extraction's output (locations only)
    main = np.zeros(n, dtype=_MAIN_DTYPE if poses else [("uid", "<u8"), _LOCATION])
    main["uid"] = uids
    if poses:
        main["alignments3D/pose"] = cryosparc_vector(data.rotations[order])
        origin_px = -data.shifts_px[order]  # RELION origin sign: +origin centres the particle
        main["alignments3D/shift"] = origin_px
        main["alignments3D/split"] = np.arange(n) % 2
        main["alignments3D/psize_A"] = data.pixel_size
    pt = np.zeros(n, dtype=_passthrough_dtype(len(stack_rel) + 1))
    shuffle = np.random.default_rng(2).permutation(n)
    p = data.ctf
    pt["uid"] = uids[shuffle]
    pt["blob/path"] = (prefix + stack_rel).encode()
    pt["blob/idx"] = order[shuffle]
    pt["blob/shape"] = data.image_size
    pt["blob/psize_A"] = data.pixel_size
    pt["blob/sign"] = 1.0
    pt["ctf/type"] = b"i"
    pt["ctf/accel_kv"] = p.voltage_kv[order][shuffle]
    pt["ctf/cs_mm"] = p.spherical_aberration_mm[order][shuffle]
    pt["ctf/amp_contrast"] = p.amplitude_contrast[order][shuffle]
    pt["ctf/df1_A"] = p.defocus_u_angstrom[order][shuffle]
    pt["ctf/df2_A"] = p.defocus_v_angstrom[order][shuffle]
    pt["ctf/df_angle_rad"] = np.deg2rad(p.defocus_angle_deg[order][shuffle])
    pt["ctf/scale"] = 1.0
    _write_cs(project / "J9" / "J9_particles.cs", main)
    _write_cs(project / "J9" / "J9_passthrough_particles.cs", pt)
    return project / "J9" / "J9_particles.cs"


def cryosparc_vector(rotations: np.ndarray) -> np.ndarray:
    """cryoSPARC's rotation vectors of poses, made with scipy (independent of the reader):
    ``Rodrigues(v)`` is the pose's transpose (microscope -> volume)."""
    return Rotation.from_matrix(np.swapaxes(rotations, -1, -2)).as_rotvec()


@pytest.fixture(scope="module")
def shifted_ctf_set():
    return simulate_dataset(
        SimulationParameters(
            n_projections=12, image_size=32, seed=6, ctf=True, max_shift_px=2.0, snr=1.0
        ),
        progress=False,
    )


def test_rotation_vectors_are_relion_angles_of_known_particles():
    """(0, π/2, 0) is RELION's tilt 90°; a turn θ about z is rot = θ; random vectors give
    scipy's ``Rodrigues(v)ᵀ``; the round trip holds. Reading ``Rodrigues(v)`` itself (no
    transpose) would be 40°+ off on these particles."""
    poses = np.array([[0.0, np.pi / 2, 0.0], [0.0, 0.0, 0.5]])
    rotations = cryosparc.rotations_from_cryosparc_poses(poses)
    np.testing.assert_allclose(
        rotations[0],
        geometry_rotations.matrices_from_relion_euler(np.array([0.0, 90.0, 0.0])),
        atol=1e-12,
    )
    np.testing.assert_allclose(
        rotations[1],
        geometry_rotations.matrices_from_relion_euler(np.array([np.rad2deg(0.5), 0, 0])),
        atol=1e-12,
    )
    vectors = Rotation.random(50, random_state=3).as_rotvec()
    got = cryosparc.rotations_from_cryosparc_poses(vectors)
    expected = np.swapaxes(Rotation.from_rotvec(vectors).as_matrix(), -1, -2)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    untransposed = Rotation.from_rotvec(vectors).as_matrix()
    assert np.median(geometry_rotations.geodesic_distance_deg(untransposed, expected)) > 40
    np.testing.assert_allclose(
        cryosparc.rotations_from_cryosparc_poses(cryosparc.cryosparc_poses_from_rotations(got)),
        got,
        atol=1e-9,
    )
    half_turn = geometry_rotations.matrices_from_relion_euler(np.array([[30.0, 90.0, 180.0]]))
    back = cryosparc.cryosparc_poses_from_rotations(half_turn)
    np.testing.assert_allclose(cryosparc.rotations_from_cryosparc_poses(back), half_turn, atol=1e-9)


def test_a_cs_file_and_its_passthrough_read_as_the_true_particle_set(tmp_path, shifted_ctf_set):
    """Poses, origins, CTF and images of a .cs file with its passthrough (rows in another
    order, joined by uid) are the simulation's truth; the image of each particle, centred by
    the origin read, matches the CTF-modulated projection at the pose read (a transposed pose
    or an opposite shift sign would not)."""
    data = shifted_ctf_set
    order = np.random.default_rng(0).permutation(len(data))
    cs_path = write_cryosparc_project(tmp_path, data, order)
    pset = read_particle_set(cs_path)
    assert len(pset) == 12 and pset.image_size == 32 and pset.relion_format == "3.1"
    assert pset.pixel_size_angstrom == pytest.approx(data.pixel_size, rel=1e-6)
    errors = geometry_rotations.geodesic_distance_deg(pset.rotations(), data.rotations[order])
    assert errors.max() < 1e-3, errors
    np.testing.assert_allclose(
        pset.origins_angstrom, -data.shifts_px[order] * data.pixel_size, atol=1e-4
    )
    for name in ("defocus_u_angstrom", "defocus_v_angstrom", "defocus_angle_deg", "voltage_kv"):
        np.testing.assert_allclose(
            getattr(pset.ctf, name), getattr(data.ctf, name)[order], rtol=1e-5, atol=1e-3
        )
    with StackReader(pset) as reader:
        images = reader.read(np.arange(12))
    np.testing.assert_array_equal(images, np.asarray(data.noisy_images, np.float32)[order])
    assert list(pset.particles["rlnRandomSubset"]) == [1, 2] * 6
    # by image: centred particle vs the CTF projection at the pose read
    clean = np.asarray(data.clean_images, np.float32)[order]
    shifts = ctf_module.centring_shift_px(pset.origins_angstrom, pset.pixel_size_angstrom)

    def agreement(rotations, shift_sign):
        centred = ctf_module.shift_images(clean, shift_sign * shifts).numpy()
        from cryosphere.imaging.projection import project_volume

        projected = project_volume(data.volume, rotations, progress=False)
        transfer = ctf_module.ctf_2d(pset.ctf, 32, pset.pixel_size_angstrom)
        model = ctf_module.apply_ctf(projected, transfer).numpy()
        a, b = centred.reshape(12, -1), model.reshape(12, -1)
        a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
        return np.sum(a * b, 1) / np.sqrt(np.sum(a * a, 1) * np.sum(b * b, 1))

    right = agreement(pset.rotations(), 1.0)
    assert right.min() > 0.75, right  # the clean images are blurred too: not 1
    for wrong in (
        agreement(np.swapaxes(pset.rotations(), -1, -2), 1.0),  # the pose transposed
        agreement(pset.rotations(), -1.0),  # the shift's sign flipped
    ):
        assert np.all(right > wrong) and np.median(right - wrong) > 0.05, (right, wrong)


def test_blob_paths_resolve_from_the_project_folder_or_are_refused(tmp_path, shifted_ctf_set):
    """An exported .cs file outside the project needs --project-dir; without, the message names
    the places tried and the option. A .cs without blob fields or a non-.cs file is refused."""
    data = shifted_ctf_set
    cs_path = write_cryosparc_project(tmp_path, data, np.arange(12), poses=False, prefix="")
    exported = tmp_path / "exports"
    exported.mkdir()
    for name in ("J9_particles.cs", "J9_passthrough_particles.cs"):
        (exported / name).write_bytes((cs_path.parent / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="--project-dir"):
        read_particle_set(exported / "J9_particles.cs")
    other_job = np.zeros(3, dtype=[("uid", "<u8"), ("blob/idx", "<u4")])  # J8's: not these
    _write_cs(exported / "J8_passthrough_particles.cs", other_job)
    pset = read_particle_set(exported / "J9_particles.cs", project_dir=tmp_path / "P7")
    assert len(pset) == 12 and pset.angles_deg is None
    same_job = exported / "J9_passthrough_particles_copy.cs"
    same_job.write_bytes((exported / "J9_passthrough_particles.cs").read_bytes())
    with pytest.raises(ValueError, match="several passthrough files"):
        read_particle_set(exported / "J9_particles.cs", project_dir=tmp_path / "P7")
    same_job.unlink()
    with pytest.raises(ValueError, match="no rlnAngleRot"):
        pset.rotations()
    (exported / "J9_passthrough_particles.cs").unlink()
    (exported / "J8_passthrough_particles.cs").unlink()
    with pytest.raises(ValueError, match="no blob/path field"):
        read_particle_set(exported / "J9_particles.cs", project_dir=tmp_path / "P7")
    bad = tmp_path / "bad.cs"
    bad.write_text("not numpy")
    with pytest.raises(ValueError, match="not a cryoSPARC .cs file"):
        read_particle_set(bad)


def test_predict_map_on_a_cs_file_finds_pose_and_shift_and_writes_relion_star(
    tmp_path, shifted_ctf_set
):
    """``predict --map`` on shifted, CTF-modulated particles named by a .cs file (no poses in
    it) finds each particle's pose within a level-2 cell and the origin that centres it, and
    writes a RELION STAR file that reads back with its stacks."""
    data = shifted_ctf_set
    cs_path = write_cryosparc_project(tmp_path, data, np.arange(12), poses=False)
    save_dataset(data, tmp_path / "sim")  # for the map
    from cryosphere.imaging import preprocess

    small, _ = preprocess.prepare_images(data.noisy_images, data.pixel_size, target_size=16)
    G = grids.healpix_so3_grid_size(1)
    d = geometry_rotations.geodesic_distance_deg(
        data.rotations[:, None], grids.healpix_so3_grid(1)[None]
    )
    mask = (d <= np.quantile(d, 0.05, axis=1, keepdims=True)).astype(np.float32)
    torch.manual_seed(0)
    checkpoint = fixed_set.train_model(
        small.numpy(), mask, data.rotations, None, TINY,
        settings.TrainingConfig(epochs=1, batch_size=4), run_dir=tmp_path / "run", progress=False,
    ).checkpoint  # fmt: skip
    refine = map_search.MapRefinement(
        tmp_path / "sim" / "volume.mrc", level=2, max_shift_px=2, blur_sigma_px=0.5,
        resolution_angstrom=4 * data.pixel_size,
    )  # fmt: skip
    out = tmp_path / "refined.star"
    inference.predict_star(cs_path, checkpoint, out, top_k=G, progress=False, refine=refine)
    table = starfile.read(out, always_dict=True)
    assert set(table) == {"optics", "particles"}
    got = geometry_rotations.matrices_from_relion_euler(
        table["particles"][["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    )
    errors = geometry_rotations.geodesic_distance_deg(got, data.rotations)
    assert np.median(errors) < grids.grid_nearest_neighbour_spacing_deg(2), errors
    origins = table["particles"][["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
    truth = -data.shifts_px * data.pixel_size
    assert np.median(np.abs(origins - truth)) <= 2 * data.pixel_size
    again = read_particle_set(out)  # a RELION STAR naming the stacks it can find
    assert len(again) == 12 and again.ctf is not None


def test_training_reads_a_cs_refinement_with_its_origins(tmp_path, shifted_ctf_set):
    """``train``'s data from a .cs refinement: particles recentred by the .cs shifts look like
    the map's projections at the .cs poses (better than other particles' poses), contrast
    white."""
    from cryosphere.runs import refinement

    data = shifted_ctf_set
    cs_path = write_cryosparc_project(tmp_path, data, np.arange(12))
    save_dataset(data, tmp_path / "sim")
    prepared = refinement.refinement_data(
        cs_path, tmp_path / "sim" / "volume.mrc", 16, progress=False
    )
    assert prepared.contrast.contrast == "white"

    def corr(a, b):
        a = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(1, keepdims=True)
        b = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(1, keepdims=True)
        return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    matched = corr(prepared.noisy_images, prepared.clean_images)
    shuffled = corr(prepared.noisy_images, np.roll(prepared.clean_images, 1, axis=0))
    assert np.median(matched) > np.median(shuffled) + 0.05, (matched, shuffled)
