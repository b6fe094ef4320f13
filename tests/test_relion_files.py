"""Particle files as RELION 3.0, 3.1 and 5 write them: read with no flags, and a shifted,
CTF-modulated particle of a known pose found at its pose and shift by ``predict --map``.

Files are laid out by :mod:`relion_layouts` from the documented formats. Each case's particles
sit at level-2 grid poses, displaced by whole pixels of the network's box; the network is a
tiny 16-px level-1 model and the map search scores every level-2 cell (all 576 top cells and
their children) with a translation search, so it must find the exact cell and shift.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import relion_layouts as rl
import starfile
import torch

from cryosphere import cli, io
from cryosphere.geometry.grids import healpix_so3_grid, healpix_so3_grid_size
from cryosphere.geometry.rotations import geodesic_distance_deg, matrices_from_relion_euler
from cryosphere.imaging import ctf as ctf_module
from cryosphere.imaging import structure
from cryosphere.imaging.atoms import load_structure
from cryosphere.imaging.particles import StackReader, read_particle_set
from cryosphere.imaging.preprocess import resample_images
from cryosphere.poses.network.model import ModelConfig
from cryosphere.poses.prediction import inference
from cryosphere.poses.search.map_search import MapRefinement
from cryosphere.poses.training import fixed_set, settings

TINY = ModelConfig(
    image_size=16, lmax=2, conv_channels=(4, 4), sphere_channels=4, so3_channels=4, grid_level=1
)
PIXEL = 1.8  # Å, the particles' (32 px) and the map's
CELLS = np.array([123, 2345, 4000])  # level-2 cells of the three particles
SHIFTS = np.array([[4.0, -4.0], [-4.0, 0.0], [0.0, 4.0]])  # px of the 32-px box: 2 of the 16
CTFS = [
    {"defocus_u": 12000.0, "defocus_v": 11000.0, "angle_deg": 30.0},
    {"defocus_u": 18000.0, "defocus_v": 17500.0, "angle_deg": 120.0},
    {"defocus_u": 9000.0, "defocus_v": 8000.0, "angle_deg": 75.0},
]


@pytest.fixture(scope="module")
def ubi():
    atoms = load_structure("1ubi")
    return atoms, structure.coulomb_potential_map(atoms, 32, PIXEL)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An (almost untrained) 16-px level-1 model: the map search does the work."""
    folder = tmp_path_factory.mktemp("model")
    rng = np.random.default_rng(0)
    rotations = healpix_so3_grid(1)[:4]
    mask = np.zeros((4, healpix_so3_grid_size(1)), np.float32)
    mask[np.arange(4), np.arange(4)] = 1
    images = rng.normal(size=(4, 16, 16)).astype(np.float32)
    config = settings.TrainingConfig(epochs=1, batch_size=4)
    return fixed_set.train_model(
        images, mask, rotations, None, TINY, config, run_dir=folder, progress=False
    ).checkpoint


def _search(map_path, max_shift=3.0) -> MapRefinement:
    # every frequency (Nyquist of the 16-px box), every level-2 cell: exhaustive matching
    return MapRefinement(map_path, level=2, max_shift_px=max_shift, resolution_angstrom=4 * PIXEL)


def _predict(star, checkpoint, out, map_path, **kw):
    kw.setdefault("refine", _search(map_path))
    G = healpix_so3_grid_size(1)
    return inference.predict_star(star, checkpoint, out, top_k=G, progress=False, **kw)


def _poses_and_origins(out):
    table = starfile.read(out, always_dict=True)
    particles = table.get("particles", table.get(""))
    angles = particles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    return matrices_from_relion_euler(angles), particles


