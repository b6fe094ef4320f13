"""environment.yml mirrors pyproject.toml; the console command is declared."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONDA_NAMES = {"torch": "pytorch", "kaleido": "python-kaleido"}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_environment_yml_lists_every_pyproject_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _names(project["dependencies"])
    for requirements in project["optional-dependencies"].values():
        wanted |= _names([r for r in requirements if not r.startswith("cryosphere-pose")])
    text = (ROOT / "environment.yml").read_text()
    listed = {m.group(1).lower() for m in re.finditer(r"^\s*-\s+([A-Za-z0-9_.-]+)", text, re.M)}
    missing = sorted(n for n in wanted if CONDA_NAMES.get(n, n) not in listed)
    assert not missing, f"environment.yml lacks {missing}"


def test_distribution_name_console_script_and_torch_pin():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "cryosphere-pose"
    assert project["scripts"]["cryosphere"] == "cryosphere.cli:main"
    assert "torch>=2.3" in project["dependencies"]
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()
