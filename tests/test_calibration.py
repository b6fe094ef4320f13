"""Calibration measures (cryosphere.poses.evaluation.calibration) on distributions whose answer is known."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from cryosphere.geometry import grids, point_groups
from cryosphere.poses.evaluation import calibration as cal

LEVEL = 1  # 576 cells


def _sampler(n: int, seed: int, symmetric_ops=None):
    """Distributions of every sharpness and true poses *drawn from them*: calibrated by
    construction. Returns ``(p (n, G), true poses (n, 3, 3))``."""
    rng = np.random.default_rng(seed)
    G = grids.healpix_so3_grid_size(LEVEL)
    sharpness = rng.uniform(0.0, 6.0, size=(n, 1))
    logits = sharpness * rng.normal(size=(n, G))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    if symmetric_ops is not None:
        orbits = cal.orbit_cells(LEVEL, symmetric_ops)
        p = p[:, orbits].mean(axis=-1)  # equal mass on every mate
    cells = np.array([rng.choice(G, p=row) for row in p])
    return p, grids.healpix_so3_grid(LEVEL)[cells]


def _sharpen(p, power):
    q = p**power
    return q / q.sum(1, keepdims=True)


def test_a_calibrated_sampler_scores_ece_near_zero_and_nominal_coverage():
    p, true = _sampler(3000, 0)
    summary = cal.calibration_summary(p, true, LEVEL)
    assert summary.n == 3000
    assert summary.ece < 0.03, summary.to_dict()
    assert summary.coverage50 == pytest.approx(0.5, abs=0.03)
    assert summary.coverage90 == pytest.approx(0.9, abs=0.02)
    # the confidences span the range, so the diagram is a real test of every bin
    assert np.count_nonzero(summary.diagram.counts) >= 8
    assert abs(summary.hit_rate - summary.mean_confidence) < 0.03


def test_overconfident_and_underconfident_distributions_are_caught():
    p, true = _sampler(3000, 1)
    over = cal.calibration_summary(_sharpen(p, 3.0), true, LEVEL)
    under = cal.calibration_summary(_sharpen(p, 0.5), true, LEVEL)
    calibrated = cal.calibration_summary(p, true, LEVEL)
    assert over.ece > 0.1 and over.mean_confidence > over.hit_rate + 0.1
    assert over.coverage90 < 0.8
    assert under.ece > 0.1 and under.mean_confidence < under.hit_rate - 0.1
    assert under.coverage90 > 0.97
    # the log-likelihood, a proper score, prefers the calibrated distribution to both
    assert calibrated.log_likelihood > over.log_likelihood
    assert calibrated.log_likelihood > under.log_likelihood


def test_off_grid_truth_within_its_cell_scores_as_its_cell():
    p, true = _sampler(2000, 2)
    rng = np.random.default_rng(3)
    axes = rng.normal(size=(len(true), 3))
    from cryosphere.geometry import rotations

    nudges = np.stack([rotations.rotation_about_axis(a, 2.0) for a in axes])
    nudged = nudges @ true  # 2°: well inside a 30° cell
    a = cal.calibration_summary(p, true, LEVEL)
    b = cal.calibration_summary(p, nudged, LEVEL)
    assert a.ece == pytest.approx(b.ece) and a.coverage90 == pytest.approx(b.coverage90)


def test_symmetric_distributions_are_folded_onto_orbits():
    ops = point_groups.point_group("C2")
    warnings.simplefilter("error")  # closed under the standard C2: no warning
    p, true = _sampler(3000, 4, symmetric_ops=ops)
    folded = cal.calibration_summary(p, true, LEVEL, ops)
    assert folded.ece < 0.03 and folded.coverage90 == pytest.approx(0.9, abs=0.02)
    # read as C1, half the mass sits on the other mate: confidence and hits both fall
    plain_conf, _ = cal.top_cell_confidence(p, true, LEVEL)
    folded_conf, folded_hit = cal.top_cell_confidence(p, true, LEVEL, ops)
    np.testing.assert_allclose(folded_conf, 2 * plain_conf, rtol=1e-6)
    # a truth on the other mate of the top cell is still a hit
    orbits = cal.orbit_cells(LEVEL, ops)
    top = p.argmax(1)
    mate = grids.healpix_so3_grid(LEVEL)[orbits[top, 1]]
    _, hit_mate = cal.top_cell_confidence(p, mate, LEVEL, ops)
    assert hit_mate.all()


def test_a_mate_peaked_distribution_is_a_hit_when_the_grid_is_not_closed_under_the_group():
    # C2 about an oblique axis (as 1HVR's): the cell nearest T g is mostly *not* the cell
    # nearest R_{cell(T)} g, so the hit must compare the top cell's orbit with the truth's mates
    from cryosphere.geometry import rotations

    rng = np.random.default_rng(8)
    frame = rotations.random_rotations(1, rng)[0]
    ops = point_groups.point_group("C2", frame)
    true = rotations.random_rotations(1000, rng)  # off-grid
    mates = cal.true_cells(true, LEVEL, ops)
    orbits = cal.orbit_cells(LEVEL, ops)
    closure = np.mean(np.any(orbits[mates[:, 0]] == mates[:, 1:2], axis=1))
    assert closure < 0.7  # the grid is far from closed under this group
    assert cal.orbit_closure(LEVEL, ops) < 0.95
    assert cal.orbit_closure(LEVEL, point_groups.point_group("C2")) == 1.0
    G = grids.healpix_so3_grid_size(LEVEL)
    for column in (0, 1):  # all mass on the cell nearest T, then on the cell nearest T g
        p = np.zeros((len(true), G))
        p[np.arange(len(true)), mates[:, column]] = 1.0
        with pytest.warns(UserWarning, match="not closed under this point group"):
            confidence, hit = cal.top_cell_confidence(p, true, LEVEL, ops)
        assert hit.all() and np.all(confidence == 1.0)
        with pytest.warns(UserWarning, match="in_symmetry_frame"):
            summary = cal.calibration_summary(p, true, LEVEL, ops)
        assert summary.ece == pytest.approx(0.0) and summary.coverage90 == pytest.approx(0.9)
    # a cell that is neither (the next cell along psi) stays a miss
    p = np.zeros((len(true), G))
    p[np.arange(len(true)), (mates[:, 0] + 1) % G] = 1.0
    with pytest.warns(UserWarning):
        _, hit = cal.top_cell_confidence(p, true, LEVEL, ops)
    assert hit.mean() < 0.1


def test_reliability_diagram_bins_and_ece_by_hand():
    confidence = np.array([0.05, 0.15, 0.15, 0.95, 1.0])
    hit = np.array([False, True, False, True, True])
    diagram = cal.reliability_diagram(confidence, hit, n_bins=10)
    assert diagram.counts.tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert np.isnan(diagram.confidence[2]) and diagram.hit_rate[1] == 0.5
    expected = (1 * 0.05 + 2 * abs(0.5 - 0.15) + 2 * abs(1.0 - 0.975)) / 5
    assert cal.expected_calibration_error(confidence, hit, 10) == pytest.approx(expected)


def test_ece_sampling_floor_matches_the_binomial_spread_and_shrinks_with_n():
    """All confidences at c: the ECE of calibrated hits is |hit rate − c|, whose mean is
    sqrt(2 c (1 − c) / (π n)); four times the particles halve it; certainty costs nothing."""
    for n in (200, 800):
        expected = np.sqrt(2 * 0.25 / (np.pi * n))
        floor = cal.ece_sampling_floor(np.full(n, 0.5), draws=2000)
        assert abs(floor - expected) < 0.08 * expected, (n, floor, expected)
    spread = np.linspace(0.05, 0.95, 200)  # spread over bins: each bin has fewer particles
    assert cal.ece_sampling_floor(spread) > 1.5 * cal.ece_sampling_floor(np.full(200, 0.5))
    assert cal.ece_sampling_floor(np.ones(50)) == 0.0
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        cal.ece_sampling_floor(np.array([1.2]))


def test_coverage_takes_the_crossing_cell_fractionally():
    G = grids.healpix_so3_grid_size(LEVEL)
    grid = grids.healpix_so3_grid(LEVEL)
    p = np.full((1, G), 0.04 / (G - 1))
    p[0, 7] = 0.96
    # the 90 % set is 0.9375 of cell 7; the 50 % set 0.52 of it
    assert cal.credible_set_coverage(p, grid[[7]], LEVEL, 0.9)[0] == pytest.approx(0.9 / 0.96)
    assert cal.credible_set_coverage(p, grid[[7]], LEVEL, 0.5)[0] == pytest.approx(0.5 / 0.96)
    assert cal.credible_set_coverage(p, grid[[8]], LEVEL, 0.9)[0] == 0.0


def test_bad_input_is_refused():
    G = grids.healpix_so3_grid_size(LEVEL)
    grid = grids.healpix_so3_grid(LEVEL)
    p = np.full((2, G), 1.0 / G)
    with pytest.raises(ValueError, match="shape"):
        cal.top_cell_confidence(p[:, :-1], grid[:2], LEVEL)
    bad = p.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cal.calibration_summary(bad, grid[:2], LEVEL)
    with pytest.raises(ValueError, match="sum to 1"):
        cal.credible_set_coverage(2 * p, grid[:2], LEVEL)
    with pytest.raises(ValueError, match="mass"):
        cal.credible_set_coverage(p, grid[:2], LEVEL, mass=1.5)
    with pytest.raises(ValueError, match="one entry per particle"):
        cal.reliability_diagram(np.ones(3) * 0.5, np.ones(2, bool))


def test_reliability_figure_draws_one_line_per_source():
    import matplotlib

    matplotlib.use("Agg")
    from cryosphere.figures.calibration import plot_reliability

    p, true = _sampler(500, 5)
    diagrams = {
        "calibrated": cal.calibration_summary(p, true, LEVEL).diagram,
        "overconfident": cal.calibration_summary(_sharpen(p, 3.0), true, LEVEL).diagram,
    }
    fig = plot_reliability(diagrams)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 3  # the diagonal and one per source
    assert "ECE" in lines[1].get_label() and len(fig.axes) == 2
    with pytest.raises(ValueError, match="empty"):
        plot_reliability({})


def test_a_fitted_temperature_undoes_sharpening_and_flattening_on_held_out_particles():
    fit_p, fit_true = _sampler(2000, 5)
    test_p, test_true = _sampler(2000, 6)
    for power, expected_tau in [(2.0, 2.0), (0.5, 0.5)]:
        tau = cal.fit_temperature(_sharpen(fit_p, power), fit_true, LEVEL)
        assert tau == pytest.approx(expected_tau, rel=0.1), (power, tau)
        miscalibrated = cal.calibration_summary(_sharpen(test_p, power), test_true, LEVEL)
        mended = cal.calibration_summary(
            cal.tempered(_sharpen(test_p, power), tau), test_true, LEVEL
        )
        assert mended.ece < 0.03 < miscalibrated.ece
        assert mended.log_likelihood > miscalibrated.log_likelihood
    # a calibrated distribution keeps (about) its temperature; tempering is exact on p^(1/τ)
    assert cal.fit_temperature(fit_p, fit_true, LEVEL) == pytest.approx(1.0, rel=0.1)
    np.testing.assert_allclose(cal.tempered(_sharpen(fit_p, 2.0), 2.0), fit_p, atol=1e-9)


def test_temperature_refuses_bad_input():
    p, true = _sampler(10, 7)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        cal.tempered(p, 0.0)
    with pytest.raises(ValueError, match="bounds"):
        cal.fit_temperature(p, true, LEVEL, bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match="NaN"):
        cal.fit_temperature(np.full_like(p, np.nan), true, LEVEL)
