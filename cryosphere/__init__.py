"""CryoSphere: probability distributions over SO(3) for cryo-EM particle images.

Pose convention (the one used everywhere in this package): a pose ``R`` is a 3x3 rotation
matrix that maps particle (volume) coordinates to microscope coordinates,
``x_mic = R @ x_vol``, with vectors ordered (x, y, z). The image of pose ``R`` is the line
integral of the rotated volume along the microscope z axis; image rows run along microscope y
and columns along microscope x. Volumes are indexed ``[z, y, x]`` with the rotation centre at
voxel ``N // 2`` along each axis, images ``[y, x]`` with the centre at pixel ``N // 2``.
See :mod:`cryosphere.geometry.so3` for conversions to e3nn and RELION angles.

Layout, by stage (data flow one way): :mod:`cryosphere.geometry` → :mod:`cryosphere.imaging` →
:mod:`cryosphere.poses` → :mod:`cryosphere.reconstruction`; :mod:`cryosphere.figures` draws,
:mod:`cryosphere.runs` runs the notebook series; :mod:`cryosphere.io` writes files atomically.

The flat module names of release 0.1 (``cryosphere.so3``, ``cryosphere.train``, …) still import,
as aliases of the modules in their new homes (:data:`MOVED_MODULES`); they go in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

__version__ = "0.2.0"

#: Former flat module name -> its home since 0.2.
MOVED_MODULES = {
    "so3": "geometry.so3",
    "distributions": "geometry.distributions",
    "structure": "imaging.structure",
    "projection": "imaging.projection",
    "simulate": "imaging.simulate",
    "labels": "poses.labels",
    "model": "poses.model",
    "train": "poses.train",
    "evaluate": "poses.evaluate",
    "reconstruct": "reconstruction.reconstruct",
    "viz": "figures.viz",
    "plots": "figures.plots",
    "spheres": "figures.spheres",
    "gallery": "figures.gallery",
    "widgets": "figures.widgets",
    "cli": "runs.cli",
    "series": "runs.series",
    "sweep": "runs.sweep",
}


class _AliasLoader(importlib.abc.Loader):
    """Loads ``cryosphere.<old>`` as the very module object of its new home."""

    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):  # noqa: D102
        module = importlib.import_module(self.target)
        self.own_spec = module.__spec__
        return module

    def exec_module(self, module) -> None:  # noqa: D102
        module.__spec__ = self.own_spec  # the import system stamped the alias spec on it
        module.__loader__ = self.own_spec.loader


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):  # noqa: D102
        prefix, _, name = fullname.partition(".")
        if prefix != __name__ or name not in MOVED_MODULES:
            return None
        new = f"{__name__}.{MOVED_MODULES[name]}"
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.append(_AliasFinder())


def __getattr__(name: str):
    if name in MOVED_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
