"""The testbed's acceptance report against hand-made rank tables."""

from __future__ import annotations

import math

import numpy as np
import pytest

from elmm.testbed import control_table, floor_table, group_of, group_table, headroom_table, relative_drop_interval, report

RELATIONS = ["has colour", "knows"]  # modality image, structure (elmm.kg.synthetic.RELATIONS)


def _table(relations, directions, ranks):
    n = len(ranks)
    return {"query": np.arange(n), "relation": np.array(relations), "direction": np.array(directions),
            "anchor": np.zeros(n, dtype=int), "target": np.ones(n, dtype=int), "rank": np.array(ranks, dtype=float)}


REL = [0, 0, 1, 1]
DIR = ["tail", "head", "tail", "head"]
TABLES = {
    ("d0", "model"): _table(REL, DIR, [1, 2, 1, 4]), ("d0", "prior"): _table(REL, DIR, [2, 4, 5, 4]),
    ("d0", "kge"): _table(REL, DIR, [1, 4, 1, 2]),
    ("d1", "model"): _table(REL, DIR, [1, 1, 2, 2]), ("d1", "prior"): _table(REL, DIR, [4, 2, 4, 8]),
    ("d1", "kge"): _table(REL, DIR, [2, 2, 1, 1]),
    ("c0", "model"): _table(REL, DIR, [1, 4, 3, 8]),
}
TABLES[("c0", "prior")] = TABLES[("d0", "prior")]  # the same world (seed 0): the same prior


def _metrics(mrr):
    return {"mrr": mrr, "mrr_se": 0.01, "per_relation": {r: {s: {"mrr": 0.5, "mrr_se": 0.1} for s in ("tail", "head")}
                                                        for r in RELATIONS}}


def _row(name, seed, k, mrr, ceiling):
    per_relation = {r: {s: {"mrr": ceiling, "mrr_se": 0.05} for s in ("tail", "head")} for r in RELATIONS}
    return {"name": name, "rev": name, "params": {"seed": seed, "prune": {"k": k}}, "metrics": _metrics(mrr),
            "baselines": {"ceiling": {"mrr": ceiling, "mrr_se": 0.02, "per_relation": per_relation}}}


ROWS = [_row("d0", 0, 4, 0.6, 0.9), _row("d1", 1, 4, 0.7, 0.9), _row("c0", 0, 8, 0.3, 0.9)]


def read(row, kind):
    return TABLES[(row["name"], kind)]


def test_groups_by_changed_params():
    assert [r["name"] for r in group_of(ROWS, {})] == ["d0", "d1"]
    assert [r["name"] for r in group_of(ROWS, {"prune.k": 8})] == ["c0"]


