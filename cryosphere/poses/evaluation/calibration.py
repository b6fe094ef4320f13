"""Calibration of pose distributions on the HEALPix SO(3) grid: do the probabilities mean what
they say?

A pose distribution ``p`` ``(n, G)`` over the ``G`` cells of the level-``L`` grid
(:func:`cryosphere.geometry.grids.healpix_so3_grid`) is *calibrated* when, among the particles
to which it gives a confidence ``c``, a fraction ``c`` have their true pose where it says. Three
measures, each computed against the true poses ``T`` ``(n, 3, 3)``:

* **Top-cell confidence and hit** (:func:`top_cell_confidence`). With a point group of ``K``
  operators ``g`` (volume frame, identity first), poses ``R`` and ``R g`` give the same image, so
  the distribution is first folded onto orbits: ``p̄(c) = Σ_g p(cell nearest R_c g)``. The
  confidence is ``max_c p̄(c)``; the particle is a *hit* when the top cell's orbit
  ``{cell nearest R_top g}`` and the truth's mate cells ``{cell nearest T g}`` share a cell.
  (Both sides are mapped through the group: unless the grid is closed under the group, e.g.
  an axis off the grid's z, the cell nearest ``T g`` is often not the cell nearest
  ``R_{cell(T)} g``; for 1HVR's C2 at level 1, only 39 % of the time.) For C1 this is the top
  cell's mass and "the top cell is the cell nearest the truth".
* **Reliability diagram and expected calibration error** (:func:`reliability_diagram`,
  :func:`expected_calibration_error`): confidences binned on ``[0, 1]`` (``B`` equal bins);
  per bin the mean confidence ``conf_b`` and hit rate ``acc_b``;
  ``ECE = Σ_b (n_b / n) |acc_b − conf_b|``. A calibrated distribution has ``ECE → 0`` as
  ``n → ∞`` (with ``n`` particles the sampling floor is about ``sqrt(c (1 − c) B / n) / 2``).
* **Coverage of credible sets** (:func:`credible_set_coverage`): the smallest set of cells holding
  a mass ``α`` (cells in decreasing probability). On a grid the cell that crosses ``α`` is taken
  *fractionally*, with inclusion weight ``(α − mass before it) / p(cell)``, so the set holds
  exactly ``α``; a particle's coverage is the inclusion weight of its true cell (with symmetry,
  the mass-weighted mean over the truth's mate cells, ``Σ p w / Σ p``). Averaged over particles,
  the coverage of a calibrated distribution is ``α`` whatever its sharpness (a set of whole cells
  would overshoot: one cell of mass 0.97 "is" the 90 % set). It is the expected coverage of the
  randomised set that takes the crossing cell with probability equal to its weight.
* **Log-likelihood of the true pose**: :func:`cryosphere.poses.evaluation.metrics.true_pose_log_likelihood`
  (nats per particle; the uniform guess scores ``−log π² ≈ −2.29``), a proper scoring rule that
  rewards calibration and sharpness together.

:func:`calibration_summary` gives all of them for one set of particles.

A *temperature* ``τ`` rescales a distribution's log-probabilities, ``p_τ ∝ p^(1/τ)``
(:func:`tempered`; ``τ > 1`` flattens, ``τ < 1`` sharpens); :func:`fit_temperature` chooses
``τ`` by the mean log-likelihood of the true poses on particles held out from the ones scored.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from cryosphere._checks import as_pose_stack, as_symmetry_ops
from cryosphere.geometry import grids
from cryosphere.poses.evaluation.metrics import true_pose_log_likelihood

__all__ = [
    "ReliabilityDiagram",
    "CalibrationSummary",
    "orbit_cells",
    "orbit_closure",
    "true_cells",
    "top_cell_confidence",
    "reliability_diagram",
    "expected_calibration_error",
    "ece_sampling_floor",
    "credible_set_coverage",
    "calibration_summary",
    "tempered",
    "fit_temperature",
]


@functools.lru_cache(maxsize=8)
def _orbit_cells(level: int, ops_bytes: bytes) -> np.ndarray:
    ops = np.frombuffer(ops_bytes, dtype=np.float64).reshape(-1, 3, 3)
    grid = grids.healpix_so3_grid(level)
    mates = np.einsum("gij,kjl->gkil", grid, ops).reshape(-1, 3, 3)
    cells = grids.nearest_grid_indices(mates, grid).reshape(len(grid), len(ops))
    cells.setflags(write=False)
    return cells


def orbit_cells(level: int, symmetry_ops: np.ndarray | None = None) -> np.ndarray:
    """``(G, K)`` int: for every grid cell ``c``, the cells nearest ``R_c g`` for each operator
    ``g`` of the point group (column 0 is ``c`` itself). Cached per level and group."""
    ops = np.ascontiguousarray(as_symmetry_ops(symmetry_ops), dtype=np.float64)
    return _orbit_cells(int(level), ops.tobytes())


def orbit_closure(level: int, symmetry_ops: np.ndarray | None = None) -> float:
    """Fraction of the level-``level`` cells whose orbit (:func:`orbit_cells`) is closed: every
    cell of it has the same orbit. 1 when the grid is closed under the group (e.g. C2, C4,
    D2, D4 in their standard frame, n-fold along z); below 1 for axes oblique to the grid,
    where folding a distribution onto orbits is only approximate."""
    orbits = orbit_cells(level, symmetry_ops)
    canonical = np.sort(orbits, axis=1)
    closed = np.all(canonical[orbits] == canonical[:, None, :], axis=(1, 2))
    return float(closed.mean())


def true_cells(true: np.ndarray, level: int, symmetry_ops: np.ndarray | None = None) -> np.ndarray:
    """``(n, K)`` int: the cells nearest each mate ``T g`` of each true pose (column 0: ``T``)."""
    T = as_pose_stack(true, "true")
    ops = as_symmetry_ops(symmetry_ops)
    mates = np.einsum("nij,kjl->nkil", T, ops).reshape(-1, 3, 3)
    grid = grids.healpix_so3_grid(level)
    return grids.nearest_grid_indices(mates, grid).reshape(len(T), len(ops))


def _check_probabilities(probabilities: np.ndarray, n: int, level: int) -> np.ndarray:
    probs = np.asarray(probabilities, dtype=np.float64)
    G = grids.healpix_so3_grid_size(level)
    if probs.shape != (n, G):
        raise ValueError(
            f"probabilities must have shape (n, G) = ({n}, {G}) for level {level}, "
            f"got {probs.shape}"
        )
    if not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise ValueError("probabilities must be finite and non-negative (NaN found or < 0)")
    total = probs.sum(axis=1)
    if np.any(np.abs(total - 1.0) > 1e-3):
        raise ValueError(
            f"probability rows must sum to 1 (found sums from {total.min():.4g} to "
            f"{total.max():.4g}); normalise them first"
        )
    return probs / total[:, None]


def top_cell_confidence(
    probabilities: np.ndarray,
    true: np.ndarray,
    level: int,
    symmetry_ops: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Confidence of the top (orbit-folded) cell and whether it holds the truth.

    Args:
        probabilities: ``(n, G)`` distributions on the level-``level`` grid (rows sum to 1).
        true: ``(n, 3, 3)`` true poses.
        level: grid level.
        symmetry_ops: ``(K, 3, 3)`` point group (None: C1).

    Returns:
        ``(confidence (n,) float64 in [0, 1], hit (n,) bool)`` (module docstring).
    """
    T = as_pose_stack(true, "true")
    probs = _check_probabilities(probabilities, len(T), level)
    orbits = orbit_cells(level, symmetry_ops)  # (G, K)
    if orbits.shape[1] > 1 and (closure := orbit_closure(level, symmetry_ops)) < 1.0:
        warnings.warn(
            f"the level-{level} grid is not closed under this point group (only "
            f"{100 * closure:.0f} % of cells fold onto a closed orbit): top-cell confidences "
            "are approximate; express poses and maps in the symmetry frame "
            "(cryosphere.imaging.chain_symmetry.in_symmetry_frame)",
            stacklevel=2,
        )
    folded = probs if orbits.shape[1] == 1 else probs[:, orbits].sum(axis=-1)
    top = folded.argmax(axis=1)
    confidence = np.clip(folded[np.arange(len(T)), top], 0.0, 1.0)
    mates = true_cells(T, level, symmetry_ops)  # (n, K): the cells nearest T g
    hit = np.any(orbits[top][:, :, None] == mates[:, None, :], axis=(1, 2))
    return confidence, hit


