"""Bad input, one case per test: each gets a clear message, and no run folder is half-written.

Every bad file is made here, inside ``tmp_path``. Cases that go through ``cryosphere run`` use
:func:`runs.plan_run` / :func:`runs.execute_run` (the CLI's calls) and check that the runs folder
is left as it was.
"""

from __future__ import annotations

import errno
import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from conftest import train_tiny_run

from cryosphere import cli, io
from cryosphere.imaging import atoms as imaging_atoms
from cryosphere.imaging import structure
from cryosphere.imaging.datasets import SimulationParameters
from cryosphere.imaging.simulate import load_or_simulate
from cryosphere.poses.labels import dataset_labels, soft_maps, templates
from cryosphere.poses.network import checkpoints
from cryosphere.poses.network.model import ModelConfig
from cryosphere.poses.training import settings
from cryosphere.runs import checks, execution

ONE_ATOM = "ATOM      1  CA  ALA A   1      11.104   6.134  -6.504  1.00  0.00           C\n"


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (what must not change)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _refused_before_any_work(tmp_path, match, error=ValueError, **plan):
    root = tmp_path / "runs"
    with pytest.raises(error, match=match):
        execution.plan_run(runs_root=root, **plan)
    assert not root.exists()


def _pdb(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------------------ structures


def test_missing_structure_file(tmp_path):
    _refused_before_any_work(
        tmp_path,
        "neither an embedded name",
        FileNotFoundError,
        structure=str(tmp_path / "absent.pdb"),
    )


def test_empty_structure_file(tmp_path):
    path = _pdb(tmp_path, "empty.pdb", "")
    _refused_before_any_work(tmp_path, "contains no atomic model", structure=path)


def test_garbage_structure_file(tmp_path):
    path = tmp_path / "noise.cif"
    path.write_bytes(np.random.default_rng(0).bytes(4000))
    _refused_before_any_work(tmp_path, "cannot parse .* truncated or damaged", structure=str(path))


def test_pdb_with_only_waters(tmp_path):
    text = "".join(
        f"HETATM{i:5d}  O   HOH A{100 + i:4d}    {10.0 + 3 * i:8.3f}  10.000  10.000  1.00 20.00"
        "           O\n"
        for i in range(1, 4)
    )
    path = _pdb(tmp_path, "waters.pdb", text + "END\n")
    _refused_before_any_work(tmp_path, "no atoms left .* removing waters, ligands", structure=path)


def test_pdb_with_only_ligands(tmp_path):
    atoms = [("C1", 10.0, 10.0, 10.0), ("C2", 11.5, 10.0, 10.0), ("O3", 12.0, 11.3, 10.0)]
    text = "".join(
        f"HETATM{i:5d}  {name:<3} LIG A 201    {x:8.3f}{y:8.3f}{z:8.3f}  1.00 20.00"
        f"           {name[0]}\n"
        for i, (name, x, y, z) in enumerate(atoms, start=1)
    )
    path = _pdb(tmp_path, "ligand.pdb", text + "END\n")
    _refused_before_any_work(tmp_path, "keep_ligands=True", structure=path)


def test_truncated_mmcif(tmp_path):
    text = gzip.decompress(imaging_atoms.embedded_structure_path("5pti").read_bytes()).decode()
    path = _pdb(tmp_path, "5pti_cut.cif", text[: len(text) // 2])  # cut inside the atom loop
    _refused_before_any_work(tmp_path, "cannot parse .* truncated or damaged", structure=path)


def test_structure_with_one_atom(tmp_path):
    path = _pdb(tmp_path, "one.pdb", ONE_ATOM + "END\n")
    _refused_before_any_work(tmp_path, r"1 atom\(s\).*poses are undefined", structure=path)
    with pytest.raises(ValueError, match="poses are undefined"):  # and for the library call
        load_or_simulate(tmp_path / "ds", SimulationParameters(structure=path), progress=False)
    assert not (tmp_path / "ds").exists()


def test_structure_with_atoms_on_one_line(tmp_path):
    text = "".join(
        f"ATOM  {i:5d}  CA  ALA A{i:4d}    {1.5 * i:8.3f}   0.000   0.000  1.00  0.00           C\n"
        for i in range(1, 6)
    )
    path = _pdb(tmp_path, "line.pdb", text + "END\n")
    _refused_before_any_work(tmp_path, "on one line", structure=path)


def test_very_large_assembly_is_refused_above_the_atom_limit(tmp_path, monkeypatch):
    # the limit stays above a ribosome (~150,000 heavy atoms); checked here on 1UBI (602
    # atoms) with the limit lowered, which exercises the same code path in milliseconds
    assert structure.MAX_ATOMS >= 150_000
    path = _pdb(tmp_path, "ubi.pdb", imaging_atoms.embedded_structure_path("1ubi").read_text())
    monkeypatch.setattr(structure, "MAX_ATOMS", 500)
    _refused_before_any_work(tmp_path, "602 atoms, more than CryoSphere images", structure=path)


# ------------------------------------------------------------------------------ parameters

BAD_PARAMETERS = [
    ("image_size", 47, "image_size = 47 .*even integer"),
    ("image_size", 8, "image_size = 8 .*in 16..512"),
    ("image_size", "64", "image_size = '64' .*integer"),
    ("image_size", 64.0, "image_size = 64.0 .*integer"),
    ("snr", 0, r"snr = 0 .*\(0, inf\)"),
    ("snr", -1.0, "snr = -1.0"),
    ("snr", math.nan, "snr = nan .*finite"),
    ("snr", "high", "snr = 'high'"),
    ("n_projections", 0, "n_projections = 0 .*>= 2"),
    ("epochs", -1, "epochs = -1 .*>= 1"),
    ("q", 0.0, r"q = 0.0 .*\(0, 1\]"),
    ("q", 1.5, r"q = 1.5 .*\(0, 1\]"),
    ("lam", 0.0, "lam = 0.0 .*None or"),
    ("lam", -2.0, "lam = -2.0"),
    ("learning_rate", math.inf, "learning_rate = inf"),
    ("grid_level", 4, "grid_level = 4 .*0..3"),
    ("lmax", 0, "lmax = 0"),
    ("batch_size", 0, "batch_size = 0"),
    ("blur_sigma", -1.0, r"blur_sigma = -1.0 .*\[0, inf\)"),
    ("seed", -1, "seed = -1"),
    ("sweep_counts", [50, 0], r"sweep_counts = \[50, 0\] .*each an integer >= 2"),
    ("snr_levels", [], "snr_levels = \\[\\] .*non-empty list"),
    ("loss", "mse", "loss = 'mse' .*one of"),
    ("image_index", 500, "image_index = 500 .*< n_projections"),
]


@pytest.mark.parametrize(("name", "value", "match"), BAD_PARAMETERS)
def test_bad_profile_parameter_is_refused_before_any_work(tmp_path, name, value, match):
    _refused_before_any_work(tmp_path, match, overrides={name: value})


def test_every_bad_value_is_listed_at_once(tmp_path):
    _refused_before_any_work(
        tmp_path, "snr = 0 .*; epochs = -1 .*Fix them with -p", overrides={"snr": 0, "epochs": -1}
    )


def test_cli_bad_parameter_exits_2_with_the_message(tmp_path, capsys):
    status = cli.main(["run", "--runs-root", str(tmp_path / "runs"), "-p", "snr", "0"])
    assert status == 2
    assert "snr = 0 (must be a finite number in (0, inf))" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"image_size": 8}, ValueError, "at least 16"),
        ({"image_size": "64"}, TypeError, "image_size must be an integer"),
        ({"n_projections": 2.5}, TypeError, "n_projections must be an integer"),
        ({"n_projections": 0}, ValueError, "n_projections must be >= 1"),
        ({"snr": 0.0}, ValueError, "snr must be a positive number"),
        ({"snr": math.nan}, ValueError, "snr must be a positive number"),
        ({"snr": "1"}, TypeError, "snr must be a number"),
        ({"pixel_size": math.inf}, ValueError, "pixel_size must be a finite"),
    ],
)
def test_simulation_parameters_refuse_bad_values(fields, error, match):
    with pytest.raises(error, match=match):
        SimulationParameters(**fields)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: settings.TrainingConfig(epochs=-1), "epochs must be >= 0"),
        (lambda: settings.TrainingConfig(learning_rate=0.0), "learning_rate must be > 0"),
        (lambda: settings.TrainingConfig(learning_rate=math.nan), "learning_rate must be > 0"),
        (lambda: ModelConfig(lmax=0), "lmax must be in"),
        (lambda: soft_maps.top_fraction_mask(np.zeros((1, 72)), 0.0), "q"),
        (lambda: soft_maps.top_fraction_mask(np.zeros((1, 72)), 1.01), "q"),
        (lambda: soft_maps.soft_labels(np.zeros((1, 72)), 0.0), "λ"),
        (lambda: soft_maps.soft_labels(np.zeros((1, 72)), -1.0), "λ"),
    ],
)
def test_config_objects_refuse_bad_values(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ------------------------------------------------------------------------------ run folders


@pytest.mark.parametrize("name", ["../escape", "..", "/tmp/elsewhere", "a/b", "~user"])
def test_run_name_must_be_a_plain_folder_name(tmp_path, name):
    _refused_before_any_work(tmp_path, "must be a plain folder name", name=name)
    assert not (tmp_path / "escape").exists()


def test_read_only_runs_folder(tmp_path, monkeypatch, capsys, write_tiny_series):
    root = tmp_path / "runs"
    root.mkdir()
    root.chmod(0o555)
    if os.geteuid() == 0:  # root ignores permission bits: refuse as the OS would for a user
        real_mkdir = Path.mkdir

        def refusing_mkdir(self, *args, **kwargs):
            if root in self.parents:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", refusing_mkdir)
    notebooks = write_tiny_series(tmp_path / "nb")
    argv = ["run", "--runs-root", str(root), "--notebooks", str(notebooks), "--no-progress"]
    assert cli.main(argv) == 2
    assert "make the runs folder writable or choose another with --runs-root" in (
        capsys.readouterr().err
    )
    root.chmod(0o755)
    assert list(root.iterdir()) == []


def test_two_runs_into_one_folder_at_once_are_refused(tmp_path, write_tiny_series):
    plan = execution.plan_run(
        "quick", runs_root=tmp_path / "runs", notebooks_dir=write_tiny_series(tmp_path)
    )
    execution.execute_run(plan, progress=False, log=lambda _: None)
    before = _tree(plan.run_dir)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = plan.run_dir / checks.LOCK_FILE
        lock.write_text(f"{checks.socket.gethostname()} {holder.pid}\n")
        with pytest.raises(checks.RunLockedError, match=f"in use by another run .*{holder.pid}"):
            execution.execute_run(plan, overwrite=True, progress=False, log=lambda _: None)
        assert _tree(plan.run_dir) == {**before, checks.LOCK_FILE: lock.read_bytes()}
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and the next run takes it over, then removes it
    execution.execute_run(plan, progress=False, log=lambda _: None)
    assert not (plan.run_dir / checks.LOCK_FILE).exists()


# ------------------------------------------------------------------------------ files


def test_truncated_mrcs_stack(tmp_path):
    path = io.write_stack(tmp_path / "s.mrcs", np.ones((4, 16, 16), np.float32), 1.5)
    data = path.read_bytes()
    path.write_bytes(data[:-300])
    with pytest.raises(ValueError, match=r"s.mrcs is not a readable MRC file: .*bytes"):
        io.read_stack(path)


def test_truncated_mrc_map_header(tmp_path):
    path = io.write_map(tmp_path / "v.mrc", np.ones((16, 16, 16), np.float32), 1.5)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match="v.mrc is not a readable MRC file: .*header"):
        io.read_map(path)


