"""Run folders and the notebook series: profiles, parameter checks, execution with papermill.

A run is the numbered notebooks (``notebooks/01_…`` to ``0N_…``) executed in order into one
run folder ``<runs_root>/<name>/``, each with the same shared parameters (structure, image
count, SNR…). The folder holds what each step writes (the dataset, labels, model, results),
the executed notebooks under ``notebooks/``, ``run.json`` (the run's profile and parameters),
``steps.json`` (what ran, with which parameters, how long), ``summary.json`` (the figures of
record every notebook leaves through :func:`record_results`, plus timings) and ``report.html``
(:mod:`cryosphere.runs.report`: the summary, spheres and curves on one self-contained page).

Profiles (:data:`PROFILES`, defined in :mod:`cryosphere.runs.pipeline`) are flat overrides of
:class:`~cryosphere.runs.run_config.RunConfig`: ``tiny`` is the notebooks' own default (seconds per
notebook, CI), ``quick`` runs the series on a laptop CPU in minutes, ``paper`` is the poster's
setting (400 images, 200 epochs, lmax 4). All of them also train the default model of the
series, the streamed network (``stream_*`` parameters, notebook 03). A notebook that declares
``profile`` and ``config`` receives the profile's name and the run's flat configuration (the
profile's values, the overrides and the structure) and builds its
:class:`~cryosphere.runs.pipeline.Run` from them; a notebook that declares a flat name itself
(or a notebook-specific one such as ``image_index``) receives that value.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryosphere import io
from cryosphere.runs import checks
from cryosphere.runs import run_config as runs_run_config
from cryosphere.runs.reproducibility import (
    default_threads,
    kernel_manager_class,
    kernel_threads,
    reproducibility_record,
)

__all__ = [
    "PROFILES",
    "RESULTS_FOLDER",
    "RunPlan",
    "RunStepError",
    "default_notebooks_dir",
    "series_notebooks",
    "notebook_parameters",
    "plan_run",
    "execute_run",
    "record_results",
    "read_results",
    "collect_summary",
]

RESULTS_FOLDER = "results"

#: The run profiles (flat overrides of :class:`~cryosphere.runs.run_config.RunConfig`).
PROFILES = runs_run_config.PROFILES


class RunStepError(RuntimeError):
    """A notebook of the series failed; the message names the notebook and the cell."""


def default_notebooks_dir() -> Path:
    """The ``notebooks/`` folder beside the package (a source checkout or editable install)."""
    return Path(__file__).resolve().parents[2] / "notebooks"


def series_notebooks(notebooks_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The numbered notebooks ``NN_*.ipynb`` of the series, in order."""
    folder = Path(notebooks_dir) if notebooks_dir is not None else default_notebooks_dir()
    notebooks = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb") if p.is_file())
    if not notebooks:
        raise FileNotFoundError(
            f"no numbered notebooks (NN_*.ipynb) in {folder}; run from a CryoSphere checkout or "
            "pass the notebooks folder explicitly"
        )
    return notebooks


def notebook_parameters(notebook: str | os.PathLike[str]) -> dict[str, Any]:
    """Default values of the ``parameters`` cell of ``notebook`` (name -> value)."""
    import papermill

    inspected = papermill.inspect_notebook(str(notebook))
    values: dict[str, Any] = {}
    for name, info in inspected.items():
        text = info["default"]
        try:
            values[name] = json.loads(_python_literal_to_json(text))
        except (ValueError, TypeError):
            values[name] = text
    return values


def _python_literal_to_json(text: str) -> str:
    import ast

    return json.dumps(ast.literal_eval(text))


@dataclass(frozen=True)
class RunPlan:
    """A validated run: where it goes and what every notebook receives.

    Attributes
    ----------
    run_dir
        Absolute run folder.
    profile, structure
        The profile name and structure (embedded name or absolute path).
    parameters
        The run's shared parameters (profile values, overrides, structure, run_dir).
    notebooks
        The series' notebook paths, in order.
    notebook_parameters
        Per notebook stem, the parameters passed to it (only the names it declares).
    seeds
        Every seed parameter the notebooks use (``seed``, ``sweep_seeds``…), with the value
        they get: the run's, or the notebooks' own default.
    """

    run_dir: Path
    profile: str
    structure: str
    parameters: dict[str, Any]
    notebooks: list[Path] = field(default_factory=list)
    notebook_parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: dict[str, Any] = field(default_factory=dict)


def _resolve_structure(structure: Any, what: str = "structure") -> str:
    """An embedded name, or the absolute path of a PDB/mmCIF file that loads and can be
    imaged (:func:`cryosphere.imaging.structure.check_imageable`)."""
    from cryosphere.imaging import atoms
    from cryosphere.imaging import structure as structures

    if not isinstance(structure, str) or not structure:
        raise ValueError(f"{what} must be an embedded name or a file path, got {structure!r}")
    if structure.lower() in atoms.EMBEDDED_STRUCTURES:
        return structure.lower()
    path = Path(structure).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} {structure!r} is neither an embedded name "
            f"({', '.join(sorted(atoms.EMBEDDED_STRUCTURES))}) nor an existing PDB/mmCIF file"
        )
    structures.check_imageable(atoms.load_structure(path), repr(str(path)))
    return str(path.resolve())


