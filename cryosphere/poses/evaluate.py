"""Evaluation: pose metrics, baselines (template matching, uniform guess) and the equivariance test.

Pose metrics
------------
For predicted poses ``P`` and true poses ``T`` ``(n, 3, 3)`` (``x_mic = R @ x_vol``):

* **geodesic error** ``d(P, T) = arccos((tr(Pᵀ T) − 1) / 2)`` in degrees; with point-group ops
  ``g`` (volume frame, identity first) the minimum over the symmetry mates ``T @ g``;
* **viewing-direction / in-plane split** of the error: with ``E = P Tᵀ`` (the microscope-frame
  rotation that turns the true pose into the predicted one, ``P = E T``), the swing–twist
  decomposition about the optical axis ``z``, ``E = S · Rz(τ)``, gives the *viewing error*
  ``arccos(E[2, 2])`` (the angle between the viewing directions ``P[2, :]`` and ``T[2, :]``)
  and the *in-plane error* ``|τ|`` (``τ = 2 atan2(q_z, q_w)`` from the quaternion of ``E``,
  wrapped to [0°, 180°]). With symmetry, the split is taken for the mate nearest in geodesic
  error;
* **median, mean, acc@15°, acc@30°** of the geodesic error;
* **log-likelihood of the true pose** ``log(p(cell of T) · G / π²)`` for a distribution ``p``
  over the ``G`` grid cells (the density on SO(3) with Haar volume π², so a uniform guess scores
  ``−log π² ≈ −2.29``). With symmetry ``p`` is read at the true pose's own cell (a model that
  splits its mass between ``K`` mates pays ``log K``).

Baselines on the same images: exhaustive template matching on the same grid (noisy image
against every noise-free template, smallest MSE; :func:`cryosphere.poses.labels.template_matching`)
and a uniform guess (Haar-random rotations, seeded).

Equivariance test (GUIDE protocol)
---------------------------------
Rotating the particle by ``Q`` before imaging gives the pose ``Q R``; an equivariant predictor
satisfies ``p(S | I(Q R)) = p(Qᵀ S | I(R))`` for all ``S``. For pairs ``(R_i, Q_i)``, the
prediction for ``I(Q_i R_i)`` is compared with the left-translated prediction for ``I(R_i)``,
as the mean over the ``G`` grid cells of the squared difference (one MSE per pair); the table
gives mean, min and max over pairs. ``Q`` about the optical axis (*in-plane*, the
architecture's own symmetry) and general ``Q`` (*out-of-plane*, learned) are separate rows.

What is compared:

* **model / random**: the poster's probabilities, the per-cell sigmoid of the grid logits (the
  network is trained with binary cross-entropy against the masks, so ``sigmoid(logit_g)`` is
  its probability that cell ``g`` is a plausible pose). The left translation is exact: the
  SO(3) harmonic coefficients of the logits are rotated with Wigner-D matrices
  (:func:`cryosphere.poses.model.rotate_so3_coefficients`) and evaluated on the grid.
  *random* is the same network untrained (:func:`cryosphere.poses.train.untrained_model`).
* **labels**: the poster's label map ``Pr[R_g | I] = exp(−λ·MSE_g)²`` (unnormalised, in [0, 1],
  the same scale as the sigmoids) computed from the noise-free images; held only on the grid,
  it is left-translated by nearest-cell resampling (``p'(S_g) = p(cell nearest Qᵀ S_g)``), so
  its MSE is the floor that the grid itself sets.

Images are noise-free (projection + the dataset's blur) unless an SNR is given, so the test
measures the predictor, not the noise.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cryosphere.geometry import so3
from cryosphere.imaging.projection import gaussian_blur, project_volume
from cryosphere.poses.model import PoseDistributionNetwork, rotate_so3_coefficients

__all__ = [
    "UNIFORM_LOG_LIKELIHOOD",
    "ROTATION_KINDS",
    "pose_error_parts_deg",
    "true_pose_log_likelihood",
    "pose_metrics",
    "uniform_poses",
    "template_matched_poses",
    "compare_pose_estimators",
    "accuracy_curve",
    "equivariance_pairs",
    "left_translate_grid_values",
    "equivariance_mse",
    "model_equivariance_mse",
    "label_equivariance_mse",
    "model_equivariance_example",
    "EquivarianceResult",
    "equivariance_table",
    "accuracy_vs_snr",
]

UNIFORM_LOG_LIKELIHOOD = -math.log(math.pi**2)
"""Log-likelihood of any pose under the uniform distribution on SO(3): ``−log π² ≈ −2.29``."""

ROTATION_KINDS = ("in_plane", "out_of_plane")


# --------------------------------------------------------------------------------------------
# pose metrics
# --------------------------------------------------------------------------------------------
def _as_poses(R: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(R, dtype=np.float64)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (3, 3):
        raise ValueError(f"{name} must have shape (n, 3, 3), got {np.shape(R)}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds NaN or infinite values")
    return array


_ops_or_identity = so3.as_symmetry_ops


def pose_error_parts_deg(
    predicted: np.ndarray, true: np.ndarray, symmetry_ops: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Geodesic error and its viewing-direction and in-plane parts, in degrees.

    Args:
        predicted, true: ``(n, 3, 3)`` poses.
        symmetry_ops: ``(K, 3, 3)`` point-group ops (identity first) or None.

    Returns:
        ``(total, viewing, in_plane)``, each ``(n,)`` float64 in [0°, 180°] (module docstring).
        With symmetry, ``total`` is the minimum over the mates ``true @ g`` and the parts are
        those of that mate.
    """
    P = _as_poses(predicted, "predicted")
    T = _as_poses(true, "true")
    if P.shape != T.shape:
        raise ValueError(f"predicted {P.shape} and true {T.shape} poses differ in count")
    mates = so3.symmetry_mates(T, _ops_or_identity(symmetry_ops))  # (n, K, 3, 3)
    distances = so3.geodesic_distance_deg(P[:, None], mates)  # (n, K)
    best = distances.argmin(axis=1)
    nearest = mates[np.arange(len(P)), best]
    E = P @ np.swapaxes(nearest, -1, -2)
    viewing = np.degrees(np.arccos(np.clip(E[:, 2, 2], -1.0, 1.0)))
    q = so3.matrices_to_quaternions(E)  # (w, x, y, z)
    twist = np.degrees(2.0 * np.arctan2(q[:, 3], q[:, 0]))
    in_plane = np.abs((twist + 180.0) % 360.0 - 180.0)
    return distances[np.arange(len(P)), best], viewing, in_plane


