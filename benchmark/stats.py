"""Confidence intervals for few-shot test accuracy: one run, a paired difference, several training seeds.

All functions take accuracies as fractions in [0, 1] and return fractions; the table code turns them into
percent with two decimals. No torch here: tables must be buildable on a laptop without it.

One run (one learner, one training seed, ``n`` test episodes)
    :func:`mean_ci` -- the mean over episodes and the half-width ``1.96 * s / sqrt(n)`` with ``s`` the
    sample standard deviation (``ddof=1``). This is the normal approximation that the few-shot papers
    (Vinyals et al. 2016, Finn et al. 2017, Snell et al. 2017, ...) report as "95% confidence interval over
    600 test episodes"; we keep it so that our numbers read like theirs. It measures only the spread over
    *test episodes*, not over training seeds.

Two learners on identical episodes (same manifest hash)
    :func:`paired_difference` -- the per-episode difference ``a - b`` and :func:`mean_ci` of it. Pairing
    removes the episode-difficulty variance that both learners share, so the interval is usually much
    narrower than the two separate intervals suggest.

Several training seeds
    :func:`seeds_mean_ci` and :func:`seeds_difference` -- the point estimate is the mean over seeds of the
    per-seed means (each seed weighs the same, whatever its episode count). The interval is
    ``1.96 * bootstrap standard error`` (the same normal approximation as above, with a standard error
    that also covers the seed-to-seed spread) from a two-way bootstrap over seeds x episodes, in the
    spirit of rliable's stratified bootstrap (Agarwal et al. 2021): each resample draws the seeds with
    replacement and, for each test manifest, one resample of its episodes that every run on that manifest
    shares. Sharing is deliberate: all seeds (and, for a difference, both learners) were scored on the
    *same* episodes, so an easy episode is easy for all of them; drawing episodes independently per seed
    would pretend otherwise and understate the interval. The generator is an explicit
    ``numpy.random.Generator`` with a fixed seed, so a table is identical every time it is built.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple

import numpy as np

#: Two-sided 95% quantile of the standard normal distribution.
Z95 = 1.96
#: Bootstrap resamples used for several training seeds.
DEFAULT_RESAMPLES = 10_000
#: Fixed seed of the bootstrap generator: the same runs always give the same table.
DEFAULT_BOOTSTRAP_SEED = 0
#: Resamples drawn at once; bounds memory at about CHUNK * episodes * 8 bytes.
_CHUNK = 1_000


class MeanCI(NamedTuple):
    """A mean with its 95% confidence half-width (``mean ± ci``), as fractions.

    ``std``: for one run, the standard deviation over episodes (``ddof=1``); for several seeds, the
    standard deviation over the per-seed means (``ddof=1``, NaN with one seed).
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


def _check_manifests(runs: Sequence[SeedRun]) -> dict[Hashable, int]:
    """Episode count per manifest; raises if two runs on one manifest disagree on it."""
    sizes: dict[Hashable, int] = {}
    for run in runs:
        size = _as_vector(run.accuracy).size
        if sizes.setdefault(run.manifest, size) != size:
            raise ValueError(f"runs on manifest {run.manifest!r} have {sizes[run.manifest]} and {size} episodes")
    return sizes


def _bootstrap_seed_means(
    arms: Sequence[Sequence[SeedRun]], resamples: int, seed: int
) -> np.ndarray:
    """Bootstrap replicates of ``mean over seeds of per-seed means`` for each arm.

    :param arms: one or more lists of runs (an arm is one learner's seeds); arms may share manifests.
    :returns: ``[resamples, len(arms)]`` replicates.
    """
    rng = np.random.default_rng(seed)
    sizes = _check_manifests([run for arm in arms for run in arm])
    out = np.empty((resamples, len(arms)))
    for start in range(0, resamples, _CHUNK):
        chunk = min(_CHUNK, resamples - start)
        # One episode resample per manifest, shared by every run scored on it (see the module docstring).
        # Stored as counts [chunk, n]: each row says how often each episode was drawn.
        counts = {}
        for manifest, n in sizes.items():
            draws = rng.integers(0, n, size=(chunk, n)) + (np.arange(chunk) * n)[:, None]
            counts[manifest] = np.bincount(draws.ravel(), minlength=chunk * n).reshape(chunk, n)
        for column, arm in enumerate(arms):
            # [chunk, seeds]: each seed's mean on this resample of its episodes.
            per_seed = np.stack(
                [counts[run.manifest] @ np.asarray(run.accuracy, np.float64) / sizes[run.manifest] for run in arm],
                axis=1,
            )
            # Resample the seeds themselves with replacement, then average them.
            picks = rng.integers(0, len(arm), size=(chunk, len(arm)))
            out[start : start + chunk, column] = np.take_along_axis(per_seed, picks, axis=1).mean(axis=1)
    return out