@dataclass(frozen=True)
class ReliabilityDiagram:
    """Binned confidence against hit rate.

    Attributes:
        edges: ``(B + 1,)`` bin edges on ``[0, 1]``.
        counts: ``(B,)`` particles per bin.
        confidence: ``(B,)`` mean confidence per bin (NaN for an empty bin).
        hit_rate: ``(B,)`` fraction of hits per bin (NaN for an empty bin).
    """

    edges: np.ndarray
    counts: np.ndarray
    confidence: np.ndarray
    hit_rate: np.ndarray

    @property
    def ece(self) -> float:
        """``Σ_b (n_b / n) |hit_rate_b − confidence_b|`` over non-empty bins."""
        used = self.counts > 0
        weights = self.counts[used] / self.counts.sum()
        return float(np.sum(weights * np.abs(self.hit_rate[used] - self.confidence[used])))


def reliability_diagram(
    confidence: np.ndarray, hit: np.ndarray, n_bins: int = 10
) -> ReliabilityDiagram:
    """Bin ``confidence`` ``(n,)`` in ``[0, 1]`` into ``n_bins`` equal bins (the last closed)
    and give each bin's mean confidence and hit rate (``hit`` ``(n,)`` bool)."""
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    hits = np.asarray(hit, dtype=bool).reshape(-1)
    if conf.shape != hits.shape or conf.size == 0:
        raise ValueError(
            f"confidence and hit need one entry per particle, got {conf.shape} and {hits.shape}"
        )
    if not np.all(np.isfinite(conf)) or np.any((conf < 0) | (conf > 1)):
        raise ValueError("confidence must be finite and in [0, 1]")
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    index = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, int(n_bins) - 1)
    counts = np.bincount(index, minlength=int(n_bins))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, conf, int(n_bins)) / counts
        hit_rate = np.bincount(index, hits.astype(np.float64), int(n_bins)) / counts
    mean_conf[counts == 0] = np.nan
    hit_rate[counts == 0] = np.nan
    return ReliabilityDiagram(edges, counts, mean_conf, hit_rate)


