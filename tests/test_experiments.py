"""elmm.experiments reads `dvc exp show --json` rows into the ablation table and sweep points."""

import json

import pytest

from elmm.experiments import load_experiments, markdown_table, queue_commands, seed_table, sweep_rows


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

    cmds = queue_commands("prune.k=range(0,9,2)")
    overrides = {c[c.index("-S") + 1] for c in cmds}
    assert {"model.mvtc.image_view=false", "model.mvtc.text_view=false", "model.mvtc.enabled=false", "prune.k=0",
            "prune.compensation=none", "prune.init=zero", "model.head=lm_head", "train.max_steps=0",
            "prune.k=range(0,9,2)"} <= overrides
    assert all(c[:4] == ["dvc", "exp", "run", "--queue"] for c in cmds)


def test_queue_replicates_over_seeds():
    cmds = queue_commands("prune.k=range(0,9,2)", seeds=[0, 1], only=["full", "no-text-view"])
    names = [c[c.index("-n") + 1] if "-n" in c else None for c in cmds]
    # seed 0 is the committed baseline: no `full` run for it
    assert names == ["no-text-view", None, "full-s1", "no-text-view-s1", None]
    assert cmds[3][-4:] == ["-S", "model.mvtc.text_view=false", "-S", "seed=1"]
    assert cmds[4][-4:] == ["-S", "prune.k=range(0,9,2)", "-S", "seed=1"]
    with pytest.raises(SystemExit, match="unknown ablation"):
        queue_commands(None, only=["no-such-thing"])


def test_knowledge_ablations_enable_the_path_themselves():
    """Written relative to a default with the path on, they mean the same whatever the default is."""
    from elmm.config import from_dict
    from elmm.experiments import ABLATIONS

    assert ABLATIONS["no-knowledge"] == ["model.knowledge.enabled=false"]
    variants = ["no-alignment", "gat", "gcn"] + [f"triples-{n}" for n in (5, 10, 20, 40)]
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
