"""dashboards/stats.py: bootstrap and seed intervals; the report's CI and Δ-vs-vanilla columns."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from core.keys import TAG_LABEL, TAG_SHARING
from dashboards.report import (
    DELTA,
    DELTA_BPB,
    SIGNIFICANT,
    SIGNIFICANT_BPB,
    _markdown,
    build_report,
    results_table,
    vanilla_of,
)
from dashboards.runs import SweepRuns
from dashboards.stats import (
    bootstrap_mean_ci,
    bpb_ci,
    mean_over_tasks_ci,
    model_ci,
    paired_bpb_diff_ci,
    paired_diff_ci,
    seed_ci,
    t_quantile,
)
from evals.reporting import log_to_mlflow
from evals.runner import DepthPoint, EvalReport


def coin(p: float, n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(float)


def test_bootstrap_ci_covers_the_true_mean_at_about_the_nominal_rate() -> None:
    """Over 100 synthetic samples of 200 items from accuracy 0.7, the 95% interval holds 0.7
    about 95 times (binomial spread: 88..100 is a 3-sigma band), and it narrows with n."""
    covered = 0
    for s in range(100):
        ci = bootstrap_mean_ci(coin(0.7, 200, s), iters=500, seed=s)
        assert ci.low <= ci.mean <= ci.high
        covered += ci.low <= 0.7 <= ci.high
    assert 88 <= covered <= 100
    small, big = bootstrap_mean_ci(coin(0.7, 50, 1)), bootstrap_mean_ci(coin(0.7, 2000, 1))
    assert big.high - big.low < (small.high - small.low) / 3
    assert math.isnan(bootstrap_mean_ci([]).mean)


def test_bootstrap_is_reproducible_and_seeded() -> None:
    x = coin(0.6, 100, 3)
    assert bootstrap_mean_ci(x) == bootstrap_mean_ci(x)  # the default seed is fixed
    assert bootstrap_mean_ci(x, seed=1) != bootstrap_mean_ci(x, seed=2)


def test_mean_over_tasks_is_the_average_of_task_means_with_a_stratified_ci() -> None:
    """Task means 0.9 (1000 items) and 0.3 (30 items): the average is 0.6, not the pooled
    item mean (~0.88), and the small task's noise dominates the width."""
    big, small = coin(0.9, 1000, 4), coin(0.3, 30, 5)
    ci = mean_over_tasks_ci({"big": big, "small": small, "empty": []})
    assert ci.mean == pytest.approx((big.mean() + small.mean()) / 2)
    assert ci.low < ci.mean < ci.high
    alone = bootstrap_mean_ci(small)  # half of the small task's width, give or take
    assert (ci.high - ci.low) == pytest.approx((alone.high - alone.low) / 2, rel=0.25)
    assert math.isnan(mean_over_tasks_ci({}).mean)


def test_paired_difference_significant_when_better_by_construction() -> None:
    a = {"t1": coin(0.8, 300, 6), "t2": coin(0.8, 300, 7)}
    b = {"t1": coin(0.5, 300, 8), "t2": coin(0.5, 300, 9)}
    d = paired_diff_ci(a, b)
    assert d.significant and 0.2 < d.low < d.mean < d.high < 0.4
    assert paired_diff_ci(b, a).significant and paired_diff_ci(b, a).high < 0


def test_paired_difference_not_significant_for_identical_or_same_distribution() -> None:
    a = {"t": coin(0.6, 300, 10)}
    same = paired_diff_ci(a, a)
    assert (same.mean, same.low, same.high, same.significant) == (0.0, 0.0, 0.0, False)
    d = paired_diff_ci(a, {"t": coin(0.6, 300, 11)})
    assert not d.significant and d.low < 0 < d.high
    with pytest.raises(ValueError, match="same items"):
        paired_diff_ci(a, {"t": coin(0.6, 299, 11)})


