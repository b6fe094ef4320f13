"""Start the JupyterLab of ``make lab`` (``python -m cryosphere.runs.lab``) for a test: a free
localhost port, a random token, Jupyter's config, data and runtime folders of the user kept
out of it; stopped (SIGINT, then kill) when the block ends."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LabServer:
    url: str  # http://127.0.0.1:PORT
    token: str
    log: Path

    def get_json(self, path: str) -> Any:
        request = urllib.request.Request(
            f"{self.url}{path}", headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def lab_server(
    home: Path,
    command: Sequence[str] | None = None,
    cwd: Path | None = None,
    extra: Sequence[str] = (),
    timeout_s: float = 180.0,
    environment: dict[str, str] | None = None,
) -> Iterator[LabServer]:
    """Run ``command`` (default ``python -m cryosphere.runs.lab``) plus the server options;
    ``home`` holds the Jupyter folders and the log; ``environment`` adds variables (the
    kernels inherit them)."""
    port, token = free_port(), secrets.token_hex(16)
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for name, sub in [
        ("JUPYTER_CONFIG_DIR", "config"),
        ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("JUPYTER_DATA_DIR", "data"),
        ("IPYTHONDIR", "ipython"),
    ]:
        env[name] = str(home / sub)
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    env.update(environment or {})
    argv = [
        *(command or [sys.executable, "-m", "cryosphere.runs.lab"]),
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--LabApp.user_settings_dir={home / 'settings'}",
        f"--LabApp.workspaces_dir={home / 'workspaces'}",
        *extra,
    ]
    log = home / "jupyterlab.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT)
    server = LabServer(f"http://127.0.0.1:{port}", token, log)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"JupyterLab exited ({process.returncode}): {log.read_text()}")
            try:
                server.get_json("/api/status")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not answer: {log.read_text()}") from None
                time.sleep(0.5)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()  # SIGTERM: JupyterLab stops its kernels and exits
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