def test_truncated_stack_in_a_run_folder(tmp_path):
    params = SimulationParameters(n_projections=4, image_size=16, seed=1)
    load_or_simulate(tmp_path, params, progress=False)
    stack = tmp_path / "particles.mrcs"
    stack.write_bytes(stack.read_bytes()[:-1000])
    kept = _tree(tmp_path)
    with pytest.raises(ValueError, match="damaged dataset .*particles.mrcs.*overwrite=True"):
        load_or_simulate(tmp_path, params, progress=False)
    assert _tree(tmp_path) == kept  # nothing overwritten behind the user's back


def test_nan_in_a_map(tmp_path):
    volume = np.ones((16, 16, 16), np.float32)
    volume[3, 4, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        io.write_map(tmp_path / "nan.mrc", volume, 1.0)
    assert list(tmp_path.iterdir()) == []
    with pytest.warns(RuntimeWarning, match="NaN"), mrcfile.new(tmp_path / "nan.mrc") as mrc:
        mrc.set_data(volume)  # a map made by another program
    with pytest.raises(ValueError, match="nan.mrc holds NaN"):
        io.read_map(tmp_path / "nan.mrc")


def test_nan_in_a_stack(tmp_path):
    images = np.ones((2, 16, 16), np.float32)
    images[1, 0, 0] = np.nan
    with pytest.warns(RuntimeWarning, match="NaN"), mrcfile.new(tmp_path / "nan.mrcs") as mrc:
        mrc.set_data(images)
    with pytest.raises(ValueError, match="nan.mrcs holds NaN"):
        io.read_stack(tmp_path / "nan.mrcs")


def _star(tmp_path, particles):
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [1.5], "rlnImageSize": [16]})
    path = tmp_path / "p.star"
    starfile.write({"optics": optics, "particles": particles}, path)
    return path