def test_pairing_sees_a_small_consistent_gain_an_unpaired_test_misses() -> None:
    """b = a with 12 of 300 wrong answers fixed: +0.04 on the same items is significant
    paired, though the two accuracies' separate intervals overlap."""
    a = coin(0.6, 300, 12)
    b = a.copy()
    b[np.flatnonzero(a == 0)[:12]] = 1.0
    d = paired_diff_ci({"t": b}, {"t": a})
    assert d.mean == pytest.approx(0.04) and d.significant
    assert bootstrap_mean_ci(a).high > bootstrap_mean_ci(b).low  # unpaired: overlapping


def test_seed_ci_on_known_values() -> None:
    """[1, 2, 3]: mean 2, s = 1, t(0.975, 2) = 4.3027: 2 ± 2.4841."""
    ci = seed_ci([1.0, 2.0, 3.0])
    assert ci.mean == 2.0
    assert (ci.low, ci.high) == pytest.approx((2 - 2.48414, 2 + 2.48414), abs=1e-4)
    one = seed_ci([0.7])
    assert one.mean == 0.7 and math.isnan(one.low) and math.isnan(one.high)
    assert t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(0.975, 30) == pytest.approx(2.0423, abs=1e-4)
    assert t_quantile(0.025, 5) == pytest.approx(-2.5706, abs=1e-4)


def test_model_ci_combines_items_and_seeds_as_documented() -> None:
    one = {"t": coin(0.7, 200, 13)}
    assert model_ci([one]) == mean_over_tasks_ci(one)  # one seed: the item bootstrap
    seeds = [{"t": coin(0.7, 200, s)} for s in (14, 15, 16)]
    means = [s["t"].mean() for s in seeds]
    assert model_ci(seeds) == seed_ci(means)  # several: Student-t across the seeds


def sweep_runs(items: dict[str, dict[str, dict[str, list[float]]]]) -> SweepRuns:
    """Two budgets: vanilla and a MoR model at 1e9, a MoR model alone at 2e9."""
    trials = pd.DataFrame(
        [
            {"run_id": "v1", "label": "vanilla,budget=1e+09", "sharing": "none"},
            {"run_id": "m1", "label": "mor,budget=1e+09", "sharing": "middle_cycle"},
            {"run_id": "m2", "label": "mor,budget=2e+09", "sharing": "middle_cycle"},
        ]
    ).assign(
        model=lambda d: d["label"].str.split(",budget=").str[0],
        router=["none", "expert_choice", "expert_choice"],
        num_recursions=[1, 2, 2],
        kv_cache=None,
        params_non_embedding=1e6,
        train_flops=[1e9, 1e9, 2e9],
        tokens=1e5,
        val_nll=3.0,
    )
    points = pd.DataFrame(
        [
            {"run_id": "v1", "point": "1", "flops_per_token": 10.0},
            {"run_id": "m1", "point": "1", "flops_per_token": 5.0},
            {"run_id": "m1", "point": "2", "flops_per_token": 10.0},
            {"run_id": "m1", "point": "router", "flops_per_token": 7.0},
            {"run_id": "m2", "point": "router", "flops_per_token": 7.0},
        ]
    )
    points["average"] = [
        np.mean(items[r][p]["t"]) if p in items.get(r, {}) else np.nan
        for r, p in zip(points["run_id"], points["point"])
    ]
    return SweepRuns(trials, points, [], [], items)


