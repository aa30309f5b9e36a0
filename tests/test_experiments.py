"""elmm.experiments reads `dvc exp show --json` rows into the ablation table and sweep points."""

import json

from elmm.experiments import load_experiments, markdown_table, sweep_rows


def _rev(name, k, mrr, running=False):
    metrics = {"mr": 10.0, "mrr": mrr, "hits_at_1": 0.1, "hits_at_3": 0.2, "hits_at_10": 0.3,
               "per_relation": {"knows": {"mrr": mrr / 2}}}
    return {"rev": f"{name}-rev", "name": name, "data": {
        "rev": "workspace" if running else f"{name}-rev", "timestamp": None if running else "2026-11-23T09:00:00",
        "params": {"params.yaml": {"data": {"prune": {"k": k}, "seed": 0}}},
        "metrics": {"metrics/evaluate.json": {"data": metrics}}}}


SHOW = [
    {"rev": "workspace", "name": None, "data": _rev("ws", 4, 0.9)["data"], "experiments": None},
    {"rev": "abc", "name": "main", "data": _rev("main", 4, 0.5)["data"], "experiments": [
        {"revs": [_rev("k0", 0, 0.6)]}, {"revs": [_rev("k8", 8, 0.2)]}, {"revs": [_rev("busy", 2, 0.99, running=True)]}]},
]


def test_rows_skip_workspace_and_unfinished_experiments():
    rows = load_experiments(json.dumps(SHOW))
    assert [r["name"] for r in rows] == ["main", "k0", "k8"]


def test_table_shows_changed_params_and_metrics():
    table = markdown_table(load_experiments(json.dumps(SHOW)))
    lines = table.splitlines()
    assert lines[0].startswith("| experiment | changed params | mrr |") and "MRR knows" in lines[0]
    assert "| main | (baseline) | 0.5000 |" in table
    assert "| k0 | prune.k=0 | 0.6000 | 10.0 |" in table and "| 0.3000 |" in lines[3]


def test_sweep_points_sorted_by_param_and_skip_other_ablations():
    show = json.loads(json.dumps(SHOW))
    other = _rev("ablation", 4, 0.01)
    other["data"]["params"]["params.yaml"]["data"]["seed"] = 1  # same k, another change: not a sweep point
    show[1]["experiments"].append({"revs": [other]})
    points = sweep_rows(load_experiments(json.dumps(show)), "prune.k")
    assert [(p["k"], p["mrr"]) for p in points] == [(0, 0.6), (4, 0.5), (8, 0.2)]


def test_queue_covers_every_ablation_of_the_paper_and_the_sweep():
    from elmm.experiments import queue_commands

    cmds = queue_commands("prune.k=range(0,9,2)")
    overrides = {c[c.index("-S") + 1] for c in cmds}
    assert {"model.mvtc.image_view=false", "model.mvtc.text_view=false", "model.mvtc.enabled=false", "prune.k=0",
            "prune.compensation=none", "prune.init=zero", "model.head=lm_head", "train.max_steps=0",
            "prune.k=range(0,9,2)"} <= overrides
    assert all(c[:4] == ["dvc", "exp", "run", "--queue"] for c in cmds)