def expected_calibration_error(confidence: np.ndarray, hit: np.ndarray, n_bins: int = 10) -> float:
    """ECE of top-cell confidences against hits (module docstring); 0 is perfect."""
    return reliability_diagram(confidence, hit, n_bins).ece


def ece_sampling_floor(
    confidence: np.ndarray, n_bins: int = 10, draws: int = 200, seed: int = 0
) -> float:
    """The ECE a *perfectly calibrated* distribution scores on these particles by chance.

    Hits are drawn ``hit_i ~ Bernoulli(confidence_i)`` (calibration: a particle given
    confidence ``c`` is a hit with probability ``c``), ``draws`` times with a seeded
    generator, and the mean of :func:`expected_calibration_error` is returned. It depends
    on the number of particles ``n`` and on how the confidences ``(n,)`` spread over the bins
    (for all of them at ``c``: ``≈ sqrt(2 c (1 − c) / (π n))``); an ECE near it says nothing
    against calibration. Measured: 200 particles with the confidences of the exact posterior
    off-grid at SNR 1 (docs/calibration.md) give 0.07.
    """
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    if conf.size == 0 or not np.all(np.isfinite(conf)) or np.any((conf < 0) | (conf > 1)):
        raise ValueError("confidence must be a non-empty array of values in [0, 1]")
    rng = np.random.default_rng(seed)
    eces = [
        expected_calibration_error(conf, rng.random(conf.size) < conf, n_bins)
        for _ in range(int(draws))
    ]
    return float(np.mean(eces))


def _inclusion_weights(probs: np.ndarray, mass: float) -> np.ndarray:
    """``(n, G)`` inclusion weight of every cell in the smallest set holding ``mass``."""
    order = np.argsort(-probs, axis=1, kind="stable")
    sorted_p = np.take_along_axis(probs, order, axis=1)
    before = np.cumsum(sorted_p, axis=1) - sorted_p
    with np.errstate(invalid="ignore", divide="ignore"):
        partial = np.where(sorted_p > 0, (mass - before) / sorted_p, 0.0)
    weights_sorted = np.clip(partial, 0.0, 1.0)
    weights = np.empty_like(weights_sorted)
    np.put_along_axis(weights, order, weights_sorted, axis=1)
    return weights


def credible_set_coverage(
    probabilities: np.ndarray,
    true: np.ndarray,
    level: int,
    mass: float = 0.9,
    symmetry_ops: np.ndarray | None = None,
) -> np.ndarray:
    """Coverage ``(n,)`` in ``[0, 1]`` of the truth by the smallest set holding ``mass``.

    The crossing cell counts fractionally and, with symmetry, the truth's mate cells are
    averaged by mass (module docstring); the mean over a calibrated set of particles is
    ``mass``.
    """
    if not 0.0 < float(mass) <= 1.0:
        raise ValueError(f"mass must lie in (0, 1], got {mass}")
    T = as_pose_stack(true, "true")
    probs = _check_probabilities(probabilities, len(T), level)
    weights = _inclusion_weights(probs, float(mass))
    cells = true_cells(T, level, symmetry_ops)  # (n, K)
    rows = np.arange(len(T))[:, None]
    distinct = np.ones(cells.shape, dtype=bool)  # count a cell once when two mates share it
    for k in range(1, cells.shape[1]):
        distinct[:, k] = np.all(cells[:, :k] != cells[:, k : k + 1], axis=1)
    p_true = probs[rows, cells] * distinct
    w_true = weights[rows, cells]
    total = p_true.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        weighted = (p_true * w_true).sum(axis=1) / total
    return np.where(total > 0, weighted, w_true.max(axis=1))