def true_pose_log_likelihood(
    probabilities: np.ndarray,
    true: np.ndarray,
    level: int,
    symmetry_ops: np.ndarray | None = None,
) -> np.ndarray:
    """``log(p(cell nearest T) · G / π²)`` per image ``(n,)`` (module docstring).

    With a point group of ``K`` operators the mass of the cells nearest every mate ``T @ g``
    counts, as a density on the quotient: ``log(Σ_g p(cell(T g)) · G / (K π²))``, so a guess
    that splits its mass over the mates scores as one that picks the right mate, and a uniform
    guess still scores ``−log π²``.

    Args:
        probabilities: ``(n, G)`` normalised grid distributions (rows summing to 1).
        true: ``(n, 3, 3)`` true poses.
        level: grid level of ``probabilities``.
        symmetry_ops: ``(K, 3, 3)`` point group (None: C1).
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    G = so3.healpix_so3_grid_size(level)
    T = _as_poses(true, "true")
    if probs.shape != (len(T), G):
        raise ValueError(
            f"probabilities must have shape (n, G) = ({len(T)}, {G}) for level {level}, "
            f"got {probs.shape}"
        )
    if not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise ValueError("probabilities must be finite and non-negative")
    ops = _ops_or_identity(symmetry_ops)
    grid = so3.healpix_so3_grid(level)
    rows = np.arange(len(T))
    mass = np.zeros(len(T))
    taken = np.zeros((len(T), 0), dtype=np.int64)
    for g in ops:
        cells = so3.nearest_grid_indices(T @ g, grid)
        fresh = ~np.any(taken == cells[:, None], axis=1)  # mates in one cell count once
        mass += np.where(fresh, probs[rows, cells], 0.0)
        taken = np.concatenate([taken, cells[:, None]], axis=1)
    with np.errstate(divide="ignore"):
        return np.log(mass * G / len(ops)) + UNIFORM_LOG_LIKELIHOOD


def pose_metrics(
    predicted: np.ndarray,
    true: np.ndarray,
    symmetry_ops: np.ndarray | None = None,
    *,
    probabilities: np.ndarray | None = None,
    level: int | None = None,
    log_likelihood: float | None = None,
) -> dict[str, float | None]:
    """Summary of pose errors (degrees) of one estimator on ``n`` images.

    Returns a dict: ``n``, ``median_deg``, ``mean_deg``, ``acc15``, ``acc30`` (fractions),
    ``viewing_median_deg``, ``in_plane_median_deg`` and ``log_likelihood`` (mean over images,
    from ``probabilities`` on grid ``level``; or the given constant; None when neither is
    given, e.g. for template matching, which gives a point estimate only).
    """
    total, viewing, in_plane = pose_error_parts_deg(predicted, true, symmetry_ops)
    if probabilities is not None:
        if level is None:
            raise ValueError("level is needed with probabilities")
        ll = float(np.mean(true_pose_log_likelihood(probabilities, true, level, symmetry_ops)))
    else:
        ll = None if log_likelihood is None else float(log_likelihood)
    return {
        "n": int(len(total)),
        "median_deg": float(np.median(total)),
        "mean_deg": float(np.mean(total)),
        "acc15": float(np.mean(total < 15.0)),
        "acc30": float(np.mean(total < 30.0)),
        "viewing_median_deg": float(np.median(viewing)),
        "in_plane_median_deg": float(np.median(in_plane)),
        "log_likelihood": ll,
    }


def accuracy_curve(errors_deg: np.ndarray, thresholds_deg: np.ndarray) -> np.ndarray:
    """Fraction of errors below each threshold: ``(len(thresholds),)``."""
    errors = np.asarray(errors_deg, dtype=np.float64)
    return (errors[None, :] < np.asarray(thresholds_deg, dtype=np.float64)[:, None]).mean(axis=1)


def uniform_poses(n: int, seed: int = 0) -> np.ndarray:
    """The uniform baseline: ``n`` Haar-random poses ``(n, 3, 3)`` (seeded)."""
    return so3.random_rotations(int(n), seed)


def template_matched_poses(
    noisy_images: np.ndarray, templates: np.ndarray, level: int, progress: bool = False
) -> np.ndarray:
    """Exhaustive template matching on the level-``level`` grid: the grid pose of smallest MSE
    between each noisy image ``(n, N, N)`` and the noise-free templates ``(G, N, N)``."""
    from cryosphere.poses.labels import template_matching

    grid = so3.healpix_so3_grid(level)
    if templates.shape[0] != len(grid):
        raise ValueError(
            f"{templates.shape[0]} templates do not match the level-{level} grid ({len(grid)})"
        )
    return grid[template_matching(noisy_images, templates, progress=progress)]


def compare_pose_estimators(
    true: np.ndarray,
    symmetry_ops: np.ndarray | None,
    *,
    model_probabilities: np.ndarray,
    model_poses: np.ndarray,
    template_poses: np.ndarray,
    level: int,
    seed: int = 0,
) -> dict[str, dict[str, float | None]]:
    """:func:`pose_metrics` of the model, template matching and a uniform guess on the same
    images: ``{"model": {...}, "template_matching": {...}, "uniform": {...}}``."""
    true = _as_poses(true, "true")
    return {
        "model": pose_metrics(
            model_poses, true, symmetry_ops, probabilities=model_probabilities, level=level
        ),
        "template_matching": pose_metrics(template_poses, true, symmetry_ops),
        "uniform": pose_metrics(
            uniform_poses(len(true), seed), true, symmetry_ops,
            log_likelihood=UNIFORM_LOG_LIKELIHOOD,
        ),
    }  # fmt: skip


# --------------------------------------------------------------------------------------------
# equivariance
# --------------------------------------------------------------------------------------------
def equivariance_pairs(n_pairs: int, kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Test pairs ``(R, Q)``, each ``(n_pairs, 3, 3)``, seeded.

    ``R`` is Haar-random. ``kind="in_plane"``: ``Q = Rz(θ)`` with θ uniform in [0°, 360°)
    (a rotation about the optical axis); ``kind="out_of_plane"``: ``Q`` Haar-random.
    """
    if kind not in ROTATION_KINDS:
        raise ValueError(f"kind must be one of {ROTATION_KINDS}, got {kind!r}")
    if int(n_pairs) < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    rng = np.random.default_rng([int(seed), ROTATION_KINDS.index(kind)])
    R = so3.random_rotations(int(n_pairs), rng)
    if kind == "in_plane":
        Q = so3.rotation_about_z(rng.uniform(0.0, 360.0, int(n_pairs)))
    else:
        Q = so3.random_rotations(int(n_pairs), rng)
    return R, Q


