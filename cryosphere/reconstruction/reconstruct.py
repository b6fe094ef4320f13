"""The names of release 0.1's ``reconstruct`` module, kept for one release (they go in 0.3).

Since 0.2 the reconstruction stage is split by concept; import from the new homes:

* :mod:`cryosphere.reconstruction.backprojection`: ``backproject``, ``reconstruct``,
  ``Reconstruction``, ``top_k_poses``;
* :mod:`cryosphere.reconstruction.symmetry`: ``symmetrize_map``, ``symmetry_correlation``,
  ``check_point_group``;
* :mod:`cryosphere.reconstruction.fsc`: ``FSCCurve``, ``fourier_shell_correlation``,
  ``resolution_at_threshold``;
* :mod:`cryosphere.reconstruction.experiments`: ``half_set_fsc``, ``HalfSetResult``,
  ``resolution_vs_image_count``, ``ResolutionSweep``;
* :mod:`cryosphere.figures.resolution`: ``plot_fsc_curves``, ``plot_resolution_vs_count``
  (figures are a later stage: these two are looked up on first use, with a
  ``DeprecationWarning`` naming the new home).
"""

from __future__ import annotations

import importlib
import warnings

from cryosphere.reconstruction.backprojection import (
    Reconstruction,
    backproject,
    reconstruct,
    top_k_poses,
)
from cryosphere.reconstruction.experiments import (
    HalfSetResult,
    ResolutionSweep,
    half_set_fsc,
    resolution_vs_image_count,
)
from cryosphere.reconstruction.fsc import (
    FSCCurve,
    fourier_shell_correlation,
    resolution_at_threshold,
)
from cryosphere.reconstruction.symmetry import (
    check_point_group,
    symmetrize_map,
    symmetry_correlation,
)

__all__ = [
    "Reconstruction",
    "FSCCurve",
    "HalfSetResult",
    "ResolutionSweep",
    "backproject",
    "reconstruct",
    "symmetrize_map",
    "symmetry_correlation",
    "check_point_group",
    "fourier_shell_correlation",
    "resolution_at_threshold",
    "half_set_fsc",
    "resolution_vs_image_count",
    "top_k_poses",
]  # plus the two names of MOVED_TO_FIGURES, which a star import leaves out

#: Names that moved to a later stage -> their module (imported on first use, not here, so
#: that reconstruction never imports figures at load time).
MOVED_TO_FIGURES = {
    "plot_fsc_curves": "cryosphere.figures.resolution",
    "plot_resolution_vs_count": "cryosphere.figures.resolution",
}


def __getattr__(name: str):
    if name in MOVED_TO_FIGURES:
        home = MOVED_TO_FIGURES[name]
        warnings.warn(
            f"cryosphere.reconstruction.reconstruct.{name} moved to {home}.{name} in 0.2; "
            "the old name goes in 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(home), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
