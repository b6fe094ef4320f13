"""What a simulated particle dataset is: the parameters that make it
(:class:`SimulationParameters`, checked on construction) and the arrays it holds
(:class:`ParticleDataset`). Made by :mod:`cryosphere.imaging.simulate`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from cryosphere._checks import known_fields
from cryosphere.imaging import ctf as ctf_module

__all__ = ["SimulationParameters", "ParticleDataset"]


@dataclass(frozen=True)
class SimulationParameters:
    """What makes a simulated dataset.

    Attributes
    ----------
    structure
        Embedded structure name (``"1ubi"``, ``"1hvr"``, ``"5pti"``) or a PDB/mmCIF path.
    n_projections
        Number of images.
    image_size
        Box size ``N`` in pixels (images ``N × N``, map ``N³``); at least 16.
    pixel_size
        Å per pixel; ``None`` picks the smallest multiple of 0.05 Å that fits the structure.
    snr
        Signal-to-noise ratio, ``var(clean stack) / σ²_noise``; must be > 0.
    blur_sigma
        Gaussian blur of the clean images, standard deviation in pixels (>= 0).
    extra_b_factor
        Extra B-factor (Å²) added to every atom when computing the map.
    symmetry
        ``"auto"`` (detect from the chains), a point-group name such as ``"C2"``, or ``None``.
    seed
        Seed for poses and noise.
    ctf
        Modulate each image by its own CTF (off by default).
    defocus_min_angstrom, defocus_max_angstrom
        Range of the mean defocus, Å (default 5,000-25,000 Å = 0.5-2.5 µm).
    max_astigmatism_angstrom
        Largest ``U − V``, Å.
    voltage_kv, spherical_aberration_mm, amplitude_contrast, ctf_b_factor
        Optics: kV, mm, fraction, envelope B-factor in Å².
    max_shift_px
        Particle shifts uniform in ``±max_shift_px`` pixels per axis (0: centred).
    contrast_sigma
        Per-image contrast factor ``exp(contrast_sigma · z)`` (0: none).
    ctf_field
        Where the CTF acts: ``"padded"`` (default: in a field padded by the rule of
        :mod:`cryosphere.imaging.microscope`, then boxed, as a microscope images a particle) or
        ``"box"`` (inside the particle box: circular, the delocalised signal wraps round; the
        behaviour before 0.3, kept to reproduce old figures).
    noise_spectrum
        ``"white"`` or ``"mtf"`` (white noise coloured by the pixel-MTF model
        :func:`cryosphere.imaging.microscope.pixel_mtf_power`, same variance).
    """

    structure: str = "1ubi"
    n_projections: int = 100
    image_size: int = 64
    pixel_size: float | None = None
    snr: float = 1.0
    blur_sigma: float = 1.0
    extra_b_factor: float = 0.0
    symmetry: str | None = "auto"
    seed: int = 0
    ctf: bool = False
    defocus_min_angstrom: float = 5000.0
    defocus_max_angstrom: float = 25000.0
    max_astigmatism_angstrom: float = 500.0
    voltage_kv: float = 300.0
    spherical_aberration_mm: float = 2.7
    amplitude_contrast: float = 0.1
    ctf_b_factor: float = 0.0
    max_shift_px: float = 0.0
    contrast_sigma: float = 0.0
    ctf_field: str = "padded"
    noise_spectrum: str = "white"

    def __post_init__(self) -> None:
        _check_types(self)
        if int(self.n_projections) < 1:
            raise ValueError(f"n_projections must be >= 1, got {self.n_projections}")
        if int(self.image_size) < 16:
            raise ValueError(
                f"image_size must be at least 16 pixels, got {self.image_size}; "
                "use 64 or more for meaningful pose labels"
            )
        if self.pixel_size is not None and not self.pixel_size > 0:
            raise ValueError(f"pixel_size must be positive (Å) or None, got {self.pixel_size}")
        if not (self.snr > 0 and math.isfinite(self.snr)):
            raise ValueError(f"snr must be a positive number, got {self.snr}")
        if not (self.blur_sigma >= 0 and math.isfinite(self.blur_sigma)):
            raise ValueError(f"blur_sigma must be >= 0 pixels, got {self.blur_sigma}")
        if not self.extra_b_factor >= 0:
            raise ValueError(f"extra_b_factor must be >= 0 Å², got {self.extra_b_factor}")
        if not 0 < self.defocus_min_angstrom <= self.defocus_max_angstrom:
            raise ValueError(
                "defocus range must satisfy 0 < defocus_min_angstrom <= defocus_max_angstrom "
                f"(Å), got {self.defocus_min_angstrom}, {self.defocus_max_angstrom}"
            )
        if not (self.max_shift_px >= 0 and self.contrast_sigma >= 0):
            raise ValueError("max_shift_px and contrast_sigma must be >= 0")
        if self.ctf_field not in CTF_FIELDS:
            raise ValueError(f"ctf_field must be one of {CTF_FIELDS}, got {self.ctf_field!r}")
        if self.noise_spectrum not in NOISE_SPECTRA:
            raise ValueError(
                f"noise_spectrum must be one of {NOISE_SPECTRA}, got {self.noise_spectrum!r}"
            )
        if self.max_shift_px >= int(self.image_size) / 4:
            raise ValueError(
                f"max_shift_px={self.max_shift_px} is too large for a {self.image_size}-px box; "
                "keep it below a quarter of the box"
            )

    @property
    def realism(self) -> bool:
        """True when CTF, shifts or contrast variation are on."""
        return bool(self.ctf) or self.max_shift_px > 0 or self.contrast_sigma > 0

    def to_dict(self) -> dict[str, Any]:
        """Parameters as a JSON-ready dict. The CTF/shift fields are left out while all of them
        keep their defaults, so records of datasets made before they existed still match."""
        record = dataclasses.asdict(self)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if all(record[name] == defaults[name] for name in _REALISM_FIELDS):
            for name in _REALISM_FIELDS:
                del record[name]
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> SimulationParameters:
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError`` naming them. A record
        with a CTF but no ``ctf_field`` was made before the padded field existed: ``"box"``."""
        record = dict(record)
        if record.get("ctf") and "ctf_field" not in record:
            record["ctf_field"] = "box"
        return known_fields(cls, record, TypeError)(**record)


