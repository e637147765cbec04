"""Tables and figures of a reproduced experiment, from its evaluated MLflow runs, beside the paper's figures.

Per task and setting: our mean ± std over seeds and the IQM with a stratified-bootstrap 95% CI, the paper's mean ±
std and the difference (``stats.compare_with_paper``). Across a group's tasks: IQM, mean, median and optimality gap
with CIs on normalised scores (return / the episode's length in environment steps, its largest return; success
rates as they are), and the probability that the reference method (PIE-G; layer 2; adaptive BatchNorm) improves on
each other one. All estimators are rliable's, through ``lightning_pieg.stats``. Markdown, CSV and PNG files are
written to the results folder and logged as artifacts of one summary MLflow run.
"""
from __future__ import annotations

import csv
import re
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lightning_pieg import experiments as ex
from lightning_pieg import paper, stats, tracking
from lightning_pieg.console import UserError, say
from lightning_pieg.reproduce import EPISODES_TAG, MISSING_TAG, mlflow_experiment, records

DIFFERENCES = (
    "MuJoCo 3 renders slightly differently from the MuJoCo 2.0 the paper used.",
    "Distractions (colours, videos) are drawn from seeded generators: the same seed gives the same episodes.",
)
PERCENT = 100.0  # success rates are tabulated in percent (the tables print whole numbers)


@dataclass(frozen=True)
class Result:
    """One evaluated run: its final evaluation per mode, and what it was trained with."""

    run_id: str
    method: str
    variant: ex.Variant
    task: str
    seed: int
    scores: dict[str, float]  # mode -> the experiment's score (final/<mode>/<score>)
    frames: int
    episodes: str
    missing: str


def _variant(exp: ex.Experiment, name: str) -> ex.Variant:
    for group in exp.groups:
        for variant in group.variants:
            if variant.name == name:
                return variant
    return ex.Variant(name, name)


def collect(exp: ex.Experiment, uri: str) -> list[Result]:
    """The experiment's runs whose final evaluation is logged (the newest such run per key)."""
    out = []
    for key, found in records(uri, exp.name).items():
        _, method, variant, task, seed = key
        evaluated = [r for r in found if r.info.status == "FINISHED" and r.data.tags.get("reproduce.evaluated")]
        if not evaluated or method not in ex.METHODS:
            continue
        record = evaluated[0]
        scores = {m.split("/")[1]: v for m, v in record.data.metrics.items()
                  if m.startswith("final/") and m.endswith(f"/{exp.score}")}
        out.append(Result(record.info.run_id, method, _variant(exp, variant), task, int(seed), scores,
                          int(float(record.data.params.get("num_train_frames", 0))),
                          record.data.tags.get(EPISODES_TAG, "?"), record.data.tags.get(MISSING_TAG, "")))
    return sorted(out, key=lambda r: (r.method, r.variant.name, r.task, r.seed))


def _label(method: str, variant: ex.Variant) -> str:
    base = ex.METHODS[method].label
    return f"{base} {variant.label}" if variant.label else base


def _max_score(exp: ex.Experiment, task: str) -> float:
    return 1.0 if exp.score == "success_rate" else float(ex.episode_frames(task))


def _setting_name(mode: str) -> str:
    return "blanket_generated (ours, not the paper's blanket)" if mode == "blanket_generated" else mode


@dataclass
class GroupData:
    """One group's scores: ``scores[label][mode][task] = {seed: score}``."""

    group: ex.Group
    labels: list[str]
    methods: dict[str, tuple[str, ex.Variant]]
    scores: dict[str, dict[str, dict[str, dict[int, float]]]]

    @property
    def tasks(self) -> list[str]:
        """The group's tasks with an evaluated run."""
        return [t for t in self.group.tasks if any(t in by_task for l in self.labels
                                                   for by_task in self.scores[l].values())]

    def reference(self) -> str:
        for label, (method, variant) in self.methods.items():
            if method == "pieg" and variant.name in ex.REFERENCE_VARIANTS:
                return label
        return self.labels[0]

    def matrix(self, label: str, mode: str, tasks: list[str], exp: ex.Experiment) -> tuple[np.ndarray, list[int]]:
        """(seeds x tasks normalised scores over the seeds every task has, those seeds)."""
        by_task = self.scores[label][mode]
        seeds = sorted(set.intersection(*(set(by_task.get(t, {})) for t in tasks))) if tasks else []
        return np.array([[by_task[t][s] / _max_score(exp, t) for t in tasks] for s in seeds]), seeds