def _assert_found(out, rotations, shifts_px, pixel=PIXEL, columns=("rlnOriginXAngst", "Å")):
    """Exact level-2 cell; origin −shift (RELION's sign) within a quarter pixel."""
    found, table = _poses_and_origins(out)
    errors = geodesic_distance_deg(found, rotations)
    assert np.all(errors < 1.0), errors
    if columns[1] == "Å":
        origins = table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
        assert "rlnOriginX" not in table
        np.testing.assert_allclose(origins, -shifts_px * pixel, atol=0.25 * pixel)
    else:
        origins = table[["rlnOriginX", "rlnOriginY"]].to_numpy()
        assert "rlnOriginXAngst" not in table  # RELION 3.0's own columns, no stale pair
        np.testing.assert_allclose(origins, -shifts_px, atol=0.25)
    return table


def _optics(pixel=PIXEL, group=1, **extra):
    row = {
        "rlnOpticsGroupName": f"opticsGroup{group}",
        "rlnOpticsGroup": group,
        "rlnMtfFileName": "mtf_k3_300kV.star",
        "rlnMicrographOriginalPixelSize": pixel / 2,
        "rlnVoltage": 300.0,
        "rlnSphericalAberration": 2.7,
        "rlnAmplitudeContrast": 0.1,
        "rlnImagePixelSize": pixel,
        "rlnImageSize": 32,
        "rlnImageDimensionality": 2,
    }
    row.update(extra)
    return {k: v for k, v in row.items() if v is not None}


def _particle_rows(stack, rotations, origins_angstrom, ctfs, group=1):
    rows = []
    for i, (rotation, ctf) in enumerate(zip(rotations, ctfs, strict=True)):
        row = {
            "rlnCoordinateX": 1000.0 + i,
            "rlnCoordinateY": 800.0,
            "rlnImageName": f"{i + 1:06d}@{stack}",
            "rlnMicrographName": "MotionCorr/job002/Movies/x.mrc",
            "rlnOpticsGroup": group,
            **rl.ctf_row(ctf),
            **rl.angles_row(rotation),
            "rlnOriginXAngst": float(origins_angstrom[i, 0]),
            "rlnOriginYAngst": float(origins_angstrom[i, 1]),
            "rlnCtfFigureOfMerit": "-7.04404e-04",  # as written, 6 significant digits
        }
        rows.append(row)
    return rows


def test_relion31_job_folder_with_a_1_angstrom_header(ubi, checkpoint, tmp_path):
    """Refine3D/job045/run_data.star names Extract/job133/Movies/x.mrcs from the project
    folder; the stack header says 1 Å: one warning naming both, the STAR's pixel size used.
    The input origins are half the displacement: predict recentres by them and finds the rest."""
    _, volume = ubi
    project = tmp_path / "project"
    images, rotations = rl.particles(volume, PIXEL, CELLS, SHIFTS, CTFS, seed=1)
    rl.write_stack(project / "Extract/job133/Movies/x.mrcs", images, header_pixel=1.0)
    star = project / "Refine3D/job045/run_data.star"
    input_origins = -SHIFTS / 2 * PIXEL
    rows = _particle_rows("Extract/job133/Movies/x.mrcs", rotations, input_origins, CTFS)
    rl.write_star(
        star, "30001", [rl.loop_block("optics", [_optics()]), rl.loop_block("particles", rows)]
    )
    map_path = project / "Refine3D/job045/run_class001.mrc"
    io.write_map(map_path, volume, PIXEL)
    with pytest.warns(UserWarning) as caught:
        pset = read_particle_set(star)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "1.8 Å" in messages[0] and "says 1 Å" in messages[0]
    assert pset.pixel_size_angstrom == pytest.approx(PIXEL)
    assert pset.stacks == ((project / "Extract/job133/Movies/x.mrcs").resolve(),)
    out = project / "CryoSphere/job001/predicted.star"
    out.parent.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _predict(star, checkpoint, out, map_path)
    table = _assert_found(out, rotations, SHIFTS)
    # untouched columns keep their digits (9 significant), not %.6f's -0.000704
    assert table["rlnCtfFigureOfMerit"].to_numpy()[0] == pytest.approx(-7.04404e-04, rel=1e-9)
    # the output resolves from the project folder too, and an existing output is refused
    assert len(read_particle_set(out, project_dir=project)) == 3
    with pytest.raises(FileExistsError, match="--overwrite"):
        _predict(star, checkpoint, out, map_path)


