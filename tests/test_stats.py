"""benchmark.reporting.stats: the 95% CI of one run, paired differences, several seeds, and their coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from benchmark.reporting.stats import (
    SEED_DF_CONFIDENCE,
    Z95,
    MeanCI,
    SeedRun,
    accuracy_bounds,
    compare_to_published,
    mean_ci,
    paired_difference,
    seeds_difference,
    seeds_mean_ci,
    t_quantile,
    wilson_interval,
)


def accuracies(seed: int, n: int = 600, p: float = 0.9, queries: int = 75) -> np.ndarray:
    """Per-episode accuracies as a 5-way, 15-query evaluation would produce them."""
    return np.random.default_rng(seed).binomial(queries, p, size=n) / queries


def t95(df: float) -> float:
    return float(scipy_stats.t.ppf(0.975, df))


def anova(table: np.ndarray) -> tuple[float, float, float]:
    """Two-way ANOVA mean squares (seed, episode, residual) of a ``[S, n]`` table, from their definitions."""
    s, n = table.shape
    rows, cols, grand = table.mean(axis=1), table.mean(axis=0), table.mean()
    ms_seed = n * np.sum((rows - grand) ** 2) / (s - 1)
    ms_episode = s * np.sum((cols - grand) ** 2) / (n - 1)
    ms_residual = np.sum((table - rows[:, None] - cols[None, :] + grand) ** 2) / ((s - 1) * (n - 1))
    return ms_seed, ms_episode, ms_residual


def seed_bound(s: int) -> float:
    """The factor that turns a seed-variance estimate with ``s - 1`` df into its upper bound for the df."""
    return (s - 1) / scipy_stats.chi2.ppf(1 - SEED_DF_CONFIDENCE, s - 1)


# --------------------------------------------------------------------------------------------------------
# One run, one pair


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


# --------------------------------------------------------------------------------------------------------
# Several seeds: the formulas, checked against their definitions


def test_t_quantile_is_scipy_stats_t() -> None:
    for df in (0.6, 1, 1.5, 2, 3.3, 9, 599, math.inf):
        assert t_quantile(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-12)


def test_one_seed_is_exactly_the_analytic_interval() -> None:
    acc = accuracies(3)
    assert seeds_mean_ci([SeedRun("m", acc)]) == mean_ci(acc)
    assert seeds_difference([SeedRun("m", acc + 0.01)], [SeedRun("m", acc)]) == paired_difference(acc + 0.01, acc)


def test_seeds_on_one_manifest_use_the_two_way_anova() -> None:
    table = np.stack([accuracies(s, p=p) for s, p in [(10, 0.88), (11, 0.91), (12, 0.94)]])
    s, n = table.shape
    result = seeds_mean_ci([SeedRun("m", row) for row in table])
    ms_seed, ms_episode, ms_residual = anova(table)
    assert ms_seed > ms_residual  # seeds clearly differ: the seed part is in
    se2 = (ms_seed + ms_episode - ms_residual) / (s * n)
    # Satterthwaite's df, with the seed part (ms_seed - ms_residual) at its upper bound.
    seed_ub = ms_residual + seed_bound(s) * (ms_seed - ms_residual)
    numerator = (seed_ub - ms_residual + ms_episode) ** 2
    denominator = seed_ub**2 / (s - 1) + ms_episode**2 / (n - 1) + ms_residual**2 / ((s - 1) * (n - 1))
    nu = numerator / denominator
    assert s - 1 <= nu < s  # the seed spread dominates: close to the seeds' own df
    assert result.mean == pytest.approx(table.mean(axis=1).mean())
    assert result.std == pytest.approx(table.mean(axis=1).std(ddof=1))
    assert result.n == s * n
    assert result.ci == pytest.approx(t95(nu) * math.sqrt(se2), rel=1e-9)
    # The order of the seeds does not matter.
    assert seeds_mean_ci([SeedRun("m", row) for row in table[::-1]]).ci == pytest.approx(result.ci, rel=1e-12)


def test_seeds_that_agree_fall_back_to_the_episode_interval() -> None:
    # Identical seeds: no seed spread (MS_seed = MS_res = 0, truncated), the shared episodes remain. Their
    # variance must count once (s^2 / n), not as if two seeds had drawn independent episodes (s^2 / 2n).
    acc = accuracies(4)
    combined = seeds_mean_ci([SeedRun("m", acc), SeedRun("m", acc.copy())])
    assert combined.ci == pytest.approx(t95(599) * acc.std(ddof=1) / math.sqrt(600), rel=1e-9)
    assert combined.ci > mean_ci(acc).ci  # t(599) > 1.96


def test_seeds_on_their_own_manifests_use_the_t_interval_over_seed_means() -> None:
    runs = [SeedRun(f"m{s}", accuracies(20 + s, p=0.9 + 0.002 * s)) for s in range(3)]
    means = np.array([run.accuracy.mean() for run in runs])
    result = seeds_mean_ci(runs)
    assert result.mean == pytest.approx(means.mean())
    assert result.ci == pytest.approx(t95(2) * means.std(ddof=1) / math.sqrt(3), rel=1e-9)
    # Also when the seed means agree far better than episode noise predicts: nested seeds are never
    # truncated to the episode noise. Two means 1e-4 apart: sd 1e-4/sqrt(2), so t(1) * 1e-4 / 2.
    close = [SeedRun(f"m{s}", accuracies(30 + s) - accuracies(30 + s).mean() + 0.9 + 1e-4 * s) for s in range(2)]
    assert seeds_mean_ci(close).ci == pytest.approx(t95(1) * 1e-4 / 2, rel=1e-6)


def test_difference_on_one_manifest_adds_both_seed_parts_to_the_per_episode_differences() -> None:
    mine = np.stack([accuracies(40 + s, p=0.90 + 0.01 * s) for s in range(3)])
    theirs = np.stack([accuracies(50 + s, p=0.88 + 0.005 * s) for s in range(2)])
    n = mine.shape[1]
    result = seeds_difference([SeedRun("m", r) for r in mine], [SeedRun("m", r) for r in theirs])
    d = mine.mean(axis=0) - theirs.mean(axis=0)  # per-episode difference of the seed averages
    terms = [(np.var(d, ddof=1) / n, np.var(d, ddof=1) / n, n - 1)]  # (variance part, df part, df)
    for table in (mine, theirs):
        s = table.shape[0]
        ms_seed, _, ms_residual = anova(table)
        assert ms_seed > ms_residual
        part = (ms_seed - ms_residual) / (s * n)
        terms += [(ms_seed / (s * n), (ms_residual + seed_bound(s) * (ms_seed - ms_residual)) / (s * n), s - 1)]
        terms += [(-ms_residual / (s * n), -ms_residual / (s * n), (s - 1) * (n - 1))]
        assert part > 0
    se2 = sum(v for v, _, _ in terms)
    nu = sum(p for _, p, _ in terms) ** 2 / sum(p**2 / df for _, p, df in terms)
    assert result.mean == pytest.approx(mine.mean() - theirs.mean())
    assert result.ci == pytest.approx(t95(nu) * math.sqrt(se2), rel=1e-9)
    assert result.n == 5 * n and math.isnan(result.std)


def test_difference_against_one_reference_seed_adds_only_the_learners_seed_part() -> None:
    mine = np.stack([accuracies(60 + s, p=0.90 + 0.01 * s) for s in range(3)])
    reference = accuracies(70, p=0.88)
    n = mine.shape[1]
    result = seeds_difference([SeedRun("m", r) for r in mine], [SeedRun("m", reference)])
    ms_seed, _, ms_residual = anova(mine)
    d = mine.mean(axis=0) - reference
    se2 = np.var(d, ddof=1) / n + (ms_seed - ms_residual) / (3 * n)
    seed_ub = ms_residual + seed_bound(3) * (ms_seed - ms_residual)
    bounded = [np.var(d, ddof=1) / n, seed_ub / (3 * n), -ms_residual / (3 * n)]
    nu = sum(bounded) ** 2 / (bounded[0] ** 2 / (n - 1) + bounded[1] ** 2 / 2 + bounded[2] ** 2 / (2 * (n - 1)))
    assert result.ci == pytest.approx(t95(nu) * math.sqrt(se2), rel=1e-9)


def test_difference_paired_by_manifest_is_the_t_interval_over_manifests() -> None:
    mine = [SeedRun(f"m{k}", accuracies(80 + k, p=0.9 + 0.01 * k)) for k in range(3)]
    theirs = [SeedRun(f"m{k}", accuracies(90 + k, p=0.88)) for k in range(3)]
    d = np.array([a.accuracy.mean() - b.accuracy.mean() for a, b in zip(mine, theirs)])
    result = seeds_difference(mine, theirs)
    assert result.mean == pytest.approx(d.mean())
    assert result.ci == pytest.approx(t95(2) * d.std(ddof=1) / math.sqrt(3), rel=1e-9)


def test_seeds_difference_refuses_different_test_episodes() -> None:
    base = [SeedRun("m", accuracies(s)) for s in (20, 21)]
    with pytest.raises(ValueError, match="different test episodes"):
        seeds_difference([SeedRun("other", base[0].accuracy)], base)
    with pytest.raises(ValueError, match="episodes"):
        seeds_mean_ci([SeedRun("m", np.ones(10)), SeedRun("m", np.ones(9))])


# --------------------------------------------------------------------------------------------------------
# Coverage: the two-way random-effects model acc[s, e] = mu + a_s + b_e + eps_se, simulated and fed through
# the public functions. Per-episode accuracies are beta-distributed around mu + a_s + b_e with the variance
# of a 150-query binomial (10-way, 15 queries per class), so they lie in [0, 1] and are skewed like real
# ones; the mean over seeds and episodes of the model is exactly mu.

#: Fewer than the protocol's 600, for speed: coverage depends on the seed spread in units of the episode
#: noise (which the spreads below are), not on the number of episodes.
EPISODES = 300
QUERIES = 150
MU, MU_REFERENCE = 0.70, 0.66
#: Width of the centred Beta(2, 2) episode effects: difficulty shared by every run on a manifest, and the
#: reference learner's own extra difficulty (so the per-episode difference of the two learners varies).
DIFFICULTY_WIDTH, OWN_WIDTH = 0.3, 0.15
SEED_COUNTS = (2, 3, 5, 10)
#: Seed standard deviation in units of one seed's standard error over its episodes.
SPREADS = (0.0, 0.5, 1.0, 4.0)
#: The reference learner's seed spread in differences: fixed, so that the learner's spread runs from "the
#: reference's seeds dominate" (0) to "the learner's seeds dominate" (4x), the two one-sided cases.
REFERENCE_SPREAD = 1.0
#: Monte-Carlo standard error of a coverage near 95%: sqrt(0.95 * 0.05 / 2000), about 0.005.
SIMULATIONS = 2000
BAND = (0.93, 0.985)


def episode_se(episodes: int) -> float:
    """Standard deviation of one seed's mean over ``episodes``: episode difficulty plus query noise."""
    return math.sqrt(DIFFICULTY_WIDTH**2 / 20 + MU * (1 - MU) / QUERIES) / math.sqrt(episodes)