def group_data(exp: ex.Experiment, results: list[Result]) -> list[GroupData]:
    out = []
    for group in exp.groups:
        methods = {_label(m, v): (m, v) for m in group.methods for v in group.variants}
        scores: dict = {label: defaultdict(lambda: defaultdict(dict)) for label in methods}
        for result in results:
            label = _label(result.method, result.variant)
            if label in methods and result.task in group.tasks:
                for mode, value in result.scores.items():
                    scores[label][mode][result.task][result.seed] = value
        labels = [label for label in methods if scores[label]]
        if labels:
            out.append(GroupData(group, labels, methods, scores))
    return out


def _published(exp: ex.Experiment, method: str, variant: ex.Variant) -> list:
    if exp.table is None:
        return []
    rows = paper.published(exp.table, method=ex.METHODS[method].label)
    if variant.layer is not None:
        return [r for r in rows if r.layer == variant.layer]
    return rows


def comparisons(exp: ex.Experiment, data: GroupData, label: str) -> list[stats.Comparison]:
    """Our per-task figures of ``label`` in every mode, beside the paper's (Table 3's rows are its video_easy);
    success rates in percent."""
    method, variant = data.methods[label]
    scale = PERCENT if exp.score == "success_rate" else 1.0
    published = [replace(r, mean=r.mean * scale, std=None if r.std is None else r.std * scale)
                 for r in _published(exp, method, variant)]
    rows = []
    for mode, by_task in data.scores[label].items():
        for task, by_seed in by_task.items():
            values = np.array([by_seed[s] for s in sorted(by_seed)]) * scale
            key = None if variant.layer is not None and mode == "video_easy" else mode  # Table 3 names no setting
            [row] = stats.compare_with_paper({key: values}, published if key != "blanket_generated" else [], [task],
                                             method=ex.METHODS[method].label)
            rows.append(replace(row, setting=_setting_name(mode)))
    order = {m: i for i, m in enumerate(data.group.modes + ("blanket_generated",))}
    return sorted(rows, key=lambda r: (order.get(r.setting.split(" ")[0], 99), data.group.tasks.index(r.task)))