def left_translate_grid_values(values: np.ndarray, Q: np.ndarray, level: int) -> np.ndarray:
    """Left translation of grid signals by nearest-cell resampling.

    Args:
        values: ``(n, G)`` signals on the level-``level`` grid.
        Q: ``(n, 3, 3)`` (one rotation per signal) or ``(3, 3)``.

    Returns:
        ``(n, G)`` with ``out[i, g] = values[i, cell nearest Q_iᵀ S_g]`` (``f'(S) = f(Qᵀ S)``).
    """
    values = np.asarray(values)
    grid = so3.healpix_so3_grid(level)
    if values.ndim != 2 or values.shape[1] != len(grid):
        raise ValueError(
            f"values must have shape (n, {len(grid)}) for level {level}, got {values.shape}"
        )
    Q = np.broadcast_to(np.asarray(Q, dtype=np.float64), (values.shape[0], 3, 3))
    out = np.empty_like(values)
    for i in range(values.shape[0]):
        cells = so3.nearest_grid_indices(Q[i].T @ grid, grid)
        out[i] = values[i, cells]
    return out


def equivariance_mse(values_rotated: np.ndarray, values_translated: np.ndarray) -> np.ndarray:
    """Per-pair MSE over grid cells ``(n,)`` between ``p(· | I(Q R))`` and ``p(Qᵀ · | I(R))``."""
    a = np.asarray(values_rotated, dtype=np.float64)
    b = np.asarray(values_translated, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"both inputs must be (n, G) of one shape, got {a.shape} and {b.shape}")
    return ((a - b) ** 2).mean(axis=1)


