"""benchmark.stats: the 95% CI of one run, paired differences, and combining training seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmark.stats import (
    Z95,
    SeedRun,
    mean_ci,
    paired_difference,
    seeds_difference,
    seeds_mean_ci,
)


def accuracies(seed: int, n: int = 600, p: float = 0.9, queries: int = 75) -> np.ndarray:
    """Per-episode accuracies as a 5-way, 15-query evaluation would produce them."""
    return np.random.default_rng(seed).binomial(queries, p, size=n) / queries


def test_mean_ci_matches_the_papers_formula() -> None:
    acc = accuracies(0)
    result = mean_ci(acc)
    s = np.sqrt(np.sum((acc - acc.mean()) ** 2) / (len(acc) - 1))  # ddof=1 by hand
    assert result.mean == pytest.approx(acc.mean(), abs=1e-15)
    assert result.std == pytest.approx(s, rel=1e-12)
    assert result.ci == pytest.approx(1.96 * s / math.sqrt(600), rel=1e-12)
    assert result.n == 600
    # A tuple, so `mean, ci, std, n = mean_ci(acc)` works.
    mean, ci, std, n = result
    assert (mean, n) == (result.mean, 600)


def test_mean_ci_small_and_degenerate_inputs() -> None:
    assert mean_ci([0.5, 1.0]).ci == pytest.approx(1.96 * np.std([0.5, 1.0], ddof=1) / math.sqrt(2))
    one = mean_ci([0.7])
    assert one.mean == 0.7 and math.isnan(one.ci) and one.n == 1
    with pytest.raises(ValueError):
        mean_ci([])


def test_paired_difference_of_a_constant_shift_has_zero_width() -> None:
    b = accuracies(1)
    result = paired_difference(b + 0.05, b)
    assert result.mean == pytest.approx(0.05, abs=1e-12)
    assert result.ci == pytest.approx(0.0, abs=1e-12)


def test_pairing_is_narrower_than_the_separate_intervals() -> None:
    # Shared episode difficulty plus small learner-specific noise: pairing should remove most of the spread.
    rng = np.random.default_rng(2)
    difficulty = rng.uniform(0.6, 1.0, 600)
    a = np.clip(difficulty + rng.normal(0.02, 0.01, 600), 0, 1)
    b = difficulty
    paired = paired_difference(a, b)
    d = a - b
    assert paired.ci == pytest.approx(Z95 * d.std(ddof=1) / math.sqrt(600))
    assert paired.ci < 0.5 * mean_ci(a).ci


def test_paired_difference_needs_equal_lengths() -> None:
    with pytest.raises(ValueError, match="same episodes"):
        paired_difference(np.ones(10), np.ones(9))


def test_one_seed_is_exactly_the_analytic_interval() -> None:
    acc = accuracies(3)
    assert seeds_mean_ci([SeedRun("m", acc)]) == mean_ci(acc)
    assert seeds_difference([SeedRun("m", acc + 0.01)], [SeedRun("m", acc)]) == paired_difference(acc + 0.01, acc)


def test_seeds_combine_as_mean_of_seed_means_with_a_deterministic_bootstrap() -> None:
    runs = [SeedRun("m", accuracies(s, p=p)) for s, p in [(10, 0.90), (11, 0.93), (12, 0.95)]]
    first = seeds_mean_ci(runs, resamples=2000)
    again = seeds_mean_ci(runs, resamples=2000)
    assert first == again  # fixed bootstrap seed: tables are reproducible
    seed_means = [r.accuracy.mean() for r in runs]
    assert first.mean == pytest.approx(np.mean(seed_means))
    assert first.std == pytest.approx(np.std(seed_means, ddof=1))
    assert first.n == 1800
    # Seed-to-seed spread (~2.5 points) dominates, so the interval is far wider than one seed's episode CI
    # and close to the normal interval of three seed means (the seed bootstrap's SE is sqrt((S-1)/S) of it).
    assert first.ci > 3 * mean_ci(runs[0].accuracy).ci
    seeds_only = Z95 * np.std(seed_means, ddof=0) / math.sqrt(3)
    assert first.ci == pytest.approx(seeds_only, rel=0.15)
    assert seeds_mean_ci(runs, resamples=2000, seed=1) != first


def test_identical_seeds_on_one_manifest_reproduce_the_episode_interval() -> None:
    # Two seeds that happen to agree episode by episode add no seed spread; the episode resample is shared
    # (same manifest), so the bootstrap SE must match s/sqrt(n) -- not s/sqrt(2n) as independent draws would.
    acc = accuracies(4)
    combined = seeds_mean_ci([SeedRun("m", acc), SeedRun("m", acc)], resamples=10_000)
    assert combined.ci == pytest.approx(mean_ci(acc).ci, rel=0.05)
    # On two different manifests the draws are independent: half the resamples pick one seed twice
    # (variance s^2/n), half pick both (s^2/2n), so the SE is sqrt(3/4) s/sqrt(n).
    independent = seeds_mean_ci([SeedRun("m1", acc), SeedRun("m2", acc)], resamples=10_000)
    assert independent.ci == pytest.approx(math.sqrt(0.75) * mean_ci(acc).ci, rel=0.05)


def test_seeds_difference_is_paired_on_episodes() -> None:
    base = [SeedRun("m", accuracies(s)) for s in (20, 21)]
    shifted = [SeedRun("m", r.accuracy + 0.03) for r in base]
    diff = seeds_difference(shifted, base, resamples=2000)
    assert diff.mean == pytest.approx(0.03)
    # Only the seed-to-seed spread remains (same seeds shifted), far below the episode spread of one run.
    assert diff.ci < mean_ci(base[0].accuracy).ci
    with pytest.raises(ValueError, match="different test episodes"):
        seeds_difference([SeedRun("other", base[0].accuracy)], base)


def test_bootstrap_is_fast() -> None:
    import time

    runs = [SeedRun("m", accuracies(s)) for s in range(5)]
    start = time.perf_counter()
    seeds_mean_ci(runs)
    assert time.perf_counter() - start < 3.0