def test_star_missing_angle_columns(tmp_path):
    path = _star(tmp_path, pd.DataFrame({"rlnImageName": ["1@s.mrcs"], "rlnAngleRot": [10.0]}))
    with pytest.raises(ValueError, match="no rlnAngleTilt, rlnAnglePsi column"):
        io.read_particles_star(path)


def test_star_non_numeric_angles(tmp_path):
    particles = pd.DataFrame(
        {
            "rlnImageName": ["1@s.mrcs", "2@s.mrcs"],
            "rlnAngleRot": ["10.0", "abc"],
            "rlnAngleTilt": ["20.0", "30.0"],
            "rlnAnglePsi": ["0.0", "5.0"],
        }
    )
    with pytest.raises(ValueError, match=r"not finite numbers, the first is row 2 .*'abc'"):
        io.read_particles_star(_star(tmp_path, particles))


# ------------------------------------------------------------------------------ caches


def test_truncated_labels_npz_is_recomputed(tmp_path, small_dataset):
    made = dataset_labels.load_or_make_labels(tmp_path, small_dataset, level=1, progress=False)
    npz = tmp_path / "labels" / "labels.npz"
    npz.write_bytes(npz.read_bytes()[:2000])
    with pytest.warns(RuntimeWarning, match="labels.npz is damaged .*recomputing"):
        again = dataset_labels.load_or_make_labels(tmp_path, small_dataset, level=1, progress=False)
    # the same computation on the same inputs and threads repeats exactly
    np.testing.assert_array_equal(again.mse, made.mse)
    with np.load(npz) as data:  # rewritten whole
        np.testing.assert_array_equal(data["mask"], made.mask)


