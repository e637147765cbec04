"""Seed statistics (lightning_pieg.stats, over rliable) and the paper's published numbers (lightning_pieg.paper).

Small hand-made score matrices (runs x tasks); the oracles are scipy.stats.trim_mean and explicit pair counts.
"""
from __future__ import annotations

import warnings
from importlib import resources

import numpy as np
import pytest
from scipy.stats import trim_mean

from lightning_pieg import paper, stats
from lightning_pieg.stats import rly, rly_metrics

REPS = 300  # bootstrap repetitions: plenty for these checks, and fast


# ---------------------------------------------------------------------------------------------- (a) IQM
@pytest.mark.parametrize("scores", [
    [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],            # n = 8, divisible by 4
    [1.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0, 10.0],  # n = 10, ties
    [5.0, 5.0, 5.0, 5.0, 5.0],                            # all tied
    [0.0, 100.0, 900.0],                                  # n = 3: int(0.75) = 0, so nothing is cut
    [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0],                  # n = 7, unsorted
])
def test_iqm_is_scipy_trimmed_mean_cutting_floor_n_over_4_each_end(scores):
    x = np.asarray(scores)
    n, cut = len(x), len(x) // 4
    expected = np.sort(x)[cut:n - cut].mean()  # what scipy's trim_mean(x, 0.25) does: drop int(0.25 n) per end
    assert trim_mean(x, 0.25) == pytest.approx(expected)
    assert rly_metrics.aggregate_iqm(x[:, None]) == pytest.approx(expected)
    per_task = stats.task_stats({"m": x}, ["t"], reps=REPS)["m"]["t"]
    assert per_task.iqm.value == pytest.approx(expected)
    assert per_task.mean == pytest.approx(x.mean())
    assert per_task.std == pytest.approx(x.std())  # ddof=0 by default
    assert stats.task_stats({"m": x}, ["t"], reps=REPS, ddof=1)["m"]["t"].std == pytest.approx(
        x.std(ddof=1) if n > 1 else np.nan, nan_ok=True)


def test_iqm_across_tasks_pools_all_runs_and_tasks():
    x = np.array([[100.0, 400.0, 900.0], [200.0, 500.0, 950.0], [300.0, 600.0, 980.0],
                  [300.0, 700.0, 990.0], [900.0, 800.0, 1000.0]])  # 5 runs x 3 tasks
    got = stats.aggregate({"m": x}, metrics=["IQM"], max_score=1.0, reps=REPS)["m"]["IQM"].value
    pooled = trim_mean(x, 0.25, axis=None)  # 15 values, 3 cut from each end
    assert got == pytest.approx(pooled)
    assert got != pytest.approx(np.mean([trim_mean(x[:, j], 0.25) for j in range(3)]))  # not a mean of per-task IQMs
    per_task = stats.task_stats({"m": x}, ["a", "b", "c"], reps=REPS)["m"]
    assert [per_task[t].iqm.value for t in "abc"] == pytest.approx([trim_mean(x[:, j], 0.25) for j in range(3)])


def test_aggregates_normalise_returns_by_1000():
    x = np.array([[100.0, 1000.0, 500.0], [300.0, 800.0, 700.0]])
    est = stats.aggregate({"m": x}, reps=REPS)["m"]
    y = x / 1000.0
    assert est["IQM"].value == pytest.approx(trim_mean(y, 0.25, axis=None))
    assert est["Mean"].value == pytest.approx(y.mean())
    assert est["Median"].value == pytest.approx(np.median(y.mean(axis=0)))
    assert est["Optimality gap"].value == pytest.approx(1.0 - np.minimum(y, 1.0).mean())
    success = stats.aggregate({"m": y}, metrics=["Mean"], max_score=1.0, reps=REPS)["m"]["Mean"]
    assert success == est["Mean"]  # already-normalised scores (e.g. success rates): max_score=1


# ------------------------------------------------------------------------------------- (b) bootstrap CIs
def _iqm(scores: dict, seed) -> stats.Estimate:
    return stats.aggregate(scores, metrics=["IQM"], reps=REPS, seed=seed)["m"]["IQM"]


def test_bootstrap_is_deterministic_for_a_seed_and_leaves_numpy_global_rng_alone():
    x = {"m": np.random.default_rng(0).normal(600.0, 120.0, size=(10, 4))}
    before = np.random.get_state()
    a, b, c = _iqm(x, 7), _iqm(x, 7), _iqm(x, 8)
    after = np.random.get_state()
    assert a == b
    assert (a.low, a.high) != (c.low, c.high)
    assert a.value == c.value  # the point estimate does not depend on the bootstrap
    assert _iqm(x, np.random.default_rng(3)) == _iqm(x, np.random.default_rng(3))  # a Generator works too
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2:] == after[2:]
    # Each key is bootstrapped from the seed on its own: adding another method leaves this one's CI unchanged.
    both = stats.aggregate({**x, "other": x["m"] * 0.5}, metrics=["IQM"], reps=REPS, seed=7)
    assert both["m"]["IQM"] == a