# ---------------------------------------------------------------------------------------------- the report
def aggregate(exp: ex.Experiment, uri: str, folder: Path, reps: int = 2000) -> dict:
    """Write ``<folder>/summary.md``, ``per_task.csv``, ``aggregate.csv`` and the plots; log them as a summary run."""
    results = collect(exp, uri)
    if not results:
        raise UserError(f"{exp.name}: no evaluated run in MLflow experiment {mlflow_experiment(exp.name)} of {uri}; "
                        f"run python scripts/reproduce.py run {exp.name} first (same mlflow.tracking_uri).")
    folder.mkdir(parents=True, exist_ok=True)
    say(f"{exp.name}: {len(results)} evaluated runs; bootstrapping ({reps} resamples) and plotting into {folder}")
    groups = group_data(exp, results)
    missing = sorted({item for r in results for item in r.missing.split("; ") if item})
    lines = [f"# {exp.title}", "", _provenance(exp, results, uri), ""]
    if missing:
        lines += [f"**Not the paper's setup. Missing when these runs were trained: {'; '.join(missing)}.**", ""]
    lines += [f"- {note}" for note in exp.notes + DIFFERENCES] + [""]
    per_task, aggregates, figures, metrics = [], [], [], {}
    for index, data in enumerate(groups):
        suffix = f"_{index + 1}" if len(groups) > 1 else ""
        lines += [f"## Per task, {_ylabel(exp, tabulated=True)}: {', '.join(data.tasks)}", ""]
        for label in data.labels:
            rows = comparisons(exp, data, label)
            per_task += [(label, r) for r in rows]
            lines += [f"### {label}", "", stats.comparison_table(rows), ""]
            published = [r for r in rows if r.paper_mean is not None]
            if published:
                figures.append(stats.plot_comparison(published, folder / f"paper_{_slug(label)}{suffix}.png",
                                                     ylabel=f"{label}: {_ylabel(exp, tabulated=True)}"))
        group_lines, group_rows, group_metrics, group_figures = _across_tasks(exp, data, folder, suffix, reps)
        lines += group_lines
        aggregates += group_rows
        metrics.update(group_metrics)
        figures += group_figures
        figures += _curves(exp, data, results, uri, folder, suffix)
        figures += _ablation_plots(exp, data, folder, suffix)
    if missing:
        lines += ["", f"**Missing when these runs were trained: {'; '.join(missing)}.**"]
    lines += ["", "Figures: " + ", ".join(f"`{p.name}`" for p in figures)]
    markdown = folder / "summary.md"
    markdown.write_text("\n".join(lines) + "\n")
    tables = [markdown, _write_per_task(folder / "per_task.csv", exp, per_task, missing),
              _write_aggregates(folder / "aggregate.csv", exp, aggregates, missing)]
    run_id = tracking.log_figure_run(uri, f"{exp.name}-summary",
                                     {"experiment": exp.name, "runs": len(results), "missing": "; ".join(missing)},
                                     metrics, [*tables, *figures], experiment=mlflow_experiment(exp.name))
    store = tracking.client(uri)
    store.set_tag(run_id, "experiment", exp.name)
    store.set_tag(run_id, "reproduce", "summary")
    print(markdown.read_text(), flush=True)
    say(f"{exp.name}: wrote {', '.join(p.name for p in tables)} and {len(figures)} plots to {folder}; summary "
        f"MLflow run {run_id}")
    return {"run_id": run_id, "markdown": markdown, "tables": tables, "figures": figures}


def _provenance(exp: ex.Experiment, results: list[Result], uri: str) -> str:
    frames = sorted({r.frames for r in results})
    episodes = sorted({r.episodes for r in results})
    return (f"{len(results)} evaluated runs from MLflow experiment `{mlflow_experiment(exp.name)}` ({uri}), "
            f"{time.strftime('%Y-%m-%d %H:%M')}. Final checkpoints evaluated with {', '.join(episodes)} episodes per "
            f"mode, mean actions, environment seed = training seed + 42, per-observation BatchNorm statistics. "
            f"Training frames: {', '.join(f'{f:,}' for f in frames)}. "
            f"{_ylabel(exp, tabulated=True).capitalize()}; std over seeds (ddof 0); IQM "
            f"with a stratified-bootstrap 95% CI over seeds.")


