"""Shared fixtures: small maps and datasets made once per test session."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cryosphere.imaging import structure
from cryosphere.imaging.simulate import SimulationParameters, auto_pixel_size, simulate_dataset

#: Torch intra-op threads for the suite: 2 (the CI machines' cores) unless
#: CRYOSPHERE_TEST_THREADS says otherwise (the suite is checked with 1 and 2).
TEST_THREADS = int(os.environ.get("CRYOSPHERE_TEST_THREADS", "2"))
torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="session")
def ubi_map_64() -> tuple[np.ndarray, float]:
    """1UBI Coulomb-potential map, 64³ at the automatic pixel size: (volume, pixel_size)."""
    atoms = structure.load_structure("1ubi")
    pixel = auto_pixel_size(atoms, 64)
    return structure.coulomb_potential_map(atoms, 64, pixel), pixel


@pytest.fixture(scope="session")
def ubi_map_32() -> tuple[np.ndarray, float]:
    """1UBI map, 32³ at the automatic pixel size: (volume, pixel_size)."""
    atoms = structure.load_structure("1ubi")
    pixel = auto_pixel_size(atoms, 32)
    return structure.coulomb_potential_map(atoms, 32, pixel), pixel


@pytest.fixture(scope="session")
def small_dataset():
    """40 noisy 32-px images of 1UBI at SNR 1."""
    return simulate_dataset(
        SimulationParameters(structure="1ubi", n_projections=40, image_size=32, seed=3),
        progress=False,
    )
