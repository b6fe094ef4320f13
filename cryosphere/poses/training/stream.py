"""Training data as a stream of batches: fresh simulated particles, or a fixed set re-noised.

Both sources give :class:`Batch` objects from ``batch(step, rank=0)``, a pure function of
``(seed, rank, step)``: a run resumed at step ``k`` sees exactly the batches it would have seen,
and ranks of a distributed run draw disjoint, reproducible shares (``rank`` enters the seed).

* :class:`SimulatedStream`: every batch draws new Haar-random poses, projects them from the map
  (Fourier slice, :func:`cryosphere.imaging.projection.project_volume`), blurs them like the
  dataset, adds fresh noise (white, or coloured by a stated ``noise_power`` per Fourier shell)
  and computes the targets (:mod:`cryosphere.poses.training.targets`). There is no training set
  to memorise.
  The noise level follows the SNR definition of the simulation, ``σ² = var(clean stack) / SNR``,
  with the variance of a fixed reference stack of ``reference_images`` Haar-random clean
  projections (seeded, so ``σ`` is a property of the map, not of a batch). ``snr`` is one value
  or a range ``(low, high)`` drawn log-uniformly per image.
  With ``realism`` (:class:`ParticleRealism`) every particle also gets its own CTF and a
  sub-pixel shift, in the order of :mod:`cryosphere.imaging.simulate` (blur, CTF, shift; the
  reference stack too, so the SNR means the same), and the network sees what ``cryosphere
  predict`` feeds it: :func:`cryosphere.imaging.preprocess.prepare_images` (CTF phase flip,
  background normalisation). The ``"bayes"`` target then uses templates carrying the image's
  CTF at its true shift, ``p(R_g | I, s) ∝ exp(−‖shift_{−s}(I) − C ∗ T_g‖² / 2σ²)``: the
  network does not know ``s``, but cross-entropy is linear in the target, so the expected
  gradient is that of the shift-marginal posterior ``E_s[p(R_g | I, s)] = p(R_g | I)``.
* :class:`~cryosphere.poses.training.fixed_stream.FixedSetStream` (its own module): the images
  of a fixed training split, in the same ``batch(step, rank)`` form.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cryosphere._checks import as_symmetry_ops, known_fields
from cryosphere.geometry import grids
from cryosphere.geometry import rotations as geometry_rotations
from cryosphere.geometry.distributions import integrate_over_parents
from cryosphere.imaging import ctf as ctf_module
from cryosphere.imaging import microscope, preprocess
from cryosphere.imaging.datasets import SimulationParameters
from cryosphere.imaging.projection import gaussian_blur, project_volume, volume_spectrum
from cryosphere.imaging.simulate import draw_realism
from cryosphere.poses.labels.landscape import mse_landscape
from cryosphere.poses.labels.soft_maps import default_radius_deg, soft_labels, tune_lambda
from cryosphere.poses.labels.templates import template_bank
from cryosphere.poses.search import matching
from cryosphere.poses.training import targets as tg

__all__ = [
    "Batch",
    "StreamConfig",
    "ParticleRealism",
    "SimulatedStream",
    "stream_seed",
]

_HELDOUT_RANK = 2**20  # rank slot reserved for held-out sets (never a training rank)


def stream_seed(seed: int, rank: int, step: int) -> np.random.Generator:
    """The generator of batch ``step`` of ``rank``: ``default_rng([seed, rank, step])``."""
    return np.random.default_rng([int(seed), int(rank), int(step)])


@dataclass(frozen=True)
class Batch:
    """One batch of training or validation data.

    Attributes:
        images: ``(n, M, M)`` float32 noisy images as the network sees them (``M``: the
            stream's ``model_box``, ``N`` unless set).
        targets: ``(n, G)`` float32 target distributions (rows sum to 1).
        rotations: ``(n, 3, 3)`` float64 true poses.
        noise_sigma: ``(n,)`` float64 noise standard deviation per image (units of ``raw``).
        clean: ``(n, N, N)`` float32 noise-free images (with CTF and shift when on).
        raw: ``(n, N, N)`` float32 noisy images before the network's preprocessing (with
            :class:`ParticleRealism` or a ``model_box`` crop; otherwise ``images`` are raw).
        ctf: the particles' CTF parameters (with a CTF on), else None.
        shifts_px: ``(n, 2)`` shifts ``(sx, sy)`` px of the particles (with realism), else None.
    """

    images: torch.Tensor
    targets: torch.Tensor
    rotations: np.ndarray
    noise_sigma: np.ndarray
    clean: torch.Tensor
    raw: torch.Tensor | None = None
    ctf: ctf_module.CTFParameters | None = None
    shifts_px: np.ndarray | None = None


@dataclass(frozen=True)
class StreamConfig:
    """What a :class:`SimulatedStream` draws.

    Attributes:
        snr: SNR of every image, or ``(low, high)``: log-uniform per image.
        target: ``"bayes"``, ``"pose"`` or ``"soft"`` (:mod:`cryosphere.poses.training.targets`).
        batch_size: images per batch.
        seed: stream seed (batches are a function of seed, rank and step).
        pose_width_deg: kernel width of the ``"pose"`` target (None: half the grid spacing).
        soft_lambda: λ of the ``"soft"`` target (None: tuned on the reference stack).
        reference_images: size of the reference stack that fixes the signal variance.
        bayes_level: the ``"bayes"`` target's template grid, at or finer than the targets'
            level: each cell gets the posterior summed over its templates, the posterior
            integrated over the cell
            (:func:`~cryosphere.geometry.distributions.integrate_over_parents`; one level
            finer: 8 templates per cell on average). None: the targets' own level, the
            posterior at the cell centres (overconfident where it is narrower than a cell).
            Measured on 1UBI at SNR 0.1 (docs/calibration.md): one level finer took the
            network's log-likelihood of the true pose from 0.34 to 0.25 nats below the exact
            posterior's.
    """

    snr: float | tuple[float, float] = 0.1
    target: str = "bayes"
    batch_size: int = 64
    seed: int = 0
    pose_width_deg: float | None = None
    soft_lambda: float | None = None
    reference_images: int = 1024
    bayes_level: int | None = None

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
        if self.bayes_level is not None and self.target != "bayes":
            raise ValueError(
                f"bayes_level sets the 'bayes' target's templates, not the {self.target!r} "
                "target's; drop bayes_level or use target='bayes'"
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as recorded in a checkpoint's stream identity; ``bayes_level`` only when
        set, so streams without it keep the identity they were trained under."""
        out = dataclasses.asdict(self)
        if isinstance(self.snr, tuple):
            out["snr"] = list(self.snr)
        if self.bayes_level is None:
            del out["bayes_level"]
        return out

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> StreamConfig:
        record = dict(record)
        if isinstance(record.get("snr"), list):
            record["snr"] = tuple(record["snr"])
        return known_fields(cls, record)(**record)