def _ylabel(exp: ex.Experiment, tabulated: bool = False) -> str:
    if exp.score == "success_rate":
        return "success rate (%)" if tabulated else "success rate"
    return "episode return"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def _across_tasks(exp: ex.Experiment, data: GroupData, folder: Path, suffix: str, reps: int):
    """Aggregate metrics and probabilities of improvement per mode, with their plots."""
    tasks = data.tasks
    modes = [m for m in dict.fromkeys(m for l in data.labels for m in data.scores[l])]
    unit = "success rate" if exp.score == "success_rate" else "return / episode length, 1000 on DMC"
    lines = [f"## Across tasks ({', '.join(tasks)}): normalised score ({unit})", "",
             "| method | mode | seeds | IQM [95% CI] | mean [95% CI] | median [95% CI] | optimality gap [95% CI] |",
             "|---|---|---:|---|---|---|---|"]
    rows, metrics, figures, improvement = [], {}, [], []
    reference = data.reference()
    for mode in modes:
        matrices = {}
        for label in data.labels:
            if mode in data.scores[label]:
                matrix, seeds = data.matrix(label, mode, tasks, exp)
                if len(seeds):
                    matrices[label] = matrix
        if not matrices:
            continue
        estimates = stats.aggregate(matrices, max_score=1.0, reps=reps)
        for label, by_metric in estimates.items():
            lines.append(f"| {label} | {_setting_name(mode)} | {len(matrices[label])} | "
                         + " | ".join(_estimate(by_metric[m]) for m in stats.AGGREGATE_METRICS) + " |")
            for metric, estimate in by_metric.items():
                rows.append((label, mode, metric, estimate, len(matrices[label]), len(tasks)))
                metrics[f"{_slug(metric)}/{_slug(label)}/{mode}"] = estimate.value
        figures.append(stats.plot_aggregates(estimates, folder / f"aggregate_{mode}{suffix}.png",
                                             xlabel=f"{_setting_name(mode)}: normalised score ({unit})"))
        profile = stats.performance_profile(matrices, max_score=1.0, reps=reps)
        figures.append(stats.plot_performance_profiles(profile, folder / f"profile_{mode}{suffix}.png",
                                                       xlabel=f"{_setting_name(mode)}: normalised score " + r"$\tau$"))
        if reference in matrices and len(matrices) > 1:
            pairs = [(reference, other) for other in matrices if other != reference]
            for (x, y), estimate in stats.probability_of_improvement(matrices, pairs, reps=reps).items():
                improvement.append(f"| P({x} > {y}) | {_setting_name(mode)} | {_estimate(estimate, 2)} |")
                rows.append((f"{x} > {y}", mode, "Probability of improvement", estimate, len(matrices[x]), len(tasks)))
                metrics[f"p_improvement/{_slug(x)}_over_{_slug(y)}/{mode}"] = estimate.value
    if improvement:
        lines += ["", "| probability of improvement | mode | P [95% CI] |", "|---|---|---|", *improvement]
    return lines + [""], rows, metrics, figures


def _estimate(estimate: stats.Estimate, digits: int = 3) -> str:
    return f"{estimate.value:.{digits}f} [{estimate.low:.{digits}f}, {estimate.high:.{digits}f}]"


def _write_per_task(path: Path, exp: ex.Experiment, rows: list, missing: list[str]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["experiment", "method", "setting", "task", "seeds", "mean", "std", "iqm", "iqm_low",
                         "iqm_high", "paper_mean", "paper_std", "difference", "missing"])
        for label, r in rows:
            writer.writerow([exp.name, label, r.setting, r.task, r.num_runs, r.mean, r.std, r.iqm.value, r.iqm.low,
                             r.iqm.high, _blank(r.paper_mean), _blank(r.paper_std), _blank(r.difference),
                             "; ".join(missing)])
    return path


def _write_aggregates(path: Path, exp: ex.Experiment, rows: list, missing: list[str]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["experiment", "method", "mode", "metric", "value", "low", "high", "seeds", "tasks",
                         "missing"])
        for label, mode, metric, e, seeds, tasks in rows:
            writer.writerow([exp.name, label, mode, metric, e.value, e.low, e.high, seeds, tasks, "; ".join(missing)])
    return path


def _blank(value: float | None) -> str | float:
    return "" if value is None else value


# ------------------------------------------------------------------------------------------------------ plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def history(uri: str, run_id: str, key: str) -> dict[int, float]:
    """A metric's values by step; where a step was logged twice (the final evaluation after training's last
    periodic one, at the same frame) the first, training's, counts, so a curve has one protocol."""
    out: dict[int, float] = {}
    for metric in sorted(tracking.client(uri).get_metric_history(run_id, key), key=lambda m: m.timestamp):
        out.setdefault(int(metric.step), float(metric.value))
    return out


