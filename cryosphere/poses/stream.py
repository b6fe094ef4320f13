"""Training data as a stream of batches: fresh simulated particles, or a fixed set re-noised.

Both sources give :class:`Batch` objects from ``batch(step, rank=0)``, a pure function of
``(seed, rank, step)``: a run resumed at step ``k`` sees exactly the batches it would have seen,
and ranks of a distributed run draw disjoint, reproducible shares (``rank`` enters the seed).

* :class:`SimulatedStream`: every batch draws new Haar-random poses, projects them from the map
  (Fourier slice, :func:`cryosphere.imaging.projection.project_volume`), blurs them like the
  dataset, adds fresh white noise and computes the targets
  (:mod:`cryosphere.poses.targets`). There is no training set to memorise.
  The noise level follows the SNR definition of the simulation, ``σ² = var(clean stack) / SNR``,
  with the variance of a fixed reference stack of ``reference_images`` Haar-random clean
  projections (seeded, so ``σ`` is a property of the map, not of a batch). ``snr`` is one value
  or a range ``(low, high)`` drawn log-uniformly per image.
* :class:`FixedSetStream`: the images of a dataset's training split (the poster's setting),
  in a seeded order per epoch, optionally with fresh noise on the clean images every time an
  image is drawn (``fresh_noise``) and exact in-plane augmentation (``in_plane``: the clean
  image turns by a random multiple of the grid's in-plane step and the target is permuted).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryosphere.geometry import so3
from cryosphere.imaging.projection import gaussian_blur, project_volume, volume_spectrum
from cryosphere.poses import targets as tg
from cryosphere.poses.labels import (
    default_radius_deg,
    mse_landscape,
    soft_labels,
    template_bank,
    tune_lambda,
)

__all__ = ["Batch", "StreamConfig", "SimulatedStream", "FixedSetStream", "stream_seed"]

_HELDOUT_RANK = 2**20  # rank slot reserved for held-out sets (never a training rank)


def stream_seed(seed: int, rank: int, step: int) -> np.random.Generator:
    """The generator of batch ``step`` of ``rank``: ``default_rng([seed, rank, step])``."""
    return np.random.default_rng([int(seed), int(rank), int(step)])


@dataclass(frozen=True)
class Batch:
    """One batch of training or validation data.

    Attributes:
        images: ``(n, N, N)`` float32 noisy images.
        targets: ``(n, G)`` float32 target distributions (rows sum to 1).
        rotations: ``(n, 3, 3)`` float64 true poses.
        noise_sigma: ``(n,)`` float64 noise standard deviation per image (image units).
        clean: ``(n, N, N)`` float32 noise-free images.
    """

    images: torch.Tensor
    targets: torch.Tensor
    rotations: np.ndarray
    noise_sigma: np.ndarray
    clean: torch.Tensor


@dataclass(frozen=True)
class StreamConfig:
    """What a :class:`SimulatedStream` draws.

    Attributes:
        snr: SNR of every image, or ``(low, high)``: log-uniform per image.
        target: ``"bayes"``, ``"pose"`` or ``"soft"`` (:mod:`cryosphere.poses.targets`).
        batch_size: images per batch.
        seed: stream seed (batches are a function of seed, rank and step).
        pose_width_deg: kernel width of the ``"pose"`` target (None: half the grid spacing).
        soft_lambda: λ of the ``"soft"`` target (None: tuned on the reference stack).
        reference_images: size of the reference stack that fixes the signal variance.
    """

    snr: float | tuple[float, float] = 0.1
    target: str = "bayes"
    batch_size: int = 64
    seed: int = 0
    pose_width_deg: float | None = None
    soft_lambda: float | None = None
    reference_images: int = 1024

    def __post_init__(self) -> None:
        snr = self.snr
        if isinstance(snr, (list, tuple)):
            if len(snr) != 2 or not 0 < float(snr[0]) <= float(snr[1]) < math.inf:
                raise ValueError(f"snr range must be (low, high) with 0 < low <= high, got {snr}")
            object.__setattr__(self, "snr", (float(snr[0]), float(snr[1])))
        elif not (math.isfinite(float(snr)) and float(snr) > 0):
            raise ValueError(f"snr must be a positive number or a (low, high) range, got {snr}")
        if self.target not in tg.TARGETS:
            raise ValueError(f"target must be one of {tg.TARGETS}, got {self.target!r}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if int(self.reference_images) < 16:
            raise ValueError(f"reference_images must be >= 16, got {self.reference_images}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if isinstance(self.snr, tuple):
            out["snr"] = list(self.snr)
        return out

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> StreamConfig:
        record = dict(record)
        if isinstance(record.get("snr"), list):
            record["snr"] = tuple(record["snr"])
        return cls(**record)


class SimulatedStream:
    """Fresh simulated particles of ``volume`` for every batch (module docstring).

    Args:
        volume: ``(N, N, N)`` map ``[z, y, x]``.
        blur_sigma: Gaussian blur of the images, pixels.
        level: grid level of the targets.
        config: :class:`StreamConfig`.
        symmetry_ops: ``(K, 3, 3)`` point group (targets put equal weight on mates).
        templates: ``(G, N, N)`` template bank of ``volume`` on ``level`` blurred by
            ``blur_sigma`` (made when a ``"bayes"`` or ``"soft"`` target needs it and None).
    """

    def __init__(
        self,
        volume: np.ndarray,
        blur_sigma: float,
        level: int,
        config: StreamConfig,
        symmetry_ops: np.ndarray | None = None,
        templates: np.ndarray | None = None,
    ):
        self.volume = np.asarray(volume, dtype=np.float32)
        if self.volume.ndim != 3 or len(set(self.volume.shape)) != 1:
            raise ValueError(f"volume must be cubic (N, N, N), got {self.volume.shape}")
        if not np.all(np.isfinite(self.volume)):
            raise ValueError("volume holds NaN or infinite values")
        self.blur_sigma = float(blur_sigma)
        self.level = int(level)
        self.config = config
        self.symmetry_ops = np.eye(3)[None] if symmetry_ops is None else np.asarray(symmetry_ops)
        self._spectrum = volume_spectrum(self.volume)
        self.templates = templates
        if config.target in ("bayes", "soft") and templates is None:
            self.templates = template_bank(self.volume, self.level, self.blur_sigma)
        reference_poses = so3.random_rotations(config.reference_images, config.seed + 7919)
        reference = self._clean(reference_poses)
        self.signal_variance = float(reference.double().var(unbiased=False))
        if not self.signal_variance > 0:
            raise ValueError("the map projects to constant images; check the volume")
        self.soft_lambda = config.soft_lambda
        if config.target == "soft" and self.soft_lambda is None:
            mse = mse_landscape(reference[:256], self.templates)
            grid = so3.healpix_so3_grid(self.level)
            self.soft_lambda = tune_lambda(
                mse,
                grid,
                reference_poses[:256],
                self.symmetry_ops,
                radius_deg=default_radius_deg(self.level),
            )

    @property
    def image_size(self) -> int:
        return int(self.volume.shape[0])

    def noise_sigma(self, snr: float | np.ndarray) -> np.ndarray:
        """Noise standard deviation for ``snr``: ``sqrt(signal_variance / snr)``."""
        return np.sqrt(self.signal_variance / np.asarray(snr, dtype=np.float64))

    def _clean(self, rotations: np.ndarray) -> torch.Tensor:
        projections = project_volume(self.volume, rotations, spectrum=self._spectrum)
        return gaussian_blur(projections, self.blur_sigma)

    def _snrs(self, rng: np.random.Generator, n: int, snr: float | None) -> np.ndarray:
        value = self.config.snr if snr is None else snr
        if isinstance(value, tuple):
            low, high = np.log(value[0]), np.log(value[1])
            return np.exp(rng.uniform(low, high, size=n))
        return np.full(n, float(value))

    def targets_for(
        self, images: torch.Tensor, clean: torch.Tensor, rotations: np.ndarray, sigma: np.ndarray
    ) -> torch.Tensor:
        """Targets ``(n, G)`` of the configured kind for one batch."""
        kind = self.config.target
        if kind == "pose":
            t = tg.pose_kernel_targets(
                rotations, self.level, self.symmetry_ops, self.config.pose_width_deg
            )
        elif kind == "bayes":
            t = tg.bayes_posterior(images, self.templates, sigma)
        else:
            t = soft_labels(mse_landscape(clean, self.templates), self.soft_lambda)
        return torch.from_numpy(np.ascontiguousarray(t))

    def make(
        self, rng: np.random.Generator, n: int, snr: float | None = None, with_targets: bool = True
    ) -> Batch:
        """``n`` new particles drawn with ``rng`` (at ``snr`` when given)."""
        rotations = so3.random_rotations(n, rng)
        sigma = self.noise_sigma(self._snrs(rng, n, snr))
        clean = self._clean(rotations)
        noise_gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        noise = (
            torch.randn(clean.shape, generator=noise_gen)
            * torch.from_numpy(sigma).float()[:, None, None]
        )
        images = clean + noise
        G = so3.healpix_so3_grid_size(self.level)
        targets = (
            self.targets_for(images, clean, rotations, sigma) if with_targets else torch.zeros(n, G)
        )
        return Batch(images, targets, rotations, sigma, clean)

    def batch(self, step: int, rank: int = 0) -> Batch:
        """Training batch ``step`` of ``rank`` (deterministic)."""
        rng = stream_seed(self.config.seed, rank, step)
        return self.make(rng, int(self.config.batch_size))

    def heldout(self, n: int, snr: float | None = None, seed: int = 0) -> Batch:
        """A fixed held-out set of ``n`` particles (never drawn in training: its own seed slot)."""
        return self.make(stream_seed(self.config.seed + 1 + int(seed), _HELDOUT_RANK, 0), n, snr)

    def description(self) -> dict[str, Any]:
        """What identifies the stream (for checkpoints)."""
        return {
            "kind": "simulated",
            "config": self.config.to_dict(),
            "level": self.level,
            "blur_sigma": self.blur_sigma,
            "volume_shape": list(self.volume.shape),
            "volume_sum": round(float(self.volume.sum(dtype=np.float64)), 6),
            # 6 significant digits: the last bits depend on the thread count (FFT sums), and a
            # run may resume on another machine or rank count
            "signal_variance": float(f"{self.signal_variance:.6g}"),
        }


class FixedSetStream:
    """Batches from a fixed training split (the poster's setting), optionally re-noised.

    Args:
        images: ``(n, N, N)`` noisy images (used as they are when ``fresh_noise`` is False).
        targets: ``(n, G)`` targets (masks for BCE, distributions for cross-entropy).
        rotations: ``(n, 3, 3)`` true poses.
        batch_size: images per batch; an epoch is ``ceil(n / batch_size)`` batches.
        seed: order and noise seed.
        clean: ``(n, N, N)`` noise-free images, needed for ``fresh_noise`` / ``in_plane``.
        noise_sigma: noise σ for ``fresh_noise``.
        fresh_noise: new noise on the clean image each time it is drawn.
        in_plane: random in-plane turn by a multiple of the grid step, target permuted.
        level: grid level of ``targets`` (for ``in_plane``).
        slots: stream batches per optimiser step of a distributed run
            (:mod:`cryosphere.poses.distributed_training`): step ``s`` takes the next
            ``slots × batch_size`` images of the epoch's order and ``batch(s, k)`` is the
            ``k``-th batch of them, so the slots (ranks) share an epoch without overlap; an
            epoch is ``ceil(n / (slots · batch_size))`` steps, and its last step fills every
            slot to ``batch_size`` from the start of the epoch's order (equal shares).
    """

    def __init__(
        self,
        images: np.ndarray,
        targets: np.ndarray,
        rotations: np.ndarray,
        batch_size: int,
        seed: int = 0,
        *,
        clean: np.ndarray | None = None,
        noise_sigma: float | None = None,
        fresh_noise: bool = False,
        in_plane: bool = False,
        level: int = 2,
        slots: int = 1,
    ):
        self.images = torch.as_tensor(np.asarray(images, dtype=np.float32))
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.float32))
        self.rotations = np.asarray(rotations, dtype=np.float64)
        n = self.images.shape[0]
        if n == 0 or self.targets.shape[0] != n or self.rotations.shape != (n, 3, 3):
            raise ValueError("images, targets and rotations need the same non-zero length")
        if (fresh_noise or in_plane) and clean is None:
            raise ValueError("fresh_noise and in_plane need the clean images (clean=...)")
        if in_plane and not fresh_noise:
            raise ValueError(
                "in_plane augmentation turns the clean images before noise is added; set "
                "fresh_noise=True (turning noisy images would blur the noise and empty the corners)"
            )
        if fresh_noise and not (noise_sigma is not None and noise_sigma > 0):
            raise ValueError("fresh_noise needs the dataset's noise_sigma > 0")
        self.clean = None if clean is None else torch.as_tensor(np.asarray(clean, np.float32))
        self.noise = float(noise_sigma or 0.0)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.fresh_noise, self.in_plane, self.level = bool(fresh_noise), bool(in_plane), int(level)
        self.slots = int(slots)
        if self.slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.per_epoch = math.ceil(n / (self.batch_size * self.slots))

    def batch(self, step: int, rank: int = 0) -> Batch:
        epoch, within = divmod(int(step), self.per_epoch)
        if self.slots == 1:  # each rank its own order (one process: rank 0)
            order = stream_seed(self.seed, rank, epoch).permutation(self.images.shape[0])
        else:  # one order per epoch dealt out in slots; the last step wraps round to its start
            n = self.images.shape[0]
            order = stream_seed(self.seed, 0, epoch).permutation(n)
            first = (within * self.slots + int(rank)) * self.batch_size
            order = order[np.arange(first, first + self.batch_size) % n]
            within = 0
        index = torch.from_numpy(order[within * self.batch_size : (within + 1) * self.batch_size])
        rng = stream_seed(self.seed, rank + 1, int(step))
        targets, rotations = self.targets[index], self.rotations[index.numpy()]
        clean = self.clean[index] if self.clean is not None else self.images[index]
        if self.in_plane:
            n_psi = 6 * 2**self.level
            steps = rng.integers(0, n_psi, size=len(index))
            clean, targets = tg.rotate_in_plane(clean, targets, steps, self.level)
            turns = so3.rotation_about_z(steps * tg.in_plane_step_deg(self.level))
            rotations = turns @ rotations
        if self.fresh_noise:
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            images = clean + torch.randn(clean.shape, generator=gen) * self.noise
        else:
            images = self.images[index]
        sigma = np.full(len(index), self.noise)
        return Batch(images, targets, rotations, sigma, clean)

    def description(self) -> dict[str, Any]:
        return {
            "kind": "fixed",
            "n_images": int(self.images.shape[0]),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "fresh_noise": self.fresh_noise,
            "in_plane": self.in_plane,
            "level": self.level,
            **({"slots": self.slots} if self.slots != 1 else {}),
        }
