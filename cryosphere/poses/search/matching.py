"""CTF-aware template matching with a translation search.

For image ``i`` (spectrum ``F_i``, CTF ``C_i``), template ``g`` (spectrum ``T_g``, a projection
of the map at grid pose ``R_g``, e.g. from :func:`cryosphere.poses.labels.templates.template_bank`) and
a trial shift ``s`` (px) applied to the image, the score is the mean squared error

    MSE_i(g, s) = (1 / N⁴) Σ_k w_k |F_i(k) e^{−2πi k·s} − M_i(k) T_g(k)|²

over the ``rfft2`` half-plane (``w_k`` = 2 for columns counted twice, 1 otherwise; Parseval),
with the model filter ``M_i`` set by ``mode``:

* ``"ctf_templates"`` (default): ``M_i = C_i``, i.e. every template carries the image's own CTF.
  Expanding the square gives one matrix product per shift for the cross term
  ``Re Σ w C_i F_i e_s conj(T_g)`` and one for ``Σ w C_i² |T_g|²``: no per-image template bank.
* ``"phase_flip"``: the image is phase-flipped (``F_i → sign(C_i) F_i``) and compared with the
  bare templates (``M_i = 1``), as real-data tools that flip before comparison do.
* ``"none"``: the CTF is ignored.
* ``"padded_ctf"``: as ``"ctf_templates"``, but the CTF acts in a padded field and the
  template is boxed afterwards, as a microscope images a particle
  (:mod:`cryosphere.imaging.microscope`): the cross term uses the image imaged in the field,
  ``⟨I, B C P T⟩ = ⟨B C P I, T⟩`` (exact; the shift is taken outside, exact up to the box
  edges), the norm ``Σ C² |T|²`` is taken in the box (:func:`padded_ctf_mse_landscape`).
  On particles imaged in a padded field (1UBI, 64 px, SNR 0.05, 0.5-2.5 µm, true shifts) it
  finds the pose with a median error of 13.9° against 22.0° for ``"ctf_templates"`` (above
  1.5 µm: 22.9° against 112.9°).

Shifts are searched on a square grid ``{−max, …, max}²`` (step ``shift_step_px``); the best
``(g, s)`` over both is returned. ``shift_px`` is the shift that centres the particle, so in
RELION's convention the particle's origin is ``rlnOriginXAngst/YAngst = shift_px ·
pixel_size`` (:mod:`cryosphere.imaging.ctf`). Measured choice: ``"ctf_templates"`` (see
``tests/test_matching.py`` and the report of issue 13).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from cryosphere.imaging import ctf as ctf_module
from cryosphere.imaging import microscope

__all__ = [
    "MATCHING_MODES",
    "MatchResult",
    "TemplateSpectra",
    "shift_grid_px",
    "template_spectra",
    "ctf_mse_landscape",
    "ctf_template_matching",
]

MATCHING_MODES = ("ctf_templates", "phase_flip", "none", "padded_ctf")


@dataclass(frozen=True)
class MatchResult:
    """Best template and shift per image.

    Attributes:
        best_index: ``(n,)`` int64 grid index of the best template.
        shift_px: ``(n, 2)`` float64 ``(sx, sy)`` shift that centres each image (px).
        best_mse: ``(n,)`` float64 mean squared error per pixel at the best (g, s); None
            where the search did not score it (the map search of ``predict --map``, which
            ranks candidates by their posterior probability).
    """

    best_index: np.ndarray
    shift_px: np.ndarray
    best_mse: np.ndarray | None

    def origins_angstrom(self, pixel_size_angstrom: float) -> np.ndarray:
        """RELION origins ``(n, 2)`` Å of the particles: ``shift_px · pixel_size``."""
        return self.shift_px * float(pixel_size_angstrom)


def shift_grid_px(max_shift_px: float, step_px: float = 1.0) -> np.ndarray:
    """``(S, 2)`` trial shifts ``(sx, sy)`` on a square grid in ``[−max, max]``, zero first."""
    if max_shift_px < 0 or not step_px > 0:
        raise ValueError(f"need max_shift_px >= 0 and step_px > 0, got {max_shift_px}, {step_px}")
    half = int(math.floor(max_shift_px / step_px + 1e-9))
    axis = np.arange(-half, half + 1) * float(step_px)
    grid = np.stack(np.meshgrid(axis, axis, indexing="xy"), axis=-1).reshape(-1, 2)
    order = np.argsort(np.abs(grid).sum(axis=1), kind="stable")  # ties go to smaller shifts
    return grid[order]


def _half_plane_weights(n_pix: int) -> torch.Tensor:
    weights = torch.full((n_pix, n_pix // 2 + 1), 2.0)
    weights[:, 0] = 1.0
    if n_pix % 2 == 0:
        weights[:, -1] = 1.0
    return weights


def _ramps(shifts: np.ndarray, n_pix: int) -> torch.Tensor:
    """``(S, N, N//2+1)`` complex64 phase ramps ``e^{−2πi k·s}``."""
    ky = torch.fft.fftfreq(n_pix, dtype=torch.float64)
    kx = torch.fft.rfftfreq(n_pix, dtype=torch.float64)
    s = torch.as_tensor(shifts, dtype=torch.float64)
    phase = -2 * math.pi * (s[:, 0, None, None] * kx + s[:, 1, None, None] * ky[:, None])
    return torch.polar(torch.ones_like(phase), phase).to(torch.complex64)


def _real_pair(z: torch.Tensor) -> torch.Tensor:
    """Complex ``(..., K)`` -> real ``(..., 2K)`` (real and imaginary parts interleaved, a view
    when ``z`` is contiguous) so that ``Re(a · conj(b)) = pair(a) · pair(b)``."""
    return torch.view_as_real(z.resolve_conj()).reshape(*z.shape[:-1], 2 * z.shape[-1])


@dataclass(frozen=True)
class TemplateSpectra:
    """Templates ``(G, N, N)`` in the forms :func:`ctf_mse_landscape` and the local search
    multiply, on the whole ``rfft2`` half-plane or on a low-pass band of it.

    Attributes:
        spectra: ``(G, K)`` complex64 ``rfft2`` spectra ``T_g(k)`` on the band, flattened
            row-major over ``(len(rows), columns)`` (whole half-plane: ``K = N (N // 2 + 1)``).
        power: ``(G, K)`` float32 ``|T_g(k)|²``.
        image_size: ``N`` (px).
        max_frequency: the band's radius in cycles per pixel (None: the whole half-plane, up
            to the corners). Frequencies in the band's rectangle but outside the disk get
            weight 0, so the score is that of the images low-passed at this radius.
    """

    spectra: torch.Tensor
    power: torch.Tensor
    image_size: int
    max_frequency: float | None = None

    @property
    def pairs(self) -> torch.Tensor:
        """``(G, 2K)`` float32 view of :attr:`spectra` as real pairs (:func:`_real_pair`)."""
        return _real_pair(self.spectra)

    @property
    def rows(self) -> torch.Tensor:
        """``(R,)`` int64 the ``rfft2`` rows (first axis, ``fftfreq`` order) in the band."""
        return _band(self.image_size, self.max_frequency)[0]

    @property
    def columns(self) -> int:
        """The ``rfft2`` columns ``0..columns−1`` (last axis) in the band."""
        return _band(self.image_size, self.max_frequency)[1]

    def restrict(self, spectrum: torch.Tensor) -> torch.Tensor:
        """``(..., N, N // 2 + 1)`` half-plane values (spectra, CTFs) -> ``(..., K)`` on the
        band, in :attr:`spectra`'s order."""
        band = spectrum.index_select(-2, self.rows)[..., : self.columns]
        return band.reshape(*spectrum.shape[:-2], -1)

    def band_ctf(
        self, parameters: ctf_module.CTFParameters, pixel_size_angstrom: float
    ) -> torch.Tensor:
        """``(n, K)`` float32 the particles' CTFs on the band, in :attr:`spectra`'s order:
        ``restrict(ctf_2d(...))`` evaluated on the band alone
        (:func:`~cryosphere.imaging.ctf.ctf_2d` with ``band``)."""
        transfer = ctf_module.ctf_2d(
            parameters, self.image_size, pixel_size_angstrom, band=(self.rows, self.columns)
        )
        return transfer.reshape(transfer.shape[0], -1)

    def weights(self) -> torch.Tensor:
        """``(K,)`` float32 Parseval weights of the band (2 for columns counted twice, 1
        otherwise, 0 outside the disk)."""
        n = self.image_size
        weights = _half_plane_weights(n)
        if self.max_frequency is not None:
            ky = torch.fft.fftfreq(n)[:, None]
            kx = torch.fft.rfftfreq(n)[None, :]
            weights = weights * (ky**2 + kx**2 <= self.max_frequency**2 + 1e-12)
        return self.restrict(weights)

    def low_passed(self, max_frequency: float | None) -> TemplateSpectra:
        """The same templates on the band of radius ``max_frequency`` cycles/px (in (0, 0.5]
        when given; None: self). The band is cut from the whole half-plane: call on spectra
        that have it."""
        if max_frequency is None:
            return self
        if not 0 < float(max_frequency) <= 0.5:
            raise ValueError(
                f"max_frequency must lie in (0, 0.5] cycles per pixel, got {max_frequency}"
            )
        if self.max_frequency is not None:
            raise ValueError("these spectra are already band-limited; start from the whole plane")
        n, g = self.image_size, self.spectra.shape[0]
        band = TemplateSpectra(self.spectra[:0], self.power[:0], n, float(max_frequency))
        full = self.spectra.view(g, n, n // 2 + 1)
        power = self.power.view(g, n, n // 2 + 1)
        return TemplateSpectra(
            band.restrict(full).contiguous(),
            band.restrict(power).contiguous(),
            n,
            band.max_frequency,
        )


@functools.cache
def _band(n_pix: int, max_frequency: float | None) -> tuple[torch.Tensor, int]:
    """Rows and column count of the ``rfft2`` rectangle that holds the disk of radius
    ``max_frequency`` cycles/px (the whole half-plane for None). Cached: every
    :meth:`TemplateSpectra.restrict` of a search block reads it; callers only index with the
    rows."""
    if max_frequency is None:
        return torch.arange(n_pix), n_pix // 2 + 1
    radius = int(math.floor(float(max_frequency) * n_pix + 1e-9))
    ky = torch.fft.fftfreq(n_pix)
    rows = torch.nonzero(ky.abs() * n_pix <= radius + 1e-9).reshape(-1)
    return rows, min(radius + 1, n_pix // 2 + 1)


def template_spectra(
    templates: np.ndarray | torch.Tensor, max_frequency: float | None = None
) -> TemplateSpectra:
    """The spectra of CTF-free templates ``(G, N, N)`` (e.g. a template bank), computed once;
    with ``max_frequency`` (cycles/px), only the low-pass band the search reads
    (:meth:`TemplateSpectra.low_passed`)."""
    b = torch.as_tensor(np.asarray(templates), dtype=torch.float32)
    if b.ndim != 3 or b.shape[1] != b.shape[2]:
        raise ValueError(f"templates must have shape (G, N, N), got {tuple(b.shape)}")
    spectra = torch.fft.rfft2(b).reshape(b.shape[0], -1)
    whole = TemplateSpectra(spectra, spectra.real**2 + spectra.imag**2, b.shape[-1])
    return whole.low_passed(max_frequency)


def ctf_mse_landscape(
    images: np.ndarray | torch.Tensor, transfer: torch.Tensor, spectra: TemplateSpectra
) -> np.ndarray:
    """Mean squared error per pixel ``(n, G)`` float64 between centred images ``(n, N, N)`` and
    the templates carrying each image's CTF ``transfer`` ``(n, N, N // 2 + 1)``
    (:func:`cryosphere.imaging.ctf.ctf_2d`): the ``s = 0`` term of the module docstring's
    ``MSE_i(g, s)`` with ``M_i = C_i``. One float32 matrix product for the cross term and one
    for ``Σ w C² |T|²``; their cancellation error is about ``eps32 · (‖I‖² + ‖C T‖²) / N²``
    per pixel, i.e. ``~1e-7 · (1 + 1/SNR)`` of the signal power, far below the noise ``σ²``
    that scales a posterior."""
    a = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    n_pix = spectra.image_size
    if a.ndim != 3 or tuple(a.shape[1:]) != (n_pix, n_pix):
        raise ValueError(f"images must have shape (n, {n_pix}, {n_pix}), got {tuple(a.shape)}")
    if tuple(transfer.shape) != (a.shape[0], n_pix, n_pix // 2 + 1):
        raise ValueError(f"the CTF must have shape (n, N, N // 2 + 1), got {tuple(transfer.shape)}")
    weights = spectra.weights()
    f = spectra.restrict(torch.fft.rfft2(a))
    c = spectra.restrict(transfer).to(torch.float32)
    cross = _real_pair(weights * c * f) @ spectra.pairs.T
    norms = (weights * c**2) @ spectra.power.T
    image_power = (weights * (f.real**2 + f.imag**2)).sum(1, dtype=torch.float64)
    total = image_power[:, None] + norms.double() - 2.0 * cross.double()
    return np.maximum(total.numpy(), 0.0) / float(n_pix) ** 4


def padded_ctf_mse_landscape(
    images: np.ndarray | torch.Tensor,
    ctf: ctf_module.CTFParameters,
    pixel_size_angstrom: float,
    spectra: TemplateSpectra,
) -> np.ndarray:
    """:func:`ctf_mse_landscape` for particles imaged in a padded field
    (:func:`cryosphere.imaging.microscope.image_in_field`): ``(n, G)`` float64.

    The template of pose ``g`` is then ``B C P T_g`` (pad ``P``, CTF ``C`` on the field, box
    ``B``). The cross term is exact: ``⟨I, B C P T_g⟩ = ⟨B C P I, T_g⟩`` (``C`` is a real,
    even multiplier, so self-adjoint, and ``B`` is ``P``'s adjoint): the image is imaged in the
    field once and compared with the CTF-free templates. The template norm is taken in the box,
    ``Σ C² |T_g|²``, which leaves out the little energy the CTF carries out of the box."""
    a = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    n_pix = spectra.image_size
    if a.ndim != 3 or tuple(a.shape[1:]) != (n_pix, n_pix):
        raise ValueError(f"images must have shape (n, {n_pix}, {n_pix}), got {tuple(a.shape)}")
    weights = spectra.weights()
    f = spectra.restrict(torch.fft.rfft2(a))
    imaged = spectra.restrict(
        torch.fft.rfft2(microscope.image_in_field(a, ctf, pixel_size_angstrom))
    )
    c = spectra.band_ctf(ctf, pixel_size_angstrom)
    cross = _real_pair(weights * imaged) @ spectra.pairs.T
    norms = (weights * c**2) @ spectra.power.T
    image_power = (weights * (f.real**2 + f.imag**2)).sum(1, dtype=torch.float64)
    total = image_power[:, None] + norms.double() - 2.0 * cross.double()
    return np.maximum(total.numpy(), 0.0) / float(n_pix) ** 4


def _check(images, templates, ctf, mode) -> tuple[torch.Tensor, torch.Tensor]:
    if mode not in MATCHING_MODES:
        raise ValueError(f"mode must be one of {MATCHING_MODES}, got {mode!r}")
    a = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    b = torch.as_tensor(np.asarray(templates), dtype=torch.float32)
    if a.ndim != 3 or b.ndim != 3 or a.shape[1:] != b.shape[1:] or a.shape[1] != a.shape[2]:
        raise ValueError(
            f"images (n, N, N) and templates (G, N, N) must share one square box, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    if mode != "none" and ctf is None:
        raise ValueError(f"mode={mode!r} needs the images' CTF parameters (or use mode='none')")
    if ctf is not None and len(ctf) != a.shape[0]:
        raise ValueError(f"{len(ctf)} CTFs given for {a.shape[0]} images")
    return a, b


def ctf_template_matching(
    images: np.ndarray | torch.Tensor,
    templates: np.ndarray | torch.Tensor,
    *,
    ctf: ctf_module.CTFParameters | None,
    pixel_size_angstrom: float,
    mode: str = "ctf_templates",
    max_shift_px: float = 3.0,
    shift_step_px: float = 1.0,
    batch_size: int = 64,
    template_block: int = 1024,
    progress: bool = False,
) -> MatchResult:
    """Best grid template and centring shift for each image (see module docstring).

    Args:
        images: ``(n, N, N)`` particle images (CTF-modulated, shifted, noisy).
        templates: ``(G, N, N)`` CTF-free templates in grid order.
        ctf: the images' CTF parameters (None only with ``mode="none"``).
        pixel_size_angstrom: Å per pixel of the images (for the CTF).
        max_shift_px, shift_step_px: the translation search grid (:func:`shift_grid_px`).
        batch_size, template_block: images and templates per block; work memory is about
            ``S · batch_size · N² · 4 + template_block · N² · 8`` bytes for ``S`` shifts.
    """
    a, b = _check(images, templates, ctf, mode)
    n, n_pix = a.shape[0], a.shape[-1]
    shifts = shift_grid_px(max_shift_px, shift_step_px)
    ramps = _ramps(shifts, n_pix).reshape(len(shifts), -1)
    weights = _half_plane_weights(n_pix).reshape(-1)
    spectra_t = torch.fft.rfft2(b).reshape(b.shape[0], -1)
    power_t = spectra_t.real**2 + spectra_t.imag**2
    best_score = torch.full((n,), math.inf, dtype=torch.float64)
    best_index = torch.zeros(n, dtype=torch.int64)
    best_shift = torch.zeros(n, dtype=torch.int64)
    image_power = torch.zeros(n, dtype=torch.float64)
    starts = range(0, n, int(batch_size))
    for start in tqdm(starts, desc="matching", disable=not progress, unit="batch"):
        stop = min(start + int(batch_size), n)
        spectra = torch.fft.rfft2(a[start:stop]).reshape(stop - start, -1)
        image_power[start:stop] = (weights * spectra.abs() ** 2).sum(1, dtype=torch.float64)
        if ctf is not None and mode != "none":
            transfer = ctf_module.ctf_2d(
                ctf.subset(np.arange(start, stop)), n_pix, pixel_size_angstrom
            ).reshape(stop - start, -1)
            model = torch.ones_like(transfer) if mode == "phase_flip" else transfer
            if mode == "padded_ctf":
                part = ctf.subset(np.arange(start, stop))
                imaged = microscope.image_in_field(a[start:stop], part, pixel_size_angstrom)
                spectra = torch.fft.rfft2(imaged).reshape(stop - start, -1)
            else:
                spectra = spectra * (transfer if mode == "ctf_templates" else torch.sign(transfer))
        else:
            model = torch.ones(stop - start, spectra.shape[1])
        cross_in = _real_pair((weights * spectra)[None] * ramps[:, None])  # (S, k, 2K)
        model_power = weights * model**2  # (k, K)
        for g0 in range(0, b.shape[0], int(template_block)):
            block = spectra_t[g0 : g0 + int(template_block)]
            norms = model_power @ power_t[g0 : g0 + block.shape[0]].T  # (k, g)
            scores = norms[None] - 2.0 * (cross_in @ _real_pair(block).T)  # (S, k, g)
            flat = scores.permute(1, 0, 2).reshape(stop - start, -1)
            value, where = flat.min(dim=1)
            better = value.double() < best_score[start:stop]
            rows = torch.arange(start, stop)[better]
            best_score[rows] = value.double()[better]
            best_shift[rows] = (where // block.shape[0])[better]
            best_index[rows] = (where % block.shape[0])[better] + g0
    mse = (image_power + best_score) / n_pix**4
    return MatchResult(
        best_index=best_index.numpy(),
        shift_px=shifts[best_shift.numpy()].astype(np.float64),
        best_mse=np.maximum(mse.numpy(), 0.0),
    )
