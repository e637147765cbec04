"""Seed statistics of RL scores: a thin layer over rliable (Agarwal et al., "Deep RL at the Edge of the
Statistical Precipice", NeurIPS 2021; PyPI ``rliable``).

Layout. Scores are numpy arrays of shape ``(num_runs, num_tasks)``, one row per seed (rliable's layout),
usually in a dict ``{method: array}``. A 1-D array is read as one task.

Normalisation. DMC episode returns lie in [0, 1000]. Per-task figures (mean ± std, IQM) stay in return units,
like the paper's tables. Figures across tasks (IQM, mean, median, optimality gap, performance profiles) are
computed on ``(score - min_score) / (max_score - min_score)``, by default ``return / 1000``, so 1.0 is the
maximum return and the optimality gap is the shortfall from it. Pass ``max_score=1.0`` for scores that are
already in [0, 1], such as success rates. Probability of improvement is rank-based, so it needs no scaling.

Estimators. rliable's: IQM is ``scipy.stats.trim_mean(scores, 0.25, axis=None)``, taken over all runs and tasks
together. It cuts ``int(0.25 * n)`` values from each end, so with n not divisible by 4 it keeps a little more
than the middle half. Confidence intervals come from rliable's stratified bootstrap: runs are resampled with
replacement within each task; percentile intervals, 95% by default.

Reproducibility. rliable 1.2.0 draws its bootstrap indices from numpy's legacy global RNG (``np.random.choice``)
and ignores its ``random_state`` argument. Each function here therefore seeds that global RNG from ``seed`` (an
int, a ``numpy.random.Generator`` or None for fresh entropy) for the duration of the call, and restores the
previous state afterwards. Each key of a score dict is bootstrapped from the same seed, so its interval does not
depend on which other keys are in the dict. This is not thread-safe.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Union

import numpy as np

__all__ = [
    "DMC_MAX_RETURN", "AGGREGATE_METRICS", "Estimate", "TaskStats", "Profile", "Comparison",
    "normalize", "interval_estimates", "task_stats", "aggregate", "probability_of_improvement",
    "performance_profile", "compare_with_paper", "comparison_table",
    "plot_aggregates", "plot_performance_profiles", "plot_comparison",
]

DMC_MAX_RETURN = 1000.0
SeedLike = Union[int, np.random.Generator, None]
ArrayLike = Union[np.ndarray, Sequence[float], Sequence[Sequence[float]]]


# rliable 1.2.0 pins arch < 8, whose import fails under pandas 3: setup.py pins pandas < 3.
from rliable import library as rly  # noqa: E402
from rliable import metrics as rly_metrics  # noqa: E402

#: Aggregate metrics across tasks, by display name (rliable's estimators).
AGGREGATE_METRICS: dict[str, Callable[[np.ndarray], float]] = {
    "IQM": rly_metrics.aggregate_iqm,
    "Mean": rly_metrics.aggregate_mean,
    "Median": rly_metrics.aggregate_median,
    "Optimality gap": rly_metrics.aggregate_optimality_gap,
}


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap confidence interval ``[low, high]``."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"


@dataclass(frozen=True)
class TaskStats:
    """Per-task seed statistics, in the scores' own units."""

    task: str
    num_runs: int
    mean: float
    std: float
    iqm: Estimate


@dataclass(frozen=True)
class Profile:
    """Performance profiles: for each method, the fraction of runs scoring above each threshold in ``taus``
    (normalised scores), with bootstrap CIs of shape ``(2, len(taus))``."""

    taus: np.ndarray
    profiles: dict[str, np.ndarray]
    cis: dict[str, np.ndarray]


@dataclass(frozen=True)
class Comparison:
    """One row of ours-vs-paper: our seed statistics and the published mean ± std (None where not published)."""

    task: str
    setting: str | None
    num_runs: int
    mean: float
    std: float
    iqm: Estimate
    paper_mean: float | None
    paper_std: float | None

    @property
    def difference(self) -> float | None:
        """Our mean minus the paper's mean."""
        return None if self.paper_mean is None else self.mean - self.paper_mean


class _Published(Protocol):
    task: str
    method: str
    setting: str | None
    mean: float
    std: float | None


# ----------------------------------------------------------------------------------------------- helpers
def _matrix(scores: ArrayLike, name: str = "scores") -> np.ndarray:
    """``scores`` as a float array (num_runs, num_tasks); a 1-D array is one task."""
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name}: expected an array (num_runs, num_tasks), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: scores must be finite")
    return x


