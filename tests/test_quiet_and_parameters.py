"""Parameters people type with papermill, and runs whose output has no kernel ERROR line."""

from __future__ import annotations

import json

import pytest

from cryosphere.runs import execution, reproducibility, run_config
from cryosphere.runs.run_config import RunConfig

# a handler that lingers after its reply: what a loaded machine does to papermill's last
# request (kernel_info) while the kernel is being shut down
LINGERING_KERNEL_INFO = """import inspect, time
kernel = get_ipython().kernel
reply_to_kernel_info = kernel.shell_handlers["kernel_info_request"]
async def reply_then_linger(*args):
    result = reply_to_kernel_info(*args)
    if inspect.isawaitable(result):
        await result
    time.sleep(2)
kernel.shell_handlers["kernel_info_request"] = reply_then_linger
print("cells done")"""


def test_a_successful_run_prints_no_kernel_error(tmp_path, write_notebook, capfd):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    write_notebook(folder / "01_only.ipynb", 'run_dir = "x"', LINGERING_KERNEL_INFO)
    plan = execution.plan_run("tiny", runs_root=tmp_path / "runs", notebooks_dir=folder)
    execution.execute_run(plan, progress=False, log=print)
    captured = capfd.readouterr()
    output = captured.out + captured.err
    assert "01_only finished" in output
    assert not [line for line in output.splitlines() if "ERROR" in line or "Traceback" in line]


def test_flat_variables_merge_into_the_config():
    import numpy  # a module under a flat name's spelling is no parameter

    config = RunConfig.from_notebook(
        "tiny", {"epochs": 5}, {"snr": 0.1, "n_projections": 20, "seed": 4, "ctf": numpy}
    )
    assert config.simulation.snr == 0.1 and config.simulation.n_projections == 20
    assert config.training.epochs == 5 and config.training.seed == 4
    assert config.simulation.image_size == execution.PROFILES["tiny"]["image_size"]
    assert config == RunConfig.from_profile(
        "tiny", {"epochs": 5, "snr": 0.1, "n_projections": 20, "seed": 4}
    )


def test_flat_variables_that_cannot_be_meant_are_refused():
    with pytest.raises(ValueError, match=r"did you mean n_projections \(papermill -p n_proj"):
        RunConfig.from_notebook("tiny", {}, {"n_projection": 20})
    with pytest.raises(ValueError, match="given twice with different values"):
        RunConfig.from_notebook("tiny", {"snr": 0.2}, {"snr": 0.1})
    with pytest.raises(ValueError, match=r"config must be a dict .*-p snr 0.1"):
        RunConfig.from_notebook("tiny", "snr=0.1", {})
    with pytest.raises(ValueError, match="unknown run parameter"):
        RunConfig.from_notebook("tiny", {"snr_db": 3}, {})


def test_papermill_flat_parameter_reaches_the_series_notebook(tmp_path, write_notebook):
    """``papermill NB OUT -p snr 0.1 -p n_projections 20`` on a notebook with the series'
    parameter cell and its RunConfig line."""
    import papermill

    source = tmp_path / "01_config.ipynb"
    write_notebook(
        source,
        'run_dir = "x"\nprofile = "tiny"\nconfig = {}',
        "from cryosphere.runs import execution, run_config\n"
        "c = run_config.RunConfig.from_notebook(profile, config, globals())\n"
        "execution.record_results(run_dir, 'c', {'snr': c.simulation.snr, "
        "'n': c.simulation.n_projections, 'epochs': c.training.epochs})",
    )
    run_dir = tmp_path / "run"
    papermill.execute_notebook(
        str(source),
        str(tmp_path / "out.ipynb"),
        parameters={"run_dir": str(run_dir), "snr": 0.1, "n_projections": 20},
        progress_bar=False,
        kernel_manager_class=reproducibility.kernel_manager_class(),
    )
    recorded = json.loads((run_dir / "results" / "c.json").read_text())
    assert recorded == {"snr": 0.1, "n": 20, "epochs": execution.PROFILES["tiny"]["epochs"]}


def test_every_series_notebook_builds_its_config_with_from_notebook():
    for notebook in execution.series_notebooks():
        text = notebook.read_text()
        assert "RunConfig.from_notebook(profile, config, globals())" in text, notebook.name
        assert "RunConfig.from_profile(" not in text, notebook.name
    assert run_config.RunConfig is RunConfig
