"""JupyterLab on the notebook series: the command behind ``make lab``.

``python -m cryosphere.runs.lab`` starts JupyterLab (``jupyterlab>=4``, the ``notebooks``
extra) with ``notebooks/`` as its root, the kernel of this Python environment (the project's
virtual environment when started from ``.venv/bin/python``) and a ``runs/`` folder beside
``notebooks/``: each notebook's ``run_dir`` parameter defaults to ``../runs/default``, relative
to the notebook (JupyterLab starts a kernel in its notebook's folder), so the notebooks opened
there share ``runs/default``. Extra arguments go to JupyterLab unchanged, e.g.
``--port 8890 --no-browser``.

ipywidgets (``jupyterlab_widgets``) and plotly (its ``jupyterlab-plotly`` extension) ship
their JupyterLab 4 front-end extensions inside their wheels: nothing to build or enable.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from cryosphere.runs.execution import default_notebooks_dir

__all__ = ["lab_command", "lab_environment", "main"]


def lab_command(
    notebooks_dir: str | os.PathLike[str] | None = None, extra: Sequence[str] = ()
) -> list[str]:
    """The argv that starts JupyterLab on ``notebooks_dir`` (default: the series' folder)
    with this interpreter, so that its ``python3`` kernel is this environment's."""
    folder = Path(notebooks_dir) if notebooks_dir is not None else default_notebooks_dir()
    return [
        sys.executable,
        "-m",
        "jupyterlab",
        f"--ServerApp.root_dir={folder.resolve()}",
        # no news feed, no update check: nothing leaves the machine unasked
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        # a container's root user (JupyterLab refuses root without it)
        *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
        *extra,
    ]


def lab_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) with this environment's Jupyter data folder first
    on ``JUPYTER_PATH``: its ``python3`` kernel spec wins over one in the user's folders."""
    env = dict(os.environ if base is None else base)
    data = str(Path(sys.prefix) / "share" / "jupyter")
    previous = env.get("JUPYTER_PATH")
    env["JUPYTER_PATH"] = data if not previous else os.pathsep.join([data, previous])
    return env


def main(argv: Sequence[str] | None = None) -> int:
    """Start JupyterLab (see the module docstring); returns its exit status."""
    import importlib.util

    if importlib.util.find_spec("jupyterlab") is None:
        print(
            "JupyterLab is not installed in this environment: "
            "pip install 'cryosphere-pose[notebooks]' (make install does it)",
            file=sys.stderr,
        )
        return 2
    notebooks = default_notebooks_dir()
    runs_root = notebooks.parent / "runs"
    runs_root.mkdir(exist_ok=True)
    print(
        f"JupyterLab on {notebooks}; the notebooks' run_dir ../runs/default is "
        f"{runs_root / 'default'}",
        flush=True,
    )
    command = lab_command(notebooks, list(sys.argv[1:] if argv is None else argv))
    if os.name == "posix":  # JupyterLab takes this process's place (and its signals)
        os.execve(command[0], command, lab_environment())
    try:
        return subprocess.call(command, env=lab_environment())
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
