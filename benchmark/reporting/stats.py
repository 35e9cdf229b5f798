"""Confidence intervals for few-shot test accuracy: one run, a paired difference, several training seeds.

All functions take accuracies as fractions in [0, 1] and return fractions; the table code turns them into
percent with two decimals. No torch here: tables must be buildable on a laptop without it. Every interval
is two-sided at 95%. ``t(nu)`` below is the 97.5% quantile of Student's t with ``nu`` degrees of freedom
(``scipy.stats.t``, see :func:`t_quantile`).

One run (one learner, one training seed, ``n`` test episodes): :func:`mean_ci`
    ``mean ± 1.96 s / sqrt(n)``, ``s`` the standard deviation over episodes (``ddof=1``). This is the
    normal approximation that the few-shot papers (Vinyals et al. 2016, Finn et al. 2017, Snell et al.
    2017, ...) report as "95% confidence interval over 600 test episodes"; we keep it so that our numbers
    read like theirs. It covers only the sampling of *test episodes*: another training seed of the same
    learner is not inside it.

Two learners, one seed each, on identical episodes (same manifest hash): :func:`paired_difference`
    The per-episode difference ``d = a - b`` and ``mean(d) ± 1.96 s_d / sqrt(n)``. Pairing removes the
    episode difficulty that both learners share, so the interval is usually much narrower than the two
    separate intervals suggest. Like :func:`mean_ci` it covers episode sampling only, not training
    randomness of either learner.

Several training seeds: the model
    Seed ``s`` of a learner scores ``acc[s, e] = mu + a_s + b_e + eps_se`` on episode ``e``: ``a_s`` is the
    training randomness (variance ``va``), ``b_e`` the episode's difficulty for this learner (``vb``),
    ``eps_se`` the rest (``ve``: query sampling, seed x episode interaction). The estimate is the mean over
    seeds of the per-seed means (each seed weighs the same, whatever its episode count). When all ``S``
    seeds were scored on one manifest of ``n`` episodes they *share* the ``b_e``, so::

        Var(estimate) = va / S + vb / n + ve / (S n)

    The episode term does not shrink with more seeds, and the spread of the seed means alone (which does
    not contain the shared ``b_e``) misses it.

:func:`seeds_mean_ci`, all seeds on one manifest (the usual case: ``bench run --seed 0 --seed 1 ...``)
    A crossed ``S x n`` table. With row (seed) means ``r_s``, column (episode) means ``c_e`` and grand
    mean ``g``, the two-way ANOVA mean squares are::

        MS_seed = n * sum_s (r_s - g)^2 / (S - 1)                     E = n va + ve      df S - 1
        MS_ep   = S * sum_e (c_e - g)^2 / (n - 1)                     E = S vb + ve      df n - 1
        MS_res  = sum (acc - r_s - c_e + g)^2 / ((S - 1)(n - 1))      E = ve             df (S - 1)(n - 1)

    ``SE^2 = (MS_seed + MS_ep - MS_res) / (S n)`` is unbiased for the variance above, and the interval is
    ``mean ± t(nu) * SE``. The seed variance estimate ``(MS_seed - MS_res) / n`` is truncated at zero
    (the usual rule for variance components): when ``MS_seed <= MS_res`` the seeds differ no more than
    episode noise explains, and ``SE^2 = MS_ep / (S n)`` -- the variance of the per-episode means over
    seeds, divided by ``n`` -- with ``nu = n - 1``.

Degrees of freedom
    ``nu`` is Welch-Satterthwaite's, ``(sum_i c_i MS_i)^2 / sum_i (c_i MS_i)^2 / df_i`` for ``SE^2 =
    sum_i c_i MS_i``, with one change: the seed part ``(MS_seed - MS_res) / (S n)`` enters it at its
    one-sided ``SEED_DF_CONFIDENCE`` (90%) upper confidence bound, ``(S - 1) / chi2_{S-1}(0.10)`` times the
    estimate (treated as a scaled chi-square with ``S - 1`` df); ``SE^2`` itself keeps the unbiased
    estimate. Why: plain Satterthwaite plugs in the same estimates, so when the seed variance happens to
    be underestimated -- with 2 or 3 seeds, often -- ``nu`` comes out large as well and the interval is
    doubly too narrow: with 2 or 3 seeds and a seed spread a few times the episode noise, plain
    Satterthwaite covers clearly less than 95%. With the bound, ``nu`` stays near ``S - 1`` unless the
    seed spread is negligible, and near ``n - 1`` when it is. The level is pinned by the coverage tests in
    ``tests/test_stats.py``, which require 93% to 98.5% for 2 to 10 seeds and seed spreads from 0 to 4x
    the episode noise, for means and differences: a higher level widens the intervals of 2-3 seeds that
    agree, a lower one lets 2 seeds with a large spread undercover. With 2 seeds no interval built from
    the data can be exact for every seed spread: 2 seeds give one degree of freedom for their variance.

:func:`seeds_mean_ci`, seeds on different manifests (a different ``--episode-seed`` per seed)
    Episodes are nested in seeds, and the seed means are independent with variance ``va + (vb + ve) / n``.
    ``SE^2 = sample variance of the seed means / S`` with ``nu = S - 1``: the classic t interval over seeds,
    exact under normality and never truncated: the t interval is exact only if it is always used, and
    switching to the episode noise (with its many df) whenever the seed means happen to agree loses
    coverage when the seed spread is large. Mixed layouts (some manifests with several seeds, some with
    one) use the general estimator below, which is approximate.

    The general estimator (used in all cases): ``SE^2 = seed part + episode part``. The episode part is
    ``sum_k var_e(z_k) / n_k`` over manifests ``k``, ``z_k[e]`` the per-episode sum of the runs on ``k``
    weighted as in the estimate (``1/S`` each) and ``var_e`` the sample variance over its ``n_k`` episodes;
    seed effects are constant along ``z_k``, so it carries ``vb`` (with its sharing) and ``ve`` and no
    ``va``. The seed part is ``va / S``: from the two-way ANOVAs of the manifests holding several seeds
    (pooled by their ``S_k - 1``; truncated and bounded as above), or, when every seed has a manifest of
    its own, the nested estimate (seed-mean variance minus each seed's ``s^2 / n``), which merges with the
    episode part into exactly the classic interval. On one manifest this is the two-way ANOVA above.

:func:`seeds_difference` (learner minus reference, several seeds on either side)
    The difference of the two seed-averaged means, paired on episodes. On one shared manifest the episode
    part is built from per-episode differences, ``z[e] = mean over the learner's seeds of acc[., e] - mean
    over the reference's seeds``: the episode difficulty both learners share cancels as in
    :func:`paired_difference`, and ``var_e(z) / n`` also carries each side's ``ve / S``. Each side adds its
    own seed part ``(MS_seed - MS_res) / (S n)`` from its own two-way ANOVA (truncated at zero, bounded in
    the df as above); the two learners' seeds are separate trainings, so the parts add (if a seed number
    made the two learners' trainings alike, this is conservative). ``nu`` as above over all terms.

    * One seed on both sides: exactly :func:`paired_difference` (1.96, episode sampling only).
    * One seed on one side: that side has no seed variance to estimate and adds none, so the interval does
      not cover its training randomness; callers must say so.
    * Each manifest holds exactly one run of each learner (seeds on different manifests, paired by
      manifest): the per-manifest differences of run means are independent replicates, and the interval
      is the t interval over them, ``nu = manifests - 1``.
    * Other layouts: the general estimator above, with both arms in the per-episode contrast ``z_k``
      (signs ``+1/S_learner``, ``-1/S_reference``); if its seed parts drive ``SE^2`` below zero (possible
      only for nested seeds), the episode part alone is used.

Accuracy at the edge of the scale: :func:`accuracy_bounds` (table cells; not differences)
    The normal interval can reach past 100% (``99.97 ± 0.05``) or have zero width (every episode 100%:
    ``100.00 ± 0.00``, a claim of certainty from 600 episodes). Rules, in order:

    * Zero width (every accuracy behind the cell is the same, ``s = 0``): the Wilson score interval for
      the pooled proportion of correct queries, over ``N = accuracies x queries per episode`` trials
      (``N = accuracies`` when the query count is unknown: a wider, conservative interval). For 600
      perfect 75-query episodes that is ``[N / (N + 1.96^2), 1] = [99.99%, 100%]``. Queries are treated as
      independent trials: with no error observed there is no clustering to estimate.
    * The interval reaches below 0 or above 1: it is cut there. The true accuracy lies in [0, 1], so the
      cut interval contains it exactly when the uncut one does: coverage is unchanged.

    Both give an asymmetric interval, which tables print as ``[low, high]`` with a footnote. A
    difference's interval is never changed: two learners both perfect on every episode show
    ``+0.00 ± 0.00``, which is exact for those episodes.

Comparing with a published number: :func:`compare_to_published`
    Both 95% half-widths are treated as independent normal intervals: the difference of the means has the
    half-width ``sqrt(ci_ours^2 + ci_published^2)``; "within" means the difference lies inside it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Iterable, Sequence
from typing import NamedTuple

import numpy as np
from scipy import special
from scipy import stats as scipy_stats

#: Two-sided 95% quantile of the standard normal distribution.
Z95 = 1.96
#: Upper quantile of the t distribution used for 95% two-sided intervals.
T_QUANTILE = 0.975
#: One-sided confidence of the upper bound on a seed mean square that the degrees of freedom are computed
#: from (module docstring, "degrees of freedom"); the coverage tests in tests/test_stats.py pin it down.
SEED_DF_CONFIDENCE = 0.90
#: A half-width at or below this (a fraction) is zero spread: every accuracy behind it was the same. Far
#: below anything a table shows (two decimals of percent) and far above float rounding of a constant mean.
ZERO_WIDTH = 1e-12


class MeanCI(NamedTuple):
    """A mean with its 95% confidence half-width (``mean ± ci``), as fractions.

    ``std``: for one run, the standard deviation over episodes (``ddof=1``); for several seeds, the
    standard deviation over the per-seed means (``ddof=1``); NaN for a difference over several seeds.
    ``n``: the number of accuracies behind the mean (episodes, or seeds x episodes summed over seeds).
    """

    mean: float
    ci: float
    std: float
    n: int


class SeedRun(NamedTuple):
    """One training seed's per-episode accuracies, tagged with the test episodes they were scored on.

    ``manifest``: any hashable that identifies the test episodes (the manifest hash); runs with equal tags
    must have their accuracies in the same episode order.
    ``accuracy``: float array ``[n]``, one accuracy in [0, 1] per test episode.
    """

    manifest: Hashable
    accuracy: np.ndarray


class Bounds(NamedTuple):
    """The ends of a 95% interval for an accuracy, as fractions, and the rule that produced them.

    ``rule``: ``"normal"`` (``mean ± ci`` as computed), ``"clipped"`` (cut at 0 or 1) or ``"wilson"``
    (zero spread: Wilson score interval of the pooled query-level proportion).
    """

    lower: float
    upper: float
    rule: str


def _as_vector(acc: Sequence[float] | np.ndarray, what: str = "accuracy") -> np.ndarray:
    array = np.asarray(acc, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D array, got shape {array.shape}")
    return array


def mean_ci(acc: Sequence[float] | np.ndarray) -> MeanCI:
    """Mean over episodes and its 95% half-width ``1.96 * s / sqrt(n)`` (``s`` with ``ddof=1``).

    :param acc: ``[n]`` per-episode accuracies.
    :returns: ``MeanCI``; with ``n == 1`` the spread is unknown and ``ci``/``std`` are NaN.
    """
    array = _as_vector(acc)
    n = array.size
    std = float(array.std(ddof=1)) if n > 1 else float("nan")
    return MeanCI(float(array.mean()), Z95 * std / float(np.sqrt(n)), std, n)


def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> MeanCI:
    """Mean and 95% half-width of the per-episode difference ``a - b`` on identical episodes.

    :param a: ``[n]`` accuracies of one learner.
    :param b: ``[n]`` accuracies of the reference learner on the same episodes, in the same order.
    """
    a_vec, b_vec = _as_vector(a, "a"), _as_vector(b, "b")
    if a_vec.shape != b_vec.shape:
        raise ValueError(f"paired runs need the same episodes, got {a_vec.size} and {b_vec.size} accuracies")
    return mean_ci(a_vec - b_vec)


def _sample_var(x: np.ndarray) -> float:
    """Sample variance (``ddof=1``) of ``[m]`` values, ``m >= 2``; plain arithmetic, cheaper than ``np.var``."""
    deviation = x - x.sum() / x.size
    return float(deviation @ deviation) / (x.size - 1)


def _by_manifest(runs: Sequence[SeedRun]) -> dict[Hashable, np.ndarray]:
    """Manifest -> ``[runs on it, n]`` accuracies; raises if two runs on one manifest disagree on ``n``."""
    if not runs:
        raise ValueError("need at least one run")
    rows: dict[Hashable, list[np.ndarray]] = {}
    for run in runs:
        accuracy = _as_vector(run.accuracy)
        same = rows.setdefault(run.manifest, [])
        if same and same[0].size != accuracy.size:
            raise ValueError(f"runs on manifest {run.manifest!r} have {same[0].size} and {accuracy.size} episodes")
        same.append(accuracy)
    return {manifest: np.stack(accuracies) for manifest, accuracies in rows.items()}


class _Estimate(NamedTuple):
    """A point estimate, its estimated variance and the Welch-Satterthwaite degrees of freedom."""

    value: float
    variance: float
    df: float


#: One term of a variance estimate: ``(key, coef, MS, df)`` for ``coef * MS``, ``MS`` a mean square with ``df``.
_Piece = tuple[Hashable, float, float, int]


class _Terms:
    """``SE^2 = sum_i coef_i * MS_i``, each ``MS_i`` with its df; named, so that one added twice merges.

    Each term also keeps the value its mean square takes in the degrees of freedom (``ms_for_df``): the
    same, except for a seed mean square, which enters the df at its upper bound (module docstring).
    """

    def __init__(self, pieces: Iterable[_Piece] = ()) -> None:
        self.terms: dict[Hashable, list[float]] = {}
        for piece in pieces:
            self.add(*piece)

    def add(self, key: Hashable, coef: float, mean_square: float, df: float, ms_for_df: float | None = None) -> None:
        if key in self.terms:
            self.terms[key][0] += coef
        else:
            self.terms[key] = [coef, mean_square, mean_square if ms_for_df is None else ms_for_df, df]

    def variance(self) -> float:
        return sum(coef * ms for coef, ms, _, _ in self.terms.values())

    def satterthwaite_df(self) -> float:
        """``(sum_i c_i MS_i)^2 / sum_i (c_i MS_i)^2 / df_i`` over the df values; infinite if all are zero."""
        parts = [(coef * ms, df) for coef, _, ms, df in self.terms.values() if coef != 0.0]
        spread = sum(part * part / df for part, df in parts)
        return sum(part for part, _ in parts) ** 2 / spread if spread > 0 else math.inf


@functools.lru_cache(maxsize=None)
def _upper_bound_factor(df: int) -> float:
    """``df / chi2_df(1 - SEED_DF_CONFIDENCE)``: a chi-square variance estimate times this is its upper bound."""
    return df / float(scipy_stats.chi2.ppf(1.0 - SEED_DF_CONFIDENCE, df))


def _lone_run_coef(seeds: int, n: int) -> float:
    """Coefficient of a lone run's episode variance ``s^2`` in ``SE^2``: its weight ``1/seeds``, squared, ``/ n``.

    One expression for both the episode part and the nested seed part, so that the two cancel exactly.
    """
    return 1.0 / (seeds * seeds * n)


def _crossed_seed_part(
    arm: int, seeds: int, tables: dict[Hashable, np.ndarray], column_sums: dict[Hashable, np.ndarray]
) -> tuple[list[_Piece], float, float]:
    """``va / seeds`` for a learner with several seeds on some manifest: pooled two-way ANOVA.

    :param tables: manifest -> ``[seeds on it, n]`` accuracies of this learner's runs.
    :param column_sums: manifest -> ``[n]`` sums of those runs' accuracies per episode.
    :returns: the pieces (``+w MS_seed`` and ``-w MS_res`` per manifest that holds two or more of these
        seeds, weighted by its ``S_k - 1``), and their two sums ``sum w MS_seed`` and ``sum w MS_res``.
    """
    crossed = [(k, t) for k, t in tables.items() if t.shape[0] >= 2]
    pooled_df = sum(t.shape[0] - 1 for _, t in crossed)
    pieces: list[_Piece] = []
    seed_sum = residual_sum = 0.0
    for manifest, table in crossed:
        s, n = table.shape
        rows, cols = table.sum(axis=1), column_sums[manifest]
        correction = float(cols.sum()) ** 2 / table.size  # (sum of all)^2 / count: the grand mean's share
        # Sums of squares about the grand mean, from sums: total = seed + episode + residual.
        ss_seed = max(float(rows @ rows) / n - correction, 0.0)
        ss_episode = float(cols @ cols) / s - correction
        ss_residual = float(np.vdot(table, table)) - correction - ss_seed - ss_episode
        ms_seed, ms_res = ss_seed / (s - 1), max(ss_residual, 0.0) / ((s - 1) * (n - 1))
        weight = (s - 1) / (pooled_df * n * seeds)
        pieces.append((("seed", arm, manifest), weight, ms_seed, s - 1))
        pieces.append((("residual", arm, manifest), -weight, ms_res, (s - 1) * (n - 1)))
        seed_sum += weight * ms_seed
        residual_sum += weight * ms_res
    return pieces, seed_sum, residual_sum


def _nested_seed_part(arm: int, seeds: int, tables: dict[Hashable, np.ndarray]) -> list[_Piece]:
    """``va / seeds`` for a learner whose seeds each have a manifest of their own: nested ANOVA.

    ``Var(seed mean) = va + s^2 / n`` with the seeds independent, so ``va / seeds`` is the seed means'
    sample variance over ``seeds`` minus each seed's episode noise ``s^2 / (seeds^2 n)``.
    """
    seed_means = np.array([t.sum() / t.size for t in tables.values()])
    pieces: list[_Piece] = [(("seed means", arm), 1.0 / seeds, _sample_var(seed_means), seeds - 1)]
    for manifest, table in tables.items():
        n = table.shape[1]
        pieces.append((("run", arm, manifest), -_lone_run_coef(seeds, n), _sample_var(table[0]), n - 1))
    return pieces


def _combine(arms: Sequence[tuple[float, dict[Hashable, np.ndarray]]]) -> _Estimate:
    """``sum_j sign_j * (mean over arm j's seeds of per-seed means)``, its variance and degrees of freedom.

    :param arms: ``(sign, tables)`` per learner, ``tables`` from :func:`_by_manifest`: ``[(1, t)]`` for a
        mean, ``[(1, t), (-1, t_reference)]`` for a difference. Runs on one manifest share its episodes.
    """
    seeds = [sum(t.shape[0] for t in tables.values()) for _, tables in arms]
    column_sums = [{manifest: table.sum(axis=0) for manifest, table in tables.items()} for _, tables in arms]
    # manifest -> (n, per-episode contrast weighted as in the estimate, runs on it, the arm of the last one)
    manifests: dict[Hashable, list] = {}
    value = 0.0
    for arm, (sign, tables) in enumerate(arms):
        for manifest, table in tables.items():
            weighted = column_sums[arm][manifest] * (sign / seeds[arm])
            value += float(weighted.sum()) / table.shape[1]
            entry = manifests.get(manifest)
            if entry is None:
                manifests[manifest] = [table.shape[1], weighted, table.shape[0], arm]
            elif entry[0] != table.shape[1]:
                raise ValueError(f"runs on manifest {manifest!r} have {entry[0]} and {table.shape[1]} episodes")
            else:
                entry[1] = entry[1] + weighted
                entry[2] += table.shape[0]
                entry[3] = arm
    if min(entry[0] for entry in manifests.values()) < 2:
        return _Estimate(value, math.nan, math.nan)

    episode_part: list[_Piece] = []
    for manifest, (n, contrast, runs, arm) in manifests.items():
        if runs == 1:
            # A lone run: named as a run, so that the nested seed part's -s^2 term merges with it.
            accuracy = arms[arm][1][manifest][0]
            episode_part.append((("run", arm, manifest), _lone_run_coef(seeds[arm], n), _sample_var(accuracy), n - 1))
        else:
            # Seed effects are constant along the contrast: its variance is the episode part alone.
            episode_part.append((("episodes", manifest), 1.0 / n, _sample_var(contrast), n - 1))

    terms = _Terms(episode_part)
    for arm, (_, tables) in enumerate(arms):
        if seeds[arm] < 2:
            continue  # no seed variance to estimate: the caller says what the interval then misses
        if all(t.shape[0] == 1 for t in tables.values()):
            for piece in _nested_seed_part(arm, seeds[arm], tables):
                terms.add(*piece)
            continue
        pieces, raw, floor = _crossed_seed_part(arm, seeds[arm], tables, column_sums[arm])
        if raw <= floor:
            continue  # the seed variance estimate is not positive: it counts as zero
        # For the df, seed mean squares scaled so that the seed part (raw - floor) becomes its upper bound.
        seed_df = sum(df for (kind, *_), _, _, df in pieces if kind == "seed")
        scale = (_upper_bound_factor(seed_df) * (raw - floor) + floor) / raw
        for key, coef, ms, df in pieces:
            terms.add(key, coef, ms, df, ms * scale if key[0] == "seed" else ms)
    if terms.variance() <= 0.0:
        # Only reachable for a difference whose nested seed parts are both estimated well below zero: fall
        # back to the episode part, which cannot be negative.
        terms = _Terms(episode_part)
    return _Estimate(value, max(terms.variance(), 0.0), terms.satterthwaite_df())


def t_quantile(df: float) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (fractional or infinite ``df``).

    This is ``scipy.stats.t.ppf(0.975, df)``: ``scipy.special.stdtrit`` is the function it evaluates, called
    here without the generic argument handling of ``scipy.stats``, which costs more than the rest of an
    interval and is paid tens of thousands of times by the coverage tests (a test pins the two together).
    """
    return float(special.stdtrit(df, T_QUANTILE))


def _t_half_width(estimate: _Estimate) -> float:
    """``t(0.975, df) * sqrt(variance)``; 0 for zero variance, NaN when it is unknown."""
    if math.isnan(estimate.variance):
        return math.nan
    if estimate.variance <= 0.0:
        return 0.0
    return t_quantile(estimate.df) * math.sqrt(estimate.variance)


def seeds_mean_ci(runs: Sequence[SeedRun]) -> MeanCI:
    """Mean over seeds of per-seed mean accuracy, with ``t(0.975, nu) * SE`` over seeds and episodes.

    ``SE^2`` estimates ``va / S + vb / n + ve / (S n)`` (two-way ANOVA on a shared manifest, nested ANOVA
    when every seed has its own manifest, see the module docstring); ``nu`` is Welch-Satterthwaite's, with
    the seed part at its upper bound (module docstring, "Degrees of freedom").
    With a single run this is exactly :func:`mean_ci` (1.96, episodes only), so one-seed tables match the
    papers.

    :param runs: one :class:`SeedRun` per training seed (``[n_s]`` accuracies each).
    """
    if len(runs) == 1:
        return mean_ci(runs[0].accuracy)
    tables = _by_manifest(runs)
    estimate = _combine([(1.0, tables)])
    seed_means = np.concatenate([t.sum(axis=1) / t.shape[1] for t in tables.values()])
    n = sum(t.size for t in tables.values())
    return MeanCI(estimate.value, _t_half_width(estimate), math.sqrt(_sample_var(seed_means)), n)


def seeds_difference(runs: Sequence[SeedRun], reference: Sequence[SeedRun]) -> MeanCI:
    """Difference of seed-averaged means, ``runs - reference``, paired on episodes.

    With one run on each side this is exactly :func:`paired_difference` (1.96, episode sampling only).
    Otherwise ``t(0.975, nu) * SE`` with ``SE^2`` = the per-episode-difference variance ``/ n`` plus each
    side's seed variance over its seed count (module docstring); a side with one seed adds no seed variance.
    Both sides must have been scored on the same set of manifests; callers check that and refuse to pair
    otherwise.

    :returns: ``MeanCI`` of the difference; ``std`` is NaN and ``n`` counts both sides' accuracies.
    """
    mine, theirs = {run.manifest for run in runs}, {run.manifest for run in reference}
    if mine != theirs:
        raise ValueError(f"cannot pair runs on different test episodes: {sorted(map(str, mine ^ theirs))}")
    if len(runs) == 1 and len(reference) == 1:
        return paired_difference(runs[0].accuracy, reference[0].accuracy)
    tables, reference_tables = _by_manifest(runs), _by_manifest(reference)
    n = sum(t.size for t in [*tables.values(), *reference_tables.values()])
    if len(tables) >= 2 and all(t.shape[0] == 1 for t in [*tables.values(), *reference_tables.values()]):
        # One run of each learner per manifest: the per-manifest differences are independent replicates.
        differences = np.array([tables[k][0].mean() - reference_tables[k][0].mean() for k in tables])
        k = differences.size
        estimate = _Estimate(float(differences.mean()), _sample_var(differences) / k, k - 1)
    else:
        estimate = _combine([(1.0, tables), (-1.0, reference_tables)])
    return MeanCI(estimate.value, _t_half_width(estimate), float("nan"), n)


def wilson_interval(proportion: float, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval ``(lower, upper)`` for a binomial proportion observed in ``trials`` trials."""
    if trials < 1:
        raise ValueError(f"need at least one trial, got {trials}")
    z2n = z * z / trials
    centre = (proportion + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(proportion * (1 - proportion) / trials + z2n / (4 * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_bounds(result: MeanCI, queries_per_episode: int | None = None) -> Bounds:
    """The ends of an accuracy's 95% interval, with the edge-of-scale rules of the module docstring.

    :param result: from :func:`mean_ci` or :func:`seeds_mean_ci` (an accuracy in [0, 1], not a difference).
    :param queries_per_episode: query images per episode (way x queries per class), for the Wilson rule's
        trial count; ``None`` counts one trial per episode (conservative).
    :returns: ``Bounds(mean - ci, mean + ci, "normal")`` unless a rule applies; NaN ends when ``ci`` is NaN.
    """
    if math.isnan(result.ci):
        return Bounds(math.nan, math.nan, "normal")
    if result.ci <= ZERO_WIDTH:
        trials = result.n * (queries_per_episode or 1)
        return Bounds(*wilson_interval(min(max(result.mean, 0.0), 1.0), trials), "wilson")
    lower, upper = result.mean - result.ci, result.mean + result.ci
    if lower < 0.0 or upper > 1.0:
        return Bounds(max(lower, 0.0), min(upper, 1.0), "clipped")
    return Bounds(lower, upper, "normal")


def compare_to_published(ours_mean: float, ours_ci: float, published_mean: float, published_ci: float) -> str:
    """``"within"``, ``"above"`` or ``"below"``: does our mean differ from a published one beyond chance?

    Both half-widths are 95% intervals treated as independent normal ones (the papers report
    ``1.96 s / sqrt(n)``; our run and theirs share no episodes or seeds), so the difference
    ``ours_mean - published_mean`` has the 95% half-width ``sqrt(ours_ci^2 + published_ci^2)``. "within":
    the difference lies inside it (no evidence, at 5%, that the two accuracies differ -- not a proof that
    they are equal); "above"/"below": ours is higher/lower beyond it. Any unit, the same for all four.
    Comparing our *mean* with the published interval, or checking whether the two intervals overlap, would
    be a different and miscalibrated test (too strict and too lenient respectively).

    :raises ValueError: when a half-width is NaN or negative.
    """
    for name, ci in (("ours_ci", ours_ci), ("published_ci", published_ci)):
        if not ci >= 0:
            raise ValueError(f"{name} must be a non-negative half-width, got {ci}")
    difference = ours_mean - published_mean
    half_width = math.hypot(ours_ci, published_ci)
    if difference > half_width:
        return "above"
    if difference < -half_width:
        return "below"
    return "within"
