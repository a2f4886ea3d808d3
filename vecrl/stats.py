"""The statistics of `vecrl report`, in plain numpy: percentile-bootstrap confidence intervals across seeds,
the aggregate scores of Agarwal et al. (2021, "rliable") with their stratified bootstrap, and the MAD-TD
paper's average regret (section 5.2).

rliable itself is not used: its release (1.2.0) needs arch < 8, and arch 7.2 fails to import with pandas 3,
which a fresh install resolves to.
"""

from __future__ import annotations

import numpy as np

CONFIDENCE = 0.95


def _interval(samples: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    tail = 100 * (1 - CONFIDENCE) / 2
    return np.percentile(samples, tail, axis=axis), np.percentile(samples, 100 - tail, axis=axis)


def mean_ci(values: np.ndarray, reps: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over seeds (axis 0) with a 95% percentile-bootstrap interval, per column; NaNs (a seed with no value
    at that point) are left out. `values`: [seeds] or [seeds, points]. Columns without values give NaN."""
    values = np.asarray(values, float)
    flat = values.reshape(values.shape[0], -1)
    present = ~np.isnan(flat)
    counts = present.sum(0)
    sums = np.where(present, flat, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums.sum(0) / counts
        idx = np.random.default_rng(seed).integers(0, flat.shape[0], (reps, flat.shape[0]))
        boot = sums[idx].sum(1) / present[idx].sum(1)  # [reps, points]; NaN where a draw has no value
    lo, hi = np.full(flat.shape[1], np.nan), np.full(flat.shape[1], np.nan)
    for j in np.flatnonzero(counts):
        lo[j], hi[j] = _interval(boot[:, j][~np.isnan(boot[:, j])])
    shape = values.shape[1:]
    return mean.reshape(shape), lo.reshape(shape), hi.reshape(shape)


def trimmed_mean(x: np.ndarray, cut: float = 0.25, axis: int = -1) -> np.ndarray:
    """Mean after removing int(cut * n) values from each end (scipy.stats.trim_mean's convention); with
    cut = 0.25 this is the interquartile mean."""
    x = np.sort(np.asarray(x, float), axis=axis)
    n = x.shape[axis]
    k = int(cut * n)
    return np.take(x, np.arange(k, n - k), axis=axis).mean(axis=axis)


def _aggregates(per_task: list[np.ndarray]) -> dict[str, np.ndarray]:
    """rliable's four aggregates of normalised scores, vectorised over a leading axis of bootstrap replicates
    (per_task[j]: [reps, n_j], task j's per-seed scores): median and mean of the per-task means, interquartile
    mean of all scores pooled, and optimality gap (mean shortfall below 1, each task weighted equally)."""
    task_means = np.stack([s.mean(1) for s in per_task], axis=1)  # [reps, tasks]
    pooled = np.concatenate(per_task, axis=1)
    gaps = np.stack([np.maximum(1.0 - s, 0.0).mean(1) for s in per_task], axis=1)
    return {"median": np.median(task_means, axis=1), "iqm": trimmed_mean(pooled, 0.25, axis=1),
            "mean": task_means.mean(1), "optimality_gap": gaps.mean(1)}


def aggregate_intervals(per_task: list[np.ndarray], reps: int = 2000,
                        seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """Each aggregate with its 95% stratified-bootstrap interval: every replicate redraws, with replacement,
    the seeds of each task separately (Agarwal et al. 2021). Returns name -> (estimate, low, high)."""
    per_task = [np.asarray(s, float) for s in per_task]
    if not per_task or any(s.ndim != 1 or s.size == 0 for s in per_task):
        raise ValueError("aggregate_intervals needs at least one task, each with at least one score")
    point = _aggregates([s[None] for s in per_task])
    rng = np.random.default_rng(seed)
    boot = _aggregates([s[rng.integers(0, s.size, (reps, s.size))] for s in per_task])
    out = {}
    for name, estimate in point.items():
        lo, hi = _interval(boot[name])
        out[name] = (float(estimate[0]), float(lo), float(hi))
    return out


def average_regret(returns: np.ndarray, episodes: np.ndarray, best: float) -> float:
    """Mean over training episodes of (best - episode return). `returns` are logged per chunk as the mean return
    of the `episodes` episodes that ended in it, so each is weighted by its episode count."""
    returns, episodes = np.asarray(returns, float), np.asarray(episodes, float)
    if episodes.sum() <= 0:
        return float("nan")
    return float(best - np.sum(returns * episodes) / episodes.sum())