def test_results_table_ci_and_delta_vs_vanilla_of_the_same_budget() -> None:
    """m1's router point (its native one) beats vanilla by construction; the worse d2 point
    is not the one compared. m2 has no vanilla at its budget: empty cells."""
    v, good, bad = coin(0.5, 300, 20), coin(0.8, 300, 21), coin(0.2, 300, 22)
    items = {
        "v1": {"1": {"t": list(v)}},
        "m1": {"1": {"t": list(bad)}, "2": {"t": list(bad)}, "router": {"t": list(good)}},
        "m2": {"router": {"t": list(good)}},
    }
    table = results_table(sweep_runs(items)).set_index("run_id")
    cols = list(table.columns)
    assert cols[cols.index("average") + 1 : cols.index("average") + 3] == [
        "avg_ci_low",
        "avg_ci_high",
    ]
    for rid in ("v1", "m1", "m2"):
        row = table.loc[rid]
        assert row["avg_ci_low"] < row["average"] < row["avg_ci_high"]
    assert table.loc["m1", "average"] == pytest.approx(good.mean())  # the router point
    delta = paired_diff_ci({"t": good}, {"t": v})
    assert table.loc["m1", DELTA] == f"{delta.mean:+.3f} [{delta.low:+.3f}, {delta.high:+.3f}]"
    assert table.loc["m1", SIGNIFICANT] == "yes"
    assert table.loc["v1", DELTA] == table.loc["v1", SIGNIFICANT] == ""
    assert table.loc["m2", DELTA] == table.loc["m2", SIGNIFICANT] == ""
    md = _markdown(table.reset_index())
    assert f"| {DELTA} | {SIGNIFICANT} |" in md and "| yes |" in md


