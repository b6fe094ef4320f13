"""Fresh particles drawn from a consensus map with a refinement's own statistics, and the
validation of a network on the refinement's real particles.

:func:`refinement_stream` is a :class:`~cryosphere.poses.training.stream.SimulatedStream` of the map
(brought to the model box) whose particles follow
:class:`~cryosphere.imaging.refinement_statistics.RefinementStatistics`:

* CTF parameters drawn as whole rows of the refinement (optics groups included) and shifts
  from the distribution of its origins (:meth:`RefinementStatistics.draw`), imaged in a padded
  field (:mod:`cryosphere.imaging.microscope`);
* the map's sign multiplied by the data's contrast sign, and blurred by the fitted envelope;
* noise at the data's SNR, log-uniform in ``[snr / snr_spread, snr · snr_spread]`` per image
  (a little wider than the data, so that the network sees both easier and harder particles),
  coloured by the backgrounds' radial power spectrum (``coloured_noise``; the ``"bayes"``
  targets still assume white noise of the same variance);
* network input as ``cryosphere predict`` makes it (phase flip, background normalisation).

:func:`validation_scores` scores a network on held-out real particles against their refined
poses: median error, acc@15° and ``topk_hit``, the share of particles whose refined pose's
cell (nearest grid cell at the output level) is among the network's ``k`` most probable
cells, i.e. among the cells ``cryosphere predict --map`` will search.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryosphere.geometry import grids
from cryosphere.geometry.grids import nearest_grid_indices
from cryosphere.geometry.point_groups import symmetry_mates
from cryosphere.imaging import ctf as ctf_module
from cryosphere.imaging.datasets import SimulationParameters
from cryosphere.imaging.refinement_statistics import RefinementStatistics
from cryosphere.poses.network.model import PoseDistributionNetwork
from cryosphere.poses.training.stream import SimulatedStream, StreamConfig
from cryosphere.poses.training.streamed import pose_error_scores

__all__ = [
    "RefinementRealism",
    "refinement_stream",
    "validation_scores",
    "topk_hit_rate",
    "topk_validator",
]


@dataclass(frozen=True)
class RefinementRealism:
    """The particle model of a :class:`SimulatedStream` that follows a refinement (the
    interface of :class:`~cryosphere.poses.training.stream.ParticleRealism`).

    Attributes:
        statistics: the refinement's measured statistics.
        coloured_noise: colour the noise by the backgrounds' spectrum (False: white).
        ctf_correction: network input's CTF correction (``"phase_flip"``, as ``predict``).
    """

    statistics: RefinementStatistics
    coloured_noise: bool = True
    ctf_correction: str = "phase_flip"

    @property
    def pixel_size_angstrom(self) -> float:
        return self.statistics.pixel_size_angstrom

    @property
    def optics(self) -> SimulationParameters:
        """Only ``ctf_field`` is read: particles are imaged in a padded field."""
        return SimulationParameters(ctf=self.ctf, ctf_field="padded")

    @property
    def ctf(self) -> bool:
        return self.statistics.ctf is not None

    @property
    def noise_power(self) -> np.ndarray | None:
        return self.statistics.noise_power if self.coloured_noise else None

    def draw(
        self, rng: np.random.Generator, n: int
    ) -> tuple[ctf_module.CTFParameters | None, np.ndarray]:
        return self.statistics.draw(rng, n)

    def description(self) -> dict[str, Any]:
        """What identifies the particle model (for checkpoints); measured figures to 6
        significant digits, as the stream's signal variance (FFT sums depend on threads)."""

        def rounded(value: Any) -> Any:
            if isinstance(value, float):
                return float(f"{value:.6g}")
            if isinstance(value, dict):
                return {k: rounded(v) for k, v in value.items()}
            if isinstance(value, list):
                return [rounded(v) for v in value]
            return value

        summary = self.statistics.summary()
        summary.pop("n_measured")
        return {
            "kind": "refinement",
            "coloured_noise": self.coloured_noise,
            "ctf_correction": self.ctf_correction,
            "statistics": rounded(summary),
        }