def _curves(exp: ex.Experiment, data: GroupData, results: list[Result], uri: str, folder: Path,
            suffix: str) -> list[Path]:
    """Learning curves per task (one panel per mode logged during training): mean over seeds, ± std shaded."""
    plt = _pyplot()
    store = tracking.client(uri)
    pattern = re.compile(rf"^eval/(.+)/{exp.score}$")
    figures = []
    for task in data.group.tasks:
        curves: dict[str, dict[str, list[dict[int, float]]]] = defaultdict(lambda: defaultdict(list))
        for result in results:
            label = _label(result.method, result.variant)
            if result.task != task or label not in data.labels:
                continue
            for key in store.get_run(result.run_id).data.metrics:
                match = pattern.match(key)
                if match:
                    curves[match.group(1)][label].append(history(uri, result.run_id, key))
        modes = [m for m in curves if any(len(h) > 1 for runs in curves[m].values() for h in runs)]
        if not modes:
            continue
        fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 3.5), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            for label, runs in curves[mode].items():
                steps = sorted(set.intersection(*(set(h) for h in runs)))
                values = np.array([[h[s] for s in steps] for h in runs])
                mean, std = values.mean(axis=0), values.std(axis=0)
                ax.plot(steps, mean, label=f"{label} ({len(runs)} seeds)")
                ax.fill_between(steps, mean - std, mean + std, alpha=0.25)
            ax.set_title(f"{task}, {mode}")
            ax.set_xlabel("environment frames")
            ax.set_ylabel(_ylabel(exp))
            ax.grid(True, alpha=0.25)
            ax.legend(fontsize="small")
        figures.append(_save(fig, folder / f"curves_{task}{suffix}.png"))
    return figures


def _ablation_plots(exp: ex.Experiment, data: GroupData, folder: Path, suffix: str) -> list[Path]:
    """Table 3's score against the layer (ours and the paper's), and the BatchNorm ablation's bars."""
    variants = {v.name for _, v in data.methods.values()}
    if any(v.startswith("layer") for v in variants):
        return [_plot_layers(exp, data, folder / f"layers{suffix}.png")]
    if any(v.startswith("bn_") for v in variants):
        return [_plot_bars(exp, data, folder / f"batchnorm{suffix}.png")]
    return []


def _plot_layers(exp: ex.Experiment, data: GroupData, path: Path) -> Path:
    plt = _pyplot()
    tasks = [t for t in data.group.tasks if any(t in data.scores[l].get("video_easy", {}) for l in data.labels)]
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(4 * max(len(tasks), 1), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        ours, theirs = [], []
        for label in data.labels:
            layer = data.methods[label][1].layer
            values = list(data.scores[label].get("video_easy", {}).get(task, {}).values())
            if values:
                ours.append((layer, np.mean(values), np.std(values)))
            ref = [r for r in paper.published(exp.table, task=task) if r.layer == layer] if exp.table else []
            if ref:
                theirs.append((layer, ref[0].mean, ref[0].std or 0.0))
        for points, name in ((ours, "ours"), (theirs, "paper")):
            if points:
                x, mean, std = map(np.array, zip(*sorted(points)))
                ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=f"{name} (mean ± std)")
        ax.set_title(f"{task}, video_easy")
        ax.set_xlabel("ResNet layer")
        ax.set_xticks([1, 2, 3, 4])
        ax.set_ylabel(_ylabel(exp))
        ax.grid(True, alpha=0.25)
        ax.legend(fontsize="small")
    return _save(fig, path)


def _plot_bars(exp: ex.Experiment, data: GroupData, path: Path) -> Path:
    plt = _pyplot()
    cells = [(mode, task) for mode in data.group.modes for task in data.group.tasks
             if any(task in data.scores[l].get(mode, {}) for l in data.labels)]
    width = 0.8 / max(len(data.labels), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(cells) + 1.5), 3.8))
    x = np.arange(len(cells))
    for i, label in enumerate(data.labels):
        values = [list(data.scores[label].get(m, {}).get(t, {}).values()) for m, t in cells]
        ax.bar(x + (i - (len(data.labels) - 1) / 2) * width, [np.mean(v) if v else np.nan for v in values], width,
               yerr=[np.std(v) if v else 0.0 for v in values], capsize=3, label=f"{label} (mean ± std)")
    ax.set_xticks(x, [f"{t}\n{m}" for m, t in cells], rotation=45, ha="right", fontsize="small")
    ax.set_ylabel(_ylabel(exp))
    ax.grid(True, axis="y", alpha=0.25)
    ax.legend(fontsize="small")
    return _save(fig, path)
