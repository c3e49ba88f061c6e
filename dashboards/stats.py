"""Confidence intervals for the numbers a report compares: one home for every bootstrap.

Pure numpy. Every bootstrap draws from ``numpy.random.default_rng(seed)`` with a fixed default
seed, so a report built twice from the same runs prints the same intervals.

Where the uncertainty comes from, and how the two sources are combined (``model_ci``):

- **Items.** An eval point scores a finite sample of test items; another sample of the same
  size would give another accuracy. ``mean_over_tasks_ci`` resamples items with replacement
  *within each task* (stratified: every task keeps its own item count), so the "average
  accuracy" (the mean over tasks of the per-task mean, lm-eval's and the paper's convention)
  gets a percentile interval. ``paired_diff_ci`` compares two models on the *same* items:
  each draw picks one set of item indices per task and scores both models on it, so the
  per-item correlation between them cancels and small, consistent differences show.
- **Seeds.** Training again with another seed (initialisation and data order) gives another
  model. With several seeds, ``seed_ci`` gives the Student-t interval of the mean across the
  per-seed values.
- **Combined.** With one seed, the item bootstrap is the only interval there is. With two or
  more seeds, the interval is the Student-t interval across the per-seed averages: every
  seed is scored on the same test items, so the across-seed spread measures the training
  noise, and the item noise (the same items for all seeds) is a shared offset that does not
  change which configuration is better on this benchmark. We do not add the two variances:
  with a fixed test set that would count the item noise into every comparison twice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

ITERS = 2000
SEED = 0
LEVEL = 0.95
_CHUNK = 2_000_000  # bootstrap indices drawn per block (iterations x items), bounds memory


class CI(NamedTuple):
    mean: float
    low: float
    high: float


class Diff(NamedTuple):
    mean: float  # mean of a minus mean of b
    low: float
    high: float
    significant: bool  # the interval excludes 0


def _nan_ci() -> CI:
    return CI(math.nan, math.nan, math.nan)


def _percentiles(draws: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(draws, [tail, 100.0 - tail], axis=0)
    return float(low), float(high)


def _boot_means(values: np.ndarray, iters: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap means of each row of ``values`` (models x items) with the *same* resampled
    item indices for every row: returns (iters, models)."""
    n = values.shape[1]
    out = np.empty((iters, values.shape[0]))
    block = max(1, _CHUNK // max(1, n))
    for start in range(0, iters, block):
        stop = min(iters, start + block)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = values[:, idx].mean(axis=2).T
    return out


def bootstrap_mean_ci(
    values: Sequence[float], iters: int = ITERS, seed: int = SEED, level: float = LEVEL
) -> CI:
    """Percentile bootstrap interval of the mean of ``values``; NaN for no values."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return _nan_ci()
    draws = _boot_means(arr[None, :], iters, np.random.default_rng(seed))[:, 0]
    return CI(float(arr.mean()), *_percentiles(draws, level))


def mean_over_tasks_ci(
    items_by_task: Mapping[str, Sequence[float]],
    iters: int = ITERS,
    seed: int = SEED,
    level: float = LEVEL,
) -> CI:
    """Interval of the average over tasks of the per-task mean item score: items are
    resampled within each task (stratified), tasks are kept. Tasks without items are
    skipped; NaN when none has any."""
    tasks = {t: np.asarray(v, dtype=float) for t, v in items_by_task.items() if len(v)}
    if not tasks:
        return _nan_ci()
    rng = np.random.default_rng(seed)
    draws = np.zeros(iters)
    for task in sorted(tasks):  # a fixed order: the same draws whatever the dict order
        draws += _boot_means(tasks[task][None, :], iters, rng)[:, 0]
    draws /= len(tasks)
    return CI(average_over_tasks(tasks), *_percentiles(draws, level))


def paired_diff_ci(
    a_by_task: Mapping[str, Sequence[float]],
    b_by_task: Mapping[str, Sequence[float]],
    iters: int = ITERS,
    seed: int = SEED,
    level: float = LEVEL,
) -> Diff:
    """Paired bootstrap of (average accuracy of a) - (average accuracy of b) on the same
    items: per task, one resample of item indices scores both models. Only tasks both have
    (with items) count; a task scored on different numbers of items is a ValueError (the
    items are not the same ones)."""
    tasks = sorted(t for t in a_by_task if t in b_by_task and len(a_by_task[t]))
    for t in tasks:
        if len(a_by_task[t]) != len(b_by_task[t]):
            raise ValueError(
                f"task {t!r}: {len(a_by_task[t])} vs {len(b_by_task[t])} items; "
                "a paired comparison needs the same items"
            )
    if not tasks:
        return Diff(math.nan, math.nan, math.nan, False)
    rng = np.random.default_rng(seed)
    draws = np.zeros(iters)
    mean = 0.0
    for t in tasks:
        pair = np.asarray([a_by_task[t], b_by_task[t]], dtype=float)
        boot = _boot_means(pair, iters, rng)
        draws += boot[:, 0] - boot[:, 1]
        mean += float(pair[0].mean() - pair[1].mean())
    draws /= len(tasks)
    low, high = _percentiles(draws, level)
    return Diff(mean / len(tasks), low, high, bool(low > 0 or high < 0))


def _bpb_rows(pairs: Sequence[Sequence[float]]) -> np.ndarray:
    """Rows (negated log-likelihood in nats, bytes) of per-document (loglikelihood, bytes)."""
    arr = np.asarray(pairs, dtype=float).reshape(-1, 2)
    return np.stack([-arr[:, 0], arr[:, 1]])


def bpb_ci(
    pairs: Sequence[Sequence[float]], iters: int = ITERS, seed: int = SEED, level: float = LEVEL
) -> CI:
    """Bits per byte over documents (lm-eval's weighted aggregate: total negated
    log-likelihood / total bytes / ln 2) and its percentile interval, resampling documents.
    ``pairs`` are lm-eval's per-document (loglikelihood, bytes)."""
    rows = _bpb_rows(pairs)
    if rows.shape[1] == 0:
        return _nan_ci()
    boot = _boot_means(rows, iters, np.random.default_rng(seed))
    draws = boot[:, 0] / boot[:, 1] / math.log(2)
    return CI(float(rows[0].sum() / rows[1].sum() / math.log(2)), *_percentiles(draws, level))


def paired_bpb_diff_ci(
    a_pairs: Sequence[Sequence[float]],
    b_pairs: Sequence[Sequence[float]],
    iters: int = ITERS,
    seed: int = SEED,
    level: float = LEVEL,
) -> Diff:
    """Paired bootstrap of (bits per byte of a) - (of b) on the same documents: each draw
    resamples one set of documents for both (negative: a is better)."""
    a, b = _bpb_rows(a_pairs), _bpb_rows(b_pairs)
    if a.shape != b.shape or not np.array_equal(a[1], b[1]):
        raise ValueError("a paired comparison needs the same documents (bytes differ)")
    if a.shape[1] == 0:
        return Diff(math.nan, math.nan, math.nan, False)
    boot = _boot_means(np.concatenate([a, b]), iters, np.random.default_rng(seed))
    draws = (boot[:, 0] - boot[:, 2]) / boot[:, 1] / math.log(2)
    mean = float((a[0].sum() - b[0].sum()) / a[1].sum() / math.log(2))
    low, high = _percentiles(draws, level)
    return Diff(mean, low, high, bool(low > 0 or high < 0))


def seed_ci(values: Sequence[float], level: float = LEVEL) -> CI:
    """Mean across seeds and its Student-t interval (n - 1 degrees of freedom); with one
    seed the width is unknown: NaN bounds (the item bootstrap is the interval then)."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return _nan_ci()
    mean = float(arr.mean())
    if arr.size == 1:
        return CI(mean, math.nan, math.nan)
    half = t_quantile(0.5 + level / 2.0, arr.size - 1) * float(arr.std(ddof=1))
    half /= math.sqrt(arr.size)
    return CI(mean, mean - half, mean + half)


def model_ci(
    items_by_seed: Sequence[Mapping[str, Sequence[float]]],
    iters: int = ITERS,
    seed: int = SEED,
    level: float = LEVEL,
) -> CI:
    """The documented combination (module docstring) for one configuration: one seed → the
    item bootstrap of its average accuracy; several → Student-t across the per-seed
    averages."""
    if len(items_by_seed) == 1:
        return mean_over_tasks_ci(items_by_seed[0], iters, seed, level)
    return seed_ci([average_over_tasks(items) for items in items_by_seed], level)


def average_over_tasks(items_by_task: Mapping[str, Sequence[float]]) -> float:
    """The average accuracy: mean over tasks (with items) of the per-task mean item score."""
    means = [float(np.mean(v)) for v in items_by_task.values() if len(v)]
    return float(np.mean(means)) if means else math.nan


def t_quantile(p: float, df: int) -> float:
    """Student-t quantile (numpy has none): bisection on the CDF, which is a regularized
    incomplete beta function."""
    if not 0.0 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile: p={p} must be in (0, 1) and df={df} >= 1")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2.0


def _t_cdf(t: float, df: int) -> float:
    """P(T <= t) for t >= 0."""
    x = df / (df + t * t)
    return 1.0 - 0.5 * _betainc(df / 2.0, 0.5, x)


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(log_front + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side only
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-14:
            break
    return front * f / a