def test_missing_stack_names_the_places_tried_and_project_dir_finds_it(ubi, tmp_path):
    _, volume = ubi
    images, rotations = rl.particles(volume, PIXEL, CELLS[:1], SHIFTS[:1], CTFS[:1])
    elsewhere = tmp_path / "data"
    rl.write_stack(elsewhere / "Extract/job7/a.mrcs", images, header_pixel=PIXEL)
    star = tmp_path / "jobs/Select/job9/particles.star"
    rows = _particle_rows("Extract/job7/a.mrcs", rotations, np.zeros((1, 2)), CTFS[:1])
    rl.write_star(
        star, "30001", [rl.loop_block("optics", [_optics()]), rl.loop_block("particles", rows)]
    )
    with pytest.raises(FileNotFoundError) as error:
        read_particle_set(star)
    message = str(error.value)
    assert "Extract/job7/a.mrcs" in message and "--project-dir" in message
    assert str(star.parent / "Extract/job7/a.mrcs") in message
    assert str(tmp_path / "jobs/Extract/job7/a.mrcs") in message
    pset = read_particle_set(star, project_dir=elsewhere)
    assert pset.stacks == ((elsewhere / "Extract/job7/a.mrcs").resolve(),)


def test_relion30_file_without_optics_writes_pixel_origins(ubi, checkpoint, tmp_path):
    """RELION 3.0.6: one data_ table, pixel size from detector pixel (µm) and magnification,
    origins rlnOriginX/Y in px; the refined origin goes back in px, no Å columns added."""
    _, volume = ubi
    images, rotations = rl.particles(volume, PIXEL, CELLS, SHIFTS, CTFS, seed=2)
    rl.write_stack(tmp_path / "Particles/Micrographs/m_particles.mrcs", images, 0.0)
    rows = []
    for i, (rotation, ctf) in enumerate(zip(rotations, CTFS, strict=True)):
        rows.append(
            {
                "rlnImageName": f"{i + 1:06d}@Particles/Micrographs/m_particles.mrcs",
                "rlnMicrographName": "Micrographs/m.mrc",
                "rlnVoltage": 300.0,
                "rlnSphericalAberration": 2.7,
                "rlnAmplitudeContrast": 0.1,
                "rlnMagnification": 5e4 / PIXEL,
                "rlnDetectorPixelSize": 5.0,
                **rl.ctf_row(ctf),
                **rl.angles_row(rotation),
                "rlnOriginX": 0.0,
                "rlnOriginY": 0.0,
            }
        )
    star = tmp_path / "Refine3D/run1_data.star"
    rl.write_star(star, "30001", [rl.loop_block("", rows)])
    pset = read_particle_set(star)
    assert pset.relion_format == "3.0" and pset.origin_convention == "pixel"
    assert pset.pixel_size_angstrom == pytest.approx(PIXEL, rel=1e-6)
    io.write_map(tmp_path / "map.mrc", volume, PIXEL)
    out = tmp_path / "Refine3D/predicted.star"
    _predict(star, checkpoint, out, tmp_path / "map.mrc")
    _assert_found(out, rotations, SHIFTS, columns=("rlnOriginX", "px"))