def _docs(nats_per_byte: float, n: int, seed: int, noise: float = 0.3) -> list[list[float]]:
    """lm-eval's per-document (loglikelihood, bytes) for a model at ``nats_per_byte``."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(200, 2000, n).astype(float)
    rates = nats_per_byte * (1 + noise * rng.standard_normal(n))
    return [[-r * b, b] for r, b in zip(rates, sizes)]


def test_bits_per_byte_interval_and_paired_difference() -> None:
    """bpb is a ratio of sums (lm-eval's weighted aggregate): its bootstrap resamples whole
    documents; a model better by construction on the same documents is significantly better,
    a model on the same distribution is not."""
    base = _docs(1.0, 150, 1)
    ci = bpb_ci(base)
    total = -sum(ll for ll, _ in base) / sum(b for _, b in base) / math.log(2)
    assert ci.mean == pytest.approx(total) and ci.low < total < ci.high
    # Same documents (bytes), 5% fewer nats on each: better, with its own noise.
    better = [[ll * 0.95 * (1 + 0.02 * math.sin(i)), b] for i, (ll, b) in enumerate(base)]
    diff = paired_bpb_diff_ci(better, base)
    assert diff.significant and diff.high < 0
    same = _docs(1.0, 150, 2)
    same = [[ll, b] for (ll, _), (_, b) in zip(same, base)]  # same documents, same rate
    assert not paired_bpb_diff_ci(same, base).significant
    with pytest.raises(ValueError, match="same documents"):
        paired_bpb_diff_ci(_docs(1.0, 150, 3), base)
    # In the results table: beside the model's bpb, for the headline bpb task.
    acc = list(coin(0.5, 100, 5))
    items = {"v1": {"1": {"t": acc, "bpb": base}}, "m1": {"router": {"t": acc, "bpb": better}}}
    table = results_table(sweep_runs(items)).set_index("run_id")
    assert table.loc["m1", "bpb_ci_low"] < table.loc["m1", "bpb_ci_high"]
    assert table.loc["m1", SIGNIFICANT_BPB] == "yes" and table.loc["m1", DELTA_BPB].startswith("-")
    assert table.loc["v1", DELTA_BPB] == ""


def test_results_table_without_items_keeps_empty_cells() -> None:
    """Runs evaluated before items were recorded: the columns exist, their cells are empty."""
    runs = sweep_runs({"v1": {"1": {"t": [1.0]}}})
    runs.items = {}
    table = results_table(runs)
    assert table["avg_ci_low"].isna().all() and table["avg_ci_high"].isna().all()
    assert set(table[DELTA]) == {""} and set(table[SIGNIFICANT]) == {""}


def test_vanilla_pairing_prefers_the_same_seed() -> None:
    trials = pd.DataFrame(
        [
            {"run_id": "a", "label": "vanilla,budget=1e+09,seed=0", "sharing": "none"},
            {"run_id": "b", "label": "vanilla,budget=1e+09,seed=1", "sharing": "none"},
            {"run_id": "c", "label": "mor,budget=1e+09,seed=1", "sharing": "middle_cycle"},
            {"run_id": "d", "label": "mor,budget=1e+09,seed=5", "sharing": "middle_cycle"},
            {"run_id": "e", "label": "mor,budget=3e+09,seed=1", "sharing": "middle_cycle"},
            {"run_id": "f", "label": None, "sharing": "middle_cycle"},
        ]
    )
    assert vanilla_of(trials) == {"c": "b", "d": "a"}


def test_report_reads_each_eval_runs_items_json_from_mlflow(tmp_path: Path) -> None:
    """Through a real MLflow store: two trained runs of one budget, each with an eval run
    logged by ``evals.reporting`` (items.json among its artifacts); the report's columns
    come from those files."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("ci", artifact_location=(tmp_path / "art").as_uri())
    scores = {"vanilla": coin(0.3, 200, 30), "mor": coin(0.9, 200, 31)}
    for name, sharing in (("vanilla", "none"), ("mor", "middle_cycle")):
        tags = {TAG_SHARING: sharing, TAG_LABEL: f"{name},budget=1e+09"}
        parent = client.create_run(exp, run_name=name, tags=tags).info.run_id
        client.log_metric(parent, "flops", 1e9)
        acc = float(scores[name].mean())
        point = DepthPoint("1", 1, 1.0, [0, 200], None, 10.0, 10.0, {"mc": {"acc": acc}}, acc)
        point.items = {"mc": list(scores[name])}
        report = EvalReport("m", ["mc"], 200, 1, [point])
        log_to_mlflow(report, uri, parent_run_id=parent)
    rep = build_report(uri, ["ci"], tmp_path / "rep", log_to_mlflow=False)
    table = rep.table.set_index("model")
    assert table.loc["mor", SIGNIFICANT] == "yes" and table.loc["mor", DELTA].startswith("+0.")
    ci = mean_over_tasks_ci({"mc": scores["mor"]})
    assert (table.loc["mor", "avg_ci_low"], table.loc["mor", "avg_ci_high"]) == (ci.low, ci.high)
    assert table.loc["vanilla", DELTA] == ""
    assert "significant?" in (tmp_path / "rep" / "results.md").read_text()


def test_seeds_become_one_row_per_configuration_with_a_t_interval(tmp_path: Path) -> None:
    """Three seeds of two configurations through a real MLflow store: the report adds
    results_by_config (mean and Student-t CI across seeds) and draws each configuration's
    points once, averaged over its seeds, with the interval as error bars."""
    from core.keys import TAG_REPLICATE_OF, TAG_SEED
    from dashboards.replicates import aggregate_points
    from dashboards.runs import load_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("seeds", artifact_location=(tmp_path / "art").as_uri())
    accs = {"vanilla": [0.50, 0.52, 0.54], "mor": [0.60, 0.66, 0.63]}
    for name, sharing in (("vanilla", "none"), ("mor", "middle_cycle")):
        for seed, acc in enumerate(accs[name]):
            tags = {TAG_SHARING: sharing, TAG_LABEL: f"{name},budget=1e+09,seed={seed}",
                    TAG_REPLICATE_OF: f"{name},budget=1e+09", TAG_SEED: str(seed)}  # fmt: skip
            parent = client.create_run(exp, run_name=name, tags=tags).info.run_id
            client.log_metric(parent, "flops", 1e9)
            point = DepthPoint("1", 1, 1.0, [0, 200], None, 10.0, 10.0, {"mc": {"acc": acc}}, acc)
            log_to_mlflow(EvalReport("m", ["mc"], 200, 1, [point]), uri, parent_run_id=parent)
    rep = build_report(uri, ["seeds"], tmp_path / "rep", log_to_mlflow=False)
    assert len(rep.table) == 6  # results.md keeps one row per run
    by = pd.read_csv(tmp_path / "rep" / "results_by_config.csv").set_index("model")
    assert by.loc["mor", "seeds"] == 3
    ci = seed_ci(accs["mor"])
    assert by.loc["mor", "average"] == pytest.approx(0.63)
    assert (by.loc["mor", "average_ci_low"], by.loc["mor", "average_ci_high"]) == pytest.approx(
        (ci.low, ci.high)
    )
    points = aggregate_points(load_runs(uri, ["seeds"], items=False).points, "average")
    assert len(points) == 2 and set(points["seeds"]) == {3}
    mor = points.set_index("model").loc["mor"]
    assert mor["average_ci_low"] < 0.63 < mor["average_ci_high"]
    assert (tmp_path / "rep" / "pareto.png").stat().st_size > 5000
    page = (tmp_path / "rep" / "report.html").read_text()
    assert '"arrayminus"' in page and "95% CI" in page  # error bars in the HTML too


def test_one_seed_points_get_error_bars_from_their_items() -> None:
    """Without seeds, each depth point's interval comes from its own eval items: documents
    for bits per byte, items within tasks for the average; a point without items has none."""
    from dashboards.plots import error_bars
    from dashboards.replicates import with_item_cis

    rng = np.random.default_rng(0)
    docs = [[-float(n) * 1.4, float(n)] for n in rng.integers(200, 800, 60)]
    accs = {"a": rng.integers(0, 2, 80).astype(float).tolist(), "b": [1.0, 0.0] * 20}
    items = {"r1": {"1": {"bpb": docs, **accs}}, "r2": {"1": {}}}
    bpb = -sum(ll for ll, _ in docs) / sum(n for _, n in docs) / math.log(2)
    points = pd.DataFrame(
        {"run_id": ["r1", "r2"], "point": ["1", "1"], "bpb/bits_per_byte": [bpb, 2.0],
         "average": [np.mean([np.mean(accs["a"]), 0.5]), 0.5]}
    )  # fmt: skip
    got = with_item_cis(points, items, "bpb/bits_per_byte")
    low, high = (
        got.loc[0, "bpb/bits_per_byte_item_ci_low"],
        got.loc[0, "bpb/bits_per_byte_item_ci_high"],
    )
    assert low < bpb < high and high - low < 0.2
    assert math.isnan(got.loc[1, "bpb/bits_per_byte_item_ci_low"])  # no items, no interval
    below, above, what = error_bars(got, "bpb/bits_per_byte")
    assert above[0] == pytest.approx(high - bpb)
    assert what == "95% CI over items" and below[0] == pytest.approx(bpb - low)
    avg = with_item_cis(points, items, "average")
    assert (
        avg.loc[0, "average_item_ci_low"]
        < points.loc[0, "average"]
        < avg.loc[0, "average_item_ci_high"]
    )
    assert with_item_cis(points, items, "nll").equals(points)  # no items behind NLL


def test_a_model_at_two_budgets_is_two_curves_named_once() -> None:
    """Figures join a model's depth points per trained configuration: the same model at two
    training budgets is two curves (joining them would zigzag between budgets), one legend
    entry."""
    from dashboards.plots import curves

    points = pd.DataFrame(
        {"model": ["m", "m", "m", "m", "v"], "point": ["1", "2", "1", "2", "1"],
         "replicate_of": ["m,budget=1e+12"] * 2 + ["m,budget=2e+12"] * 2 + ["v,budget=1e+12"]}
    )  # fmt: skip
    got = [
        (model, sorted(grp["replicate_of"].unique()), label) for model, grp, label in curves(points)
    ]
    assert got == [("m", ["m,budget=1e+12"], "m"), ("m", ["m,budget=2e+12"], None),
                   ("v", ["v,budget=1e+12"], "v")]  # fmt: skip