_REALISM_FIELDS = (
    "ctf",
    "defocus_min_angstrom",
    "defocus_max_angstrom",
    "max_astigmatism_angstrom",
    "voltage_kv",
    "spherical_aberration_mm",
    "amplitude_contrast",
    "ctf_b_factor",
    "max_shift_px",
    "contrast_sigma",
    "ctf_field",
    "noise_spectrum",
)
CTF_FIELDS = ("padded", "box")
NOISE_SPECTRA = ("white", "mtf")


_INTEGER_FIELDS = ("n_projections", "image_size", "seed")
_NUMBER_FIELDS = ("snr", "blur_sigma", "extra_b_factor")


def _check_types(parameters: SimulationParameters) -> None:
    """``TypeError`` naming a field of the wrong type (``"64"``, ``64.5``, ``True``…)."""
    for name in _INTEGER_FIELDS:
        value = getattr(parameters, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    for name in _NUMBER_FIELDS + ("pixel_size",):
        value = getattr(parameters, name)
        if name == "pixel_size" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must be a number, got {value!r}")
    if parameters.pixel_size is not None and not math.isfinite(parameters.pixel_size):
        raise ValueError(
            f"pixel_size must be a finite number of Å or None, got {parameters.pixel_size}"
        )


@dataclass
class ParticleDataset:
    """A simulated particle dataset.

    Attributes
    ----------
    parameters
        What made it.
    volume
        ``(N, N, N)`` float32 Coulomb-potential map ``[z, y, x]``, centre at voxel ``N // 2``.
    pixel_size
        Å per pixel (and per voxel).
    rotations
        ``(n, 3, 3)`` float64 poses ``R`` (``x_mic = R @ x_vol``).
    clean_images, noisy_images
        ``(n, N, N)`` float32 images ``[image, y, x]``.
    noise_sigma
        Standard deviation of the added noise (image units).
    point_group
        Point-group name used for the structure (``"C1"`` for none).
    symmetry_ops
        ``(K, 3, 3)`` point-group rotations in volume coordinates, identity first; poses
        ``R`` and ``R @ g`` give the same image.
    ctf
        Per-image CTF parameters, or None without CTF.
    shifts_px
        ``(n, 2)`` shifts ``(sx, sy)`` in pixels applied to the particles, or None.
    contrast
        ``(n,)`` contrast factors, or None.
    """

    parameters: SimulationParameters
    volume: np.ndarray
    pixel_size: float
    rotations: np.ndarray
    clean_images: np.ndarray
    noisy_images: np.ndarray
    noise_sigma: float
    point_group: str
    symmetry_ops: np.ndarray
    ctf: ctf_module.CTFParameters | None = None
    shifts_px: np.ndarray | None = None
    contrast: np.ndarray | None = None

    @property
    def image_size(self) -> int:
        """Box size ``N`` in pixels."""
        return int(self.volume.shape[0])

    def __len__(self) -> int:
        return int(self.rotations.shape[0])