@dataclass(frozen=True)
class ParticleRealism:
    """CTF and shifts of a :class:`SimulatedStream`'s particles (module docstring).

    Attributes:
        pixel_size_angstrom: Å per pixel of the map (and images).
        optics: the :class:`~cryosphere.imaging.datasets.SimulationParameters` whose CTF and
            shift fields (``ctf``, ``defocus_min/max_angstrom``, ``max_astigmatism_angstrom``,
            ``voltage_kv``, ``spherical_aberration_mm``, ``amplitude_contrast``,
            ``ctf_b_factor``, ``max_shift_px``) the particles follow, drawn as
            :func:`cryosphere.imaging.simulate.draw_realism` draws them (default: CTF on,
            0.5-2.5 µm, centred); its other fields are not used.
        ctf_correction: the network input's CTF correction (``"phase_flip"``, as ``predict``).
    """

    pixel_size_angstrom: float
    optics: SimulationParameters = field(default_factory=lambda: SimulationParameters(ctf=True))
    ctf_correction: str = "phase_flip"

    def __post_init__(self) -> None:
        if not self.pixel_size_angstrom > 0:
            raise ValueError(f"pixel_size_angstrom must be > 0, got {self.pixel_size_angstrom}")
        if self.optics.contrast_sigma > 0:
            raise ValueError("contrast variation is not streamed; set contrast_sigma=0")
        if self.ctf_correction not in preprocess.CTF_CORRECTIONS:
            raise ValueError(
                f"ctf_correction must be one of {preprocess.CTF_CORRECTIONS}, "
                f"got {self.ctf_correction!r}"
            )

    @property
    def ctf(self) -> bool:
        return bool(self.optics.ctf)

    def draw(self, rng: np.random.Generator, n: int):
        """CTF parameters (or None) and ``(n, 2)`` shifts (or None) of ``n`` particles."""
        drawn = draw_realism(self.optics, n, rng)
        return drawn.get("ctf"), drawn.get("shifts_px")

    def description(self) -> dict[str, Any]:
        return {
            "pixel_size_angstrom": self.pixel_size_angstrom,
            "ctf_correction": self.ctf_correction,
            "optics": self.optics.to_dict(),
        }