def centred_beta(rng: np.random.Generator, width: float, size: int) -> np.ndarray:
    """``width * (Beta(2, 2) - 1/2)``: mean zero, variance ``width^2 / 20``, bounded by ``width / 2``."""
    return width * (rng.beta(2.0, 2.0, size) - 0.5)


def episode_accuracy(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    """Beta accuracies with mean ``p`` and the variance ``p (1 - p) / QUERIES`` of a binomial; same shape."""
    return rng.beta((QUERIES - 1) * p, (QUERIES - 1) * (1 - p))


def coverage_report(hits: dict[str, dict[float, int]], simulations: int) -> tuple[dict[str, dict[float, float]], str]:
    rates = {what: {s: h / simulations for s, h in row.items()} for what, row in hits.items()}
    text = "; ".join(f"{what}: " + ", ".join(f"{k} -> {r:.3f}" for k, r in row.items()) for what, row in rates.items())
    return rates, text


def assert_in_band(rates: dict[str, dict[float, float]], text: str) -> None:
    print(f"coverage {text}")  # the README's coverage table: python -m pytest tests/test_stats.py -k cover -s
    outside = [(what, s, r) for what, row in rates.items() for s, r in row.items() if not BAND[0] <= r <= BAND[1]]
    assert not outside, f"coverage outside {BAND}: {outside} (all: {text})"


@pytest.mark.parametrize("spread", SPREADS)
def test_several_seeds_on_one_manifest_cover(spread: float) -> None:
    """Means and paired differences, 2 to 10 seeds on one shared manifest, at one seed spread."""
    rng = np.random.default_rng([20_240_610, SPREADS.index(spread)])
    se = episode_se(EPISODES)
    hits: dict[str, dict[int, int]] = {what: dict.fromkeys(SEED_COUNTS, 0) for what in ("mean", "difference")}
    most = max(SEED_COUNTS)
    for _ in range(SIMULATIONS):
        difficulty = centred_beta(rng, DIFFICULTY_WIDTH, EPISODES)
        own = centred_beta(rng, OWN_WIDTH, EPISODES)
        # [most, EPISODES] each; the first S rows are an S-seed experiment (the seed counts share draws).
        learner = episode_accuracy(rng, MU + rng.normal(0, spread * se, (most, 1)) + difficulty)
        reference_seeds = rng.normal(0, REFERENCE_SPREAD * se, (most, 1))
        reference = episode_accuracy(rng, MU_REFERENCE + reference_seeds + difficulty + own)
        for seeds in SEED_COUNTS:
            runs = [SeedRun("m", acc) for acc in learner[:seeds]]
            mean = seeds_mean_ci(runs)
            hits["mean"][seeds] += abs(mean.mean - MU) <= mean.ci
            diff = seeds_difference(runs, [SeedRun("m", acc) for acc in reference[:seeds]])
            hits["difference"][seeds] += abs(diff.mean - (MU - MU_REFERENCE)) <= diff.ci
    assert_in_band(*coverage_report(hits, SIMULATIONS))


@pytest.mark.parametrize("seeds", (2, 5))
def test_seeds_on_their_own_manifests_cover(seeds: int) -> None:
    """Every seed on its own manifest (episodes nested in seeds); differences paired by manifest."""
    rng = np.random.default_rng([20_240_611, seeds])
    episodes, simulations, spreads = 100, 1000, (0.0, 1.0, 4.0)
    se = episode_se(episodes)
    hits: dict[str, dict[float, int]] = {what: dict.fromkeys(spreads, 0) for what in ("mean", "difference")}
    for _ in range(simulations):
        difficulty = centred_beta(rng, DIFFICULTY_WIDTH, seeds * episodes).reshape(seeds, episodes)
        own = centred_beta(rng, OWN_WIDTH, seeds * episodes).reshape(seeds, episodes)
        learner_noise = rng.normal(0, 1, (seeds, 1))
        reference_seeds = rng.normal(0, REFERENCE_SPREAD * se, (seeds, 1))
        reference = episode_accuracy(rng, MU_REFERENCE + reference_seeds + difficulty + own)
        reference_runs = [SeedRun(k, acc) for k, acc in enumerate(reference)]
        for spread in spreads:
            learner = episode_accuracy(rng, MU + spread * se * learner_noise + difficulty)
            runs = [SeedRun(k, acc) for k, acc in enumerate(learner)]
            mean = seeds_mean_ci(runs)
            hits["mean"][spread] += abs(mean.mean - MU) <= mean.ci
            diff = seeds_difference(runs, reference_runs)
            hits["difference"][spread] += abs(diff.mean - (MU - MU_REFERENCE)) <= diff.ci
    assert_in_band(*coverage_report(hits, simulations))


def test_one_seed_intervals_cover_episode_sampling() -> None:
    """``mean_ci`` and ``paired_difference`` over the episodes of one seed: the normal approximation."""
    rng = np.random.default_rng(20_240_612)
    hits = {"mean": {1: 0}, "difference": {1: 0}}
    for _ in range(SIMULATIONS):
        difficulty = centred_beta(rng, DIFFICULTY_WIDTH, EPISODES)
        learner = episode_accuracy(rng, MU + difficulty)
        reference = episode_accuracy(rng, MU_REFERENCE + difficulty + centred_beta(rng, OWN_WIDTH, EPISODES))
        hits["mean"][1] += abs(mean_ci(learner).mean - MU) <= mean_ci(learner).ci
        diff = paired_difference(learner, reference)
        hits["difference"][1] += abs(diff.mean - (MU - MU_REFERENCE)) <= diff.ci
    assert_in_band(*coverage_report(hits, SIMULATIONS))


# --------------------------------------------------------------------------------------------------------
# The edge of the scale


def test_wilson_interval_known_values() -> None:
    # 0 of 10 and 10 of 10: the closed forms z^2 / (n + z^2) and n / (n + z^2).
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, 3.8416 / 13.8416))
    assert wilson_interval(1.0, 10) == pytest.approx((10 / 13.8416, 1.0))
    low, high = wilson_interval(0.9, 100)
    assert low == pytest.approx(0.8256, abs=1e-4) and high == pytest.approx(0.9448, abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(0.5, 0)


def test_perfect_episodes_get_a_wilson_bound_not_zero_width() -> None:
    perfect = mean_ci(np.ones(600))
    assert perfect.ci == 0.0
    bounds = accuracy_bounds(perfect, queries_per_episode=75)
    assert bounds.rule == "wilson"
    assert bounds.upper == 1.0
    assert bounds.lower == pytest.approx(45_000 / (45_000 + Z95**2))
    assert 100 * bounds.lower < 99.995  # shows as 99.99, not 100.00
    # Unknown query count: one trial per episode, a wider interval.
    assert accuracy_bounds(perfect).lower == pytest.approx(600 / (600 + Z95**2))
    # All wrong: the mirror image.
    assert accuracy_bounds(mean_ci(np.zeros(600)), 75) == pytest.approx((0.0, Z95**2 / (45_000 + Z95**2), "wilson"))
    # Several seeds that are all perfect: every query of every seed counts.
    seeds = seeds_mean_ci([SeedRun("m", np.ones(600)) for _ in range(3)])
    assert accuracy_bounds(seeds, 75).lower == pytest.approx(135_000 / (135_000 + Z95**2))
    # A constant accuracy below 1 (float rounding leaves a tiny s): also zero spread.
    assert accuracy_bounds(mean_ci(np.full(600, 0.8)), 75).rule == "wilson"


def test_intervals_past_the_edge_are_cut_there() -> None:
    near = np.ones(600)
    near[0] = 74 / 75
    result = mean_ci(near)
    assert result.mean + result.ci > 1.0
    bounds = accuracy_bounds(result, 75)
    assert bounds.rule == "clipped"
    assert bounds == pytest.approx((result.mean - result.ci, 1.0, "clipped"))
    low = accuracy_bounds(MeanCI(0.001, 0.002, 0.01, 600))
    assert low == pytest.approx((0.0, 0.003, "clipped"))


def test_ordinary_intervals_are_unchanged() -> None:
    result = mean_ci(accuracies(5))
    assert accuracy_bounds(result, 75) == pytest.approx((result.mean - result.ci, result.mean + result.ci, "normal"))
    unknown = accuracy_bounds(mean_ci([0.7]))
    assert math.isnan(unknown.lower) and math.isnan(unknown.upper)


# --------------------------------------------------------------------------------------------------------
# Comparing with a published number


def test_compare_to_published_tests_the_difference() -> None:
    # Published 98.7 ± 0.4, ours ± 0.3: the difference's half-width is sqrt(0.3^2 + 0.4^2) = 0.5.
    assert compare_to_published(98.2, 0.3, 98.7, 0.4) == "within"  # below their interval, not significantly
    assert compare_to_published(98.19, 0.3, 98.7, 0.4) == "below"
    assert compare_to_published(99.21, 0.3, 98.7, 0.4) == "above"
    assert compare_to_published(98.7, 0.0, 98.7, 0.0) == "within"
    assert compare_to_published(0.95, 0.01, 0.9, 0.01) == "above"  # any unit, the same for all four
    for bad in (float("nan"), -0.1):
        with pytest.raises(ValueError):
            compare_to_published(98.0, bad, 98.7, 0.4)