def _images(
    volume: np.ndarray,
    rotations: np.ndarray,
    blur_sigma: float,
    noise_sigma: float,
    seed: int,
) -> np.ndarray:
    images = gaussian_blur(project_volume(volume, rotations), blur_sigma)
    if noise_sigma > 0:
        generator = torch.Generator().manual_seed(int(seed))
        images = images + noise_sigma * torch.randn(images.shape, generator=generator)
    return images.numpy()


def _sigmoid_map_pairs(
    model: PoseDistributionNetwork,
    images_R: np.ndarray,
    images_QR: np.ndarray,
    Q: np.ndarray,
    output: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(map of I(Q R), exact left translation by Q of the map of I(R))``, each ``(n, G)`` on
    the CPU, for images ``(n, N, N)`` and rotations ``(n, 3, 3)``. ``output="sigmoid"``: per-cell
    sigmoid of the logits (BCE-trained models); ``"density"``: ``G · softmax(logits)``, the
    density relative to uniform (cross-entropy-trained models, whose logits have no scale of
    their own)."""
    if output not in ("sigmoid", "density"):
        raise ValueError(f"output must be 'sigmoid' or 'density', got {output!r}")

    def link(logits: torch.Tensor) -> torch.Tensor:
        if output == "sigmoid":
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=1) * logits.shape[1]

    model.eval()
    with torch.no_grad():
        coeff_R = model.coefficients(torch.as_tensor(images_R)).cpu()
        coeff_QR = model.coefficients(torch.as_tensor(images_QR)).cpu()
        wigner = model.grid_wigner.cpu()
        p_translated = link(rotate_so3_coefficients(coeff_R, Q) @ wigner)
        p_rotated = link(coeff_QR @ wigner)
    return p_rotated, p_translated


def model_equivariance_mse(
    model: PoseDistributionNetwork,
    images_R: np.ndarray,
    images_QR: np.ndarray,
    Q: np.ndarray,
    batch_size: int = 128,
    output: str = "sigmoid",
) -> np.ndarray:
    """Per-pair MSE ``(n,)`` between ``sigmoid(logits(I(Q R)))`` and the exact left translation by
    ``Q`` of ``sigmoid(logits(I(R)))`` (rotating the harmonic coefficients, module docstring);
    ``output="density"`` compares ``G · softmax(logits)`` instead (see ``_sigmoid_map_pairs``)."""
    Q = np.asarray(Q, dtype=np.float64)
    if not (len(images_R) == len(images_QR) == len(Q)):
        raise ValueError(
            f"images_R ({len(images_R)}), images_QR ({len(images_QR)}) and Q ({len(Q)}) must "
            "have one entry per pair"
        )
    out = []
    for start in range(0, len(Q), int(batch_size)):
        stop = start + int(batch_size)
        p_rotated, p_translated = _sigmoid_map_pairs(
            model, images_R[start:stop], images_QR[start:stop], Q[start:stop], output
        )
        out.append(((p_rotated - p_translated) ** 2).mean(dim=1).double().numpy())
    return np.concatenate(out)


def label_equivariance_mse(
    images_R: np.ndarray,
    images_QR: np.ndarray,
    Q: np.ndarray,
    templates: np.ndarray,
    level: int,
    lam: float,
) -> np.ndarray:
    """Per-pair MSE ``(n,)`` of the label maps ``exp(−λ·MSE)²`` (unnormalised), left-translated by
    nearest-cell resampling: the floor set by the grid (module docstring)."""
    from cryosphere.poses.labels import mse_landscape, soft_labels

    maps_R = soft_labels(mse_landscape(images_R, templates), lam, normalize=False)
    maps_QR = soft_labels(mse_landscape(images_QR, templates), lam, normalize=False)
    return equivariance_mse(maps_QR, left_translate_grid_values(maps_R, Q, level))


def model_equivariance_example(
    model: PoseDistributionNetwork,
    volume: np.ndarray,
    blur_sigma: float,
    kind: str = "out_of_plane",
    *,
    n_pairs: int = 64,
    index: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Pair ``index`` of :func:`equivariance_pairs` ``(n_pairs, kind, seed)`` worked out for
    display: ``R``, ``Q`` ``(3, 3)``; ``image_R``, ``image_QR`` ``(N, N)`` (noise-free);
    ``map_QR`` = sigmoid map ``(G,)`` of ``p(· | I(Q R))``; ``map_translated`` = the exact left
    translation of ``p(· | I(R))``; ``mse`` their mean squared difference."""
    R, Q = equivariance_pairs(n_pairs, kind, seed)
    R, Q = R[index : index + 1], Q[index : index + 1]
    image_R = _images(volume, R, blur_sigma, 0.0, 0)
    image_QR = _images(volume, Q @ R, blur_sigma, 0.0, 0)
    map_QR, map_translated = (p[0].numpy() for p in _sigmoid_map_pairs(model, image_R, image_QR, Q))
    return {
        "R": R[0],
        "Q": Q[0],
        "image_R": image_R[0],
        "image_QR": image_QR[0],
        "map_QR": map_QR,
        "map_translated": map_translated,
        "mse": float(np.mean((map_QR.astype(np.float64) - map_translated) ** 2)),
    }


@dataclass(frozen=True)
class EquivarianceResult:
    """Per-pair equivariance MSE for each predictor and rotation kind.

    Attributes:
        mse: ``{predictor: {kind: (n_pairs,) float64}}``, predictors among ``model``,
            ``random``, ``labels``; kinds among :data:`ROTATION_KINDS`.
        protocol: how the numbers were made (pairs, seed, images, compared probabilities).
    """

    mse: dict[str, dict[str, np.ndarray]]
    protocol: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """One row per (predictor, kind): mean, min, max and count over pairs."""
        return [
            {
                "predictor": predictor,
                "rotation": kind,
                "mean": float(np.mean(values)),
                "min": float(np.min(values)),
                "max": float(np.max(values)),
                "n_pairs": int(len(values)),
            }
            for predictor, kinds in self.mse.items()
            for kind, values in kinds.items()
        ]

    def mean(self, predictor: str, kind: str) -> float:
        """Mean MSE over pairs of one row."""
        return float(np.mean(self.mse[predictor][kind]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"protocol": ..., "rows": [...]}``."""
        return {"protocol": dict(self.protocol), "rows": self.rows()}


def equivariance_table(
    volume: np.ndarray,
    blur_sigma: float,
    *,
    model: PoseDistributionNetwork | None = None,
    random_model: PoseDistributionNetwork | None = None,
    templates: np.ndarray | None = None,
    level: int = 2,
    lam: float | None = None,
    n_pairs: int = 64,
    kinds: Sequence[str] = ROTATION_KINDS,
    noise_sigma: float = 0.0,
    seed: int = 0,
    progress: bool = False,
    output: str = "sigmoid",
) -> EquivarianceResult:
    """The poster's equivariance table (module docstring for the protocol).

    Args:
        volume: ``(N, N, N)`` map the images are made from.
        blur_sigma: the dataset's blur in pixels.
        model: trained network (row ``model``), optional.
        random_model: the same network untrained (row ``random``), optional.
        templates: ``(G, N, N)`` noise-free templates on grid ``level`` with ``lam`` (row
            ``labels``), optional.
        n_pairs: pairs per rotation kind.
        kinds: rotation kinds to test.
        noise_sigma: standard deviation of independent noise added to both images of a pair
            (0: noise-free, the default).
        seed: seeds the pairs and the noise.
        output: how the model and random rows map logits to values: ``"sigmoid"`` per cell
            (the poster's BCE-trained model) or ``"density"`` ``G · softmax`` (models trained
            with cross-entropy, whose logits carry no offset of their own).

    Returns:
        :class:`EquivarianceResult` with one entry per given predictor and kind.
    """
    if templates is not None and lam is None:
        raise ValueError("the labels row needs lam (the labels' λ) with the templates")
    if model is None and random_model is None and templates is None:
        raise ValueError("give at least one of model, random_model, templates")
    predictors: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {}
    if model is not None:
        predictors["model"] = lambda a, b, q: model_equivariance_mse(model, a, b, q, output=output)
    if random_model is not None:
        predictors["random"] = lambda a, b, q: model_equivariance_mse(
            random_model, a, b, q, output=output
        )
    if templates is not None:
        predictors["labels"] = lambda a, b, q: label_equivariance_mse(
            a, b, q, templates, level, float(lam)
        )
    mse: dict[str, dict[str, np.ndarray]] = {name: {} for name in predictors}
    for k, kind in enumerate(tqdm(list(kinds), desc="equivariance", disable=not progress)):
        R, Q = equivariance_pairs(n_pairs, kind, seed)
        images_R = _images(volume, R, blur_sigma, noise_sigma, seed=2 * (seed * 7 + k))
        images_QR = _images(volume, Q @ R, blur_sigma, noise_sigma, seed=2 * (seed * 7 + k) + 1)
        for name, fn in predictors.items():
            mse[name][kind] = fn(images_R, images_QR, Q)
    protocol = {
        "n_pairs": int(n_pairs),
        "seed": int(seed),
        "noise_sigma": float(noise_sigma),
        "grid_level": int(level),
        "lam": None if lam is None else float(lam),
        "output": output,
        "compared": f"model/random: per-cell {output} of the grid logits, exact Wigner-D left "
        "translation; labels: exp(-lam*MSE)^2 (unnormalised), nearest-cell resampling; MSE "
        "over grid cells per pair",
    }
    return EquivarianceResult(mse=mse, protocol=protocol)


# --------------------------------------------------------------------------------------------
# accuracy vs SNR
# --------------------------------------------------------------------------------------------
def accuracy_vs_snr(
    run_dir: str | os.PathLike[str],
    parameters: Any,
    snr_levels: Sequence[float],
    *,
    level: int = 2,
    q: float = 0.05,
    model_config: Any = None,
    training_config: Any = None,
    progress: bool = True,
    extra_models: Mapping[str, PoseDistributionNetwork] | None = None,
) -> list[dict[str, Any]]:
    """Model vs template matching vs uniform at several SNRs, each in its own run folder.

    For each SNR the dataset ``parameters`` (a :class:`cryosphere.imaging.simulate.SimulationParameters`)
    is simulated with that SNR (same poses and seed) into ``run_dir/snr/snr_<value>/``, labelled,
    and a model is trained (or reloaded) there; the three estimators are scored on that model's
    validation images.

    ``extra_models`` (name -> trained network, e.g. the streamed default model, which was
    trained on a range of SNRs and so serves every level) are scored on the same images and
    added to each row under their names.

    Returns one dict per SNR: ``{"snr": s, "model": metrics, "template_matching": metrics,
    "uniform": metrics, <extra name>: metrics}`` (metrics from :func:`pose_metrics`).
    """
    from cryosphere.imaging.simulate import load_or_simulate
    from cryosphere.poses import labels, train

    if not len(snr_levels):
        raise ValueError("snr_levels is empty; give at least one SNR, e.g. [1.0, 0.1]")
    rows = []
    for snr in snr_levels:
        if not float(snr) > 0:
            raise ValueError(f"every SNR must be > 0, got {snr}")
        folder = Path(run_dir) / "snr" / f"snr_{float(snr):g}"
        dataset = load_or_simulate(folder, replace(parameters, snr=float(snr)), progress=progress)
        pose_labels = labels.load_or_make_labels(
            folder, dataset, level=level, q=q, progress=progress
        )
        result, predictions = train.load_or_train(
            folder, dataset, pose_labels, model_config, training_config, progress=progress
        )
        val = result.validation_indices
        templates = labels.dataset_templates(
            dataset, level, cache_dir=labels.labels_dir(folder), progress=progress
        )
        metrics = compare_pose_estimators(
            dataset.rotations[val],
            dataset.symmetry_ops,
            model_probabilities=predictions.probabilities[val],
            model_poses=predictions.best_rotation[val],
            template_poses=template_matched_poses(dataset.noisy_images[val], templates, level),
            level=level,
        )
        for name, extra in (extra_models or {}).items():
            extra_pred = train.predict(extra, dataset.noisy_images[val])
            metrics[name] = pose_metrics(
                extra_pred.best_rotation,
                dataset.rotations[val],
                dataset.symmetry_ops,
                probabilities=extra_pred.probabilities,
                level=level,
            )
        rows.append({"snr": float(snr), **metrics})
    return rows