def plan_run(
    profile: str = "quick",
    structure: str = "1ubi",
    overrides: dict[str, Any] | None = None,
    name: str | None = None,
    runs_root: str | os.PathLike[str] = "runs",
    notebooks_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> RunPlan:
    """Check everything about a run before any work starts, and return its plan.

    Raises ``ValueError`` for an unknown profile or parameter name (listing the valid ones), a
    parameter value of the wrong type or out of range (:func:`checks.check_parameter_values`)
    or a ``name`` that is not a plain folder name, ``FileNotFoundError`` for a structure path
    that does not exist, and ``FileExistsError`` for a run folder that holds another run's data
    (unless ``overwrite``). Nothing is written.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    overrides = dict(overrides or {})
    resolved_structure = _resolve_structure(structure)
    notebooks = series_notebooks(notebooks_dir)
    declared = {nb.stem: notebook_parameters(nb) for nb in notebooks}
    known = set().union(*(set(p) for p in declared.values()))
    takes_config = {stem for stem, params in declared.items() if "config" in params}
    if takes_config:
        known |= set(runs_run_config.FLAT_FIELDS)
    reserved = {"run_dir", "structure", "profile", "config"}
    unknown = sorted(set(overrides) - (known - reserved))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown}; the notebooks take {sorted(known - reserved)} "
            "(structure and run folder have their own options)"
        )
    label = Path(resolved_structure).stem.split(".")[0] if "/" in resolved_structure else structure
    run_name = checks.check_run_name(name if name is not None else f"{label}-{profile}")
    run_dir = (Path(runs_root) / run_name).resolve()
    shared = {**PROFILES[profile], **overrides}
    checks.check_parameter_values(shared)
    if "compare_structure" in shared:
        shared["compare_structure"] = _resolve_structure(
            shared["compare_structure"], "compare_structure"
        )
    shared["structure"] = resolved_structure
    run_config = {k: v for k, v in shared.items() if k in runs_run_config.FLAT_FIELDS}
    if takes_config:  # the whole configuration is checked before anything runs
        runs_run_config.RunConfig.from_profile(profile, run_config)
    shared["run_dir"] = str(run_dir)
    if not overwrite:
        _check_run_folder(run_dir, {"profile": profile, "parameters": shared})
    per_notebook = {
        stem: {key: value for key, value in shared.items() if key in params}
        | ({"profile": profile, "config": run_config} if stem in takes_config else {})
        for stem, params in declared.items()
    }
    seeds = {
        key: shared.get(key, value)
        for params in declared.values()
        for key, value in params.items()
        if "seed" in key
    }
    if takes_config:
        resolved = runs_run_config.RunConfig.from_profile(profile, run_config).to_flat()
        seeds |= {key: value for key, value in resolved.items() if "seed" in key}
    return RunPlan(
        seeds=dict(sorted(seeds.items())),
        run_dir=run_dir,
        profile=profile,
        structure=resolved_structure,
        parameters=shared,
        notebooks=notebooks,
        notebook_parameters=per_notebook,
    )


def _check_run_folder(run_dir: Path, record: dict[str, Any]) -> None:
    """Refuse a folder that holds another run's data or is not a run folder."""
    run_record = run_dir / "run.json"
    if run_record.is_file():
        stored = io.read_json(run_record)
        if stored != json.loads(json.dumps(record)):
            raise FileExistsError(
                f"{run_dir} holds another run's data (profile {stored.get('profile')!r}, other "
                "parameters); choose another --name or pass --overwrite to replace it"
            )
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(
            f"{run_dir} exists and is not a CryoSphere run folder; choose another --name"
        )


def _load_steps(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "steps.json"
    return io.read_json(path) if path.is_file() else {}


def _damaged_results(run_dir: Path) -> list[str]:
    """Steps whose ``results/<step>.json`` is unreadable (removed, so the step reruns)."""
    damaged = []
    for path in sorted((run_dir / RESULTS_FOLDER).glob("*.json")):
        try:
            io.read_json(path)
        except ValueError:
            path.unlink()
            damaged.append(path.stem)
    return damaged


def _open_run_folder(run_dir: Path, overwrite: bool) -> checks.RunLock:
    """Create the run folder, take its lock, remove the temporary files a killed run left
    (``io.atomic_path``'s ``.<name>.<random>.tmp<suffix>``), clear it for ``overwrite``;
    return the lock."""
    if overwrite and run_dir.exists():
        if not (run_dir / "run.json").is_file() and any(
            p.name != checks.LOCK_FILE for p in run_dir.iterdir()
        ):
            raise FileExistsError(f"refusing to clear {run_dir}: it is not a CryoSphere run folder")
    try:
        (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
        lock = checks.RunLock(run_dir)
        lock.acquire()
    except PermissionError as error:
        raise PermissionError(
            f"cannot write into {run_dir} ({error.strerror}); make the runs folder writable "
            "or choose another with --runs-root"
        ) from error
    for debris in run_dir.rglob(".*.tmp*"):  # io.atomic_path files of a killed run
        if debris.is_file():
            debris.unlink()
    if overwrite:
        for child in run_dir.iterdir():
            if child.name == checks.LOCK_FILE:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        (run_dir / "notebooks").mkdir()
    return lock


def execute_run(
    plan: RunPlan,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    threads: int | None = None,
) -> dict[str, Any]:
    """Execute the plan's notebooks in order; return the run summary (also ``summary.json``).

    A step whose executed notebook exists and ran with the same parameters is skipped. A
    failing step stops the run with :class:`RunStepError` naming the notebook and cell; its
    partly executed notebook is kept in ``<run_dir>/notebooks/`` for inspection.

    ``threads`` sets the torch (OpenMP/MKL) threads of every notebook's kernel; ``None`` uses
    :func:`default_threads`. Results repeat bit for bit for the same parameters, thread count,
    device and package versions (see :func:`reproducibility_record`). Two runs into one folder
    at once are refused (:class:`checks.RunLockedError`); a folder that cannot be written
    raises ``PermissionError`` naming it.
    """
    threads = default_threads() if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    lock = _open_run_folder(plan.run_dir, overwrite)
    try:
        with kernel_threads(threads):
            return _execute_steps(plan, progress, log, threads)
    finally:
        lock.release()


def _execute_steps(
    plan: RunPlan, progress: bool, log: Callable[[str], None], threads: int
) -> dict[str, Any]:
    import papermill
    from papermill.exceptions import PapermillExecutionError

    run_dir = plan.run_dir
    io.write_json(run_dir / "run.json", {"profile": plan.profile, "parameters": plan.parameters})
    steps = _load_steps(run_dir)
    for stem in _damaged_results(run_dir):
        log(f"results/{stem}.json is damaged: step {stem} runs again")
        steps.pop(stem, None)
    manager = kernel_manager_class()
    for index, notebook in enumerate(plan.notebooks, start=1):
        stem = notebook.stem
        parameters = plan.notebook_parameters[stem]
        output = run_dir / "notebooks" / notebook.name
        previous = steps.get(stem)
        if previous and previous.get("parameters") == parameters and output.is_file():
            log(
                f"[{index}/{len(plan.notebooks)}] {stem}: done before with these parameters, skipped"
            )
            continue
        log(f"[{index}/{len(plan.notebooks)}] {stem} …")
        start = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(notebook),
                str(output),
                parameters=parameters,
                cwd=str(notebook.parent),
                progress_bar=progress,
                kernel_manager_class=manager,
            )
        except PapermillExecutionError as error:
            steps.pop(stem, None)
            io.write_json(run_dir / "steps.json", steps)
            raise RunStepError(
                f"step {stem} failed in cell {error.exec_count} ({error.ename}: {error.evalue}); "
                f"the executed notebook is {output}"
            ) from error
        seconds = time.perf_counter() - start
        steps[stem] = {"parameters": parameters, "seconds": round(seconds, 2), "threads": threads}
        io.write_json(run_dir / "steps.json", steps)
        log(f"    {stem} finished in {seconds:.1f} s")
    summary = collect_summary(run_dir, reproducibility_record(plan.seeds, threads))
    io.write_json(run_dir / "summary.json", summary)
    from cryosphere.runs import report  # plotly and the figures only once the run is done

    log(f"report: {report.write_report(run_dir)}")
    return summary


def record_results(run_dir: str | os.PathLike[str], step: str, results: dict[str, Any]) -> Path:
    """Save a notebook's figures of record as ``<run_dir>/results/<step>.json`` (atomic)."""
    return io.write_json(Path(run_dir) / RESULTS_FOLDER / f"{step}.json", results)


def read_results(run_dir: str | os.PathLike[str], step: str) -> dict[str, Any]:
    """Read what :func:`record_results` saved for ``step``."""
    path = Path(run_dir) / RESULTS_FOLDER / f"{step}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no results for step {step!r} in {run_dir}; run that notebook first"
        )
    return io.read_json(path)


def collect_summary(
    run_dir: str | os.PathLike[str], reproducibility: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The run's summary: its parameters, each step's results and timings, and (when given)
    the :func:`reproducibility_record` of the run."""
    folder = Path(run_dir)
    record = io.read_json(folder / "run.json") if (folder / "run.json").is_file() else {}
    steps = _load_steps(folder)
    results = {
        path.stem: io.read_json(path) for path in sorted((folder / RESULTS_FOLDER).glob("*.json"))
    }
    summary = {
        "run_dir": str(folder.resolve()),
        "profile": record.get("profile"),
        "parameters": record.get("parameters", {}),
        "timings_s": {stem: step["seconds"] for stem, step in steps.items()},
        "total_s": round(sum(step["seconds"] for step in steps.values()), 2),
        "results": results,
    }
    if reproducibility is not None:
        summary["reproducibility"] = reproducibility
        used = sorted({step.get("threads") for step in steps.values()} - {None})
        if len(used) > 1:
            summary["reproducibility"]["threads_by_step"] = {
                stem: step.get("threads") for stem, step in steps.items()
            }
    return summary
