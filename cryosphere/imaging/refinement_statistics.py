"""What a refinement's particles look like, measured so that particles can be simulated like them.

From a particle set with refined poses (:class:`~cryosphere.imaging.particles.ParticleSet`) and
its consensus map brought to the model box ``M`` (pixel ``p = p_data · N / M`` Å),
:func:`estimate_statistics` measures, on a seeded sample of at most ``max_images`` particles
Fourier-cropped to ``M`` px (no CTF correction, no normalisation: as a microscope recorded them):

* **CTF**: every particle's own row (optics groups included: the
  :class:`~cryosphere.imaging.ctf.CTFParameters` of the set carry each particle's voltage, Cs,
  amplitude contrast and B-factor); new particles draw whole rows (defocus U, V and angle stay
  together, so the astigmatism distribution is the data's).
* **Shifts**: the particles' displacements from the box centre, ``s = −origin / p_data`` px
  (RELION's sign, :mod:`cryosphere.imaging.ctf`), in model pixels ``s · M / N``; new particles
  draw them from this empirical distribution, independently of the CTF row.
* **Noise**: the standard deviation ``σ`` of the pixels outside a circle of
  ``background_radius_fraction · M`` px around the centre (each image's background mean removed,
  variances pooled over images), and the shape of its power spectrum per Fourier shell
  (:func:`cryosphere.imaging.microscope.masked_shell_power` of the masked backgrounds, mean 1
  over the grid), each less the share of the fitted signal (below) in the same background: at
  0.5-2.5 µm the CTF carries a particle's low-frequency signal tens of pixels out of its disc
  (1.5× the noise power in the first shells of 1UBI at 64 px, SNR 0.05), which is not noise.
* **Signal**: the prediction of particle ``i`` is its refined pose's projection of the map,
  blurred by a Gaussian of ``β`` px, imaged with its CTF and shift
  (:func:`cryosphere.imaging.microscope.image_in_field`): ``S_i(β)``. Contrast ``a`` and blur
  ``β`` are the least-squares fit of ``I_i ≈ a · S_i(β)`` over the sample (``a`` in closed form
  for each ``β`` of a 0.1-px grid from 0 to 4 px); the sign of ``a`` is the data's contrast (+1:
  the map's sign, RELION's usual white protein; −1: dark protein), ``β`` the envelope of the
  data relative to the map.
* **SNR**: ``var(a · S(β) over the sample's pixels) / σ²``, the definition the simulation and
  :class:`~cryosphere.poses.training.stream.SimulatedStream` use.

``tests/test_refinement_statistics.py`` estimates these from a simulated refinement and
compares them with the simulation's parameters (defocus range, noise level within 10 %, shift
spread, contrast sign, SNR).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryosphere.imaging import ctf as ctf_module
from cryosphere.imaging import microscope, preprocess
from cryosphere.imaging.loader import drop_damaged, warn_left_out
from cryosphere.imaging.particles import ParticleSet, StackReader
from cryosphere.imaging.projection import gaussian_blur, project_volume

__all__ = ["RefinementStatistics", "estimate_statistics"]

_BLUR_GRID_PX = np.round(np.arange(0.0, 4.01, 0.1), 2)


@dataclass(frozen=True)
class RefinementStatistics:
    """The measured statistics of a refinement's particles at the model box (module docstring).

    Attributes:
        image_size: model box ``M`` px.
        pixel_size_angstrom: Å per model pixel.
        ctf: every particle's CTF (rows to draw from), or None when the set has no defocus.
        shifts_px: ``(n, 2)`` displacements ``(sx, sy)`` of every particle, model px.
        noise_sigma: background noise standard deviation (units of the cropped images).
        noise_power: ``(M // 2 + 1,)`` noise power per Fourier shell, mean 1 over the grid.
        contrast: fitted scale ``a`` of the prediction (its sign: the data's contrast).
        blur_sigma_px: fitted Gaussian envelope ``β`` of the data relative to the map, px.
        snr: ``var(a · S) / σ²``.
        n_measured: particles the noise and signal were measured on.
    """

    image_size: int
    pixel_size_angstrom: float
    ctf: ctf_module.CTFParameters | None
    shifts_px: np.ndarray
    noise_sigma: float
    noise_power: np.ndarray
    contrast: float
    blur_sigma_px: float
    snr: float
    n_measured: int

    def draw(
        self, rng: np.random.Generator, n: int
    ) -> tuple[ctf_module.CTFParameters | None, np.ndarray]:
        """CTF rows (or None) and ``(n, 2)`` shifts of ``n`` new particles, drawn with
        replacement from the refinement's own (independently of each other)."""
        rows = rng.integers(0, len(self.shifts_px), size=n)
        ctf = None
        if self.ctf is not None:
            ctf = self.ctf.subset(rng.integers(0, len(self.ctf), size=n))
        return ctf, self.shifts_px[rows]

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures: defocus and astigmatism percentiles (Å), shift spread (px),
        noise, contrast sign, envelope and SNR."""
        out: dict[str, Any] = {
            "n_particles": int(len(self.shifts_px)),
            "n_measured": self.n_measured,
            "image_size": self.image_size,
            "pixel_size_angstrom": self.pixel_size_angstrom,
            "shift_std_px": [float(v) for v in self.shifts_px.std(axis=0)],
            "shift_max_px": float(np.abs(self.shifts_px).max()),
            "noise_sigma": self.noise_sigma,
            "contrast_sign": int(np.sign(self.contrast)),
            "contrast": self.contrast,
            "blur_sigma_px": self.blur_sigma_px,
            "snr": self.snr,
        }
        if self.ctf is not None:
            mean = (self.ctf.defocus_u_angstrom + self.ctf.defocus_v_angstrom) / 2
            astig = np.abs(self.ctf.defocus_u_angstrom - self.ctf.defocus_v_angstrom)
            q = [0, 5, 50, 95, 100]
            values = np.percentile(mean, q).tolist()
            out["defocus_percentiles_angstrom"] = {
                f"p{k}": v for k, v in zip(q, values, strict=True)
            }
            out["astigmatism_median_angstrom"] = float(np.median(astig))
            out["voltages_kv"] = sorted(set(self.ctf.voltage_kv.tolist()))
        return out


def _blur_transfers(size: int) -> torch.Tensor:
    """``(B, M, M // 2 + 1)`` Gaussian blur multipliers of :data:`_BLUR_GRID_PX` on the rfft2
    grid (as :func:`cryosphere.imaging.projection.gaussian_blur`)."""
    ky = torch.fft.fftfreq(size, dtype=torch.float64)[:, None]
    kx = torch.fft.rfftfreq(size, dtype=torch.float64)[None, :]
    sigma = torch.as_tensor(_BLUR_GRID_PX, dtype=torch.float64)[:, None, None]
    return torch.exp(-2.0 * np.pi**2 * sigma**2 * (ky**2 + kx**2))


def _half_plane_weights(size: int) -> torch.Tensor:
    """rfft2 column weights (1 on columns 0 and ``M / 2``, else 2): sums over the half plane
    weighted by them are inner products over the whole plane."""
    weights = torch.full((size // 2 + 1,), 2.0, dtype=torch.float64)
    weights[0] = weights[-1] = 1.0
    return weights


def estimate_statistics(
    particles: ParticleSet,
    volume: np.ndarray,
    *,
    indices: np.ndarray | None = None,
    max_images: int = 2000,
    background_radius_fraction: float = 0.375,
    seed: int = 0,
    batch_size: int = 256,
    skip_bad: bool = False,
) -> RefinementStatistics:
    """Measure a refinement (module docstring).

    Args:
        particles: the particle set, with refined angles.
        volume: ``(M, M, M)`` consensus map at the model box
            (:func:`cryosphere.imaging.preprocess.reference_map`).
        indices: the particles (rows) to describe (None: all), e.g. a training split.
        max_images: particles read for the noise and signal fits (a seeded sample).
        background_radius_fraction: radius of the particle mask, a fraction of ``M``.
        seed: the sample's seed.
        skip_bad: leave sampled particles with NaN or infinite pixels out (a warning lists
            them) instead of refusing the set (ValueError naming them).
    """
    volume = np.asarray(volume, dtype=np.float32)
    size = int(volume.shape[0])
    pool = np.arange(len(particles)) if indices is None else np.asarray(indices, np.int64)
    if pool.size == 0:
        raise ValueError("no particles to measure (an empty selection)")
    ratio = size / particles.image_size
    pixel = particles.pixel_size_angstrom / ratio
    shifts_all = -np.asarray(particles.origins_angstrom) / particles.pixel_size_angstrom * ratio
    rotations = particles.rotations()
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(pool, size=min(pool.size, int(max_images)), replace=False))
    mask = preprocess.background_mask(size, float(background_radius_fraction) * size)
    shells = microscope.shell_index(size)
    cross = torch.zeros(size, size // 2 + 1, dtype=torch.float64)  # Σ_i Re(Î_i S̄_i)
    power = torch.zeros_like(cross)  # Σ_i |S_i|²
    bg_var, bg_power, n_bg, predictions, dropped = 0.0, np.zeros(size // 2 + 1), 0, [], []
    with StackReader(particles) as reader:
        for start in range(0, len(sample), int(batch_size)):
            index = sample[start : start + int(batch_size)]
            raw = reader.read(index)
            index, raw = drop_damaged(particles, index, raw, skip_bad, dropped)
            if len(index) == 0:
                continue
            images, _ = preprocess.fourier_crop(raw, size, particles.pixel_size_angstrom)
            background = images.double()[:, mask]
            bg_var += float(background.var(dim=1, unbiased=False).sum())
            bg_power += microscope.masked_shell_power(images, mask, shells) * len(index)
            n_bg += len(index)
            projections = project_volume(volume, rotations[index], progress=False)
            ctf = None if particles.ctf is None else particles.ctf.subset(index)
            shifts = shifts_all[index]
            if ctf is None:
                predicted = ctf_module.shift_images(projections, shifts)
            else:
                predicted = microscope.image_in_field(projections, ctf, pixel, shifts_px=shifts)
            f_images, f_pred = torch.fft.rfft2(images.double()), torch.fft.rfft2(predicted.double())
            cross += (f_images * f_pred.conj()).real.sum(0)
            power += (f_pred.abs() ** 2).sum(0)
            predictions.append(predicted)
    # S(β) = blur_β(S(0)) (the blur commutes with CTF and shift); for each β the scale is
    # a(β) = Σ⟨I, S(β)⟩ / Σ‖S(β)‖² and the fit explains (Σ⟨I, S(β)⟩)² / Σ‖S(β)‖²
    blur = _blur_transfers(size) * _half_plane_weights(size)
    c_tot = (blur * cross).sum(dim=(1, 2)).numpy()
    p_tot = ((blur * _blur_transfers(size)) * power).sum(dim=(1, 2)).numpy()
    best = int(np.argmax(c_tot**2 / np.maximum(p_tot, 1e-300)))
    contrast = float(c_tot[best] / p_tot[best])
    signal = gaussian_blur(torch.cat(predictions), float(_BLUR_GRID_PX[best])).double() * contrast
    # the background also holds the signal the CTF carried out of the particle's disc: take
    # the fitted signal's own share out of the noise's variance and spectrum
    leaked_var = float(signal[:, mask].var(dim=1, unbiased=False).mean())
    variance = bg_var / max(n_bg, 1)
    sigma = float(np.sqrt(max(variance - leaked_var, microscope.LEAKED_SIGNAL_FLOOR * variance)))
    measured = bg_power / max(n_bg, 1)
    noise = microscope.noise_power_less_signal(measured, signal, mask, shells)
    noise_power = noise / float(np.mean(noise[shells.numpy()]))
    if not sigma > 0:
        raise ValueError("the particle backgrounds are constant; are these real particle images?")
    warn_left_out(particles, dropped)
    sample = np.setdiff1d(sample, dropped)
    return RefinementStatistics(
        image_size=size,
        pixel_size_angstrom=float(pixel),
        ctf=None if particles.ctf is None else particles.ctf.subset(pool),
        shifts_px=shifts_all[pool],
        noise_sigma=sigma,
        noise_power=noise_power,
        contrast=contrast,
        blur_sigma_px=float(_BLUR_GRID_PX[best]),
        snr=float(signal.var(unbiased=False)) / sigma**2,
        n_measured=int(len(sample)),
    )
