"""The run machinery on two tiny notebooks (fast), and the real series' parameter cells."""

from __future__ import annotations

import json

import nbformat
import pytest

from cryosphere import cli
from cryosphere.runs import execution, run_config


@pytest.fixture
def tiny_series(tmp_path, write_notebook):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    write_notebook(
        folder / "01_first.ipynb",
        'run_dir = "x"\nstructure = "1ubi"\nn_projections = 3',
        "from cryosphere.runs import execution\nexecution.record_results(run_dir, '01_first', {'n': n_projections * 2})",
    )
    write_notebook(
        folder / "02_second.ipynb",
        'run_dir = "x"\nepochs = 1\nfail = False',
        "assert not fail, 'asked to fail'\nprint(epochs)",
    )
    return folder


def test_plan_passes_each_notebook_only_its_parameters(tiny_series, tmp_path):
    plan = execution.plan_run(
        "quick", overrides={"epochs": 7}, runs_root=tmp_path / "runs", notebooks_dir=tiny_series
    )
    assert (
        plan.notebook_parameters["01_first"]["n_projections"]
        == execution.PROFILES["quick"]["n_projections"]
    )
    assert "epochs" not in plan.notebook_parameters["01_first"]
    assert plan.notebook_parameters["02_second"] == {"run_dir": str(plan.run_dir), "epochs": 7}
    assert plan.run_dir.name == "1ubi-quick"


def test_execute_writes_notebooks_summary_and_skips_on_rerun(tiny_series, tmp_path):
    plan = execution.plan_run("quick", runs_root=tmp_path / "runs", notebooks_dir=tiny_series)
    summary = execution.execute_run(plan, progress=False, log=lambda _: None)
    assert summary["results"]["01_first"] == {"n": 2 * execution.PROFILES["quick"]["n_projections"]}
    assert set(summary["timings_s"]) == {"01_first", "02_second"}
    assert json.loads((plan.run_dir / "summary.json").read_text()) == summary
    assert (plan.run_dir / "notebooks" / "02_second.ipynb").is_file()
    messages = []
    execution.execute_run(
        execution.plan_run("quick", runs_root=tmp_path / "runs", notebooks_dir=tiny_series),
        progress=False,
        log=messages.append,
    )
    assert sum("skipped" in m for m in messages) == 2


def test_failed_step_names_the_notebook_and_cell(tiny_series, tmp_path):
    plan = execution.plan_run(
        "quick", overrides={"fail": True}, runs_root=tmp_path / "runs", notebooks_dir=tiny_series
    )
    with pytest.raises(
        execution.RunStepError,
        match=r"02_second failed in cell \d+ \(AssertionError: asked to fail",
    ):
        execution.execute_run(plan, progress=False, log=lambda _: None)


def test_bad_input_is_refused_before_any_work(tiny_series, tmp_path):
    root = tmp_path / "runs"
    with pytest.raises(ValueError, match="unknown profile"):
        execution.plan_run("huge", runs_root=root, notebooks_dir=tiny_series)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['epoch'\]"):
        execution.plan_run(
            "quick", overrides={"epoch": 3}, runs_root=root, notebooks_dir=tiny_series
        )
    with pytest.raises(FileNotFoundError, match="neither an embedded name"):
        execution.plan_run(
            "quick",
            structure=str(tmp_path / "missing.pdb"),
            runs_root=root,
            notebooks_dir=tiny_series,
        )
    assert not root.exists()
    plan = execution.plan_run("quick", runs_root=root, notebooks_dir=tiny_series)
    execution.execute_run(plan, progress=False, log=lambda _: None)
    with pytest.raises(FileExistsError, match="another run's data"):
        execution.plan_run(
            "paper", name=plan.run_dir.name, runs_root=root, notebooks_dir=tiny_series
        )
    execution.plan_run(
        "paper", name=plan.run_dir.name, runs_root=root, notebooks_dir=tiny_series, overwrite=True
    )


def test_cli_reports_bad_input_with_exit_status_2(tiny_series, tmp_path, capsys):
    status = cli.main(
        ["run", "--profile", "nope", "--notebooks", str(tiny_series), "--runs-root", str(tmp_path)]
    )
    assert status == 2
    assert "unknown profile" in capsys.readouterr().err
    assert cli.main(["profiles"]) == 0


def test_cli_parses_parameter_values():
    assert cli._parse_value("3") == 3
    assert cli._parse_value("[50, 100]") == [50, 100]
    assert cli._parse_value("None") is None
    assert cli._parse_value("1hvr") == "1hvr"


def test_series_notebooks_share_parameter_defaults_and_are_committed_clean():
    """Shared names have one default across notebooks, so any notebook reuses the run folder."""
    defaults: dict[str, tuple[str, object]] = {}
    notebooks = execution.series_notebooks()
    assert notebooks[0].name == "01_simulate.ipynb"
    for path in notebooks:
        notebook = nbformat.read(path, as_version=4)
        tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
        code = [c for c in notebook.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), (
            f"{path.name} has outputs"
        )
        assert not any(
            line.lstrip().startswith("def ") for c in code for line in c.source.splitlines()
        )
        for name, value in execution.notebook_parameters(path).items():
            if name in defaults:
                first, expected = defaults[name]
                assert value == expected, (
                    f"{name}: {path.name} says {value!r}, {first} says {expected!r}"
                )
            else:
                defaults[name] = (path.name, value)


def test_every_notebook_takes_the_ctf_parameters_off_by_default_and_in_every_profile(tmp_path):
    """CTF and shifts are RunConfig fields (``-p ctf True`` reaches notebook 01 through
    ``config``); no profile turns them on (paper: the poster had none)."""
    from cryosphere.runs.run_config import RunConfig

    names = ["ctf", "defocus_min_angstrom", "defocus_max_angstrom", "max_astigmatism_angstrom"]
    names += ["voltage_kv", "spherical_aberration_mm", "amplitude_contrast", "ctf_b_factor"]
    names += ["max_shift_px"]
    for profile in execution.PROFILES:
        simulation = RunConfig.from_profile(profile).simulation
        assert simulation.ctf is False and simulation.max_shift_px == 0.0
        assert (simulation.defocus_min_angstrom, simulation.defocus_max_angstrom) == (5e3, 25e3)
    path = next(p for p in execution.series_notebooks() if p.name == "01_simulate.ipynb")
    assert {"profile", "config"} <= set(execution.notebook_parameters(path))
    plan = execution.plan_run(
        "quick", overrides={"ctf": True, "max_shift_px": 2.0}, runs_root=tmp_path, name="ctf"
    )
    passed = plan.notebook_parameters["01_simulate"]["config"]
    assert passed["ctf"] is True and passed["max_shift_px"] == 2.0
    assert set(names) <= set(run_config.FLAT_FIELDS)
