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


#: The concepts of ``cryosphere.poses`` in the order data flow through them.
POSES_ORDER = ["distributed", "labels", "search", "network", "prediction", "training", "evaluation"]


def test_stages_import_only_downstream_of_themselves():
    """Data flow one way: a stage never imports a later stage, nor a concept of ``poses`` a later
    concept (AST scan of import lines, lazy ones included)."""
    import ast

    order = ["io", "geometry", "imaging", "poses", "reconstruction", "figures", "runs"]
    package = ROOT / "cryosphere"
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).parts
        stage = parts[0] if len(parts) > 1 else path.stem
        if stage not in order:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                bits = name.split(".")
                if bits[0] != "cryosphere" or len(bits) < 2 or bits[1] not in order:
                    continue
                assert order.index(bits[1]) <= order.index(stage), (
                    f"{path.relative_to(ROOT)} ({stage}) imports {name} from a later stage"
                )
                if stage == "poses" == bits[1] and len(parts) > 2 and len(bits) > 2:
                    mine, theirs = parts[1], bits[2]
                    assert POSES_ORDER.index(theirs) <= POSES_ORDER.index(mine), (
                        f"{path.relative_to(ROOT)} (poses.{mine}) imports {name} from a later "
                        "concept"
                    )


def test_readme_is_a_front_page_whose_links_resolve():
    """README: at most ~150 lines, the two set-up commands, and every relative link (into the
    docs site) pointing at a file that exists; the docs' own links are checked by the strict
    MkDocs build of ``make test``."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert "make run" in text and "make test" in text
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert len(local) >= 8
    missing = [link for link in local if not (ROOT / link).exists()]
    assert missing == []
    assert (
        "- docs" in (ROOT / "Makefile").read_text()
        or "test: lint docs" in (ROOT / "Makefile").read_text()
    )
    assert "--strict" in (ROOT / "Makefile").read_text()