def test_rliable_ignores_random_state_so_seeding_the_global_rng_is_what_makes_it_reproducible():
    # Documents upstream behaviour that stats.py works around: rliable 1.2.0's StratifiedBootstrap draws
    # indices with np.random.choice, not from the random_state it is given.
    x = {"m": np.random.default_rng(1).normal(size=(8, 3))}
    f = lambda s: np.array([rly_metrics.aggregate_iqm(s)])  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # arch deprecates random_state
        np.random.seed(0)
        _, ci1 = rly.get_interval_estimates(x, f, reps=100, random_state=np.random.RandomState(0))
        np.random.seed(1)
        _, ci2 = rly.get_interval_estimates(x, f, reps=100, random_state=np.random.RandomState(0))
        np.random.seed(0)
        _, ci3 = rly.get_interval_estimates(x, f, reps=100, random_state=np.random.RandomState(99))
    assert not np.array_equal(ci1["m"], ci2["m"])
    assert np.array_equal(ci1["m"], ci3["m"])


def test_ci_contains_point_estimate():
    x = np.random.default_rng(2).normal(500.0, 100.0, size=(10, 3))
    for est in stats.aggregate({"m": x}, reps=REPS, seed=0)["m"].values():
        assert est.low <= est.value <= est.high
    for s in stats.task_stats({"m": x}, reps=REPS, seed=0)["m"].values():
        assert s.iqm.low <= s.iqm.value <= s.iqm.high
        assert s.iqm.low < s.iqm.high


def test_ci_narrows_as_runs_are_added():
    # 30 runs of 20 tasks from one distribution; the first 3, 10 and 30 runs. Widths are averaged over tasks so
    # that one unlucky draw cannot reverse the order.
    pool = np.random.default_rng(0).normal(500.0, 100.0, size=(30, 20))
    agg, per_task = [], []
    for n in (3, 10, 30):
        e = _iqm({"m": pool[:n]}, 0)
        agg.append(e.high - e.low)
        rows = stats.task_stats({"m": pool[:n]}, reps=REPS, seed=0)["m"].values()
        per_task.append(np.mean([s.iqm.high - s.iqm.low for s in rows]))
    assert agg[0] > 1.2 * agg[1] > 1.2 * 1.2 * agg[2]  # IQM across tasks: about 1/sqrt(runs)
    # Per task, 3 runs give a CI barely wider than 10 do: there are only 10 distinct resamples of 3 runs, and the
    # IQM of 10 runs keeps only 6 of them. So only the move to 30 runs is asserted with a margin.
    assert per_task[1] > 1.3 * per_task[2]
    assert per_task[0] > 1.3 * per_task[2]


# ------------------------------------------------------------------------------ (c) probability of improvement
def _pairwise(x: np.ndarray, y: np.ndarray) -> float:
    """Oracle: per task, P(x > y) + 0.5 P(x = y) over all pairs of runs; averaged over tasks."""
    per_task = [(x[:, None, j] > y[None, :, j]).mean() + 0.5 * (x[:, None, j] == y[None, :, j]).mean()
                for j in range(x.shape[1])]
    return float(np.mean(per_task))


def test_probability_of_improvement_dominating_identical_and_between():
    y = np.array([[100.0, 200.0], [150.0, 250.0], [120.0, 300.0]])
    dom = stats.probability_of_improvement({"x": y + 1000.0, "y": y}, reps=REPS)[("x", "y")]
    assert (dom.value, dom.low, dom.high) == (1.0, 1.0, 1.0)
    assert stats.probability_of_improvement({"x": y, "y": y + 1000.0}, reps=REPS)[("x", "y")].value == 0.0

    same = stats.probability_of_improvement({"x": y, "y": y.copy()}, reps=REPS)[("x", "y")]
    assert same.value == 0.5 and same.low <= 0.5 <= same.high
    shuffled = stats.probability_of_improvement({"x": y[::-1], "y": y}, reps=REPS)[("x", "y")]
    assert shuffled.value == pytest.approx(0.5)  # same runs in another order: all ties count one half

    x = np.array([[3.0, 10.0], [4.0, 20.0], [1.0, 30.0], [2.0, 40.0]])  # 4 runs of X, 3 of Y; ties on task 0
    z = np.array([[2.0, 25.0], [2.0, 15.0], [5.0, 35.0]])
    est = stats.probability_of_improvement({"x": x, "z": z}, reps=REPS)[("x", "z")]
    assert 0.0 < est.value < 1.0
    assert est.value == pytest.approx(_pairwise(x, z))
    assert est.low <= est.value <= est.high
    back = stats.probability_of_improvement({"x": x, "z": z}, [("z", "x")], reps=REPS)[("z", "x")]
    assert est.value + back.value == pytest.approx(1.0)


def test_probability_of_improvement_needs_the_same_tasks():
    with pytest.raises(ValueError):
        stats.probability_of_improvement({"x": np.ones((3, 2)), "y": np.ones((3, 3))}, reps=REPS)