def refinement_stream(
    volume: np.ndarray,
    statistics: RefinementStatistics,
    level: int,
    *,
    batch_size: int = 32,
    seed: int = 0,
    snr_spread: float = 2.0,
    coloured_noise: bool = True,
    target: str = "bayes",
) -> SimulatedStream:
    """The stream of the module docstring for ``volume`` ``(M, M, M)`` at the model box."""
    if not snr_spread >= 1:
        raise ValueError(f"snr_spread must be >= 1, got {snr_spread}")
    if not (np.isfinite(statistics.snr) and statistics.snr > 0):
        raise ValueError(
            f"the refinement's measured SNR is {statistics.snr:g}: the particles do not "
            "correlate with the map at their refined poses (check the map and the STAR file)"
        )
    snr = (statistics.snr / snr_spread, statistics.snr * snr_spread)
    config = StreamConfig(snr=snr, target=target, batch_size=int(batch_size), seed=int(seed))
    signed = np.asarray(volume, dtype=np.float32) * float(np.sign(statistics.contrast))
    realism = RefinementRealism(statistics, coloured_noise=coloured_noise)
    return SimulatedStream(signed, statistics.blur_sigma_px, level, config, realism=realism)


def validation_scores(
    model: PoseDistributionNetwork,
    images: torch.Tensor,
    rotations: np.ndarray,
    top_k: int = 100,
    batch_size: int = 256,
    symmetry_ops: np.ndarray | None = None,
    with_errors: bool = False,
) -> dict[str, float]:
    """``val_topk_hit`` of the module docstring (``k = top_k``) on prepared images
    ``(n, M, M)`` with refined poses ``(n, 3, 3)``; with ``symmetry_ops`` ``(K, 3, 3)`` (the
    particle's point group) a hit is the cell of any symmetry mate ``R @ g``. With
    ``with_errors`` also ``val_median_deg`` and ``val_acc15`` of the most probable cell."""
    level = model.config.grid_level
    grid = grids.healpix_so3_grid(level)
    k = min(int(top_k), len(grid))
    device = model.image_mean.device
    model.eval()
    tops = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            logits = model(images[start : start + batch_size].to(device))
            tops.append(torch.topk(logits, k, dim=1).indices.cpu())
    top = torch.cat(tops).numpy()
    scores = {"val_topk_hit": topk_hit_rate(top, rotations, grid, symmetry_ops), "top_k": k}
    if with_errors:
        scores |= pose_error_scores(top[:, 0], rotations, symmetry_ops, level)
    return scores


def topk_hit_rate(
    top_cells: np.ndarray,
    rotations: np.ndarray,
    grid: np.ndarray,
    symmetry_ops: np.ndarray | None = None,
) -> float:
    """Share of particles whose pose's nearest cell of ``grid`` ``(G, 3, 3)``, or the nearest
    cell of any of its symmetry mates ``R @ g`` (``symmetry_ops`` ``(K, 3, 3)``; None: C1),
    is among their ``top_cells`` ``(n, k)``; ``rotations`` ``(n, 3, 3)``."""
    ops = np.eye(3)[None] if symmetry_ops is None else np.asarray(symmetry_ops, dtype=np.float64)
    rotations = np.asarray(rotations, dtype=np.float64)
    mates = symmetry_mates(rotations, ops)  # (n, K, 3, 3)
    cells = nearest_grid_indices(mates.reshape(-1, 3, 3), grid).reshape(len(rotations), -1)
    top_cells = np.asarray(top_cells)
    hit = (top_cells[:, :, None] == cells[:, None, :]).any(axis=(1, 2))
    return float(np.mean(hit))


def topk_validator(
    images: torch.Tensor,
    rotations: np.ndarray,
    top_k: int = 100,
    symmetry_ops: np.ndarray | None = None,
) -> Callable[[PoseDistributionNetwork], dict[str, float]]:
    """:func:`validation_scores` as a function of the model (for ``train_on_stream``)."""
    return lambda model: validation_scores(
        model, images, rotations, top_k, symmetry_ops=symmetry_ops
    )
