"""Shared fixtures: small maps and datasets made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from nbformat.v4 import new_code_cell, new_notebook

from cryosphere.imaging import atoms as imaging_atoms
from cryosphere.imaging import structure
from cryosphere.imaging.datasets import SimulationParameters
from cryosphere.imaging.simulate import auto_pixel_size, simulate_dataset

#: Torch intra-op threads for the suite: 2 (the CI machines' cores) unless
#: CRYOSPHERE_TEST_THREADS says otherwise (the suite is checked with 1 and 2).
TEST_THREADS = int(os.environ.get("CRYOSPHERE_TEST_THREADS", "2"))
torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="session")
def ubi_map_64() -> tuple[np.ndarray, float]:
    """1UBI Coulomb-potential map, 64³ at the automatic pixel size: (volume, pixel_size)."""
    atoms = imaging_atoms.load_structure("1ubi")
    pixel = auto_pixel_size(atoms, 64)
    return structure.coulomb_potential_map(atoms, 64, pixel), pixel


@pytest.fixture(scope="session")
def ubi_map_32() -> tuple[np.ndarray, float]:
    """1UBI map, 32³ at the automatic pixel size: (volume, pixel_size)."""
    atoms = imaging_atoms.load_structure("1ubi")
    pixel = auto_pixel_size(atoms, 32)
    return structure.coulomb_potential_map(atoms, 32, pixel), pixel


def _ctf_particles(templates, pixel, cells, shifts, snr, seed):
    """Noisy images of grid templates ``templates[cells]`` carrying random CTFs, moved by
    ``shifts`` ``(n, 2)`` px; returns ``(images (n, N, N), CTF parameters)``."""
    from cryosphere.imaging import ctf
    from cryosphere.imaging.projection import add_gaussian_noise

    params = ctf.random_ctf_parameters(len(cells), np.random.default_rng(seed))
    transfer = ctf.ctf_2d(params, templates.shape[-1], pixel)
    clean = ctf.shift_images(ctf.apply_ctf(templates[cells], transfer), shifts)
    noisy, _ = add_gaussian_noise(clean, snr, seed=seed)
    return noisy.numpy(), params


@pytest.fixture(scope="session")
def ctf_particles():
    """The function ``(templates, pixel, cells, shifts, snr, seed) -> (images, ctf)``."""
    return _ctf_particles


@pytest.fixture(scope="session")
def small_dataset():
    """40 noisy 32-px images of 1UBI at SNR 1."""
    return simulate_dataset(
        SimulationParameters(structure="1ubi", n_projections=40, image_size=32, seed=3),
        progress=False,
    )


def _write_notebook(path: Path, parameters_source: str, body_source: str) -> None:
    """A two-cell notebook: a cell tagged ``parameters``, then ``body_source``."""
    notebook = new_notebook()
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    cell = new_code_cell(parameters_source)
    cell.metadata["tags"] = ["parameters"]
    notebook.cells = [cell, new_code_cell(body_source)]
    nbformat.write(notebook, path)


def _write_tiny_series(folder: Path, second_body: str = "print(epochs)") -> Path:
    """``01_first`` records ``n`` and ``seed``; ``02_second`` runs ``second_body``."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_notebook(
        folder / "01_first.ipynb",
        'run_dir = "x"\nn_projections = 3\nseed = 0',
        "from cryosphere.runs import execution\n"
        "execution.record_results(run_dir, '01_first', {'n': n_projections * 2, 'seed': seed})",
    )
    _write_notebook(folder / "02_second.ipynb", 'run_dir = "x"\nepochs = 1', second_body)
    return folder


@pytest.fixture(scope="session")
def write_notebook():
    """``write_notebook(path, parameters_source, body_source)``: a tiny series notebook."""
    return _write_notebook


@pytest.fixture(scope="session")
def write_tiny_series():
    """``write_tiny_series(folder, second_body)``: a two-notebook series, returns ``folder``."""
    return _write_tiny_series


@pytest.fixture(scope="session")
def tiny_run() -> dict:
    """Flat :class:`~cryosphere.runs.run_config.RunConfig` names of a tiny run: 12 images of
    1UBI at 32 px, level-1 grid, lmax 2, 2 epochs (see :func:`train_tiny_run`)."""
    return dict(
        structure="1ubi",
        n_projections=12,
        image_size=32,
        snr=1.0,
        blur_sigma=1.0,
        seed=4,
        grid_level=1,
        lmax=2,
        epochs=2,
    )


def train_tiny_run(folder, progress: bool = False, **flat):
    """``Run(RunConfig.from_flat(flat), folder).trained()``: simulate, label and train (or
    reload) the poster's setting in ``folder``."""
    from cryosphere.runs.pipeline import Run
    from cryosphere.runs.run_config import RunConfig

    return Run(RunConfig.from_flat(flat), folder, progress=progress).trained()