# --------------------------------------------------------------------------------------- (d) paper data
def test_paper_tables_ship_in_the_package():
    folder = resources.files("lightning_pieg.paper")
    for name in [*paper.TABLES.values(), "README.md"]:
        assert folder.joinpath(name).is_file(), name
    assert len(paper.published("table1_dmcgb")) == 2 * 6 * 5  # settings x tasks x methods
    assert len(paper.published("table2")) == 12 and len(paper.published("layers")) == 12


def test_published_pieg_walker_walk():
    easy = paper.published_score("table1_dmcgb", "walker_walk", "PIE-G", "video_easy")
    hard = paper.published_score("table1", "walker_walk", "PIE-G", "video_hard")
    assert (easy.mean, easy.std) == (887.0, 22.0)
    assert (hard.mean, hard.std) == (600.0, 28.0)
    assert paper.published_score("dmcgb", "cup_catch", "SVEA", "video_hard").std == 174.0
    drawer = paper.published_score("table2_drawerworld", "drawer_close", "PIE-G", "metal")
    assert (drawer.mean, drawer.std) == (0.95, None)
    layer2 = paper.published("table3_layers", task="walker_walk")[1]
    assert (layer2.layer, layer2.mean, layer2.std, layer2.setting) == (2, 884.0, 20.0, None)
    with pytest.raises(KeyError):
        paper.published_score("table1", "walker_walk", "PIE-G", "color_hard")
    with pytest.raises(KeyError):
        paper.published("table9")


def test_drqv2_curves():
    assert "walker_walk" in paper.drqv2_tasks()
    seeds, frames, returns = paper.drqv2_curve("cartpole_balance")
    assert returns.shape == (len(seeds), len(frames)) == (10, 50)
    assert frames[:4].tolist() == [0, 20000, 40000, 60000]
    assert np.round(returns[:, :4].mean(axis=0)).tolist() == [374.0, 375.0, 835.0, 985.0]  # as the notes say


def test_compare_with_paper_differences():
    tasks = ["walker_walk", "cheetah_run", "reacher_easy"]  # reacher_easy is not in Table 1
    ours = {"video_easy": np.array([[880.0, 300.0, 900.0], [890.0, 320.0, 910.0], [900.0, 340.0, 920.0]]),
            "video_hard": np.array([[590.0, 150.0, 800.0], [610.0, 160.0, 810.0], [650.0, 170.0, 820.0]])}
    rows = stats.compare_with_paper(ours, paper.published("table1_dmcgb"), tasks, reps=REPS)
    by = {(r.setting, r.task): r for r in rows}
    assert len(rows) == 6
    r = by["video_easy", "walker_walk"]
    assert (r.num_runs, r.mean, r.std) == (3, 890.0, pytest.approx(np.std([880, 890, 900])))
    assert (r.paper_mean, r.paper_std, r.difference) == (887.0, 22.0, pytest.approx(3.0))
    assert r.iqm.value == pytest.approx(890.0) and r.iqm.low <= 890.0 <= r.iqm.high
    assert by["video_hard", "walker_walk"].difference == pytest.approx(np.mean([590, 610, 650]) - 600.0)
    assert by["video_easy", "cheetah_run"].difference == pytest.approx(320.0 - 305.0)
    assert by["video_hard", "cheetah_run"].difference == pytest.approx(160.0 - 154.0)
    missing = by["video_easy", "reacher_easy"]
    assert (missing.paper_mean, missing.paper_std, missing.difference) == (None, None, None)
    svea = stats.compare_with_paper(ours, paper.published("table1_dmcgb"), tasks, method="SVEA", reps=REPS)
    assert svea[0].paper_mean == 819.0 and svea[0].difference == pytest.approx(890.0 - 819.0)
    table = stats.comparison_table(rows)
    assert "| video_easy | walker_walk | 3 | 890 ± 8 | 890 [" in table and "| 887 ± 22 | +3 |" in table


# -------------------------------------------------------------------------------------------- (e) plots
def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    scores = {"PIE-G": rng.uniform(500.0, 900.0, size=(5, 6)), "SVEA": rng.uniform(200.0, 800.0, size=(5, 6))}
    est = stats.aggregate(scores, reps=100)
    _assert_png(stats.plot_aggregates(est, tmp_path / "aggregates.png"))

    profile = stats.performance_profile(scores, np.linspace(0.0, 1.0, 21), reps=100)
    assert profile.profiles["PIE-G"] == pytest.approx([(scores["PIE-G"] / 1000.0 > t).mean() for t in profile.taus])
    assert profile.cis["SVEA"].shape == (2, 21)
    _assert_png(stats.plot_performance_profiles(profile, tmp_path / "profiles.png"))

    rows = stats.compare_with_paper({"video_hard": scores["PIE-G"]}, paper.published("table1"),
                                    ["cartpole_swingup", "walker_stand", "walker_walk", "cup_catch", "cheetah_run",
                                     "finger_spin"], reps=100)
    _assert_png(stats.plot_comparison(rows, tmp_path / "sub" / "comparison.png"))