@dataclass(frozen=True)
class CalibrationSummary:
    """Calibration of one set of distributions against its true poses (module docstring).

    Attributes:
        ece: expected calibration error of the top-cell confidence.
        mean_confidence: mean top-cell confidence.
        hit_rate: fraction of particles whose top cell holds the truth.
        coverage50, coverage90: mean coverage of the 50 % and 90 % credible sets.
        log_likelihood: mean log-likelihood of the true pose (nats; uniform −2.29).
        n: number of particles.
        diagram: the reliability diagram.
    """

    ece: float
    mean_confidence: float
    hit_rate: float
    coverage50: float
    coverage90: float
    log_likelihood: float
    n: int
    diagram: ReliabilityDiagram

    def to_dict(self) -> dict[str, float | int]:
        """The scalar fields (no diagram), for JSON records."""
        record = asdict(self)
        record.pop("diagram")
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}


def calibration_summary(
    probabilities: np.ndarray,
    true: np.ndarray,
    level: int,
    symmetry_ops: np.ndarray | None = None,
    n_bins: int = 10,
) -> CalibrationSummary:
    """Every measure of the module docstring for ``probabilities`` ``(n, G)`` and ``true``
    ``(n, 3, 3)`` on the level-``level`` grid."""
    confidence, hit = top_cell_confidence(probabilities, true, level, symmetry_ops)
    diagram = reliability_diagram(confidence, hit, n_bins)
    ll = true_pose_log_likelihood(probabilities, true, level, symmetry_ops)
    return CalibrationSummary(
        ece=diagram.ece,
        mean_confidence=float(confidence.mean()),
        hit_rate=float(hit.mean()),
        coverage50=float(
            credible_set_coverage(probabilities, true, level, 0.5, symmetry_ops).mean()
        ),
        coverage90=float(
            credible_set_coverage(probabilities, true, level, 0.9, symmetry_ops).mean()
        ),
        log_likelihood=float(np.mean(ll)),
        n=len(confidence),
        diagram=diagram,
    )


def tempered(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """``p^(1/τ)`` renormalised per row: ``(n, G)`` float64. ``τ`` must be finite and > 0;
    zero probabilities stay zero."""
    tau = float(temperature)
    if not np.isfinite(tau) or tau <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2 or not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise ValueError("probabilities must be a finite, non-negative (n, G) array")
    with np.errstate(divide="ignore"):
        log_p = np.log(probs) / tau
    log_p -= log_p.max(axis=1, keepdims=True)
    out = np.exp(log_p)
    return out / out.sum(axis=1, keepdims=True)


def fit_temperature(
    probabilities: np.ndarray,
    true: np.ndarray,
    level: int,
    symmetry_ops: np.ndarray | None = None,
    bounds: tuple[float, float] = (0.2, 5.0),
) -> float:
    """The temperature ``τ`` in ``bounds`` that maximises the mean log-likelihood of the true
    poses (symmetry-aware, :func:`~cryosphere.poses.evaluation.metrics.true_pose_log_likelihood`)
    under :func:`tempered` ``(probabilities, τ)``: a one-parameter fit (bounded search on
    ``log τ``). Fit it on particles *other* than the ones it is then scored on.

    Args:
        probabilities: ``(n, G)`` distributions on the level-``level`` grid (rows sum to 1).
        true: ``(n, 3, 3)`` their true poses.
        level: grid level.
        symmetry_ops: ``(K, 3, 3)`` point group (None: C1).
        bounds: ``(τ_min, τ_max)``, both > 0.
    """
    from scipy.optimize import minimize_scalar

    T = as_pose_stack(true, "true")
    probs = _check_probabilities(probabilities, len(T), level)
    lo, hi = (float(b) for b in bounds)
    if not 0 < lo < hi:
        raise ValueError(f"bounds must satisfy 0 < min < max, got {bounds!r}")

    def loss(log_tau: float) -> float:
        ll = true_pose_log_likelihood(tempered(probs, np.exp(log_tau)), T, level, symmetry_ops)
        return -float(np.mean(ll))

    result = minimize_scalar(
        loss, bounds=(np.log(lo), np.log(hi)), method="bounded", options={"xatol": 1e-3}
    )
    return float(np.exp(result.x))
