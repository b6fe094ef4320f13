"""Prediction with a trained :class:`~cryosphere.poses.network.model.PoseDistributionNetwork`: grid
distributions for images (:class:`Predictions`), their pose errors, and saving them to a run
folder (``run_dir/model/predictions.npz`` and ``predicted_particles.star``, RELION angles of the
most probable grid pose with ``rlnMaxValueProbDistribution``), and the test-time average over
quarter turns of each image (:func:`turn_averaged_log_probabilities`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cryosphere import io
from cryosphere.geometry import grids, point_groups, rotations
from cryosphere.geometry.grids import in_plane_permutation
from cryosphere.imaging.datasets import ParticleDataset
from cryosphere.imaging.projection import rotate_images_quarter_turns
from cryosphere.poses.network.harmonics import grid_wigner
from cryosphere.poses.network.model import PoseDistributionNetwork

__all__ = [
    "Predictions",
    "pose_errors_deg",
    "predict",
    "save_predictions",
    "predict_dataset",
    "check_turns",
    "turn_averaged_log_probabilities",
    "top_k_by_groups",
]


def check_turns(turns: int) -> int:
    """``turns`` as an int; ValueError unless 1, 2 or 4 (quarter turns of the pixel grid)."""
    if isinstance(turns, bool) or int(turns) not in (1, 2, 4):
        raise ValueError(f"turns must be 1, 2 or 4 (quarter turns of the pixel grid), got {turns}")
    return int(turns)


def turn_averaged_log_probabilities(
    model: PoseDistributionNetwork, images: torch.Tensor, turns: int = 4
) -> torch.Tensor:
    """``log p`` ``(n, G)`` float32 on the model's grid, averaged over quarter turns of each
    image ``(n, N, N)``.

    Turn ``k`` (of ``turns`` in 1, 2 or 4; 90° · 4/turns apart) rotates the image exactly
    (:func:`cryosphere.imaging.projection.rotate_images_quarter_turns`): it is the image of
    ``Rz(k · 90°·4/turns) R``, whose distribution is that of ``R`` with its in-plane index
    moved by a whole number of grid steps (:func:`cryosphere.poses.training.targets.
    in_plane_permutation`), so each turn's ``log_softmax`` is moved back exactly, the turns
    are averaged (a geometric mean of the distributions) and the result is renormalised.
    ``turns=1`` is the plain ``log_softmax``. The average is exactly equivariant to quarter
    turns (up to float rounding). Costs ``turns`` forward passes.
    """
    check_turns(turns)
    level = int(model.config.grid_level)
    n_psi = 6 * 2**level
    if level < 1:
        raise ValueError("quarter turns need a grid of level >= 1 (a whole number of ψ steps)")
    quarter = 4 // int(turns)
    total = None
    for k in range(int(turns)):
        turned = rotate_images_quarter_turns(images, k * quarter)
        log_p = torch.log_softmax(model.logits_from_coefficients(model.coefficients(turned)), 1)
        back = torch.from_numpy(in_plane_permutation(level, -k * quarter * n_psi // 4))
        log_p = log_p.float()[:, back.to(log_p.device)]
        total = log_p if total is None else total + log_p
    mean = total / int(turns)
    return mean - torch.logsumexp(mean, dim=1, keepdim=True)


@dataclass(frozen=True)
class Predictions:
    """Network output for ``n`` images on the grid of ``G`` rotations.

    Attributes:
        probabilities: ``(n, G)`` float32, softmax of the logits (each row sums to 1).
        logits: ``(n, G)`` float32.
        coefficients: ``(n, dim_so3)`` float32 SO(3) harmonic coefficients of the logits.
        best_index: ``(n,)`` int64 most probable grid cell.
        best_rotation: ``(n, 3, 3)`` float64 pose of that cell.
        best_probability: ``(n,)`` float32 its probability.
    """

    probabilities: np.ndarray
    logits: np.ndarray
    coefficients: np.ndarray
    best_index: np.ndarray
    best_rotation: np.ndarray
    best_probability: np.ndarray


def pose_errors_deg(
    predicted: np.ndarray, true: np.ndarray, symmetry_ops: np.ndarray | None = None
) -> np.ndarray:
    """Geodesic error in degrees ``(n,)`` between predicted and true poses ``(n, 3, 3)``,
    symmetry-aware (``min_g d(P, T @ g)``) when ``symmetry_ops`` has more than one op."""
    if symmetry_ops is not None and np.asarray(symmetry_ops).shape[0] > 1:
        return point_groups.symmetric_geodesic_distance_deg(predicted, true, symmetry_ops)
    return rotations.geodesic_distance_deg(predicted, true)


def predict(
    model: PoseDistributionNetwork,
    images: np.ndarray | torch.Tensor,
    batch_size: int = 256,
    progress: bool = False,
    level: int | None = None,
) -> Predictions:
    """Pose distributions for images ``(n, N, N)`` (n may be 0), on the model's device.

    Probabilities are the softmax of the grid logits over the ``G`` grid cells. ``level``
    reads the network's harmonic output on another grid than the one it was trained on
    (e.g. 3: 36,864 cells, 7.5° spacing, so errors can fall below the level-2 cell floor);
    None: the model's ``grid_level``.
    """
    images = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if images.ndim != 3:
        raise ValueError(f"images must have shape (n, N, N), got {tuple(images.shape)}")
    N = model.config.image_size
    if tuple(images.shape[1:]) != (N, N):
        raise ValueError(
            f"images are {images.shape[1]}x{images.shape[2]} px but the model was trained on "
            f"{N}x{N} px images; resample them or train a model for this size"
        )
    device = model.image_mean.device
    level = model.config.grid_level if level is None else int(level)
    grid = grids.healpix_so3_grid(level)
    wigner = model.grid_wigner
    if level != model.config.grid_level:
        wigner = torch.from_numpy(grid_wigner(level, model.config.lmax).T.copy()).float()
        wigner = wigner.to(device)
    model.eval()
    logits_all, coeff_all = [], []
    starts = range(0, images.shape[0], int(batch_size))
    with torch.no_grad():
        for start in tqdm(starts, desc="predicting", disable=not progress):
            coeff = model.coefficients(images[start : start + batch_size].to(device))
            logits_all.append((coeff @ wigner).cpu())
            coeff_all.append(coeff.cpu())
    G, dim = wigner.shape[1], wigner.shape[0]
    logits = torch.cat(logits_all) if logits_all else torch.zeros(0, G)
    coefficients = torch.cat(coeff_all) if coeff_all else torch.zeros(0, dim)
    probabilities = torch.softmax(logits, dim=1)
    best_probability, best_index = (
        probabilities.max(dim=1) if logits.shape[0] else (torch.zeros(0), torch.zeros(0).long())
    )
    best_index = best_index.numpy().astype(np.int64)
    return Predictions(
        probabilities=probabilities.numpy(),
        logits=logits.numpy(),
        coefficients=coefficients.numpy(),
        best_index=best_index,
        best_rotation=grid[best_index].copy(),
        best_probability=best_probability.numpy(),
    )


def save_predictions(
    run_dir: str | os.PathLike[str],
    predictions: Predictions,
    pixel_size: float,
    image_size: int,
    true_rotations: np.ndarray | None = None,
    symmetry_ops: np.ndarray | None = None,
    stack_name: str = "../particles.mrcs",
) -> tuple[Path, Path]:
    """Write ``run_dir/model/predictions.npz`` and ``run_dir/model/predicted_particles.star``.

    The npz holds every :class:`Predictions` field (and ``errors_deg`` when ``true_rotations``
    are given). The STAR file has the RELION angles of ``best_rotation`` and the column
    ``rlnMaxValueProbDistribution``; images refer to ``stack_name`` relative to the STAR file.
    Returns the two paths.
    """
    folder = Path(run_dir) / "model"
    arrays = dataclasses.asdict(predictions)
    if true_rotations is not None:
        arrays["errors_deg"] = pose_errors_deg(
            predictions.best_rotation, np.asarray(true_rotations), symmetry_ops
        )
    npz = io.write_npz(folder / "predictions.npz", **arrays)
    star = io.write_particles_star(
        folder / "predicted_particles.star",
        rotations.relion_euler_from_matrices(predictions.best_rotation).reshape(-1, 3),
        stack_name=stack_name,
        pixel_size=pixel_size,
        image_size=image_size,
        extra_columns={"MaxValueProbDistribution": predictions.best_probability},
    )
    return npz, star


def predict_dataset(
    run_dir: str | os.PathLike[str],
    model: PoseDistributionNetwork,
    dataset: ParticleDataset,
    stack_name: str = "../particles.mrcs",
) -> Predictions:
    """:func:`predict` every image of ``dataset`` and :func:`save_predictions` them (with the
    errors against its true poses) under ``run_dir/model/``; ``stack_name`` is the dataset's
    stack relative to that folder."""
    predictions = predict(model, dataset.noisy_images)
    save_predictions(
        run_dir,
        predictions,
        pixel_size=dataset.pixel_size,
        image_size=dataset.image_size,
        true_rotations=dataset.rotations,
        symmetry_ops=dataset.symmetry_ops,
        stack_name=stack_name,
    )
    return predictions


#: Column groups of :func:`top_k_by_groups` (every grid level's cell count is a multiple).
TOP_K_GROUPS = 8


def top_k_by_groups(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(values, k, dim=1)`` of ``(n, G)`` values, exactly (the same values, most
    probable first; tied values in any order), in fewer passes over the row when
    ``k · 8 < G``: the columns fall into ``G / 8`` groups of 8 (group ``j``: columns ``j``,
    ``j + G/8``, ...), the ``k`` groups with the largest maxima are found, and the top ``k``
    taken among their ``8k`` columns. Exact: a group holding one of the ``k`` largest values
    has a maximum at least the ``k``-th largest, and at most ``k`` groups do. Faster than
    ``torch.topk`` on the CPU for ``k`` of a few tens: the grouped maxima are one strided
    pass, and the sort touches ``G / 8 + 8k`` values."""
    n, size = values.shape
    width = size // TOP_K_GROUPS
    if size % TOP_K_GROUPS or k * TOP_K_GROUPS >= size:
        top = torch.topk(values, k, dim=1)
        return top.values, top.indices
    maxima = values.reshape(n, TOP_K_GROUPS, width).amax(dim=1)  # (n, G / 8)
    groups = torch.topk(maxima, k, dim=1).indices
    offsets = width * torch.arange(TOP_K_GROUPS, device=values.device)
    columns = (groups[:, :, None] + offsets).reshape(n, -1)  # (n, 8k)
    top = torch.topk(torch.gather(values, 1, columns), k, dim=1)
    return top.values, torch.gather(columns, 1, top.indices)