class SimulatedStream:
    """Fresh simulated particles of ``volume`` for every batch (module docstring).

    Args:
        volume: ``(N, N, N)`` map ``[z, y, x]``.
        blur_sigma: Gaussian blur of the images, pixels.
        level: grid level of the targets.
        config: :class:`StreamConfig`.
        symmetry_ops: ``(K, 3, 3)`` point group (targets put equal weight on mates).
        templates: ``(G, N, N)`` template bank of ``volume`` on ``level`` (the ``"bayes"``
            target's: on ``config.bayes_level`` when set) blurred by ``blur_sigma`` (made when a
            ``"bayes"`` or ``"soft"`` target needs it and None).
        realism: per-particle CTF and shifts (:class:`ParticleRealism`); None: neither.
        noise_power: ``(N // 2 + 1,)`` relative noise power per Fourier shell
            (:func:`cryosphere.imaging.microscope.colour_noise`; the variance per pixel stays
            ``σ²``); None: white noise, or the realism's own ``noise_power`` where it has one
            (a refinement's measured spectrum).
        model_box: the network's box ``M`` (even, ``<= N``): its input is Fourier-cropped
            from the simulated ``N`` px, as ``cryosphere predict`` crops particles to the
            network's box (the physics, SNR and targets stay those of ``N`` px); None: ``N``.
    """

    def __init__(
        self,
        volume: np.ndarray,
        blur_sigma: float,
        level: int,
        config: StreamConfig,
        symmetry_ops: np.ndarray | None = None,
        templates: np.ndarray | None = None,
        realism: ParticleRealism | None = None,
        noise_power: np.ndarray | None = None,
        model_box: int | None = None,
    ):
        self.realism = realism
        measured = getattr(realism, "noise_power", None)
        if noise_power is not None and measured is not None:
            raise ValueError(
                "noise_power given twice (argument and realism); drop the argument to use the "
                "refinement's measured spectrum"
            )
        self.noise_power = _checked_noise_power(
            noise_power if noise_power is not None else measured, int(np.shape(volume)[0])
        )
        self.volume = np.asarray(volume, dtype=np.float32)
        if self.volume.ndim != 3 or len(set(self.volume.shape)) != 1:
            raise ValueError(f"volume must be cubic (N, N, N), got {self.volume.shape}")
        if not np.all(np.isfinite(self.volume)):
            raise ValueError("volume holds NaN or infinite values")
        self.model_box = self.image_size if model_box is None else int(model_box)
        if self.model_box != self.image_size:
            preprocess.check_crop_size(self.image_size, self.model_box)
        self.blur_sigma = float(blur_sigma)
        self.level = int(level)
        self.config = config
        self.symmetry_ops = as_symmetry_ops(symmetry_ops)
        self._spectrum = volume_spectrum(self.volume)
        template_level = self.level if config.bayes_level is None else int(config.bayes_level)
        if template_level < self.level:
            raise ValueError(
                f"templates on level {template_level} cannot be summed into the finer "
                f"level-{self.level} cells; use bayes_level {self.level} or finer"
            )
        self._template_level = template_level
        self.templates = templates
        if config.target in ("bayes", "soft") and templates is None:
            self.templates = template_bank(self.volume, template_level, self.blur_sigma)
        if self.templates is not None and config.target in ("bayes", "soft"):
            expected = grids.healpix_so3_grid_size(template_level)
            if len(self.templates) != expected:
                raise ValueError(
                    f"{len(self.templates)} templates given for a {config.target!r} target whose "
                    f"templates are the {expected} of level {template_level}; pass that "
                    "level's template bank or none (made here)"
                )
        reference_poses = geometry_rotations.random_rotations(
            config.reference_images, config.seed + 7919
        )
        reference = self._clean(reference_poses)
        if realism is not None:
            draws = realism.draw(np.random.default_rng([config.seed, 7919]), len(reference_poses))
            observed = self._observed(reference, *draws)
        else:
            observed = reference
        self._spectra = None
        if realism is not None and realism.ctf and config.target == "bayes":
            self._spectra = matching.template_spectra(self.templates)
        self.signal_variance = float(observed.double().var(unbiased=False))
        if not self.signal_variance > 0:
            raise ValueError("the map projects to constant images; check the volume")
        self.soft_lambda = config.soft_lambda
        if config.target == "soft" and self.soft_lambda is None:
            mse = mse_landscape(reference[:256], self.templates)
            grid = grids.healpix_so3_grid(self.level)
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

    def _transfer(self, ctf: ctf_module.CTFParameters) -> torch.Tensor:
        return ctf_module.ctf_2d(ctf, self.image_size, self.realism.pixel_size_angstrom)

    def _observed(self, clean: torch.Tensor, ctf, shifts) -> torch.Tensor:
        """Noise-free particles: ``shift(CTF ∗ clean)`` (either step skipped when None); with
        the optics' ``ctf_field="padded"`` both act in a padded field, then boxed
        (:func:`cryosphere.imaging.microscope.image_in_field`)."""
        if ctf is not None and self.realism.optics.ctf_field == "padded":
            pixel = self.realism.pixel_size_angstrom
            return microscope.image_in_field(clean, ctf, pixel, shifts_px=shifts)
        if ctf is not None:
            clean = ctf_module.apply_ctf(clean, self._transfer(ctf))
        if shifts is not None:
            clean = ctf_module.shift_images(clean, shifts)
        return clean

    def _realistic_targets(self, raw, clean, rotations, sigma, ctf, shifts) -> torch.Tensor:
        """Targets of realistic particles; ``"bayes"`` with CTF templates at the true shift."""
        if self.config.target != "bayes" or ctf is None:
            return self.targets_for(raw, clean, rotations, sigma)
        centred = raw if shifts is None else ctf_module.shift_images(raw, -shifts)
        if self.realism.optics.ctf_field == "padded":
            pixel = self.realism.pixel_size_angstrom
            mse = matching.padded_ctf_mse_landscape(centred, ctf, pixel, self._spectra)
        else:
            mse = matching.ctf_mse_landscape(centred, self._transfer(ctf), self._spectra)
        t = tg.posterior_from_mse(mse, self.image_size**2, sigma)
        return torch.from_numpy(self._on_target_cells(t))

    def _on_target_cells(self, posterior: np.ndarray) -> np.ndarray:
        """``(n, G)`` float32: a ``"bayes"`` posterior over the templates, each target cell
        summing its templates' mass when they lie on a finer grid (``bayes_level``)."""
        if self._template_level != self.level:
            every = np.arange(posterior.shape[1])
            posterior = integrate_over_parents(posterior, every, self.level, self._template_level)
        return np.ascontiguousarray(posterior, dtype=np.float32)

    def _make_realistic(
        self, rng: np.random.Generator, n: int, snr: float | None, with_targets: bool
    ) -> Batch:
        rotations = geometry_rotations.random_rotations(n, rng)
        sigma = self.noise_sigma(self._snrs(rng, n, snr))
        ctf, shifts = self.realism.draw(rng, n)
        projections = self._clean(rotations)
        clean = self._observed(projections, ctf, shifts)
        noise_gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        noise = self._unit_noise(clean.shape, noise_gen)
        raw = clean + noise * torch.from_numpy(sigma).float()[:, None, None]
        G = grids.healpix_so3_grid_size(self.level)
        targets = (
            self._realistic_targets(raw, projections, rotations, sigma, ctf, shifts)
            if with_targets
            else torch.zeros(n, G)
        )
        images, _ = preprocess.prepare_images(
            raw,
            self.realism.pixel_size_angstrom,
            target_size=self.model_box,
            ctf=ctf,
            ctf_correction=self.realism.ctf_correction,
        )
        return Batch(images, targets, rotations, sigma, clean, raw, ctf, shifts)

    def _unit_noise(self, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        """Noise of unit variance per pixel: white, or coloured by ``noise_power``."""
        noise = torch.randn(shape, generator=generator)
        if self.noise_power is None:
            return noise
        return microscope.colour_noise(noise, self.noise_power)

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
            t = self._on_target_cells(tg.bayes_posterior(images, self.templates, sigma))
        else:
            t = soft_labels(mse_landscape(clean, self.templates), self.soft_lambda)
        return torch.from_numpy(np.ascontiguousarray(t))

    def make(
        self, rng: np.random.Generator, n: int, snr: float | None = None, with_targets: bool = True
    ) -> Batch:
        """``n`` new particles drawn with ``rng`` (at ``snr`` when given)."""
        if self.realism is not None:
            return self._make_realistic(rng, n, snr, with_targets)
        rotations = geometry_rotations.random_rotations(n, rng)
        sigma = self.noise_sigma(self._snrs(rng, n, snr))
        clean = self._clean(rotations)
        noise_gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        noise = self._unit_noise(clean.shape, noise_gen)
        images = clean + noise * torch.from_numpy(sigma).float()[:, None, None]
        G = grids.healpix_so3_grid_size(self.level)
        targets = (
            self.targets_for(images, clean, rotations, sigma) if with_targets else torch.zeros(n, G)
        )
        if self.model_box != self.image_size:  # the network's input; raw keeps the N px
            cropped = preprocess.fourier_crop(images, self.model_box, 1.0)[0]
            return Batch(cropped, targets, rotations, sigma, clean, raw=images)
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
        description = {
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
        if self.realism is not None:
            description["realism"] = self.realism.description()
        if self.model_box != self.image_size:
            description["model_box"] = self.model_box
        if self.noise_power is not None and getattr(self.realism, "noise_power", None) is None:
            # a refinement's realism describes its own measured spectrum
            description["noise_power"] = [float(f"{v:.6g}") for v in self.noise_power]
        return description


def _checked_noise_power(power: np.ndarray | None, image_size: int) -> np.ndarray | None:
    """``power`` as float64 ``(N // 2 + 1,)``, or a one-line error naming the fix."""
    if power is None:
        return None
    power = np.asarray(power, dtype=np.float64)
    shells = image_size // 2 + 1
    if power.shape != (shells,) or not np.all(np.isfinite(power)) or np.any(power < 0):
        raise ValueError(
            f"noise_power must hold {shells} finite values >= 0 (one per Fourier shell of the "
            f"{image_size}-px map), got shape {power.shape}; see microscope.radial_power_spectrum"
        )
    if not power.sum() > 0:
        raise ValueError("noise_power is zero in every shell; give the noise's relative power")
    return power
