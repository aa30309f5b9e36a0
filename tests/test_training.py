"""Training at scale and the ranking pass: determinism, resume, DDP, hard negatives, the faiss index.

The stage tests run stages/train.py and stages/evaluate.py in a micro project (conftest
`make_project`): 54 entities, 156 training triples (312 queries), a 3-layer backbone with layer 1
pruned. The DDP test launches 2 CPU processes with torchrun (gloo on 127.0.0.1).
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.testing import assert_close

from elmm import training
from elmm.checkpointing import training_fingerprint
from elmm.distributed import Dist
from elmm.kg.queries import FilterIndex, queries_from_triples
from elmm.model_io import build_model, set_trainable
from elmm.seeds import derive_seed
from elmm.training import TrainingInterrupted, lr_lambda, train_model

ROOT = Path(__file__).resolve().parents[1]

# 312 queries / (16 x 2) -> 10 steps per epoch, 20 in all.
TRAIN = {"epochs": 2, "batch_size": 16, "grad_accum": 2, "negatives": 4, "warmup_steps": 2, "lr": 0.002,
         "checkpoint_every": 3, "lora": {"r": 4, "alpha": 8, "dropout": 0.1}}
UNIFORM = {"train": TRAIN, "evaluate": {"batch_size": 16, "index": "hnsw", "index_k": 5}}
# bce with hard negatives: the sampled-negative path (UNIFORM runs the default loss, softmax)
HARD = {"train": {**TRAIN, "loss": "bce", "hard_negatives": "faiss", "hard_negatives_pool": 6, "hard_negatives_refresh": 4},
        "evaluate": {"batch_size": 16}}


# ---------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 spinning OpenMP threads per run are far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tensors(project: Path) -> dict[str, torch.Tensor]:
    out = load_file(str(project / "data/model/elmm.safetensors"))
    adapter = project / "data/model/adapter_model.safetensors"
    if adapter.exists():
        out.update({f"adapter.{k}": v for k, v in load_file(str(adapter)).items()})
    return out


def curves(project: Path) -> dict[str, list]:
    """metrics/train/plots/metrics/*.tsv without the timestamp column, plus metrics.json."""
    out = {"metrics.json": json.loads((project / "metrics/train/metrics.json").read_text())}
    for tsv in sorted((project / "metrics/train/plots/metrics").rglob("*.tsv")):
        lines = [line.split("\t") for line in tsv.read_text().splitlines()]
        keep = [i for i, col in enumerate(lines[0]) if col != "timestamp"]
        out[str(tsv.relative_to(project))] = [[row[i] for i in keep] for row in lines]
    return out


def evaluation(project: Path) -> dict:
    """metrics/evaluate.json without the timing figures (they are wall-clock measurements)."""
    ev = json.loads((project / "metrics/evaluate.json").read_text())
    ev.pop("efficiency")
    for key in ("build_seconds", "ms_per_query", "flat_ms_per_query"):
        ev["index"].pop(key, None)
    return ev


def set_params(project: Path, **train) -> None:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["train"].update(train)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def fresh(make_project, run_stage):
    """Uninterrupted train + evaluate runs, one per params set, built on first use."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            project = make_project({"uniform": UNIFORM, "hard": HARD}[name])
            run_stage("train", project)
            run_stage("evaluate", project)
            cache[name] = project
        return cache[name]

    return get


# ---------------------------------------------------------------------------------------- pieces
def test_entity_tables_get_their_own_learning_rate(make_workspace, micro_env) -> None:
    """train.entity_lr_scale: the completion rows, the entity tokens and their relation scales in a group at lr x scale, the
    rest at lr; at 1 one group, as before the option existed. The scheduler scales both alike."""
    import dataclasses

    from elmm.model import ELMM, ELMMConfig
    from elmm.training import param_groups

    ws = make_workspace()
    model = ELMM(ws.backbone, ELMMConfig(num_entities=ws.kg.num_entities, heads=2, entity_token="relational",
                                         num_relations=ws.kg.num_relations))
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("llm.")]
    tp = micro_env.params.train
    assert len(param_groups(named, dataclasses.replace(tp, entity_lr_scale=1.0))) == 1
    groups = param_groups(named, dataclasses.replace(tp, entity_lr_scale=10.0))
    tables = {id(model.completion.entities.weight), id(model.completion.entities.bias), id(model.entity_tokens),
              id(model.relation_scales)}
    assert {id(p) for p in groups[1]["params"]} == tables and groups[1]["lr"] == tp.lr * 10
    assert not tables & {id(p) for p in groups[0]["params"]} and "lr" not in groups[0]
    opt = torch.optim.AdamW(groups, lr=tp.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(4, 20))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([tp.lr / 4, tp.lr * 10 / 4])
    sched.step()
    assert opt.param_groups[1]["lr"] / opt.param_groups[0]["lr"] == pytest.approx(10)


def test_lr_schedule_warmup_then_cosine() -> None:
    f = lr_lambda(4, 20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(12) == pytest.approx(0.5) and f(20) == pytest.approx(0.0) and f(30) == pytest.approx(0.0)


def test_derive_seed_is_stable_and_distinct() -> None:
    assert derive_seed(0, 1, 5) == derive_seed(0, 1, 5)
    seeds = {derive_seed(0, purpose, step) for purpose in (1, 2, 3) for step in range(100)}
    assert len(seeds) == 300 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(-1, 2) >= 0  # negative seeds are fine


@pytest.mark.parametrize("n, world", [(9, 2), (1, 2), (7, 3), (16, 4)])
def test_rank_slices_partition_every_batch(n: int, world: int) -> None:
    rows = [list(range(*Dist(rank, world, rank, True).slice(n))) for rank in range(world)]
    assert sum(rows, []) == list(range(n))
    assert max(map(len, rows)) - min(map(len, rows)) <= 1


@pytest.mark.parametrize("loss, function", [("bce", "elmm_loss"), ("softmax", "softmax_loss")])
def test_non_finite_loss_stops_naming_the_step(make_workspace, micro_env, monkeypatch, loss, function) -> None:
    ws = make_workspace()
    model = build_model(ws, seed=0)
    set_trainable(model)
    queries = queries_from_triples(ws.kg.triples["train"])
    tp = copy.deepcopy(micro_env.params.train)  # the session params are shared: never mutate them
    tp.batch_size, tp.max_steps, tp.loss = 16, 5, loss
    calls = {"n": 0}
    real = getattr(training, function)

    def poisoned(*args):
        calls["n"] += 1
        value = real(*args)
        return value * float("nan") if calls["n"] == 3 else value  # the third micro-batch = step 3

    monkeypatch.setattr(training, function, poisoned)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss \(nan\) at step 3;"):
        train_model(model, ws, queries, FilterIndex(ws.kg.triples["train"], ws.kg.num_entities), tp, seed=0,
                    progress=False)


@pytest.mark.parametrize("loss", ["bce", "softmax"])
def test_softmax_loss_moves_every_entity_row(make_workspace, micro_env, loss) -> None:
    """One step of train.loss: softmax updates every completion row (each entity is in the normaliser);
    bce only the rows of the targets and their sampled negatives."""
    ws = make_workspace()
    model = build_model(ws, seed=0)
    set_trainable(model)
    queries = queries_from_triples(ws.kg.triples["train"])
    tp = copy.deepcopy(micro_env.params.train)
    tp.loss, tp.batch_size, tp.max_steps, tp.negatives, tp.weight_decay = loss, 4, 1, 2, 0.0
    before = model.completion.entities.weight.detach().clone()
    summary = train_model(model, ws, queries, FilterIndex(ws.kg.triples["train"], ws.kg.num_entities), tp, seed=0,
                          progress=False)
    moved = (model.completion.entities.weight.detach() != before).any(1)
    assert summary["steps"] == 1 and math.isfinite(summary["final_loss"])
    if loss == "softmax":
        assert moved.all()
    else:  # 4 queries x (target + 2 negatives + the anchor) rows at most
        assert 0 < int(moved.sum()) <= 16 < ws.kg.num_entities


@pytest.mark.parametrize("self_denoise", [True, False])
def test_softmax_self_denoise_decides_whether_the_anchor_leaves_the_normaliser(make_workspace, micro_env, monkeypatch,
                                                                                self_denoise) -> None:
    """train.self_denoise: false hands the batch's anchors to softmax_loss (they leave the normaliser); true none.
    train.label_smoothing reaches it as given."""
    ws = make_workspace()
    model = build_model(ws, seed=0)
    set_trainable(model)
    queries = queries_from_triples(ws.kg.triples["train"])
    tp = copy.deepcopy(micro_env.params.train)
    tp.loss, tp.self_denoise, tp.batch_size, tp.max_steps = "softmax", self_denoise, 8, 1
    tp.label_smoothing = 0.0 if self_denoise else 0.2
    seen, smoothing = [], []
    real = training.softmax_loss

    def spy(scores, targets, known, anchors=None, label_smoothing=0.0):
        seen.append(anchors)
        smoothing.append(label_smoothing)
        return real(scores, targets, known, anchors, label_smoothing)

    monkeypatch.setattr(training, "softmax_loss", spy)
    train_model(model, ws, queries, FilterIndex(ws.kg.triples["train"], ws.kg.num_entities), tp, seed=0,
                progress=False)
    first = queries.subset(torch.as_tensor(training.epoch_order(len(queries), 0, 0)[:8]))
    assert len(seen) == 1
    assert seen[0] is None if self_denoise else torch.equal(seen[0].cpu(), first.anchors)
    assert smoothing == [tp.label_smoothing]


def test_early_stopping_keeps_the_best_epoch(make_workspace, micro_env) -> None:
    """Validation gets worse after the start: with patience 2 training stops after 2 epochs (of 5)
    and the weights are those of epoch 0, the best."""
    ws = make_workspace()
    model = build_model(ws, seed=0)
    set_trainable(model)
    queries = queries_from_triples(ws.kg.triples["train"])
    tp = copy.deepcopy(micro_env.params.train)
    tp.batch_size, tp.epochs, tp.patience, tp.lr = 64, 5, 2, 0.01
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    seen = []

    def validate(epoch: int) -> dict:
        seen.append(epoch)
        return {"mrr": 1.0 if epoch == 0 else 0.5, "hits_at_1": 0.0, "hits_at_10": 0.0}

    summary = train_model(model, ws, queries, FilterIndex(ws.kg.triples["train"], ws.kg.num_entities), tp, seed=0,
                          validate=validate, progress=False)
    steps_per_epoch = -(-len(queries) // 64)
    assert seen == [0, 1, 2] and summary["stopped_early"] == 2 and summary["steps"] == 2 * steps_per_epoch
    assert summary["best_epoch"] == 0
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------- stages
def test_same_params_give_the_same_metrics_twice(fresh, make_project, run_stage) -> None:
    again = make_project(UNIFORM)
    run_stage("train", again)
    run_stage("evaluate", again)
    first = fresh("uniform")
    assert curves(again) == curves(first)
    assert evaluation(again) == evaluation(first)
    a, b = tensors(first), tensors(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["uniform", "hard"])
def test_interrupted_run_resumes_to_the_same_result(name, fresh, make_project, run_stage, capsys) -> None:
    project = make_project({"uniform": UNIFORM, "hard": HARD}[name])
    # Killed after step 5: the last checkpoint is step 3, so steps 4-5 are redone on resume.
    with pytest.raises(TrainingInterrupted):
        run_stage("train", project, stop_after_steps=5)
    state = json.loads((project / "data/checkpoints/last/state.json").read_text())
    assert state["step"] == 3 and (project / "data/checkpoints/.gitignore").read_text().strip().endswith("*")
    assert (project / "data/checkpoints/last/negatives.safetensors").exists() == (name == "hard")
    capsys.readouterr()
    run_stage("train", project)
    assert "resuming from data/checkpoints/last at step 3 of 20" in capsys.readouterr().out
    run_stage("evaluate", project)
    reference = fresh(name)
    a, b = tensors(reference), tensors(project)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    assert curves(project) == curves(reference)
    assert evaluation(project) == evaluation(reference)
    assert not (project / "data/checkpoints/last").exists()  # a finished run leaves nothing to resume


def test_mismatching_checkpoint_is_ignored(make_project, run_stage, capsys) -> None:
    project = make_project(UNIFORM)
    with pytest.raises(TrainingInterrupted):
        run_stage("train", project, stop_after_steps=3)
    set_params(project, lr=0.001, max_steps=4)
    capsys.readouterr()
    run_stage("train", project)
    out = capsys.readouterr().out
    assert "ignoring data/checkpoints/last: written for other params, inputs or code" in out
    assert "resuming" not in out
    summary = json.loads((project / "metrics/train/metrics.json").read_text())
    assert summary["steps"] == 4 and summary["train"]["lr"] == pytest.approx(0.0)
    # The summary carries the trainable parameters per component (elmm.param_count).
    counts = summary["parameters"]
    saved = json.loads((project / "data/model/config.json").read_text())
    assert {"mvtc_text", "mvtc_image", "completion", "lora", "compensation"} <= set(counts)
    assert counts["trainable"] == saved["trainable_parameters"] == saved["parameters"]["trainable"]
    assert counts["trainable"] == sum(v for k, v in counts.items() if k not in ("trainable", "frozen"))


def test_checkpoint_every_does_not_change_the_fingerprint(micro_env) -> None:
    p = copy.deepcopy(micro_env.params)
    a = training_fingerprint(p, [])
    p.train.checkpoint_every += 7
    assert training_fingerprint(p, []) == a
    p.train.lr *= 2
    assert training_fingerprint(p, []) != a


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process(make_project, run_stage) -> None:
    """torchrun, 2 CPU processes (gloo): the same weights as one process with the same global batch."""
    # 312 queries in micro-batches of 311 -> 2 steps; the last has one row, so one rank's slice is empty.
    overrides = {"train": {**TRAIN, "epochs": 1, "batch_size": 311, "grad_accum": 1,
                           "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
                 "evaluate": {"batch_size": 16}}
    single, ddp = make_project(overrides), make_project(overrides)
    run_stage("train", single)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(ROOT / "stages" / "train.py")]
    proc = subprocess.run(cmd, cwd=ddp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size 2" in proc.stdout and proc.stdout.count("train: epoch 1 valid") == 1  # rank 0 only
    config = json.loads((ddp / "data/model/config.json").read_text())
    assert config["best_epoch"] == 1 and config["summary"]["steps"] == 2  # trained weights, not the initial ones
    assert json.loads((single / "data/model/config.json").read_text())["best_epoch"] == 1
    a, b = tensors(single), tensors(ddp)
    assert a.keys() == b.keys()
    for k in a:
        assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    loss_single = [float(r[-1]) for r in curves(single)["metrics/train/plots/metrics/train/loss.tsv"][1:]]
    loss_ddp = [float(r[-1]) for r in curves(ddp)["metrics/train/plots/metrics/train/loss.tsv"][1:]]
    assert len(loss_ddp) == 2  # logged once, by rank 0
    assert loss_ddp == pytest.approx(loss_single, rel=1e-5)


def test_evaluate_json_has_every_field(fresh) -> None:
    ev = json.loads((fresh("uniform") / "metrics/evaluate.json").read_text())
    for key in ("mr", "mrr", "hits_at_1", "hits_at_3", "hits_at_10", "mrr_optimistic", "mrr_pessimistic", "mrr_gap",
                "amr", "candidates", "filtered_candidates_mean", "queries", "head", "tail", "per_relation", "ranks"):
        assert key in ev, key
    assert ev["candidates"] == 54 and ev["queries"] == 40
    assert ev["mrr_optimistic"] >= ev["mrr"] >= ev["mrr_pessimistic"]
    assert ev["ranks"] == {"kind": "realistic", "tie_atol": 1e-5, "tie_rtol": 1e-4, "filter": "train+valid+test"}
    eff = ev["efficiency"]
    assert eff["image_tokens_per_query"] == 4 and eff["image_tokens_without_mvtc"] == 3 * 4  # 3 images x 2x2 patches
    assert eff["queries_per_second"] > 0 and eff["ms_per_query"] >= eff["forward_ms_per_query"] > 0
    index = ev["index"]
    assert index["kind"] == "hnsw" and index["k"] == 5 and index["dim"] == 3 * 32 + 1
    assert index["flat_recall_at_k"] == pytest.approx(1.0) and 0.8 <= index["recall_at_k"] <= 1.0
    info = json.loads((fresh("uniform") / "data/index/index.json").read_text())
    assert info["files"] == ["entities.faiss", "entities-hnsw.faiss"] and info["bias_folded"]
    # a cached output: no wall-clock figures, so the same model gives the same bytes
    assert info["recall_at_k"] == index["recall_at_k"] and not {"build_seconds", "ms_per_query"} & set(info)
    train = json.loads((fresh("uniform") / "metrics/train/metrics.json").read_text())
    assert train["steps"] == 20 and train["epochs"] == 2 and "valid" in train
    group = ev["group_precision"]  # the micro world is synthetic: the structure relations' top-10 pools
    assert group["k"] == 10
    for name, sides in group["per_relation"].items():
        for side, entry in sides.items():
            assert entry["count"] == ev["per_relation"][name][side]["count"]
            assert 0 <= entry["precision"] <= 1 and 0 < entry["chance"] < 1
    assert group["overall"]["count"] == sum(e["count"] for s in group["per_relation"].values() for e in s.values())
    head = ev["head_scoring"]  # the default: per relation, the best mode on valid's head queries
    assert head["mode"] == "per_relation" and head["tail_queries"] == 54 * len(head["chosen"])
    for name, mode in head["chosen"].items():
        assert head["valid_head_mrr"][name][mode] == max(head["valid_head_mrr"][name].values())


def test_evaluate_writes_the_per_query_ranks(fresh, micro_env) -> None:
    """metrics/ranks/model.csv: one row per test query in queries_from_triples order, whose ranks give
    evaluate.json's MRR and Hits@1, with the anchor-rank summary beside them."""
    from elmm.kg.format import load_kg
    from elmm.kg.queries import queries_from_triples
    from elmm.rank_table import COLUMNS, read_rank_table

    project = fresh("uniform")
    ev = json.loads((project / "metrics/evaluate.json").read_text())
    lines = (project / "metrics/ranks/model.csv").read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS)
    table = read_rank_table(project / "metrics/ranks/model.csv")
    q = queries_from_triples(load_kg(micro_env.kg_dir).triples["test"])
    assert table["query"].tolist() == list(range(len(q))) == list(range(ev["queries"]))
    assert table["anchor"].tolist() == q.anchors.tolist() and table["target"].tolist() == q.targets.tolist()
    assert table["relation"].tolist() == q.relations.tolist()
    assert table["direction"].tolist() == ["tail" if d == 0 else "head" for d in q.directions.tolist()]
    assert (table["rank"] == (table["optimistic"] + table["pessimistic"]) / 2).all()
    assert (1 / table["rank"]).mean() == pytest.approx(ev["mrr"], abs=1e-6)
    assert (table["rank"] <= 1).mean() == pytest.approx(ev["hits_at_1"], abs=1e-6)
    assert ev["anchor_rank"]["count"] == ev["queries"] and 0 <= ev["anchor_rank"]["first"] <= 1
    some = next(iter(ev["per_relation"].values()))
    assert "anchor_rank" in some.get("tail", some.get("head"))


def test_evaluate_reads_results_against_the_baselines_and_stops_on_a_leak(fresh, make_project, run_stage) -> None:
    """With metrics/baselines.json present, evaluate.json carries the prior/KGE/ceiling beside every
    relation and side; a score more than 3 SE above its ceiling stops the stage, naming it."""
    import shutil

    project = make_project(UNIFORM)
    shutil.copytree(fresh("uniform") / "data/model", project / "data/model")
    ev = json.loads((fresh("uniform") / "metrics/evaluate.json").read_text())
    per_relation = {name: {side: {"mrr": 0.0, "mrr_se": 0.001, "count": r[side]["count"]}
                           for side in ("tail", "head") if side in r} for name, r in ev["per_relation"].items()}
    fake = {"split": "test", "queries": ev["queries"], "prior": {"mrr": 0.01, "per_relation": per_relation},
            "kge": None, "ceiling": {"mrr": 0.0, "per_relation": per_relation}}
    (project / "metrics").mkdir(exist_ok=True)
    (project / "metrics/baselines.json").write_text(json.dumps(fake))
    with pytest.raises(SystemExit, match="above their Bayes ceiling"):
        run_stage("evaluate", project)
    written = json.loads((project / "metrics/evaluate.json").read_text())
    first = next(iter(written["against_baselines"]["per_relation"].values()))
    assert {"model", "prior", "kge", "ceiling", "z_prior"} <= set(next(iter(first.values())))
    assert written["against_baselines"]["overall"] == {"model": ev["mrr"], "prior": 0.01, "kge": None, "ceiling": 0.0}
    # A ceiling that holds: the same stage passes.
    for sides in per_relation.values():
        for side in sides.values():
            side["mrr"] = 1.0
    (project / "metrics/baselines.json").write_text(json.dumps(fake))
    run_stage("evaluate", project)
