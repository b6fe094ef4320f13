"""Checks that a run makes before any work starts, and the run folder's lock.

:func:`check_parameter_values` refuses a parameter of the wrong type or out of range (an odd or
tiny image size, SNR ≤ 0, NaN, zero projections, negative epochs, q outside (0, 1], λ ≤ 0…)
with a message naming the parameter, the value and what it accepts. :func:`check_run_name`
keeps ``--name`` inside the runs folder. :class:`RunLock` stops two runs from writing into one
folder at once: ``<run_dir>/.cryosphere.lock`` holds the owner's host and process id, is created
exclusively (``O_EXCL``) and removed when the run ends; a lock left by a process that no longer
exists on this host is taken over.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "PARAMETER_RULES",
    "check_parameter_values",
    "check_run_name",
    "RunLock",
    "RunLockedError",
    "LOCK_FILE",
]

LOCK_FILE = ".cryosphere.lock"

#: Largest grid level the labels support (level 3: 36,864 rotations).
_MAX_GRID_LEVEL = 3
#: Largest harmonic degree of the network (``cryosphere.poses.network.model.MAX_LMAX``).
_MAX_LMAX = 8


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(low: int, high: int | None = None, even: bool = False) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if (
            not _is_int(value)
            or value < low
            or (high is not None and value > high)
            or (even and value % 2)
        ):
            return _integer_text(low, high, even)
        return None

    return check


def _integer_text(low: int, high: int | None, even: bool) -> str:
    kind = "an even integer" if even else "an integer"
    return f"{kind} in {low}..{high}" if high is not None else f"{kind} >= {low}"


def _number(
    low: float, high: float = math.inf, low_open: bool = True, high_open: bool = False
) -> Callable[[Any], str | None]:
    left = "(" if low_open else "["
    right = ")" if high_open or high == math.inf else "]"
    text = f"a finite number in {left}{low:g}, {high:g}{right}"

    def check(value: Any) -> str | None:
        if not _is_number(value) or not math.isfinite(value):
            return text
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        return text if too_low or too_high else None

    return check


def _optional(rule: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value is None:
            return None
        problem = rule(value)
        return f"None or {problem}" if problem else None

    return check


def _list_of(rule: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not isinstance(value, (list, tuple)) or not value:
            return "a non-empty list"
        problems = [rule(item) for item in value]
        first = next((p for p in problems if p), None)
        return f"a non-empty list, each {first}" if first else None

    return check


def _one_of(*choices: Any) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"one of {list(choices)}"

    return check


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) and value else "a non-empty string"


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "True or False"


#: Notebook parameter -> check returning None (fine) or what the parameter accepts. Image sizes
#: are even (the series and its tests use even boxes, centre pixel N // 2) and at least 16 px.
PARAMETER_RULES: dict[str, Callable[[Any], str | None]] = {
    "n_projections": _integer(2),
    "compare_n_projections": _integer(1),
    "image_size": _integer(16, 512, even=True),
    "pixel_size": _optional(_number(0.0)),
    "snr": _number(0.0),
    "snr_levels": _list_of(_number(0.0)),
    "snr_series": _list_of(_number(0.0)),
    "blur_sigma": _number(0.0, low_open=False),
    "seed": _integer(0),
    "sweep_seeds": _list_of(_integer(0)),
    "grid_level": _integer(0, _MAX_GRID_LEVEL),
    "q": _number(0.0, 1.0),
    "lam": _optional(_number(0.0)),
    "lmax": _integer(1, _MAX_LMAX),
    "epochs": _integer(1),
    "sweep_epochs": _integer(1),
    "batch_size": _integer(1),
    "learning_rate": _number(0.0),
    "loss": _one_of("bce", "soft_ce"),
    "sweep_counts": _list_of(_integer(2)),
    "image_counts": _list_of(_integer(2)),
    "n_pairs": _integer(1),
    "image_index": _integer(0),
    "top_k": _integer(1),
    "regularisation": _number(0.0),
    "threshold": _number(0.0, 1.0, high_open=True),
    "compare_structure": _string,
    "write_png": _boolean,
    "overwrite": _boolean,
}


def check_parameter_values(parameters: dict[str, Any]) -> None:
    """Raise ``ValueError`` listing every parameter whose value breaks :data:`PARAMETER_RULES`.

    Names without a rule (and ``structure``, ``run_dir``, checked elsewhere) pass unchecked.
    """
    problems = []
    for name, value in parameters.items():
        rule = PARAMETER_RULES.get(name)
        expected = rule(value) if rule is not None else None
        if expected:
            problems.append(f"{name} = {value!r} (must be {expected})")
    n = parameters.get("n_projections")
    index = parameters.get("image_index")
    if _is_int(n) and _is_int(index) and not problems and index >= n:
        problems.append(f"image_index = {index} (must be < n_projections = {n})")
    if problems:
        raise ValueError(
            "bad parameter value(s): " + "; ".join(problems) + ". Fix them with -p NAME VALUE"
        )


def check_run_name(name: str) -> str:
    """``name`` if it is one plain folder name, else ``ValueError`` (no ``..``, no separators)."""
    if (
        not isinstance(name, str)
        or not name.strip()
        or name in {".", ".."}
        or "/" in name
        or (os.sep != "/" and os.sep in name)
        or (os.altsep is not None and os.altsep in name)
        or name.startswith("~")
        or "\x00" in name
    ):
        raise ValueError(
            f"run name {name!r} must be a plain folder name (no '/', '..', '~' or absolute "
            "path); use --runs-root to choose where run folders go"
        )
    return name


class RunLockedError(RuntimeError):
    """Another run holds the run folder's lock."""


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive lock on a run folder while a run writes into it (a context manager).

    ``RunLockedError`` names the holder when another live process holds it. A lock left by a
    process of this host that has ended (a killed run) is replaced.
    """

    def __init__(self, run_dir: str | os.PathLike[str]):
        self.path = Path(run_dir) / LOCK_FILE
        self.owner = f"{socket.gethostname()} {os.getpid()}"

    def _holder(self) -> str | None:
        try:
            return self.path.read_text().strip()
        except (FileNotFoundError, UnicodeDecodeError):
            return None

    def _stale(self, holder: str | None) -> bool:
        if not holder:  # being written this instant, or left empty by a crash long ago
            try:
                return time.time() - self.path.stat().st_mtime > 10.0
            except FileNotFoundError:
                return True
        host, _, pid = holder.rpartition(" ")
        if host != socket.gethostname() or not pid.isdigit():
            return False  # another machine's run: cannot tell, so respect it
        return not _process_exists(int(pid))

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunLockedError`."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if self._stale(holder):
                    self.path.unlink(missing_ok=True)
                    continue
                raise RunLockedError(
                    f"{self.path.parent} is in use by another run (host and process {holder}); "
                    f"wait for it to finish, or, if no run is going, delete {self.path}"
                ) from None
            with os.fdopen(fd, "w") as handle:
                handle.write(self.owner + "\n")
            return
        raise RunLockedError(f"could not take the lock {self.path}; try again")

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self._holder() == self.owner:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
