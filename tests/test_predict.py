"""`elmm-predict`: top-k entities of a query from a trained micro project (conftest `make_project`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elmm.batches import forward_batch, make_batch
from elmm.config import load_params
from elmm.kg.queries import HEAD, TAIL, FilterIndex, Queries
from elmm.model_io import load_trained
from elmm.predict import main
from elmm.workspace import open_workspace

TRAIN = {"train": {"epochs": 1, "batch_size": 32, "negatives": 4, "warmup_steps": 1, "lr": 0.002}}


@pytest.fixture(scope="module")
def project(make_project, run_stage):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machine: one thread is faster than two contending ones
    try:
        root = make_project(TRAIN)
        run_stage("train", root)
        yield root
    finally:
        torch.set_num_threads(before)


def predict_json(capsys, *args) -> dict:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def model_scores(root: Path, anchor: int | list[int], relation: int, direction: int) -> torch.Tensor:
    """The trained model's scores of (anchor, relation, direction): [E], or [len(anchor), E] for a list."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        ws = open_workspace(load_params("params.yaml"))
        model = load_trained(ws, "data/model")
    finally:
        os.chdir(cwd)
    anchors = torch.tensor([anchor] if isinstance(anchor, int) else anchor)
    q = Queries(anchors, torch.full_like(anchors, relation), torch.full_like(anchors, direction), torch.zeros_like(anchors))
    with torch.no_grad():
        scores = forward_batch(model, make_batch(ws, q)).scores
    return scores[0] if isinstance(anchor, int) else scores


def test_top_k_excludes_known_answers_and_matches_the_model(project, micro_env, capsys) -> None:
    kg = open_workspace(micro_env.params, micro_env.kg_dir, micro_env.backbone_dir, micro_env.encoded_dir).kg
    h, r, _ = (int(x) for x in kg.triples["train"][0])
    known = FilterIndex(kg.all_triples(), kg.num_entities).answers(h, r, TAIL)
    res = predict_json(capsys, "--head", str(h), "--relation", str(r), "-k", "5", "--root", str(project))
    assert res["direction"] == "tail" and len(res["results"]) == 5
    ids = kg.entities["id"].tolist()
    assert res["known"] == [ids[e] for e in known] and len(known) >= 1
    got = [row["index"] for row in res["results"]]
    assert not set(got) & set(known.tolist())
    scores = model_scores(project, h, r, TAIL)
    expected = scores.clone()
    expected[torch.as_tensor(known)] = float("-inf")
    assert got == expected.topk(5).indices.tolist()
    assert [row["score"] for row in res["results"]] == pytest.approx(expected.topk(5).values.tolist(), abs=1e-4)
    assert [row["rank"] for row in res["results"]] == [1, 2, 3, 4, 5]

    # --include-known: the plain top-k of all entities, known answers marked.
    res = predict_json(capsys, "--head", str(h), "--relation", str(r), "-k", str(kg.num_entities),
                       "--include-known", "--root", str(project))
    assert [row["index"] for row in res["results"]] == scores.topk(kg.num_entities).indices.tolist()
    assert {row["index"] for row in res["results"] if row["known"]} == set(known.tolist())


def test_names_ids_and_indices_give_the_same_query(project, micro_env, capsys) -> None:
    kg = open_workspace(micro_env.params, micro_env.kg_dir, micro_env.backbone_dir, micro_env.encoded_dir).kg
    e, r = 3, 1
    name, eid = kg.entities["name"].iloc[e], kg.entities["id"].iloc[e]
    rel_name, rel_id = kg.relations["name"].iloc[r], kg.relations["id"].iloc[r]
    runs = [predict_json(capsys, "--tail", spec, "--relation", rspec, "-k", "3", "--root", str(project))
            for spec, rspec in ((str(e), str(r)), (eid, rel_id), (name.upper(), rel_name))]
    assert runs[0] == runs[1] == runs[2]
    assert runs[0]["direction"] == "head" and runs[0]["query"] == f"(?, {rel_name}, {name})"


def test_head_queries_are_scored_as_evaluate_scores_them(project, micro_env, capsys) -> None:
    kg = open_workspace(micro_env.params, micro_env.kg_dir, micro_env.backbone_dir, micro_env.encoded_dir).kg
    _, r, t = (int(x) for x in kg.triples["train"][0])
    n, rel = kg.num_entities, kg.relations["name"].iloc[r]
    known = FilterIndex(kg.all_triples(), n).answers(t, r, HEAD)
    # log p(t | e, r) for every candidate e, each from e's own tail query, one forward at a time.
    triples = torch.log_softmax(model_scores(project, list(range(n)), r, TAIL).float(), 1)[:, t]
    direct = torch.log_softmax(model_scores(project, t, r, HEAD).float(), 0)

    def top(scores: torch.Tensor) -> list[int]:
        scores = scores.clone()
        scores[torch.as_tensor(known)] = float("-inf")
        return scores.topk(5).indices.tolist()

    args = ("--tail", str(t), "--relation", str(r), "-k", "5", "--root", str(project))
    res = predict_json(capsys, *args, "--head-scoring", "triples")
    assert res["scoring"] == {"mode": "triples", "source": "--head-scoring"}
    assert [row["index"] for row in res["results"]] == top(triples)
    assert [row["probability"] for row in res["results"]] == pytest.approx(triples.exp()[top(triples)].tolist(), abs=1e-4)
    assert top(triples) != top(direct)  # otherwise the check above could not tell the modes apart
    # per_relation (the micro project's evaluate.head_scoring): the choice recorded by evaluate.
    metrics = project / "metrics" / "evaluate.json"
    assert not metrics.exists()
    res = predict_json(capsys, *args)
    assert res["scoring"]["mode"] == "direct" and "not found" in res["scoring"]["source"]
    metrics.parent.mkdir(exist_ok=True)
    try:
        metrics.write_text(json.dumps({"head_scoring": {"mode": "per_relation", "chosen": {rel: "sum"}}}))
        res = predict_json(capsys, *args)
        assert res["scoring"]["mode"] == "sum" and [row["index"] for row in res["results"]] == top(direct + triples)
        assert all(row["probability"] is None for row in res["results"])
        assert main([*args]) == 0
        assert capsys.readouterr().out.splitlines()[-1].startswith("scored as sum (per_relation, chosen on valid")
        metrics.write_text("{")
        assert main([*args]) == 2
        assert "metrics/evaluate.json: not valid JSON" in capsys.readouterr().err
    finally:
        metrics.unlink()


def test_table_output_and_errors(project, capsys) -> None:
    assert main(["--head", "0", "--relation", "0", "-k", "2", "--root", str(project)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "top 2 of 54 entities" in out[0] and out[1].split()[:3] == ["rank", "score", "p"] and len(out) == 4
    assert main(["--head", "Nobody At All", "--relation", "0", "--root", str(project)]) == 2
    assert "unknown entity 'Nobody At All'" in capsys.readouterr().err
    assert main(["--head", "0", "--relation", "has colur", "--root", str(project)]) == 2
    assert "did you mean 'has colour'" in capsys.readouterr().err
    assert main(["--head", "0", "--relation", "0", "--root", str(project / "nowhere")]) == 2
    assert "run `dvc repro` first" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--head", "0", "--tail", "1", "--relation", "0"])


def test_console_script(project) -> None:
    exe = shutil.which("elmm-predict") or str(Path(sys.executable).parent / "elmm-predict")
    proc = subprocess.run([exe, "--head", "1", "--relation", "has shape", "-k", "3"], cwd=project,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert ", has shape, ?)" in lines[0] and len(lines) == 5
