"""Pose labels: template bank, MSE landscapes, soft maps and top-fraction masks.

One namespace for :mod:`~cryosphere.poses.labels.templates` (template banks),
:mod:`~cryosphere.poses.labels.landscape` (MSE landscapes, template matching),
:mod:`~cryosphere.poses.labels.soft_maps` (soft maps, masks, λ) and
:mod:`~cryosphere.poses.labels.explorer`; a dataset's labels and their cache live here.

Recipe (per image ``i`` with true pose ``R_i`` and each cell ``R_g`` of the HEALPix SO(3) grid)
-------------------------------------------------------------------------------------------
* **Templates** ``T_g = blur(P(R_g) V)``: projections of the map at every grid rotation,
  blurred by the dataset's Gaussian (``blur_sigma`` pixels), so they match the clean images
  ``blur(P(R_i) V)`` exactly at ``R_g = R_i``.
* **MSE landscape** ``MSE_ig = mean_pixels (T_g - I_i)²`` (float32), computed for all pairs as
  ``(‖a‖² + ‖b‖² − 2 a·b) / n_pixels`` (both sides centred on the mean template first) with
  one float32 matrix product per block, blocks sized to a stated memory bound.
* **Soft map** ``Pr[R_g | I_i] ∝ exp(−λ · MSE_ig)²`` (the square as in the poster), normalised
  over the grid (computed as ``exp(−2λ (MSE_ig − min_g MSE_ig))`` so it never underflows).
* **Mask**: 1 on the ``⌈q · G⌉`` cells of smallest MSE (largest 1/MSE); ties go to the lower
  cell index. For a symmetric particle every symmetry mate has near-zero MSE, so the mask
  holds all mates.

λ auto-tuning criterion (:func:`tune_lambda`)
--------------------------------------------
λ is the value at which, averaged over images, ``target_share`` (default 50 %) of the
normalised soft-map mass lies within ``radius_deg`` of the true pose or one of its symmetry
mates; ``radius_deg`` defaults to ``max(15°, grid spacing)`` (15° at level 2 and finer, 30° at
level 1, 60° at level 0) so the ball always holds grid cells. The share grows with λ (from the
uniform share at λ → 0 to the share of the best cell at λ → ∞); λ is found by bisection in
``log λ`` (fixed bracket expansion and 32 halvings: deterministic). A blurrier map has smaller
MSE differences between neighbouring cells and so needs a larger λ.

Run-folder cache (``run_dir/labels/``)
--------------------------------------
``templates_L{level}.npy`` + ``templates_L{level}.json`` (level, blur_sigma, image size, pixel
size, oversampling, SHA-256 of the volume bytes) and ``labels.npz`` + ``labels.json`` (the
parameters and a hash of the dataset). Each is reused only when its record matches.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryosphere import io
from cryosphere._checks import check_label_level, check_lam, check_q
from cryosphere.geometry import grids
from cryosphere.imaging.datasets import ParticleDataset
from cryosphere.poses.labels.landscape import (
    DEFAULT_MEMORY_LIMIT_BYTES,
    mse_landscape,
)
from cryosphere.poses.labels.soft_maps import (
    default_radius_deg,
    mask_size,
    soft_labels,
    top_fraction_mask,
    tune_lambda,
)
from cryosphere.poses.labels.templates import (
    LABELS_VERSION,
    _cache_is_whole,
    _read_cache,
    _read_record,
    dataset_templates,
)

__all__ = [
    "PoseLabels",
    "labels_dir",
    "compute_labels",
    "labels_from_mse",
    "load_or_make_labels",
]


def _dataset_sha256(dataset: ParticleDataset) -> str:
    digest = hashlib.sha256()
    for array, dtype in (
        (dataset.volume, np.float32),
        (dataset.clean_images, np.float32),
        (dataset.rotations, np.float64),
        (dataset.symmetry_ops, np.float64),
    ):
        digest.update(np.ascontiguousarray(np.asarray(array, dtype=dtype)).tobytes())
    return digest.hexdigest()


def labels_dir(run_dir: str | os.PathLike[str]) -> Path:
    """``run_dir/labels/``: where labels and templates of a run are cached."""
    return Path(run_dir) / "labels"


@dataclass(frozen=True)
class PoseLabels:
    """Pose labels of a dataset on the level-``level`` HEALPix SO(3) grid.

    Attributes:
        mse: ``(n, G)`` float32 noise-free MSE landscape.
        soft: ``(n, G)`` float32 normalised soft map ``∝ exp(−λ·MSE)²``.
        mask: ``(n, G)`` bool, ``⌈q·G⌉`` smallest-MSE cells per row.
        lam: λ used (image units⁻²).
        q: mask fraction.
        level: grid level.
        lam_tuned: whether λ came from :func:`tune_lambda`.
        target_share, radius_deg: the tuning criterion's parameters.
    """

    mse: np.ndarray
    soft: np.ndarray
    mask: np.ndarray
    lam: float
    q: float
    level: int
    lam_tuned: bool = False
    target_share: float = 0.5
    radius_deg: float = 15.0

    @property
    def grid(self) -> np.ndarray:
        """``(G, 3, 3)`` grid rotations (read-only cached array)."""
        return grids.healpix_so3_grid(self.level)

    @property
    def n_cells(self) -> int:
        """``G``."""
        return int(self.mse.shape[1])

    def __len__(self) -> int:
        return int(self.mse.shape[0])


def compute_labels(
    dataset: ParticleDataset,
    level: int = 2,
    q: float = 0.05,
    lam: float | None = None,
    progress: bool = True,
    templates: np.ndarray | None = None,
    *,
    target_share: float = 0.5,
    radius_deg: float | None = None,
    memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
) -> PoseLabels:
    """Labels of a :class:`cryosphere.imaging.datasets.ParticleDataset` from its clean images.

    Args:
        dataset: needs ``volume``, ``clean_images``, ``rotations``, ``symmetry_ops``,
            ``pixel_size`` and ``parameters.blur_sigma``.
        level: grid level 0..3.
        q: mask fraction in (0, 1].
        lam: λ > 0, or None to tune it (:func:`tune_lambda`, ``target_share`` within
            ``radius_deg``, default :func:`default_radius_deg`).
        progress: progress bars.
        templates: precomputed ``(G, N, N)`` templates (else :func:`template_bank`, cached in
            ``cache_dir`` when given).
        memory_limit_bytes: MSE work-space bound.
        device: torch device of the template projection and the MSE products (default: CPU).
    """
    level = check_label_level(level)
    q = check_q(q)
    if getattr(dataset, "ctf", None) is not None or getattr(dataset, "shifts_px", None) is not None:
        raise ValueError(
            "this dataset's clean images carry a CTF or shifts but the templates do not; make "
            "labels from the projections at its true poses instead "
            "(cryosphere.runs.refinement.refinement_data on its run folder)"
        )
    if lam is not None:
        lam = check_lam(lam)
    if templates is None:
        templates = dataset_templates(
            dataset, level, cache_dir=cache_dir, progress=progress, device=device
        )
    n_cells = grids.healpix_so3_grid_size(level)
    if np.asarray(templates).shape[0] != n_cells:
        raise ValueError(
            f"templates hold {np.asarray(templates).shape[0]} projections but the level-{level} "
            f"grid has {n_cells} cells; make them with template_bank(volume, level={level})"
        )
    mse = mse_landscape(
        dataset.clean_images,
        templates,
        memory_limit_bytes=memory_limit_bytes,
        progress=progress,
        device=device,
    )
    return labels_from_mse(
        mse, level, dataset.rotations, dataset.symmetry_ops, q, lam, target_share, radius_deg
    )


def labels_from_mse(
    mse: np.ndarray,
    level: int,
    rotations: np.ndarray,
    symmetry_ops: np.ndarray,
    q: float,
    lam: float | None,
    target_share: float = 0.5,
    radius_deg: float | None = None,
) -> PoseLabels:
    """:class:`PoseLabels` of an ``(n, G)`` MSE landscape on the level-``level`` grid: the
    top-``q`` mask and the soft map with ``lam`` (None: tuned so that ``target_share`` of the
    mass lies within ``radius_deg`` of the true poses ``rotations`` ``(n, 3, 3)``)."""
    radius = default_radius_deg(level) if radius_deg is None else float(radius_deg)
    tuned = lam is None
    if tuned:
        lam = tune_lambda(
            mse,
            grids.healpix_so3_grid(level),
            rotations,
            symmetry_ops,
            target_share=target_share,
            radius_deg=radius,
        )
    return PoseLabels(
        mse=mse,
        soft=soft_labels(mse, lam),
        mask=top_fraction_mask(mse, q),
        lam=float(lam),
        q=float(q),
        level=int(level),
        lam_tuned=tuned,
        target_share=float(target_share),
        radius_deg=radius,
    )


def _load_label_arrays(path: Path) -> tuple[np.ndarray, np.ndarray, float]:
    with np.load(path) as data:
        return data["mse"], data["mask"], float(data["lam"])


def load_or_make_labels(
    run_dir: str | os.PathLike[str],
    dataset: ParticleDataset,
    level: int = 2,
    q: float = 0.05,
    lam: float | None = None,
    progress: bool = True,
    *,
    target_share: float = 0.5,
    device: str | torch.device | None = None,
) -> PoseLabels:
    """Labels cached in ``run_dir/labels/labels.npz`` (+ ``labels.json``), recomputed when the
    parameters (level, q, requested λ, tuning target, dataset hash) differ.

    Templates are cached beside them (:func:`template_bank`). The npz holds ``mse``, ``mask``
    and ``lam``; the soft map is recomputed from them on load (it is a pure function).
    """
    level = check_label_level(level)
    q = check_q(q)
    if lam is not None:
        lam = check_lam(lam)
    folder = labels_dir(run_dir)
    record = {
        "version": LABELS_VERSION,
        "level": level,
        "q": q,
        "lam_requested": lam,
        "target_share": float(target_share),
        "radius_deg": default_radius_deg(level),
        "blur_sigma": float(dataset.parameters.blur_sigma),
        "n_images": len(dataset.rotations),
        "dataset_sha256": _dataset_sha256(dataset),
    }
    npz_path, json_path = folder / "labels.npz", folder / "labels.json"
    stored = _read_record(json_path) if json_path.is_file() and npz_path.is_file() else None
    if stored is not None and stored.get("parameters") == record:
        cached = _read_cache(npz_path, _load_label_arrays)
        shape = (record["n_images"], grids.healpix_so3_grid_size(level))
        if cached is not None and _cache_is_whole(npz_path, cached[0], shape, cached[1]):
            mse, mask, lam_used = cached
            return PoseLabels(
                mse=mse,
                soft=soft_labels(mse, lam_used),
                mask=mask,
                lam=lam_used,
                q=q,
                level=level,
                lam_tuned=lam is None,
                target_share=float(target_share),
                radius_deg=default_radius_deg(level),
            )
    labels = compute_labels(
        dataset,
        level,
        q,
        lam,
        progress,
        target_share=target_share,
        cache_dir=folder,
        device=device,
    )
    io.write_npz(npz_path, mse=labels.mse, mask=labels.mask, lam=np.float64(labels.lam))
    io.write_json(
        json_path,
        {"parameters": record, "lam": labels.lam, "mask_size": mask_size(labels.n_cells, q)},
    )
    return labels
