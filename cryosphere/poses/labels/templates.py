"""Template banks: blurred projections of a map at every cell of a HEALPix SO(3) grid,
cached in a run folder with a record of what made them.

``T_g = blur(P(R_g) V)``: projections of the map at every grid rotation, blurred by the
dataset's Gaussian (``blur_sigma`` pixels), so they match the clean images ``blur(P(R_i) V)``
exactly at ``R_g = R_i``. Cache: ``templates_L{level}.npy`` + ``templates_L{level}.json``
(level, blur_sigma, image size, pixel size, oversampling, SHA-256 of the volume bytes); a
cached bank is reused only when its record matches and its array is whole.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from cryosphere import io
from cryosphere._checks import check_label_level
from cryosphere.geometry import grids
from cryosphere.imaging.datasets import ParticleDataset
from cryosphere.imaging.projection import gaussian_blur, project_volume, volume_spectrum

__all__ = ["LABELS_VERSION", "volume_sha256", "template_bank", "dataset_templates"]

#: Version of the label and template cache records.
LABELS_VERSION = 1
_Cached = TypeVar("_Cached")


def volume_sha256(volume: np.ndarray) -> str:
    """SHA-256 hex digest of the volume's bytes as C-contiguous float32."""
    data = np.ascontiguousarray(np.asarray(volume, dtype=np.float32))
    return hashlib.sha256(data.tobytes()).hexdigest()


def template_bank(
    volume: np.ndarray,
    level: int = 2,
    blur_sigma: float = 1.0,
    *,
    pixel_size: float | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    oversampling: int = 2,
    batch_size: int = 1024,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Blurred projections of ``volume`` at every rotation of the level-``level`` SO(3) grid.

    Args:
        volume: ``(N, N, N)`` map ``[z, y, x]``.
        level: grid level 0..3 (``G = 72 * 8**level`` templates).
        blur_sigma: Gaussian blur in pixels, the dataset's ``blur_sigma``.
        pixel_size: Å per pixel; only recorded in the cache record.
        cache_dir: when given, templates are read from / written to
            ``cache_dir/templates_L{level}.npy`` with a JSON record of the parameters that
            made them; a cached bank is reused only when the record matches exactly.
        oversampling, batch_size: passed to :func:`cryosphere.imaging.projection.project_volume`.
        progress: show a progress bar while projecting.
        device: torch device of the projection and blur (default: CPU); the bank comes back
            to the CPU. The cache record does not depend on it.

    Returns:
        ``(G, N, N)`` float32 templates ``[cell, y, x]`` in grid order.
    """
    level = check_label_level(level)
    if not (blur_sigma >= 0 and math.isfinite(blur_sigma)):
        raise ValueError(f"blur_sigma must be >= 0 pixels, got {blur_sigma}")
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise ValueError(f"volume must be a cubic array (N, N, N), got shape {vol.shape}")
    record = {
        "version": LABELS_VERSION,
        "level": level,
        "n_templates": grids.healpix_so3_grid_size(level),
        "blur_sigma": float(blur_sigma),
        "image_size": int(vol.shape[0]),
        "pixel_size": None if pixel_size is None else round(float(pixel_size), 6),
        "oversampling": int(oversampling),
        "volume_sha256": volume_sha256(vol),
    }
    if cache_dir is not None:
        folder = Path(cache_dir)
        npy_path = folder / f"templates_L{level}.npy"
        json_path = folder / f"templates_L{level}.json"
        if npy_path.is_file() and json_path.is_file() and _read_record(json_path) == record:
            cached = _read_cache(npy_path, lambda path: np.load(path))
            expected = (record["n_templates"], record["image_size"], record["image_size"])
            if cached is not None and _cache_is_whole(npy_path, cached, expected):
                return cached
    grid = grids.healpix_so3_grid(level)
    spectrum = volume_spectrum(vol, oversampling, None if device is None else torch.device(device))
    projections = project_volume(
        vol, grid, batch_size=batch_size, progress=progress, spectrum=spectrum, device=device
    )
    templates = gaussian_blur(projections, blur_sigma).cpu().numpy()
    if cache_dir is not None:
        with io.atomic_path(npy_path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, templates)
        io.write_json(json_path, record)  # written last: the record marks a complete bank
    return templates


def dataset_templates(
    dataset: ParticleDataset,
    level: int = 2,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """:func:`template_bank` of a dataset's map on grid ``level``, blurred like its images.

    Args:
        dataset: needs ``volume``, ``pixel_size`` and ``parameters.blur_sigma``.
        cache_dir: cache folder, normally ``labels_dir(run_dir)``; None: no cache.

    Returns:
        ``(G, N, N)`` float32 templates in grid order.
    """
    return template_bank(
        dataset.volume,
        level,
        float(dataset.parameters.blur_sigma),
        pixel_size=dataset.pixel_size,
        cache_dir=cache_dir,
        progress=progress,
        device=device,
    )


def _read_record(path: Path) -> dict[str, Any] | None:
    """A cache's JSON record, or None (with a warning) when it is unreadable."""
    try:
        return io.read_json(path)
    except ValueError as error:
        warnings.warn(f"ignoring a damaged cache record: {error}", RuntimeWarning, stacklevel=3)
        return None


def _read_cache(path: Path, reader: Callable[[Path], _Cached]) -> _Cached | None:
    """``reader(path)``, or None with a warning when the file is truncated or damaged."""
    try:
        return reader(path)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        warnings.warn(
            f"{path} is damaged ({type(error).__name__}: {error}); recomputing it",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _cache_is_whole(
    path: Path, values: np.ndarray, shape: tuple[int, ...], mask: np.ndarray | None = None
) -> bool:
    """Whether cached arrays have the recorded shape and finite values (else warn)."""
    whole = values.shape == shape and bool(np.all(np.isfinite(values)))
    if mask is not None:
        whole = whole and mask.shape == shape and mask.dtype == bool
    if not whole:
        warnings.warn(
            f"{path} does not hold the recorded arrays (shape {values.shape}, expected {shape}, "
            "or non-finite values); recomputing it",
            RuntimeWarning,
            stacklevel=3,
        )
    return whole
