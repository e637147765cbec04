"""The PIE-G paper's published results (Yuan et al., NeurIPS 2022, arXiv:2212.08860), shipped as package data.

``published("table1_dmcgb")`` returns the table's rows as :class:`PublishedScore` records. ``drqv2_curve(task)``
returns DrQ-v2's published learning curves. Files are read with :mod:`importlib.resources`, so only this
package's own folder is read. See ``README.md`` next to this file for where the numbers come from.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

__all__ = ["TABLES", "PublishedScore", "published", "published_score", "drqv2_tasks", "drqv2_curve"]

#: Table name -> CSV file in this package.
TABLES = {
    "table1_dmcgb": "table1_dmcgb.csv",
    "table2_drawerworld": "table2_drawerworld.csv",
    "table3_layers": "table3_layers.csv",
}


@dataclass(frozen=True)
class PublishedScore:
    """One published figure: mean (and std over seeds, where given) of ``method`` on ``task`` in ``setting``.

    ``table1_dmcgb``: episode return, settings ``video_easy`` / ``video_hard``.
    ``table2_drawerworld``: drawer-close success rate in [0, 1]; settings ``train``, ``wood``, ``metal``, ``blanket``;
    ``std`` is None (none given).
    ``table3_layers``: PIE-G with ResNet layer ``layer`` as the representation; ``method`` is ``"PIE-G"`` and
    ``setting`` is None (the paper does not name the evaluation setting).
    """

    table: str
    task: str
    method: str
    setting: str | None
    mean: float
    std: float | None
    layer: int | None = None


def _table_name(table: str) -> str:
    """``"table1"``, ``"dmcgb"`` or ``"table1_dmcgb.csv"`` -> ``"table1_dmcgb"``."""
    name = table.removesuffix(".csv")
    matches = [t for t in TABLES if name == t or name in t.split("_")]
    if len(matches) != 1:
        raise KeyError(f"unknown table {table!r}; known: {sorted(TABLES)}")
    return matches[0]


def _read_csv(*parts: str) -> list[dict[str, str]]:
    resource = resources.files(__name__).joinpath(*parts)
    with resource.open("r", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@lru_cache(maxsize=None)
def _records(table: str) -> tuple[PublishedScore, ...]:
    rows = _read_csv(TABLES[table])
    if table == "table1_dmcgb":
        return tuple(PublishedScore(table, r["task"], r["method"], r["setting"], float(r["mean"]), float(r["std"]))
                     for r in rows)
    if table == "table2_drawerworld":
        return tuple(PublishedScore(table, r["task"], r["method"], r["setting"], float(r["success_rate"]), None)
                     for r in rows)
    return tuple(PublishedScore(table, r["task"], "PIE-G", None, float(r["mean"]), float(r["std"]), int(r["layer"]))
                 for r in rows)


def published(table: str, *, task: str | None = None, method: str | None = None,
              setting: str | None = None) -> list[PublishedScore]:
    """Rows of a published table (``table1_dmcgb``, ``table2_drawerworld``, ``table3_layers``, or a short form
    such as ``"table1"`` / ``"dmcgb"``), optionally filtered by ``task``, ``method`` and ``setting``."""
    rows = _records(_table_name(table))
    return [r for r in rows if (task is None or r.task == task) and (method is None or r.method == method)
            and (setting is None or r.setting == setting)]


def published_score(table: str, task: str, method: str, setting: str | None) -> PublishedScore:
    """The single published figure for ``(task, method, setting)``; KeyError if the table has none."""
    rows = published(table, task=task, method=method)
    rows = [r for r in rows if r.setting == setting]
    if len(rows) != 1:
        raise KeyError(f"{table}: {len(rows)} rows for task={task!r} method={method!r} setting={setting!r}")
    return rows[0]


def drqv2_tasks() -> list[str]:
    """Tasks with a DrQ-v2 published learning curve in ``drqv2_curves/``."""
    folder = resources.files(__name__).joinpath("drqv2_curves")
    return sorted(p.name.removeprefix("dmc_").removesuffix(".csv") for p in folder.iterdir()
                  if p.name.startswith("dmc_") and p.name.endswith(".csv"))


@lru_cache(maxsize=None)
def _drqv2_curve(task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if task not in drqv2_tasks():
        raise KeyError(f"no DrQ-v2 curve for {task!r}; known: {drqv2_tasks()}")
    by_seed: dict[int, list[tuple[int, float]]] = {}
    for r in _read_csv("drqv2_curves", f"dmc_{task}.csv"):
        by_seed.setdefault(int(r["seed"]), []).append((int(r["frame"]), float(r["episode_reward"])))
    seeds = sorted(by_seed)
    curves = [sorted(by_seed[s]) for s in seeds]
    frames = np.array([f for f, _ in curves[0]], dtype=np.int64)
    if any([f for f, _ in c] != frames.tolist() for c in curves):
        raise ValueError(f"DrQ-v2 curve {task!r}: seeds were evaluated at different frames")
    returns = np.array([[ret for _, ret in c] for c in curves], dtype=np.float64)
    return np.array(seeds), frames, returns


def drqv2_curve(task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DrQ-v2's published evaluation returns for ``task`` (clean DMC): ``(seeds, frames, returns)`` with
    ``returns[i, j]`` the return of seed ``seeds[i]`` at environment frame ``frames[j]``."""
    return tuple(a.copy() for a in _drqv2_curve(task))  # type: ignore[return-value]
