"""Particle files laid out as RELION writes them, built from the documented formats.

Not CryoSphere's own writers: STAR text is written line by line as RELION 3.0 / 3.1 / 5 write
it (``data_optics`` then ``data_particles``; RELION 3.0 one ``data_`` table with optics columns
per particle, pixel size as detector pixel and magnification, origins in px), stacks with
``mrcfile`` and a header pixel size of our choosing (RELION leaves 1 Å in many). Particles are
projections of a 1UBI map at a known pose, modulated by RELION's CTF written here from
RELION's definition (``CTF::getCTF``: ``−sin(K1 Δf k² + K2 k⁴ − K5 − K3)`` with a negative
underfocus), moved by a known shift, with Gaussian noise.
"""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np

from cryosphere.geometry.grids import healpix_so3_grid
from cryosphere.geometry.rotations import relion_euler_from_matrices
from cryosphere.imaging.projection import project_volume


def relion_wavelength(voltage_kv: float) -> float:
    """Electron wavelength (Å), relativistic, as RELION computes it."""
    volts = voltage_kv * 1e3
    return 12.2643247 / np.sqrt(volts * (1.0 + volts * 0.978466e-6))


def relion_ctf(
    image_size: int,
    pixel: float,
    *,
    defocus_u: float,
    defocus_v: float,
    angle_deg: float,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    phase_shift_deg: float = 0.0,
    b_factor: float = 0.0,
    scale: float = 1.0,
) -> np.ndarray:
    """RELION's CTF on the rfft2 grid ``(N, N // 2 + 1)`` float64 (module docstring)."""
    ky = np.fft.fftfreq(image_size)[:, None] / pixel
    kx = np.fft.rfftfreq(image_size)[None, :] / pixel
    u2 = kx**2 + ky**2
    lam = relion_wavelength(voltage_kv)
    k1 = np.pi * lam
    k2 = np.pi / 2 * cs_mm * 1e7 * lam**3
    k3 = np.arctan(amplitude_contrast / np.sqrt(1 - amplitude_contrast**2))
    k5 = np.deg2rad(phase_shift_deg)
    azimuth = np.arctan2(ky, kx) - np.deg2rad(angle_deg)  # astigmatism angle from x
    deltaf = -((defocus_u + defocus_v) / 2 + (defocus_u - defocus_v) / 2 * np.cos(2 * azimuth))
    argument = k1 * deltaf * u2 + k2 * u2**2 - k5 - k3
    return -np.sin(argument) * scale * np.exp(-b_factor / 4 * u2)


def shift_px(images: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Move each image's content by ``shifts[i] = (sx, sy)`` px: ``out(x) = in(x − s)``."""
    n = images.shape[-1]
    ky = np.fft.fftfreq(n)[:, None]
    kx = np.fft.rfftfreq(n)[None, :]
    ramp = np.exp(-2j * np.pi * (shifts[:, 0, None, None] * kx + shifts[:, 1, None, None] * ky))
    return np.fft.irfft2(np.fft.rfft2(images) * ramp, s=(n, n))


def particles(volume, pixel, cells, shifts, ctfs, snr=4.0, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy particles of ``volume`` at level-2 grid ``cells`` ``(n,)``, CTF-modulated with
    ``ctfs`` (dicts of :func:`relion_ctf` keywords), displaced by ``shifts`` ``(n, 2)`` px:
    ``(images (n, N, N) float32, rotations (n, 3, 3))``."""
    rotations = healpix_so3_grid(2)[np.asarray(cells)]
    clean = project_volume(volume, rotations).numpy().astype(np.float64)
    n_pix = clean.shape[-1]
    spectra = np.fft.rfft2(clean)
    for i, ctf in enumerate(ctfs):
        spectra[i] *= relion_ctf(n_pix, pixel, **ctf)
    clean = shift_px(np.fft.irfft2(spectra, s=(n_pix, n_pix)), np.asarray(shifts, float))
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, np.sqrt(clean.var() / snr), clean.shape)
    return (clean + noise).astype(np.float32), rotations


def write_stack(path: Path, images: np.ndarray, header_pixel: float) -> None:
    """An MRC stack as RELION writes it (mode 2, image stack), header pixel ``header_pixel``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(images, np.float32))
        mrc.set_image_stack()
        mrc.voxel_size = header_pixel


def _value(v) -> str:
    return v if isinstance(v, str) else (f"{v:d}" if isinstance(v, int) else f"{v:.6f}")


def loop_block(name: str, rows: list[dict]) -> str:
    """A ``data_NAME`` loop as RELION writes it: labels numbered ``#1 ...``, one row a line."""
    labels = list(rows[0])
    lines = [f"data_{name}", "", "loop_"]
    lines += [f"_{label} #{i + 1}" for i, label in enumerate(labels)]
    lines += [" ".join(_value(row[label]) for label in labels) for row in rows]
    return "\n".join(lines) + "\n\n"


def pair_block(name: str, pairs: dict) -> str:
    """A ``data_NAME`` block of ``_label value`` pairs (RELION 5's ``data_general``)."""
    lines = [f"data_{name}", ""] + [f"_{k} {_value(v)}" for k, v in pairs.items()]
    return "\n".join(lines) + "\n\n"


def write_star(path: Path, version: str, blocks: list[str]) -> None:
    """A STAR file: each block preceded by RELION's ``# version`` line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"\n# version {version}\n\n{block}" for block in blocks))


def ctf_row(ctf: dict) -> dict:
    """The particle-level CTF columns of a ``relion_ctf`` keyword dict."""
    row = {
        "rlnDefocusU": ctf["defocus_u"],
        "rlnDefocusV": ctf["defocus_v"],
        "rlnDefocusAngle": ctf["angle_deg"],
    }
    if ctf.get("phase_shift_deg"):
        row["rlnPhaseShift"] = ctf["phase_shift_deg"]
    if ctf.get("b_factor"):
        row["rlnCtfBfactor"] = ctf["b_factor"]
    if ctf.get("scale", 1.0) != 1.0:
        row["rlnCtfScalefactor"] = ctf["scale"]
    return row


def angles_row(rotation: np.ndarray) -> dict:
    rot, tilt, psi = relion_euler_from_matrices(rotation[None])[0]
    return {"rlnAngleRot": rot, "rlnAngleTilt": tilt, "rlnAnglePsi": psi}
