"""elmm.experiments reads `dvc exp show --json` rows into the ablation table and sweep points."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from elmm.config import Params
from elmm.experiments import (
    load_experiments,
    markdown_table,
    merge_runs,
    queue_commands,
    seed_groups,
    seed_table,
    sweep_rows,
)


def _rev(name, k, mrr, running=False, seed=0):
    metrics = {"mr": 10.0, "mrr": mrr, "hits_at_1": 0.1, "hits_at_3": 0.2, "hits_at_10": 0.3,
               "per_relation": {"knows": {"mrr": mrr / 2, "tail": {"mrr": mrr / 4}}}}
    return {"rev": f"{name}-rev", "name": name, "data": {
        "rev": "workspace" if running else f"{name}-rev", "timestamp": None if running else "2026-11-23T09:00:00",
        "params": {"params.yaml": {"data": {"prune": {"k": k}, "seed": seed, "train": {"lr": 3e-4}}}},
        "metrics": {"metrics/evaluate.json": {"data": metrics}}}}


SHOW = [
    {"rev": "workspace", "name": None, "data": _rev("ws", 4, 0.9)["data"], "experiments": None},
    {"rev": "abc", "name": "main", "data": _rev("main", 4, 0.5)["data"], "experiments": [
        {"revs": [_rev("k0", 0, 0.6)]}, {"revs": [_rev("k8", 8, 0.2)]}, {"revs": [_rev("busy", 2, 0.99, running=True)]}]},
]


def test_rows_skip_workspace_and_unfinished_experiments():
    rows = load_experiments(json.dumps(SHOW))
    assert [r["name"] for r in rows] == ["main", "k0", "k8"]
    # a task that is still running, though its copy already holds (the baseline's) metrics files
    show = json.loads(json.dumps(SHOW))
    show[1]["experiments"].append({"executor": {"state": "running"}, "revs": [_rev("copy", 6, 0.5)]})
    show[1]["experiments"].append({"executor": {"state": "success"}, "revs": [_rev("done", 6, 0.4)]})
    assert [r["name"] for r in load_experiments(json.dumps(show))] == ["main", "k0", "k8", "done"]


def test_runs_of_several_commits_count_each_params_set_once():
    first = load_experiments(json.dumps(SHOW))  # main (k 4), k0, k8
    later = json.loads(json.dumps(SHOW))
    later[1]["data"] = _rev("main2", 4, 0.5)["data"]  # the later commit's baseline: the same run again
    later[1]["experiments"] = [{"revs": [_rev("k2", 2, 0.7)]}, {"revs": [_rev("k0-again", 0, 0.6)]}]
    notes = []
    rows = merge_runs([first, load_experiments(json.dumps(later))], say=notes.append)
    assert [r["name"] for r in rows] == ["main", "k0", "k8", "k2"]
    assert len(notes) == 2 and "counted once" in notes[0]
    assert merge_runs([first]) == first  # one commit: nothing merged away


def test_a_param_added_later_takes_its_default_in_older_runs():
    """A run of a commit before a param existed merges with the same run of a later commit whose
    params.yaml has the param at its default; at another value it stays a changed param."""
    first = load_experiments(json.dumps(SHOW))
    later = json.loads(json.dumps(SHOW))
    for rev, value in ((later[1], "none"), (later[1]["experiments"][0]["revs"][0], "free")):
        rev["data"]["params"]["params.yaml"]["data"]["model"] = {"entity_token": value}
    later[1]["data"]["params"]["params.yaml"]["data"]["train"]["lr"] = 0.0003  # 3e-4 as written by `-S`: the same
    rows = merge_runs([first, load_experiments(json.dumps(later))])
    assert [r["name"] for r in rows] == ["main", "k0", "k8", "k0"]  # main again: counted once; k0 + entity token: new
    later[1]["data"]["params"]["params.yaml"]["data"]["prune"]["k"] = 4.0  # an int read back as a float: the same
    assert len(merge_runs([first, load_experiments(json.dumps(later))])) == 4
    assert first[0]["params"]["model"]["entity_token"] == "none"  # filled from elmm.config's default
    assert "entity_token" in markdown_table(rows)
    # a run from before train.loss existed trained eq. 15's bce, not today's default (BEFORE_ADDED)
    assert first[0]["params"]["train"]["loss"] == "bce" != Params().train.loss
    assert first[0]["params"]["pretrain"]["reading_loss"] == "line" != Params().pretrain.reading_loss
    # a run from before evaluate.head_scoring ranked its head queries with their own prompt
    assert first[0]["params"]["evaluate"]["head_scoring"] == "direct" != Params().evaluate.head_scoring
    # and read E_relation at the answer cue, with no answer prefix after it
    assert first[0]["params"]["model"]["answer_prefix"] is False and Params().model.answer_prefix is True


def test_runs_of_two_commits_sharing_a_name_but_not_params_are_two_groups():
    """`-n entity-lr30` queued from two commits with other defaults: two groups, not one with seed 0
    twice; the later one is told apart by its commit."""
    def run(name, rev, seed, where):
        params = {"seed": seed, "model": {"entity_token_at": where}, "train": {"entity_lr_scale": 30.0}}
        return {"name": name, "rev": rev, "params": params, "metrics": {"mrr": 0.1}}

    base = {"name": "main", "rev": "c" * 40, "params": {"seed": 0, "model": {"entity_token_at": "answer"},
                                                         "train": {"entity_lr_scale": 10.0}}, "metrics": {"mrr": 0.1}}
    rows = [base, run("entity-lr30", "a" * 40, 0, "name"), run("entity-lr30", "b" * 40, 0, "answer"),
            run("entity-lr30-s1", "b" * 40, 1, "answer")]
    groups = seed_groups(rows)
    assert [(name, len(members)) for name, _, members in groups] == [
        ("main", 1), ("entity-lr30", 1), ("entity-lr30@bbbbbbb", 2)]
    assert groups[1][1] == "model.entity_token_at=name, train.entity_lr_scale=30.0"
    assert "entity-lr30 | model.entity_token_at=name" in markdown_table(rows, relations=False)


def test_table_shows_changed_params_and_metrics():
    table = markdown_table(load_experiments(json.dumps(SHOW)))
    lines = table.splitlines()
    assert lines[0].startswith("| experiment | changed params | mrr |") and "MRR knows" in lines[0]
    assert "| main | (baseline) | 0.5000 |" in table
    assert "| k0 | prune.k=0 | 0.6000 | 10.0 |" in table and "| 0.3000 |" in lines[3]


def test_sweep_points_sorted_by_param_and_skip_other_ablations():
    show = json.loads(json.dumps(SHOW))
    other = _rev("ablation", 4, 0.01)
    other["data"]["params"]["params.yaml"]["data"]["train"]["lr"] = 1e-3  # same k, another change: not a sweep point
    show[1]["experiments"].append({"revs": [other]})
    points = sweep_rows(load_experiments(json.dumps(show)), "prune.k")
    assert [(p["k"], p["mrr"], p["seeds"], p["mrr_sd"]) for p in points] == [(0, 0.6, 1, 0.0), (4, 0.5, 1, 0.0),
                                                                          (8, 0.2, 1, 0.0)]


def test_sweep_averages_seed_replicates():
    show = json.loads(json.dumps(SHOW))
    show[1]["experiments"] += [{"revs": [_rev("k0-s1", 0, 0.4, seed=1)]}, {"revs": [_rev("k0-s2", 0, 0.5, seed=2)]}]
    points = {p["k"]: p for p in sweep_rows(load_experiments(json.dumps(show)), "prune.k")}
    assert points[0]["seeds"] == 3
    assert points[0]["mrr"] == pytest.approx(0.5)
    assert points[0]["mrr_sd"] == pytest.approx(0.1)  # sample sd of 0.6, 0.4, 0.5
    assert points[4]["seeds"] == 1


def test_seed_table_groups_replicates_and_selects_a_side():
    show = json.loads(json.dumps(SHOW))
    # the replicate listed first names the group, without its -s<seed> suffix
    show[1]["experiments"] = ([{"revs": [_rev("k0-s1", 0, 0.8, seed=1)]}] + show[1]["experiments"]
                              + [{"revs": [_rev("full-s1", 4, 0.3, seed=1)]}])
    rows = load_experiments(json.dumps(show))
    lines = seed_table(rows, side="tail").splitlines()
    assert "MRR knows (tail)" in lines[0]
    by_name = {line.split(" | ")[0].strip("| "): line for line in lines[2:]}
    assert set(by_name) == {"main", "k0", "k8"}
    # main + full-s1: mrr 0.5, 0.3 -> 0.4 +- 0.1414; tail MRR of knows is mrr / 4 -> 0.1 +- 0.0354
    assert "| (baseline) | 0,1 | 0.4000 ± 0.1414 |" in by_name["main"]
    assert by_name["main"].endswith("| 0.1000 ± 0.0354 |")
    assert "| prune.k=0 | 0,1 | 0.7000 ± 0.1414 |" in by_name["k0"]
    assert "| prune.k=8 | 0 | 0.2000 |" in by_name["k8"]
    # Results written before the side split have no tail entry: shown as missing, never as 0.
    k8_rev = next(e["revs"][0] for e in show[1]["experiments"] if e["revs"][0]["name"] == "k8")
    del k8_rev["data"]["metrics"]["metrics/evaluate.json"]["data"]["per_relation"]["knows"]["tail"]
    k8 = [line for line in seed_table(load_experiments(json.dumps(show)), side="tail").splitlines() if "prune.k=8" in line]
    assert k8[0].endswith("| - |")


def test_queue_covers_every_ablation_of_the_paper_and_the_sweep():
    from elmm.experiments import queue_commands

    cmds = queue_commands("prune.k=range(0,9,2)", half_layers=16, layers=32)
    overrides = {c[c.index("-S") + 1] for c in cmds}
    assert "prune.k=32" in overrides  # no-attention, the testbed's positive control (K = L)
    assert {"model.mvtc.image_view=false", "model.mvtc.text_view=false", "model.mvtc.enabled=false", "prune.k=0",
            "prune.compensation=none", "prune.init=zero", "model.head=lm_head", "train.max_steps=0",
            "train.self_denoise=false", "prune.k=range(0,9,2)"} <= overrides
    assert all(c[:4] == ["dvc", "exp", "run", "--queue"] for c in cmds)
    # the compensation methods at K = L/2
    half = {c[c.index("-n") + 1]: c[c.index("-n") + 2:] for c in cmds if "-n" in c and c[c.index("-n") + 1].startswith("half-")}
    assert half == {
        "half-ridge": ["-S", "prune.k=16", "-S", "prune.compensation=ridge", "-S", "prune.init=closed_form"],
        "half-paper": ["-S", "prune.k=16", "-S", "prune.compensation=paper", "-S", "prune.init=closed_form"],
        "half-none": ["-S", "prune.k=16", "-S", "prune.compensation=none"],
        "half-zero-init": ["-S", "prune.k=16", "-S", "prune.compensation=ridge", "-S", "prune.init=zero"]}
    with pytest.raises(SystemExit, match="--layers"):
        queue_commands(None, only=["half-paper"])


def test_queue_skips_runs_that_repeat_the_baseline_or_another_ablation():
    """At the default K = L/2 (ridge, closed form), half-ridge is the baseline and the other half-*
    runs repeat paper-wc, no-linear and no-init, and the entity token's variants at the default
    position and of the default kind (tied too), the default loss's (with the knowledge path too),
    the default pretraining's, the answer prefix's and the path's default N are the baseline: only the
    distinct runs are queued."""
    import yaml

    from elmm.experiments import LR_SWEEP

    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    said = []
    cmds = queue_commands(None, half_layers=base["model"]["tiny"]["layers"] // 2, base_params=base, say=said.append,
                          layers=base["model"]["tiny"]["layers"])
    names = [c[c.index("-n") + 1] for c in cmds]
    assert not any(n.startswith("half-") for n in names) and "no-self-denoise" in names
    knowledge = base["model"]["knowledge"]
    kind = base["model"]["entity_token"]  # its variant (entity-token-free, -relational, -complex) is the baseline too
    assert said == [f"skipping entity-token-{base['model']['entity_token_at']}: the same params as the baseline"] + (
        [f"skipping entity-token-{kind}: the same params as the baseline"] if kind != "none" else []) + (
        # the tied vector (on since 99db1b6)
        ["skipping entity-token-complex-tied: the same params as the baseline"]
        if kind == "complex" and base["model"]["entity_token_tied"] else []) + [
                    f"skipping loss-{base['train']['loss']}: the same params as the baseline"] + (
        ["skipping loss-softmax-knowledge: the same params as the baseline"]
        if base["train"]["loss"] == "softmax" and knowledge["enabled"] else []) + (
        # the pretraining's variant that is the default (reading-both since it was measured)
        [f"skipping reading-{pre['reading_loss']}: the same params as the baseline"]
        if ((pre := base["pretrain"])["reading_loss"], pre["reading_share"], pre["steps"]) in (("line", 0.5, 400),
                                                                                   ("both", 0.8, 600)) else []) + [
        # the answer prefix's variant that is the default (on since it was measured)
        f"skipping {'' if base['model']['answer_prefix'] else 'no-'}answer-prefix: the same params as the baseline"] + (
        # the weight-decay variant that is the default (0.3 since it was measured)
        [f"skipping {'weight-decay' if base['train']['weight_decay'] == 0.3 else 'no-weight-decay'}: the same params "
         "as the baseline"] if base["train"]["weight_decay"] in (0, 0.3) else []) + [
                    "skipping half-ridge: the same params as the baseline",
                    "skipping half-paper: the same params as paper-wc", "skipping half-none: the same params as no-linear",
                    "skipping half-zero-init: the same params as no-init"] + (
        [] if knowledge["enabled"] else ["skipping no-knowledge: the same params as the baseline"]) + (
        # at the softmax default, the path at its defaults (triples-10) is the run loss-softmax-knowledge
        # names, or the baseline itself when the path is on
        ["skipping triples-10: the same params as loss-softmax-knowledge"]
        if base["train"]["loss"] == "softmax" and not knowledge["enabled"] else
        ["skipping triples-10: the same params as the baseline"]
        if knowledge["enabled"] and (knowledge["max_triples"], knowledge["seed_triples"]) == (10, 5) else [])
    # A baseline at another K queues them.
    other = queue_commands(None, half_layers=4, base_params={**base, "prune": {**base["prune"], "k": 2}}, layers=8)
    assert sum(c[c.index("-n") + 1].startswith("half-") for c in other) == 4
    # The paper's lr grid, as one queued sweep (Hydra's comma list).
    (lr,) = queue_commands(LR_SWEEP, only=["full"])
    assert lr == ["dvc", "exp", "run", "--queue", "-S", "train.lr=1e-4,2e-4,3e-4,5e-4,8e-4,1e-3"]


def test_queue_replicates_over_seeds():
    cmds = queue_commands("prune.k=range(0,9,2)", seeds=[0, 1], only=["full", "no-text-view"])
    names = [c[c.index("-n") + 1] if "-n" in c else None for c in cmds]
    # seed 0 is the committed baseline: no `full` run for it
    assert names == ["no-text-view", None, "full-s1", "no-text-view-s1", None]
    assert cmds[3][-4:] == ["-S", "model.mvtc.text_view=false", "-S", "seed=1"]
    assert cmds[4][-4:] == ["-S", "prune.k=range(0,9,2)", "-S", "seed=1"]
    with pytest.raises(SystemExit, match="unknown ablation"):
        queue_commands(None, only=["no-such-thing"])


# ---------------------------------------------------------------------------- paired comparisons
def test_paired_differences_by_hand():
    """Reciprocal-rank and Hits@1 differences of 3 queries (realistic ranks, a - b)."""
    from elmm.experiments import paired_differences

    keys = {"query": np.arange(3), "relation": np.array([0, 0, 1]), "direction": np.array(["tail", "head", "tail"]),
            "anchor": np.array([5, 6, 7]), "target": np.array([1, 2, 3])}
    a = {**keys, "rank": np.array([1.0, 2.0, 4.0])}
    b = {**keys, "rank": np.array([2.0, 2.0, 1.0])}
    d = paired_differences(a, b)
    assert d["mrr"].tolist() == [0.5, 0.0, -0.75]
    assert d["hits_at_1"].tolist() == [1.0, 0.0, -1.0]
    other = {**b, "target": np.array([1, 2, 4])}  # another world: not the same queries
    with pytest.raises(ValueError, match="'target'"):
        paired_differences(a, other)


def _independent_bootstrap(diffs_by_seed, resamples, seed, block=100):
    """The same resampling written out resample by resample, and the percentiles by hand."""
    rng = np.random.default_rng(seed)
    total = sum(len(d) for d in diffs_by_seed)
    means = []
    for lo in range(0, resamples, block):
        rows = min(block, resamples - lo)
        draws = [rng.integers(0, len(d), (rows, len(d))) for d in diffs_by_seed]
        for r in range(rows):
            pooled = [d[i] for d, idx in zip(diffs_by_seed, draws) for i in idx[r]]
            means.append(sum(pooled) / total)
    means.sort()

    def percentile(q):
        pos = q / 100 * (len(means) - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, len(means) - 1)
        return means[lo] + (pos - lo) * (means[hi] - means[lo])

    return percentile(2.5), percentile(97.5)


def test_bootstrap_interval_hand_computed_and_independent():
    from elmm.experiments import bootstrap_interval

    # 3 queries with differences 0, 1, 2: the mean is 1; a resample of all 0s (or all 2s) has
    # probability 1/27 > 2.5%, so the 95% interval is exactly [0, 2].
    assert bootstrap_interval([np.array([0.0, 1.0, 2.0])]) == (1.0, 0.0, 2.0)
    # All differences equal: a zero-width interval at that value.
    assert bootstrap_interval([np.full(5, 0.25), np.full(3, 0.25)]) == (0.25, 0.25, 0.25)
    # Two seeds pooled (resampled within each seed): the same numbers as an independent computation.
    diffs = [np.array([0.5, 0.0, -0.75, 0.2]), np.array([1.0, -0.5, 0.1])]
    mean, low, high = bootstrap_interval(diffs, resamples=500, seed=3)
    assert mean == pytest.approx(np.concatenate(diffs).mean())
    assert (low, high) == pytest.approx(_independent_bootstrap(diffs, 500, 3), abs=1e-12)
    assert low < mean < high
    assert bootstrap_interval(diffs, resamples=500, seed=3) == (mean, low, high)  # fixed RNG seed: reproducible


def _rank_table(ranks, target_shift=0):
    n = len(ranks)
    return {"query": np.arange(n), "relation": np.zeros(n, dtype=int), "direction": np.array(["tail"] * n),
            "anchor": np.arange(n), "target": np.arange(n) + target_shift, "rank": np.array(ranks, dtype=float)}


def test_seed_table_with_baseline_prints_the_paired_difference():
    """--baseline: next to each group's MRR and Hits@1, the bootstrap difference to the baseline
    group, paired by seed (each seed its own world: the queries differ between seeds)."""
    from elmm.experiments import bootstrap_interval

    show = json.loads(json.dumps(SHOW))
    show[1]["experiments"] = [{"revs": [_rev("k0", 0, 0.6)]}, {"revs": [_rev("k0-s1", 0, 0.7, seed=1)]},
                              {"revs": [_rev("full-s1", 4, 0.4, seed=1)]}, {"revs": [_rev("k8-s2", 8, 0.1, seed=2)]}]
    rows = load_experiments(json.dumps(show))
    assert {r["name"]: r["rev"] for r in rows}["k0-s1"] == "k0-s1-rev"
    tables = {"main-rev": _rank_table([1, 2, 4]), "full-s1-rev": _rank_table([2, 1], target_shift=5),
              "k0-rev": _rank_table([1, 1, 2]), "k0-s1-rev": _rank_table([1, 3], target_shift=5),
              "k8-s2-rev": _rank_table([9, 9])}
    read = lambda row: tables[row["rev"]]  # noqa: E731
    table = seed_table(rows, relations=False, baseline="main", read=read, resamples=200)
    lines = table.splitlines()
    assert lines[0].split(" | ")[3:7] == ["mrr", "Δmrr vs main (95% CI)", "mr", "hits_at_1"]
    assert lines[0].split(" | ")[7] == "Δhits_at_1 vs main (95% CI)"
    by_name = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in lines[2:]}
    assert by_name["main"][4] == "(baseline)" and by_name["main"][7] == "(baseline)"
    # k0 - main: seed 0 RR [1, 1, .5] - [1, .5, .25]; seed 1 RR [1, 1/3] - [.5, 1]
    rr = [np.array([0.0, 0.5, 0.25]), np.array([0.5, 1 / 3 - 1])]
    hits = [np.array([0.0, 1.0, 0.0]), np.array([1.0, -1.0])]
    mrr_cell = "{:+.4f} [{:+.4f}, {:+.4f}]".format(*bootstrap_interval(rr, 200))
    hits_cell = "{:+.4f} [{:+.4f}, {:+.4f}]".format(*bootstrap_interval(hits, 200))
    assert by_name["k0"][4] == mrr_cell and by_name["k0"][7] == hits_cell
    assert by_name["k8"][4] == "- (no common seed)"
    with pytest.raises(SystemExit, match="no experiment group named 'nope'"):
        seed_table(rows, baseline="nope", read=read)


def test_comparison_rows_are_the_seed_table_as_csv_rows(tmp_path):
    """Table --out: the same groups, means and paired intervals as the markdown, one CSV row each."""
    from elmm.experiments import comparison_rows
    from elmm.io import write_csv_rows

    show = json.loads(json.dumps(SHOW))
    show[1]["experiments"] = [{"revs": [_rev("k0", 0, 0.6)]}, {"revs": [_rev("k0-s1", 0, 0.7, seed=1)]},
                              {"revs": [_rev("full-s1", 4, 0.4, seed=1)]}]
    rows = load_experiments(json.dumps(show))
    tables = {"main-rev": _rank_table([1, 2, 4]), "full-s1-rev": _rank_table([2, 1], target_shift=5),
              "k0-rev": _rank_table([1, 1, 2]), "k0-s1-rev": _rank_table([1, 3], target_shift=5)}
    read = lambda row: tables[row["rev"]]  # noqa: E731
    points = {p["experiment"]: p for p in comparison_rows(rows, "main", read=read, resamples=200)}
    table = seed_table(rows, relations=False, baseline="main", read=read, resamples=200)
    by_name = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()[2:]}
    k0 = points["k0"]
    assert by_name["k0"][4] == "{:+.4f} [{:+.4f}, {:+.4f}]".format(k0["delta_mrr"], k0["delta_mrr_low"],
                                                                    k0["delta_mrr_high"])
    assert k0["seeds"] == 2 and k0["paired_seeds"] == "0 1" and k0["changed"] == "prune.k=0"
    assert k0["mrr"] == pytest.approx((0.6 + 0.7) / 2)
    base = points["main"]  # paired with itself: every difference 0
    assert base["changed"] == "(baseline)" and base["delta_hits_at_1"] == 0.0 and base["delta_mrr_high"] == 0.0
    # only: the named groups and the baseline, in both outputs
    assert [p["experiment"] for p in comparison_rows(rows, "k0", read=read, resamples=50, only=["k0"])] == ["k0"]
    assert [p["experiment"] for p in comparison_rows(rows, "main", read=read, resamples=50, only=["k0"])] == [
        "main", "k0"]
    only_table = seed_table(rows, relations=False, baseline="k0", read=read, resamples=50, only=["main"])
    assert [line.split(" | ")[0].strip("| ") for line in only_table.splitlines()[2:]] == ["main", "k0"]
    with pytest.raises(SystemExit, match="no experiment group named 'nope'"):
        comparison_rows(rows, "main", read=read, only=["nope"])
    write_csv_rows(tmp_path / "a.csv", list(points.values()))
    header = (tmp_path / "a.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["experiment", "changed", "seeds"] and "delta_hits_at_1_low" in header


def test_rank_table_round_trip(tmp_path):
    from elmm.rank_table import COLUMNS, read_rank_table, write_rank_table

    write_rank_table(tmp_path / "r.csv", [3, 0], [0, 1], [17, 4], [52, 9], [2.5, 14540.5], [2, 14000], [3, 14081])
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines == [",".join(COLUMNS), "0,3,tail,17,52,2.5,2,3", "1,0,head,4,9,14540.5,14000,14081"]
    table = read_rank_table(tmp_path / "r.csv")
    assert table["rank"].tolist() == [2.5, 14540.5] and table["direction"].tolist() == ["tail", "head"]
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="expected the header"):
        read_rank_table(tmp_path / "bad.csv")


def test_knowledge_ablations_enable_the_path_themselves():
    """Written relative to a default with the path on, they mean the same whatever the default is."""
    from elmm.config import from_dict
    from elmm.experiments import ABLATIONS

    assert ABLATIONS["no-knowledge"] == ["model.knowledge.enabled=false"]
    variants = ["no-alignment", "gat", "gcn", "graph-candidates", "keep-reverse"] + [f"triples-{n}" for n in (5, 10, 20, 40)]
    for name in variants:
        assert ABLATIONS[name][0] == "model.knowledge.enabled=true", name
    assert "model.knowledge.align_lambda=0" in ABLATIONS["no-alignment"]
    assert "model.knowledge.conv=gcn" in ABLATIONS["gcn"]
    for n in (5, 10, 20, 40):  # every sweep point is a valid params set
        raw = {"model": {"knowledge": {}}}
        for override in ABLATIONS[f"triples-{n}"]:
            key, value = override.split("=")
            raw["model"]["knowledge"][key.split(".")[-1]] = value == "true" or int(value)
        assert from_dict(raw).model.knowledge.max_triples == n


def test_every_ablation_overrides_known_params_with_valid_values():
    """A typo in an override's key or value would only show when its queued run fails: each ablation
    applied to params.yaml must name existing keys and pass the config's validation."""
    import yaml

    from elmm.config import from_dict, validate
    from elmm.experiments import ABLATIONS, resolve_overrides

    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    layers = base["model"]["tiny"]["layers"]
    for name, overrides in ABLATIONS.items():
        raw = copy.deepcopy(base)
        for o in resolve_overrides(overrides, layers // 2, layers):
            key, value = o.split("=", 1)
            *parents, leaf = key.split(".")
            node = raw
            for part in parents:
                node = node[part]
            assert leaf in node, f"{name}: {key} is not in params.yaml"
            node[leaf] = yaml.safe_load(value)
        validate(from_dict(raw), num_layers=layers)


def test_sweep_against_one_value_pairs_each_point_by_seed():
    """--against: every sweep point's bootstrap difference to one point, over the seeds both ran."""
    from elmm.experiments import bootstrap_interval

    show = json.loads(json.dumps(SHOW))  # main (k 4, seed 0), k0, k8 (seed 0)
    show[1]["experiments"] += [{"revs": [_rev("k0-s1", 0, 0.4, seed=1)]}, {"revs": [_rev("k8-s2", 8, 0.1, seed=2)]}]
    tables = {"main-rev": _rank_table([1, 2, 4]), "k0-rev": _rank_table([1, 1, 2]), "k8-rev": _rank_table([4, 4, 4]),
              "k0-s1-rev": _rank_table([3, 1], target_shift=5), "k8-s2-rev": _rank_table([9, 9])}
    points = {p["k"]: p for p in sweep_rows(load_experiments(json.dumps(show)), "prune.k", against=0,
                                            read=lambda row: tables[row["rev"]], resamples=200)}
    assert points[0]["delta_mrr"] == 0.0 and points[0]["paired_seeds"] == "0 1"
    # k4 - k0 at seed 0 only: RR [1, .5, .25] - [1, 1, .5]
    mean, low, high = bootstrap_interval([np.array([0.0, -0.5, -0.25])], 200)
    assert (points[4]["delta_mrr"], points[4]["delta_mrr_low"], points[4]["delta_mrr_high"]) == (
        round(mean, 6), round(low, 6), round(high, 6))
    assert points[4]["delta_hits_at_1"] == pytest.approx(-1 / 3) and points[4]["paired_seeds"] == "0"
    # k8 at seeds 0 and 2; k0 at 0 and 1: paired over seed 0 only
    assert points[8]["paired_seeds"] == "0" and points[8]["delta_mrr"] == pytest.approx((0.25 - 1 + 0.25 - 1 + 0.25 - 0.5) / 3)
    with pytest.raises(SystemExit, match="no sweep point has prune.k = 3"):
        sweep_rows(load_experiments(json.dumps(show)), "prune.k", against=3, read=lambda row: tables[row["rev"]])


def test_only_seeds_keeps_the_runs_of_those_seeds():
    from elmm.experiments import only_seeds

    show = json.loads(json.dumps(SHOW))
    show[1]["experiments"] += [{"revs": [_rev("k0-s1", 0, 0.4, seed=1)]}, {"revs": [_rev("main-s1", 4, 0.3, seed=1)]}]
    rows = load_experiments(json.dumps(show))
    assert [r["name"] for r in only_seeds(rows, [1])] == ["k0-s1", "main-s1"]
    points = {p["k"]: p for p in sweep_rows(only_seeds(rows, [0]), "prune.k")}
    assert points[0]["seeds"] == 1 and points[0]["mrr"] == 0.6 and points[4]["mrr"] == 0.5
