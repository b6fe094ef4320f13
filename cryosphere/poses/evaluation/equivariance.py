"""Equivariance of pose predictors: a rotation of the particle before imaging should
left-translate the predicted distribution.

Protocol (GUIDE)
----------------
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
  (:func:`cryosphere.poses.network.harmonics.rotate_so3_coefficients`) and evaluated on the grid.
  *random* is the same network untrained (:func:`cryosphere.poses.training.fixed_set.untrained_model`).
* **labels**: the poster's label map ``Pr[R_g | I] = exp(−λ·MSE_g)²`` (unnormalised, in [0, 1],
  the same scale as the sigmoids) computed from the noise-free images; held only on the grid,
  it is left-translated by nearest-cell resampling (``p'(S_g) = p(cell nearest Qᵀ S_g)``), so
  its MSE is the floor that the grid itself sets.

Images are noise-free (projection + the dataset's blur) unless an SNR is given, so the test
measures the predictor, not the noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cryosphere.geometry import grids
from cryosphere.geometry import rotations as geometry_rotations
from cryosphere.imaging.projection import gaussian_blur, project_volume
from cryosphere.poses.labels.landscape import mse_landscape
from cryosphere.poses.labels.soft_maps import soft_labels
from cryosphere.poses.network.harmonics import rotate_so3_coefficients
from cryosphere.poses.network.model import PoseDistributionNetwork

__all__ = [
    "ROTATION_KINDS",
    "equivariance_pairs",
    "left_translate_grid_values",
    "equivariance_mse",
    "model_equivariance_mse",
    "label_equivariance_mse",
    "model_equivariance_example",
    "EquivarianceResult",
    "equivariance_table",
]

ROTATION_KINDS = ("in_plane", "out_of_plane")


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
    R = geometry_rotations.random_rotations(int(n_pairs), rng)
    if kind == "in_plane":
        Q = geometry_rotations.rotation_about_z(rng.uniform(0.0, 360.0, int(n_pairs)))
    else:
        Q = geometry_rotations.random_rotations(int(n_pairs), rng)
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
    grid = grids.healpix_so3_grid(level)
    if values.ndim != 2 or values.shape[1] != len(grid):
        raise ValueError(
            f"values must have shape (n, {len(grid)}) for level {level}, got {values.shape}"
        )
    Q = np.broadcast_to(np.asarray(Q, dtype=np.float64), (values.shape[0], 3, 3))
    out = np.empty_like(values)
    for i in range(values.shape[0]):
        cells = grids.nearest_grid_indices(Q[i].T @ grid, grid)
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