def test_relion5_file_with_a_general_table_and_missing_amplitude_contrast(
    ubi, checkpoint, tmp_path
):
    """RELION 5: data_general before the optics; no rlnAmplitudeContrast: RELION's 0.1 with a
    warning; the general table is written back."""
    _, volume = ubi
    images, rotations = rl.particles(volume, PIXEL, CELLS, SHIFTS, CTFS, seed=3)
    rl.write_stack(tmp_path / "Extract/job012/Movies/y.mrcs", images, PIXEL)
    optics = _optics(rlnAmplitudeContrast=None)
    rows = _particle_rows("Extract/job012/Movies/y.mrcs", rotations, np.zeros((3, 2)), CTFS)
    star = tmp_path / "Class3D/job020/run_it025_data.star"
    general = rl.pair_block("general", {"rlnTomoSubTomosAre2DStacks": 0})
    rl.write_star(
        star,
        "50001",
        [general, rl.loop_block("optics", [optics]), rl.loop_block("particles", rows)],
    )
    with pytest.warns(UserWarning, match="no rlnAmplitudeContrast; using RELION's default 0.1"):
        pset = read_particle_set(star)
    np.testing.assert_allclose(pset.ctf.amplitude_contrast, 0.1)
    io.write_map(tmp_path / "map.mrc", volume, PIXEL)
    out = tmp_path / "predicted.star"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _predict(star, checkpoint, out, tmp_path / "map.mrc")
    _assert_found(out, rotations, SHIFTS)
    assert "general" in starfile.read(out, always_dict=True)