def test_floor_table_pairs_queries_and_pools_seeds():
    rows = {(r["relation"], r["side"]): r for r in floor_table(group_of(ROWS, {}), RELATIONS, read)}
    overall = rows[("overall", "both")]
    model = [1, 1 / 2, 1, 1 / 4, 1, 1, 1 / 2, 1 / 2]
    prior = [1 / 2, 1 / 4, 1 / 5, 1 / 4, 1 / 4, 1 / 2, 1 / 4, 1 / 8]
    diff = np.array(model) - np.array(prior)
    assert overall["model"] == pytest.approx(np.mean(model)) and overall["prior"] == pytest.approx(np.mean(prior))
    assert overall["z_prior"] == pytest.approx(diff.mean() / (diff.std(ddof=1) / math.sqrt(8)))
    assert overall["n"] == 8
    colour_tail = rows[("has colour", "tail")]
    assert colour_tail["model"] == 1.0 and colour_tail["prior"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    # the ceiling check: 0.5 vs 0.9 with SE sqrt(0.1^2 + 0.05^2): far below
    assert colour_tail["ceiling"] == 0.9
    assert colour_tail["ceiling_excess_se"] == pytest.approx((0.5 - 0.9) / math.sqrt(0.01 + 0.0025))
    assert overall["ceiling_excess_se"] == pytest.approx((0.7 - 0.9) / math.sqrt(0.01**2 + 0.02**2))


def test_control_table_relative_drop_per_group():
    groups = {c["group"]: c for c in control_table(group_of(ROWS, {}), group_of(ROWS, {"prune.k": 8}), RELATIONS, read)}
    # seed 0 only: default ranks [1, 2 | 1, 4], control [1, 4 | 3, 8]
    assert groups["image"]["hits_at_1"] == 0.5 and groups["image"]["hits_at_1_no_attention"] == 0.5
    assert groups["structure"]["hits_at_1"] == 0.5 and groups["structure"]["hits_at_1_no_attention"] == 0.0
    assert groups["structure"]["relative_drop"] == 1.0 and groups["all"]["relative_drop"] == pytest.approx(0.5)
    assert groups["all"]["control_vs_prior"] == pytest.approx(np.mean([1 - 1 / 2, 1 / 4 - 1 / 4, 1 / 3 - 1 / 5, 1 / 8 - 1 / 4]))
    assert groups["all"]["seeds"] == [0]


def test_report_renders_both_tables():
    text = report(ROWS, read=read)
    assert "| overall | both | 8 |" in text and "Positive control" in text and "| structure | [0] |" in text


def test_floor_table_has_each_side_overall():
    rows = {(r["relation"], r["side"]): r for r in floor_table(group_of(ROWS, {}), RELATIONS, read)}
    head = rows[("overall", "head")]  # head ranks: d0 model [2, 4], kge [4, 2]; d1 model [1, 2], kge [2, 1]
    assert head["n"] == 4 and head["model"] == pytest.approx((1 / 2 + 1 / 4 + 1 + 1 / 2) / 4)
    assert head["kge"] == pytest.approx((1 / 4 + 1 / 2 + 1 / 2 + 1) / 4) and head["vs_kge"] == pytest.approx(0.0)
    assert rows[("overall", "tail")]["model"] == pytest.approx((1 + 1 + 1 + 1 / 2) / 4)


def test_group_table_averages_the_seeds_that_report_it():
    def block(p):
        return {"k": 10, "per_relation": {"knows": {"tail": {"precision": p, "chance": 0.1}}}}

    rows = [dict(r, metrics=dict(r["metrics"])) for r in ROWS]
    rows[0]["metrics"]["group_precision"] = block(0.6)
    rows[0]["baselines"] = dict(rows[0]["baselines"], kge={"group_precision": block(0.9)})
    rows[1]["metrics"]["group_precision"] = block(0.2)  # no KGE block at this seed
    table = group_table(group_of(rows, {}))
    assert table == [{"relation": "knows", "side": "tail", "seeds": 2, "model": pytest.approx(0.4), "prior": None,
                      "kge": 0.9, "chance": pytest.approx(0.1), "k": 10}]
    assert "In-group precision@10" in report(rows, read=read) and "In-group" not in report(ROWS, read=read)


def test_report_of_another_group():
    def read_c0(row, kind):  # c0 ran at seed 0: d0's world, so d0's KGE
        return TABLES[("d0", kind)] if (row["name"], kind) == ("c0", "kge") else read(row, kind)

    text = report(ROWS, read=read_c0, group="c0")
    assert text.startswith("c0, seeds [0]:") and "| overall | both | 4 |" in text
    with pytest.raises(SystemExit, match="no experiment group named 'nope'"):
        report(ROWS, read=read, group="nope")


def _drop_reference(default, control, resamples, seed=0, block=100):
    """The interval written out query by query: the same draws, one resample at a time."""
    rng = np.random.default_rng(seed)
    drops = []
    for lo in range(0, resamples, block):
        rows = min(block, resamples - lo)
        picks = [rng.integers(0, d.size, (rows, d.size)) for d in default]
        for i in range(rows):
            hd = sum(d[p[i]].sum() for d, p in zip(default, picks))
            hc = sum(c[p[i]].sum() for c, p in zip(control, picks))
            if hd > 0:
                drops.append(1 - hc / hd)
    return tuple(np.percentile(drops, [2.5, 97.5]))


def test_relative_drop_interval_keeps_pairs_and_pools_seeds():
    rng = np.random.default_rng(3)
    default = [(rng.random(40) < 0.3).astype(float), (rng.random(25) < 0.5).astype(float)]
    control = [d * (rng.random(d.size) < 0.6) for d in default]  # the control loses some of the default's hits
    low, high = relative_drop_interval(default, control, resamples=300)
    assert (low, high) == pytest.approx(_drop_reference(default, control, 300))
    point = 1 - sum(c.sum() for c in control) / sum(d.sum() for d in default)
    assert low < point < high and 0 <= low and high <= 1  # a control that only loses hits: drop in [0, 1]


def test_relative_drop_interval_degenerate_cases():
    same = [np.array([1.0, 0.0, 1.0, 1.0])]
    assert relative_drop_interval(same, same, resamples=200) == (0.0, 0.0)  # pairs kept: no drop in any resample
    assert relative_drop_interval(same, [np.zeros(4)], resamples=200) == (1.0, 1.0)
    with pytest.raises(ValueError, match="not the same queries"):
        relative_drop_interval(same, [np.zeros(3)])


def test_control_table_reports_the_drop_interval():
    groups = {c["group"]: c for c in control_table(group_of(ROWS, {}), group_of(ROWS, {"prune.k": 8}), RELATIONS, read,
                                                    resamples=500)}
    low, high = groups["all"]["relative_drop_ci"]  # seed 0: hits default [1, 0, 1, 0], control [1, 0, 0, 0]
    assert low == 0.0 and high == 1.0
    assert "50% [0%, 100%]" in report(ROWS, read=read)


def test_headroom_table_weighs_each_side_by_its_queries():
    heads = {h["group"]: h for h in headroom_table(floor_table(group_of(ROWS, {}), RELATIONS, read))}
    # pooled over d0, d1 (2 queries a side, 8 in all), every ceiling 0.9: has colour tail 1, head (1/2 + 1) / 2;
    # knows tail (1 + 1/2) / 2, head (1/4 + 1/2) / 2. A side above its ceiling counts negative.
    assert heads["image"]["headroom"] == pytest.approx((2 * (0.9 - 1.0) + 2 * (0.9 - 0.75)) / 8)
    assert heads["structure"]["headroom"] == pytest.approx((2 * (0.9 - 0.75) + 2 * (0.9 - 0.375)) / 8)
    assert heads["structure"]["share_of_queries"] == 0.5 and heads["structure"]["model"] == pytest.approx(0.5625)
    # KGE: knows tail (1 + 1) / 2, head (1/2 + 1) / 2, both above the model; has colour tail 0.75 below it
    assert heads["structure"]["headroom_to_kge"] == pytest.approx((2 * (1 - 0.75) + 2 * (0.75 - 0.375)) / 8)
    assert heads["image"]["headroom_to_kge"] == pytest.approx(0.0)
    assert "text" not in heads
    assert "| structure | 0.50 |" in report(ROWS, read=read)
