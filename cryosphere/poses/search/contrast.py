"""Particle contrast: is the protein white (the map's sign, RELION's extractions) or dark?

CryoSphere's CTF is RELION's (CTF(0) = +amplitude contrast, :mod:`cryosphere.imaging.ctf`), and
its templates carry the map's sign, so it needs particles whose protein has the map's sign
(*white*). Programs and simulators differ: ASPIRE's CTF is −1 × RELION's (dark protein), raw
micrographs have dark protein, a ``.cs`` file does not say. ``--contrast`` on ``predict`` and
``train`` says what to do:

* ``white`` / ``dark``: taken as given; dark particles are multiplied by −1 on reading, before
  anything else (recentring, cropping, CTF correction, normalisation, the network, the search).
* ``auto`` (default): decided from the data. With a map, a seeded sample of particles (48 by
  default) is compared with the map's CTF-modulated projections:

  - *at refined poses* (``train``: the refinement's angles and origins) — the signed
    correlation ``r_i`` of particle ``i`` (centred) with ``CTF_i · P(R_i) V``;
  - *by a search* (``predict --map``) — each particle against every cell of a coarse grid
    (level 1, ~30°, with a shift search), scored with a free positive scale for the particle
    and for its negative: the better of the two gives the particle's best pose and the sign of
    its correlation, ``r_i = ± sqrt(1 − residual / power)`` in the search band (no zero
    frequency).

  The contrast is the sign of the median ``r``; when fewer than 60 % of the sample agree
  (noise, or a map of something else) the result is *undecided*: ``white`` is assumed, with a
  warning to pass ``--contrast``. Without a map, ``predict`` takes the contrast recorded in the
  checkpoint (the training set's, :func:`record_in_checkpoint`), else ``white`` is assumed and
  said so.

The decision is printed (one line on stderr) and written as a comment line at the top of the
output STAR file (:func:`annotate_star`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cryosphere import io
from cryosphere.imaging import ctf as ctf_module
from cryosphere.imaging import preprocess
from cryosphere.imaging.particles import ParticleSet, StackReader
from cryosphere.imaging.projection import project_volume
from cryosphere.poses.labels.templates import template_bank
from cryosphere.poses.search.local_search import candidate_scores
from cryosphere.poses.search.matching import template_spectra

__all__ = [
    "CONTRASTS",
    "ContrastDecision",
    "correlations_at_poses",
    "correlations_by_search",
    "decide_contrast",
    "detect_contrast",
    "resolve_without_map",
    "forced_contrast",
    "sample_indices",
    "record_in_checkpoint",
    "recorded_contrast",
    "annotate_star",
    "decide_for_particle_set",
]

CONTRASTS = ("auto", "white", "dark")
#: Particles compared with the map to decide ``auto``.
DEFAULT_SAMPLE = 48
#: Share of the sample that must agree on the sign for a decision.
AGREEMENT = 0.6
_CHECKPOINT_KEY = "contrast"


@dataclass(frozen=True)
class ContrastDecision:
    """The contrast taken for a particle set and why.

    Attributes:
        contrast: ``"white"`` or ``"dark"``.
        how: ``"forced"`` (--contrast), ``"refined poses"``, ``"map search"``, ``"checkpoint"``,
            ``"assumed"`` (no evidence) or ``"undecided"`` (evidence split: white assumed).
        correlations: ``(k,)`` signed correlations of the sampled particles (None without).
    """

    contrast: str
    how: str
    correlations: np.ndarray | None = field(default=None, compare=False)

    @property
    def sign(self) -> float:
        """+1 for white, −1 for dark: the factor applied to the images on reading."""
        return -1.0 if self.contrast == "dark" else 1.0

    def describe(self) -> str:
        """One line for the log and the STAR comment."""
        if self.correlations is None or len(self.correlations) == 0:
            reason = {
                "forced": "as given by --contrast",
                "checkpoint": "recorded in the checkpoint (the training set's); no map to check",
                "assumed": "assumed: no map to decide from; pass --contrast dark if protein is dark",
            }.get(self.how, self.how)
            return f"contrast {self.contrast} ({reason})"
        r = np.asarray(self.correlations)
        agree = int(np.sum(np.sign(r) == (1 if np.median(r) >= 0 else -1)))
        text = (
            f"contrast {self.contrast} (from the map, {self.how}: {agree} of {len(r)} sampled "
            f"particles correlate {'positively' if np.median(r) >= 0 else 'negatively'}, "
            f"median r = {np.median(r):+.3f})"
        )
        if self.how == "undecided":
            text += "; white assumed, pass --contrast white or dark"
        return text


def sample_indices(n: int, sample: int = DEFAULT_SAMPLE, seed: int = 0) -> np.ndarray:
    """A seeded sorted sample of ``min(sample, n)`` particle indices out of ``n``."""
    rng = np.random.default_rng([int(seed), 22])
    return np.sort(rng.choice(int(n), size=min(int(sample), int(n)), replace=False))


def _modulated_projections(volume, rotations, ctf, pixel_size_angstrom) -> torch.Tensor:
    projections = project_volume(np.asarray(volume, np.float32), rotations, progress=False)
    if ctf is None:
        return projections
    transfer = ctf_module.ctf_2d(ctf, projections.shape[-1], pixel_size_angstrom)
    return ctf_module.apply_ctf(projections, transfer)


def correlations_at_poses(
    images: np.ndarray | torch.Tensor,
    ctf: ctf_module.CTFParameters | None,
    pixel_size_angstrom: float,
    volume: np.ndarray,
    rotations: np.ndarray,
) -> np.ndarray:
    """``(n,)`` Pearson correlation of each centred image ``(n, M, M)`` (not CTF-corrected)
    with the projection of ``volume`` ``(M, M, M)`` (same pixel size, Å) at its pose
    ``rotations[i]`` ``(n, 3, 3)`` carrying its CTF (``ctf``; None: no CTF)."""
    a = torch.as_tensor(np.asarray(images), dtype=torch.float64).reshape(len(rotations), -1)
    b = _modulated_projections(volume, rotations, ctf, pixel_size_angstrom)
    b = b.to(torch.float64).reshape(a.shape)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    denominator = torch.sqrt((a * a).sum(1) * (b * b).sum(1)).clamp(min=1e-300)
    return ((a * b).sum(1) / denominator).numpy()


def correlations_by_search(
    images: np.ndarray | torch.Tensor,
    ctf: ctf_module.CTFParameters | None,
    pixel_size_angstrom: float,
    volume: np.ndarray,
    *,
    level: int = 1,
    max_shift_px: float = 2.0,
    resolution_px: float = 4.0,
) -> np.ndarray:
    """``(n,)`` signed correlation of each image ``(n, M, M)`` (raw: CTF-modulated, not
    corrected) at its best pose and shift among every cell of the level-``level`` grid, the
    image and its negative both tried (module docstring); the band is low-passed at
    ``resolution_px`` px."""
    a = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    bank = template_bank(np.asarray(volume, np.float32), level, 0.0, progress=False)
    spectra = template_spectra(bank, 1.0 / float(resolution_px))
    n = a.shape[0]
    cells = np.tile(np.arange(bank.shape[0]), (n, 1))
    search = dict(
        ctf=ctf,
        pixel_size_angstrom=pixel_size_angstrom,
        max_shift_px=max_shift_px,
        score="scaled",
    )
    positive = candidate_scores(a, cells, spectra, **search)[0].min(axis=1)
    negative = candidate_scores(-a, cells, spectra, **search)[0].min(axis=1)
    weights = spectra.weights()
    weights[0] = 0.0
    f = spectra.restrict(torch.fft.rfft2(a))
    power = (weights * (f.real**2 + f.imag**2)).sum(1, dtype=torch.float64).numpy()
    power = np.maximum(power / float(a.shape[-1]) ** 4, 1e-300)
    best = np.minimum(positive, negative)
    magnitude = np.sqrt(np.clip(1.0 - best / power, 0.0, 1.0))
    return np.where(positive <= negative, magnitude, -magnitude)


def decide_contrast(correlations: np.ndarray, how: str) -> ContrastDecision:
    """White or dark from the signed correlations of a sample (module docstring)."""
    r = np.asarray(correlations, dtype=np.float64)
    if r.size == 0 or not np.all(np.isfinite(r)):
        return ContrastDecision("white", "undecided", r)
    median_sign = 1.0 if np.median(r) >= 0 else -1.0
    agreeing = float(np.mean(np.sign(r) == median_sign))
    if agreeing < AGREEMENT:
        return ContrastDecision("white", "undecided", r)
    return ContrastDecision("white" if median_sign > 0 else "dark", how, r)


def detect_contrast(
    images: np.ndarray | torch.Tensor,
    ctf: ctf_module.CTFParameters | None,
    pixel_size_angstrom: float,
    volume: np.ndarray,
    *,
    rotations: np.ndarray | None = None,
    max_shift_px: float = 2.0,
    level: int = 1,
) -> ContrastDecision:
    """Decide the contrast of particles ``images`` ``(n, M, M)`` (not CTF-corrected; centred
    when ``rotations`` are given) from their CTFs, pixel size (Å) and the map ``volume``
    ``(M, M, M)`` at that pixel size: at their poses ``rotations`` ``(n, 3, 3)`` when given,
    else by a search of the level-``level`` grid with shifts up to ``max_shift_px``."""
    if rotations is not None:
        r = correlations_at_poses(images, ctf, pixel_size_angstrom, volume, rotations)
        return decide_contrast(r, "refined poses")
    r = correlations_by_search(
        images, ctf, pixel_size_angstrom, volume, level=level, max_shift_px=max_shift_px
    )
    return decide_contrast(r, "map search")


def forced_contrast(requested: str) -> ContrastDecision | None:
    """The decision for ``--contrast white|dark``; None for ``auto``; ValueError otherwise."""
    if requested not in CONTRASTS:
        raise ValueError(f"contrast must be one of {CONTRASTS}, got {requested!r}")
    return None if requested == "auto" else ContrastDecision(requested, "forced")


def resolve_without_map(requested: str, checkpoint: str | os.PathLike[str]) -> ContrastDecision:
    """``--contrast`` without a map to decide from: as given, else the checkpoint's record,
    else white assumed."""
    forced = forced_contrast(requested)
    if forced is not None:
        return forced
    recorded = recorded_contrast(checkpoint)
    if recorded is not None:
        return ContrastDecision(recorded, "checkpoint")
    return ContrastDecision("white", "assumed")


def report(decision: ContrastDecision) -> None:
    """Print the decision (one line on stderr): the log of ``predict`` and ``train``."""
    print(f"cryosphere: {decision.describe()}", file=sys.stderr)


def record_in_checkpoint(checkpoint: str | os.PathLike[str], decision: ContrastDecision) -> None:
    """Write the training set's contrast into a checkpoint (atomically)."""
    path = Path(checkpoint)
    record = torch.load(path, map_location="cpu", weights_only=True)
    record[_CHECKPOINT_KEY] = decision.contrast
    with io.atomic_path(path) as tmp:
        torch.save(record, tmp)