def test_labels_npz_of_the_wrong_shape_is_recomputed(tmp_path, small_dataset):
    dataset_labels.load_or_make_labels(tmp_path, small_dataset, level=1, progress=False)
    npz = tmp_path / "labels" / "labels.npz"
    io.write_npz(npz, mse=np.zeros((3, 3), np.float32), mask=np.zeros((3, 3), bool), lam=1.0)
    with pytest.warns(RuntimeWarning, match="does not hold the recorded arrays"):
        again = dataset_labels.load_or_make_labels(tmp_path, small_dataset, level=1, progress=False)
    assert again.mse.shape == (len(small_dataset), 576)


def test_truncated_template_cache_is_recomputed(tmp_path, ubi_map_32):
    volume, pixel = ubi_map_32
    first = templates.template_bank(volume, 1, 1.0, pixel_size=pixel, cache_dir=tmp_path)
    cache = tmp_path / "templates_L1.npy"
    cache.write_bytes(cache.read_bytes()[:5000])
    with pytest.warns(RuntimeWarning, match="templates_L1.npy is damaged"):
        again = templates.template_bank(volume, 1, 1.0, pixel_size=pixel, cache_dir=tmp_path)
    np.testing.assert_array_equal(again, first)


def test_garbage_labels_record_is_recomputed(tmp_path, small_dataset):
    dataset_labels.load_or_make_labels(tmp_path, small_dataset, level=1, progress=False)
    (tmp_path / "labels" / "labels.json").write_text('{"parameters": {"lev')
    with pytest.warns(RuntimeWarning, match="labels.json is not valid JSON"):
        dataset_labels.load_or_make_labels(tmp_path, small_dataset, level=1, progress=False)
    assert json.loads((tmp_path / "labels" / "labels.json").read_text())["parameters"]


def test_truncated_checkpoint_stops_clearly_and_is_kept(tmp_path, tiny_run):
    train_tiny_run(tmp_path, progress=False, **tiny_run)
    checkpoint = checkpoints.checkpoint_path(tmp_path)
    checkpoint.write_bytes(checkpoint.read_bytes()[:3000])
    damaged = checkpoint.read_bytes()
    with pytest.raises(ValueError, match="checkpoint.pt is not a readable CryoSphere checkpoint"):
        train_tiny_run(tmp_path, progress=False, **tiny_run)
    assert checkpoint.read_bytes() == damaged  # kept for the user to inspect or delete


def test_damaged_steps_record_stops_the_run_clearly(tmp_path, write_tiny_series):
    plan = execution.plan_run(
        "quick", runs_root=tmp_path / "runs", notebooks_dir=write_tiny_series(tmp_path)
    )
    execution.execute_run(plan, progress=False, log=lambda _: None)
    (plan.run_dir / "steps.json").write_text('{"01_first": {"param')
    with pytest.raises(ValueError, match="steps.json is not valid JSON .*--overwrite"):
        execution.execute_run(plan, progress=False, log=lambda _: None)
    assert not (plan.run_dir / checks.LOCK_FILE).exists()  # the lock went with the error


def test_damaged_step_results_rerun_that_step(tmp_path, write_tiny_series):
    plan = execution.plan_run(
        "quick", runs_root=tmp_path / "runs", notebooks_dir=write_tiny_series(tmp_path)
    )
    first = execution.execute_run(plan, progress=False, log=lambda _: None)
    (plan.run_dir / "results" / "01_first.json").write_text('{"n": 4')
    messages = []
    again = execution.execute_run(plan, progress=False, log=messages.append)
    assert any("01_first.json is damaged: step 01_first runs again" in m for m in messages)
    assert sum("skipped" in m for m in messages) == 1  # only 02_second
    assert again["results"] == first["results"]