def _seed_means(runs: Sequence[SeedRun]) -> np.ndarray:
    if not runs:
        raise ValueError("need at least one run")
    return np.array([_as_vector(run.accuracy).mean() for run in runs])


def seeds_mean_ci(
    runs: Sequence[SeedRun], resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_BOOTSTRAP_SEED
) -> MeanCI:
    """Mean over seeds of per-seed mean accuracy, with ``1.96 * bootstrap SE`` over seeds x episodes.

    With a single run this is exactly :func:`mean_ci` (no bootstrap), so one-seed tables match the papers.

    :param runs: one :class:`SeedRun` per training seed.
    :param resamples: bootstrap resamples (10k take well under a second for a few seeds of 600 episodes).
    :param seed: seed of the bootstrap's ``numpy.random.Generator``.
    """
    if len(runs) == 1:
        return mean_ci(runs[0].accuracy)
    means = _seed_means(runs)
    replicates = _bootstrap_seed_means([runs], resamples, seed)[:, 0]
    n = sum(_as_vector(run.accuracy).size for run in runs)
    return MeanCI(float(means.mean()), Z95 * float(replicates.std(ddof=1)), float(means.std(ddof=1)), n)


def seeds_difference(
    runs: Sequence[SeedRun],
    reference: Sequence[SeedRun],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_BOOTSTRAP_SEED,
) -> MeanCI:
    """Difference of seed-averaged means, ``runs - reference``, paired on episodes.

    With one run on each side on the same manifest this is exactly :func:`paired_difference`. Otherwise
    the two-way bootstrap draws seeds independently for each learner and one episode resample per manifest
    that both learners share, which is what makes it a *paired* comparison. Both sides must have been
    scored on the same set of manifests; callers check that and refuse to pair otherwise.

    :returns: ``MeanCI`` of the difference; ``std`` is NaN and ``n`` counts both sides' accuracies.
    """
    mine, theirs = {run.manifest for run in runs}, {run.manifest for run in reference}
    if mine != theirs:
        raise ValueError(f"cannot pair runs on different test episodes: {sorted(map(str, mine ^ theirs))}")
    if len(runs) == 1 and len(reference) == 1:
        return paired_difference(runs[0].accuracy, reference[0].accuracy)
    replicates = _bootstrap_seed_means([runs, reference], resamples, seed)
    diff = float(_seed_means(runs).mean() - _seed_means(reference).mean())
    n = sum(_as_vector(run.accuracy).size for run in [*runs, *reference])
    se = float((replicates[:, 0] - replicates[:, 1]).std(ddof=1))
    return MeanCI(diff, Z95 * se, float("nan"), n)


def compare_to_published(ours_mean: float, ours_ci: float, published_mean: float, published_ci: float) -> str:
    """"within", "above" or "below": whether our 95% interval is compatible with a published 95% interval.

    Both half-widths are treated as independent normal 95% intervals, so the difference of the means has the
    half-width sqrt(ours_ci² + published_ci²); "within" when |ours - published| is at most that.
    """
    allowed = float(np.hypot(ours_ci, published_ci))
    difference = ours_mean - published_mean
    if difference > allowed:
        return "above"
    if difference < -allowed:
        return "below"
    return "within"
