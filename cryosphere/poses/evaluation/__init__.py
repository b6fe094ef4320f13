"""Measuring poses and distributions: errors, accuracy, log-likelihood and the baselines
(:mod:`.metrics`, importing nothing from training) and the equivariance test
(:mod:`.equivariance`)."""