def test_two_optics_groups_of_other_pixel_sizes_and_a_phase_plate(ubi, checkpoint, tmp_path):
    """Group 1: 1.8 Å, a 90° phase shift, B-factor and CTF scale; group 2: 2.2 Å (made from
    a map at 2.2 Å), other defoci. Not merged: group 2 is resampled to 1.8 Å on reading, and
    both are found against the 1.8-Å map."""
    atoms, volume = ubi
    plate = [dict(c, phase_shift_deg=90.0, b_factor=40.0, scale=0.8) for c in CTFS[:2]]
    first, rot1 = rl.particles(volume, PIXEL, CELLS[:2], SHIFTS[:2], plate, seed=4)
    coarse = structure.coulomb_potential_map(atoms, 32, 2.2)
    # defocus small enough for the CTF to be sampled without aliasing in a 58-Å box
    other = [dict(CTFS[2], defocus_u=7000.0, defocus_v=6500.0)]
    moved = SHIFTS[2:] * PIXEL / 2.2  # the same displacement in Å
    second, rot2 = rl.particles(coarse, 2.2, CELLS[2:], moved, other, snr=100.0, seed=5)
    rl.write_stack(tmp_path / "Extract/job3/a.mrcs", first, 1.0)
    rl.write_stack(tmp_path / "Extract/job4/b.mrcs", second, 1.0)
    rows = _particle_rows("Extract/job3/a.mrcs", rot1, np.zeros((2, 2)), plate)
    rows += _particle_rows("Extract/job4/b.mrcs", rot2, np.zeros((1, 2)), other, group=2)
    for row in rows:  # one table for both groups: every column in every row
        row.setdefault("rlnPhaseShift", 0.0)
        row.setdefault("rlnCtfBfactor", 0.0)
        row.setdefault("rlnCtfScalefactor", 1.0)
    optics = [_optics(), _optics(2.2, group=2)]
    star = tmp_path / "Refine3D/job9/run_data.star"
    rl.write_star(
        star, "30001", [rl.loop_block("optics", optics), rl.loop_block("particles", rows)]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pset = read_particle_set(star)
    assert pset.pixel_size_angstrom == pytest.approx(PIXEL)
    np.testing.assert_allclose(pset.particle_pixels(), [PIXEL, PIXEL, 2.2])
    np.testing.assert_allclose(pset.ctf.phase_shift_deg, [90, 90, 0])
    np.testing.assert_allclose(pset.ctf.scale_factor, [0.8, 0.8, 1.0])
    # the group-2 image is read resampled to 1.8 Å: the same centre, a smaller field of view
    with StackReader(pset) as reader:
        read = reader.read(np.array([2]))[0]
    grid_22 = (np.arange(32) - 16) * 2.2
    grid_18 = (np.arange(32) - 16) * PIXEL
    stored = resample_images(second, 2.2, 2.2).numpy()[0]  # band-limited as the reader's
    assert np.abs(stored - second[0]).max() < 0.05 * np.abs(second).max()
    blob = np.exp(-(grid_18[:, None] ** 2 + grid_18[None, :] ** 2) / (2 * 4.0**2))
    seen = resample_images(
        np.exp(-(grid_22[:, None] ** 2 + grid_22[None, :] ** 2) / (2 * 4.0**2))[None], 2.2, PIXEL
    ).numpy()[0]
    assert np.abs(seen - blob).max() < 1e-3  # a 4-Å Gaussian sampled at 2.2 Å, seen at 1.8 Å
    centre = np.unravel_index(np.argmax(np.abs(read)), read.shape)
    assert read.shape == (32, 32) and np.isfinite(read).all() and centre != (0, 0)
    io.write_map(tmp_path / "map.mrc", volume, PIXEL)
    out = tmp_path / "predicted.star"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _predict(star, checkpoint, out, tmp_path / "map.mrc")
    _assert_found(out, np.concatenate([rot1, rot2]), SHIFTS)


def test_predict_map_with_crop_crops_the_map_too(ubi, checkpoint, tmp_path):
    """--crop 24 then the 16-px network: the map is cropped to 24³ as the images are, so its
    templates have the images' 2.7 Å pixel; the pose is found (centred particles)."""
    _, volume = ubi
    near = [dict(c, defocus_u=c["defocus_u"] / 2, defocus_v=c["defocus_v"] / 2) for c in CTFS]
    images, rotations = rl.particles(volume, PIXEL, CELLS, np.zeros((3, 2)), near, seed=6)
    rl.write_stack(tmp_path / "Extract/job1/c.mrcs", images, PIXEL)
    rows = _particle_rows("Extract/job1/c.mrcs", rotations, np.zeros((3, 2)), near)
    star = tmp_path / "Select/job2/particles.star"
    rl.write_star(
        star, "30001", [rl.loop_block("optics", [_optics()]), rl.loop_block("particles", rows)]
    )
    io.write_map(tmp_path / "map.mrc", volume, PIXEL)
    out = tmp_path / "cropped.star"
    refine = MapRefinement(tmp_path / "map.mrc", level=2, resolution_angstrom=2 * 2.7)
    _predict(star, checkpoint, out, tmp_path / "map.mrc", crop_size=24, refine=refine)
    found, _ = _poses_and_origins(out)
    assert np.all(geodesic_distance_deg(found, rotations) < 1.0)


def test_ctf_is_relions_with_phase_shift_bfactor_scale_and_astigmatism_from_x():
    """ctf_2d against RELION's definition written independently (relion_layouts.relion_ctf),
    including a 90° phase shift; without the phase shift half the signs would differ."""
    settings = dict(
        defocus_u=15000.0, defocus_v=13000.0, angle_deg=30.0, amplitude_contrast=0.07,
        phase_shift_deg=90.0, b_factor=60.0, scale=0.8, voltage_kv=200.0, cs_mm=1.4,
    )  # fmt: skip
    params = ctf_module.CTFParameters(
        defocus_u_angstrom=[15000.0], defocus_v_angstrom=[13000.0], defocus_angle_deg=[30.0],
        voltage_kv=[200.0], spherical_aberration_mm=[1.4], amplitude_contrast=[0.07],
        b_factor=[60.0], phase_shift_deg=[90.0], scale_factor=[0.8],
    )  # fmt: skip
    ours = ctf_module.ctf_2d(params, 64, 1.3)[0].double().numpy()
    relion = rl.relion_ctf(64, 1.3, **settings)
    np.testing.assert_allclose(ours, relion, atol=1e-5)
    assert ours[0, 0] == pytest.approx(0.8 * np.cos(np.arcsin(0.07)), rel=1e-6)
    no_plate = rl.relion_ctf(64, 1.3, **dict(settings, phase_shift_deg=0.0))
    assert np.mean(np.sign(no_plate) != np.sign(relion)) > 0.3
    # premultiplied images carry CTF²
    squared = ctf_module.CTFParameters(**{**params.__dict__, "premultiplied": [1.0]})
    np.testing.assert_allclose(
        ctf_module.ctf_2d(squared, 64, 1.3)[0].double().numpy(), relion**2, atol=1e-5
    )


def test_command_line_reads_with_project_dir_pixel_size_and_overwrite(
    ubi, checkpoint, tmp_path, capsys
):
    """predict --datadir, --pixel-size for a STAR file without one (header 0), --overwrite."""
    _, volume = ubi
    images, rotations = rl.particles(volume, PIXEL, CELLS, SHIFTS, CTFS, seed=7)
    rl.write_stack(tmp_path / "raw/Extract/s.mrcs", images, 0.0)
    optics = _optics(rlnImagePixelSize=None)
    rows = _particle_rows("Extract/s.mrcs", rotations, np.zeros((3, 2)), CTFS)
    star = tmp_path / "star/particles.star"
    rl.write_star(
        star, "30001", [rl.loop_block("optics", [optics]), rl.loop_block("particles", rows)]
    )
    io.write_map(tmp_path / "map.mrc", volume, PIXEL)
    out = tmp_path / "star/out.star"
    argv = [
        "predict", str(star), "--checkpoint", str(checkpoint), "-o", str(out), "--no-progress",
        "--map", str(tmp_path / "map.mrc"), "--search-level", "2", "--max-shift", "3",
        "--top-k", "576", "--resolution", str(4 * PIXEL), "--workers", "0",
    ]  # fmt: skip
    assert cli.main(argv) == 2  # no pixel size anywhere, and no stack beside the STAR file
    assert "Extract/s.mrcs" in capsys.readouterr().err
    assert cli.main([*argv, "--datadir", str(tmp_path / "raw")]) == 2
    assert "--pixel-size" in capsys.readouterr().err
    reading = ["--datadir", str(tmp_path / "raw"), "--pixel-size", str(PIXEL)]
    assert cli.main([*argv, *reading]) == 0
    _assert_found(out, rotations, SHIFTS)
    assert cli.main([*argv, *reading]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main([*argv, *reading, "--overwrite"]) == 0
    torch.set_num_threads(torch.get_num_threads())  # the CLI leaves torch as it found it


def test_the_phase_shift_reaches_the_wiener_reconstruction(ubi):
    """Phase-plate particles (ψ = 90°) reconstructed with the CTF read from their STAR columns
    match the map; with ψ dropped the CTF's sign is wrong on many shells and the map is worse."""
    from cryosphere.reconstruction import backprojection

    _, volume = ubi
    rng = np.random.default_rng(9)
    cells = rng.choice(healpix_so3_grid_size(2), 150, replace=False)
    defoci = rng.uniform(6000, 12000, 150)
    ctfs = [
        {"defocus_u": d, "defocus_v": d - 300, "angle_deg": 20.0, "phase_shift_deg": 90.0}
        for d in defoci
    ]
    images, poses = rl.particles(volume, PIXEL, cells, np.zeros((150, 2)), ctfs, snr=10.0)
    plate = ctf_module.CTFParameters(
        defocus_u_angstrom=defoci, defocus_v_angstrom=defoci - 300, defocus_angle_deg=20.0,
        voltage_kv=300.0, spherical_aberration_mm=2.7, amplitude_contrast=0.1, b_factor=0.0,
        phase_shift_deg=90.0,
    )  # fmt: skip
    without = ctf_module.CTFParameters(**{**plate.__dict__, "phase_shift_deg": 0.0})

    def correlation(ctf):
        got = backprojection.reconstruct(
            images, poses, regularisation=0.1, ctf=ctf, pixel_size_angstrom=PIXEL
        ).volume.numpy()
        return np.corrcoef(got.ravel(), volume.ravel())[0, 1]

    with_plate, ignored = correlation(plate), correlation(without)
    # measured: 0.69 with the phase shift, 0.35 without it
    assert with_plate > 0.6 and with_plate > ignored + 0.2, (with_plate, ignored)