def _base_seed(seed: SeedLike) -> int | None:
    """An int for numpy's legacy seeding: a Generator gives one draw per call."""
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(2**32))
    return None if seed is None else int(seed)


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed numpy's global RNG (what rliable 1.2.0 samples from) and restore its state on exit."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def normalize(scores: ArrayLike, max_score: float = DMC_MAX_RETURN, min_score: float = 0.0) -> np.ndarray:
    """``(scores - min_score) / (max_score - min_score)``; DMC returns / 1000 by default."""
    if max_score <= min_score:
        raise ValueError("max_score must be greater than min_score")
    return (np.asarray(scores, dtype=np.float64) - min_score) / (max_score - min_score)


def interval_estimates(scores: Mapping[str, ArrayLike | Sequence[ArrayLike]], func: Callable[..., np.ndarray], *,
                       reps: int = 2000, seed: SeedLike = 0, confidence: float = 0.95,
                       task_bootstrap: bool = False) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Seeded ``rliable.library.get_interval_estimates``: ``(points {key: (k,)}, intervals {key: (2, k)})``.

    A value may be one score matrix, or a list of matrices (as for probability of improvement: each is then
    resampled independently). ``func`` maps the matrix (or matrices) to a 1-D array of k statistics.
    """
    base = _base_seed(seed)
    points: dict[str, np.ndarray] = {}
    intervals: dict[str, np.ndarray] = {}
    for key, value in scores.items():
        data = [_matrix(v, key) for v in value] if isinstance(value, (list, tuple)) and np.ndim(value[0]) == 2 \
            else _matrix(value, key)
        with _seeded(base):
            p, ci = rly.get_interval_estimates({key: data}, func, reps=reps, confidence_interval_size=confidence,
                                               task_bootstrap=task_bootstrap)
        points[key] = np.atleast_1d(np.asarray(p[key], dtype=np.float64))
        intervals[key] = np.asarray(ci[key], dtype=np.float64).reshape(2, -1)
    return points, intervals


# --------------------------------------------------------------------------------------------- per task
def task_stats(scores: Mapping[str, ArrayLike], tasks: Sequence[str] | None = None, *, reps: int = 2000,
               seed: SeedLike = 0, confidence: float = 0.95, ddof: int = 0) -> dict[str, dict[str, TaskStats]]:
    """Per task: mean ± std over seeds and the IQM with its stratified-bootstrap CI over seeds.

    ``scores`` maps any key (a method, a setting, ``"PIE-G/video_hard"``...) to an array (num_runs, num_tasks);
    the result maps the same keys to ``{task: TaskStats}``. ``tasks`` names the columns (default ``"0"``,
    ``"1"``, ...). ``std`` uses ``ddof`` (default 0, numpy's ``std``; pass 1 for the sample std).
    """
    mats = {k: _matrix(v, k) for k, v in scores.items()}
    out: dict[str, dict[str, TaskStats]] = {}
    for key, x in mats.items():
        names = [str(j) for j in range(x.shape[1])] if tasks is None else list(tasks)
        if len(names) != x.shape[1]:
            raise ValueError(f"{key}: {x.shape[1]} task columns but {len(names)} task names")

        def per_task_iqm(m: np.ndarray) -> np.ndarray:
            return np.array([rly_metrics.aggregate_iqm(m[:, [j]]) for j in range(m.shape[1])])

        points, cis = interval_estimates({key: x}, per_task_iqm, reps=reps, seed=seed, confidence=confidence)
        std = x.std(axis=0, ddof=ddof) if x.shape[0] > ddof else np.full(x.shape[1], np.nan)
        out[key] = {name: TaskStats(name, x.shape[0], float(x[:, j].mean()), float(std[j]),
                                    Estimate(float(points[key][j]), float(cis[key][0, j]), float(cis[key][1, j])))
                    for j, name in enumerate(names)}
    return out


# ---------------------------------------------------------------------------------------- across tasks
def aggregate(scores: Mapping[str, ArrayLike], *, metrics: Sequence[str] = tuple(AGGREGATE_METRICS),
              max_score: float = DMC_MAX_RETURN, min_score: float = 0.0, reps: int = 2000, seed: SeedLike = 0,
              confidence: float = 0.95, task_bootstrap: bool = False) -> dict[str, dict[str, Estimate]]:
    """Aggregate metrics across tasks (default IQM, mean, median, optimality gap) with stratified-bootstrap CIs,
    on normalised scores (``return / max_score`` by default): ``{method: {metric: Estimate}}``."""
    unknown = [m for m in metrics if m not in AGGREGATE_METRICS]
    if unknown:
        raise KeyError(f"unknown metrics {unknown}; known: {list(AGGREGATE_METRICS)}")
    fns = [AGGREGATE_METRICS[m] for m in metrics]
    normed = {k: normalize(_matrix(v, k), max_score, min_score) for k, v in scores.items()}
    points, cis = interval_estimates(normed, lambda x: np.array([f(x) for f in fns]), reps=reps, seed=seed,
                                     confidence=confidence, task_bootstrap=task_bootstrap)
    return {k: {m: Estimate(float(points[k][i]), float(cis[k][0, i]), float(cis[k][1, i]))
                for i, m in enumerate(metrics)} for k in normed}


def probability_of_improvement(scores: Mapping[str, ArrayLike], pairs: Sequence[tuple[str, str]] | None = None, *,
                               reps: int = 2000, seed: SeedLike = 0,
                               confidence: float = 0.95) -> dict[tuple[str, str], Estimate]:
    """P(X > Y) for each pair ``(X, Y)``: rliable's probability of improvement (the Mann-Whitney U statistic per
    task over num_runs_x * num_runs_y, ties counting one half, averaged over tasks), with a CI from resampling the
    runs of X and of Y independently. Default pairs: the first method against each of the others. X and Y
    must have the same tasks; their numbers of runs may differ."""
    keys = list(scores)
    pairs = [(keys[0], k) for k in keys[1:]] if pairs is None else list(pairs)
    out: dict[tuple[str, str], Estimate] = {}
    for x, y in pairs:
        sx, sy = _matrix(scores[x], x), _matrix(scores[y], y)
        if sx.shape[1] != sy.shape[1]:
            raise ValueError(f"{x} has {sx.shape[1]} tasks, {y} has {sy.shape[1]}")
        points, cis = interval_estimates({f"{x},{y}": [sx, sy]}, rly_metrics.probability_of_improvement,
                                         reps=reps, seed=seed, confidence=confidence)
        key = f"{x},{y}"
        out[(x, y)] = Estimate(float(points[key][0]), float(cis[key][0, 0]), float(cis[key][1, 0]))
    return out


def performance_profile(scores: Mapping[str, ArrayLike], taus: ArrayLike | None = None, *,
                        max_score: float = DMC_MAX_RETURN, min_score: float = 0.0, reps: int = 2000,
                        seed: SeedLike = 0, confidence: float = 0.95) -> Profile:
    """Score distributions (fraction of runs above each normalised threshold tau, default 0..1 in 101 steps)
    with stratified-bootstrap CIs: ``rliable.library.create_performance_profile``."""
    taus = np.linspace(0.0, 1.0, 101) if taus is None else np.asarray(taus, dtype=np.float64)
    base = _base_seed(seed)
    profiles: dict[str, np.ndarray] = {}
    cis: dict[str, np.ndarray] = {}
    for key, value in scores.items():
        normed = normalize(_matrix(value, key), max_score, min_score)
        with _seeded(base):
            p, ci = rly.create_performance_profile({key: normed}, taus, reps=reps,
                                                   confidence_interval_size=confidence)
        profiles[key], cis[key] = np.asarray(p[key]), np.asarray(ci[key])
    return Profile(taus, profiles, cis)


# ---------------------------------------------------------------------------------------- vs the paper
def compare_with_paper(ours: Mapping[str | None, ArrayLike], published: Iterable[_Published], tasks: Sequence[str], *,
                       method: str = "PIE-G", reps: int = 2000, seed: SeedLike = 0, confidence: float = 0.95,
                       ddof: int = 0) -> list[Comparison]:
    """Our per-task seed statistics next to the published figures of ``method``.

    ``ours`` maps a setting (e.g. ``"video_easy"``) to an array (num_runs, num_tasks) whose columns are ``tasks``;
    ``published`` is a sequence of records with ``task``, ``method``, ``setting``, ``mean``, ``std`` (such as
    ``lightning_pieg.paper.published("table1_dmcgb")``). One row per (setting, task) of ours; the paper columns
    are None where the table has no figure.
    """
    paper = {(r.setting, r.task): r for r in published if r.method == method}
    stats = task_stats({str(s): v for s, v in ours.items()}, tasks, reps=reps, seed=seed, confidence=confidence,
                       ddof=ddof)
    rows = []
    for setting in ours:
        for task, s in stats[str(setting)].items():
            ref = paper.get((setting, task))
            rows.append(Comparison(task, setting, s.num_runs, s.mean, s.std, s.iqm,
                                   None if ref is None else float(ref.mean),
                                   None if ref is None or ref.std is None else float(ref.std)))
    return rows


def comparison_table(rows: Sequence[Comparison]) -> str:
    """The comparison rows as a Markdown table."""
    def pm(mean: float | None, std: float | None) -> str:
        return "-" if mean is None else f"{mean:.0f}" + ("" if std is None else f" ± {std:.0f}")

    lines = ["| setting | task | seeds | ours mean ± std | ours IQM [95% CI] | paper mean ± std | ours − paper |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = "-" if r.difference is None else f"{r.difference:+.0f}"
        iqm = f"{r.iqm.value:.0f} [{r.iqm.low:.0f}, {r.iqm.high:.0f}]"
        lines.append(f"| {r.setting} | {r.task} | {r.num_runs} | {pm(r.mean, r.std)} | {iqm} | "
                     f"{pm(r.paper_mean, r.paper_std)} | {diff} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_aggregates(estimates: Mapping[str, Mapping[str, Estimate]], path: str | Path, *,
                    xlabel: str = "Normalised score (return / 1000)") -> Path:
    """Aggregate metrics with their CIs, one panel per metric (``rliable.plot_utils.plot_interval_estimates``)."""
    _pyplot()
    from rliable import plot_utils

    methods = list(estimates)
    names = list(estimates[methods[0]])
    points = {m: np.array([estimates[m][n].value for n in names]) for m in methods}
    cis = {m: np.array([[estimates[m][n].low for n in names], [estimates[m][n].high for n in names]])
           for m in methods}
    row_height = 0.45
    fig, _ = plot_utils.plot_interval_estimates(  # the label sits ~0.6 inch below the axes, whatever the height
        points, cis, metric_names=names, algorithms=methods, xlabel=xlabel, row_height=row_height,
        xlabel_y_coordinate=-0.6 / (row_height * len(methods)))
    return _save(fig, path)


def plot_performance_profiles(profile: Profile, path: str | Path, *,
                              xlabel: str = r"Normalised score $\tau$ (return / 1000)") -> Path:
    """Performance profiles with CI bands (``rliable.plot_utils.plot_performance_profiles``)."""
    plt = _pyplot()
    from rliable import plot_utils

    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_utils.plot_performance_profiles(profile.profiles, profile.taus, performance_profile_cis=profile.cis,
                                         ax=ax, xlabel=xlabel, legend=True)
    return _save(fig, path)


def plot_comparison(rows: Sequence[Comparison], path: str | Path, *, ylabel: str = "Episode return") -> Path:
    """Ours vs the paper per (setting, task): bars of mean with ± std whiskers for both, and our IQM as a black
    dot with its 95% bootstrap CI."""
    plt = _pyplot()
    x = np.arange(len(rows))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(rows) + 1.5), 4.0))
    ax.bar(x - width / 2, [r.mean for r in rows], width, yerr=[r.std for r in rows], capsize=3, label="ours (mean ± std)")
    paper_mean = [np.nan if r.paper_mean is None else r.paper_mean for r in rows]
    paper_std = [0.0 if r.paper_std is None else r.paper_std for r in rows]
    ax.bar(x + width / 2, paper_mean, width, yerr=paper_std, capsize=3, label="paper (mean ± std)")
    iqm = np.array([r.iqm.value for r in rows])
    err = np.array([iqm - [r.iqm.low for r in rows], [r.iqm.high for r in rows] - iqm])
    ax.errorbar(x - width / 4, iqm, yerr=err, fmt="o", color="k", ms=3, capsize=2, label="ours IQM, 95% CI")
    ax.set_xticks(x, [f"{r.task}\n{r.setting}" if r.setting else r.task for r in rows], rotation=45, ha="right",
                  fontsize="small")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small", loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    ax.grid(True, axis="y", alpha=0.25)
    return _save(fig, path)