def recorded_contrast(checkpoint: str | os.PathLike[str]) -> str | None:
    """The contrast a checkpoint's model was trained on (None when not recorded)."""
    record = torch.load(Path(checkpoint), map_location="cpu", weights_only=True)
    value = record.get(_CHECKPOINT_KEY) if isinstance(record, dict) else None
    return value if value in ("white", "dark") else None


def annotate_star(path: str | os.PathLike[str], decision: ContrastDecision) -> None:
    """Put ``# CryoSphere: <decision>`` as the first line of a written STAR file (atomically)."""
    path = Path(path)
    text = path.read_text()
    with io.atomic_path(path) as tmp:
        tmp.write_text(f"# CryoSphere: {decision.describe()}\n{text}")


def decide_for_particle_set(
    particles: ParticleSet,
    requested: str,
    volume: np.ndarray,
    image_size: int,
    *,
    rotations: np.ndarray | None = None,
    crop_size: int | None = None,
    normalise: bool = True,
    max_shift_px: float = 2.0,
    sample: int = DEFAULT_SAMPLE,
    seed: int = 0,
) -> ContrastDecision:
    """``--contrast`` for a particle set with a map: as given (``white``/``dark``), else
    decided (``auto``) on a seeded sample of ``sample`` particles.

    The sample is read, recentred by its origins, brought to the box ``image_size`` (``crop_size``
    and ``normalise`` as for the network, no CTF correction) and compared with ``volume``
    ``(M, M, M)`` (the map at that box, :func:`cryosphere.imaging.preprocess.reference_map`): at
    the particles' poses ``rotations`` ``(n, 3, 3)`` when given (a refinement), else by a search
    with shifts up to ``max_shift_px`` px of that box.
    """
    forced = forced_contrast(requested)
    if forced is not None:
        return forced
    n = len(particles) if rotations is None else min(len(particles), len(rotations))
    chosen = sample_indices(n, sample, seed)
    with StackReader(particles) as reader:
        images = reader.read(chosen)
    finite = np.isfinite(images).reshape(len(chosen), -1).all(axis=1)  # damaged: left out
    chosen, images = chosen[finite], images[finite]
    shifts = ctf_module.centring_shift_px(
        particles.origins_angstrom[chosen], particles.pixel_size_angstrom
    )
    prepared, pixel = preprocess.prepare_images(
        ctf_module.shift_images(images, shifts),
        particles.pixel_size_angstrom,
        target_size=int(image_size),
        crop_size=crop_size,
        normalise=normalise,
    )
    ctf = None if particles.ctf is None else particles.ctf.subset(chosen)
    return detect_contrast(
        prepared,
        ctf,
        pixel,
        volume,
        rotations=None if rotations is None else np.asarray(rotations)[chosen],
        max_shift_px=max_shift_px,
    )
