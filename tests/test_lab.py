"""``make lab``: its command starts a JupyterLab that answers and lists the notebook series."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lab_server import lab_server

from cryosphere.runs import execution, lab

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("jupyterlab", reason="JupyterLab is in the notebooks extra")


def test_make_lab_runs_the_lab_module():
    if shutil.which("make") is None:
        pytest.skip("GNU make is not installed")
    printed = subprocess.run(
        ["make", "--no-print-directory", "-n", "-o", ".venv/.cryosphere-installed", "lab"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # (under ``make test`` this is a sub-make: no directory lines, the command is the last line)
    assert "-m cryosphere.runs.lab" in printed.strip().splitlines()[-1]


def test_lab_command_uses_this_interpreter_and_the_notebooks_folder(tmp_path):
    command = lab.lab_command(tmp_path, ["--port", "9"])
    assert command[:3] == [sys.executable, "-m", "jupyterlab"]
    assert f"--ServerApp.root_dir={tmp_path.resolve()}" in command
    assert command[-2:] == ["--port", "9"]
    env = lab.lab_environment({"JUPYTER_PATH": "/elsewhere"})
    assert env["JUPYTER_PATH"].split(":") == [f"{sys.prefix}/share/jupyter", "/elsewhere"]


def test_lab_server_answers_and_lists_the_notebooks(tmp_path):
    with lab_server(tmp_path / "jupyter") as server:
        listing = server.get_json("/api/contents/")
        names = {item["name"] for item in listing["content"] if item["type"] == "notebook"}
        specs = server.get_json("/api/kernelspecs")
    expected = {path.name for path in execution.series_notebooks()}
    assert expected <= names
    assert specs["default"] == "python3"
    argv = specs["kernelspecs"]["python3"]["spec"]["argv"]
    # the spec of this environment ("python" is replaced by the server's own interpreter)
    assert argv[0] in ("python", sys.executable)
    assert (ROOT / "runs").is_dir()
