"""The fact-swap probe against two hand-made models: one that reads the description, one that remembers."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from elmm.fact_swap import NEEDS, SPLITS, TEXT_FACTS, fact_swap, materialise, resolve_rev, swapped
from elmm.kg.queries import TAIL
from elmm.kg.synthetic import ATTRIBUTE_RELATIONS, CONCEPTS, FACT_CLAUSES
from elmm.model import QueryOutput


class _Oracle(nn.Module):
    """Scores 1 on the concept a query's answer is taken to be: read from the prompt's text (reader)
    or looked up by the anchor in the latent table (memoriser); 0 elsewhere."""

    def __init__(self, ws, latent: pd.DataFrame, reads: bool):
        super().__init__()
        self.ws, self.reads = ws, reads
        self.truth = latent.set_index("entity")
        self.entity = {e: i for i, e in enumerate(ws.kg.entities["id"].astype(str))}
        self.kinds = [ATTRIBUTE_RELATIONS.get(r) for r in ws.kg.relations["id"].astype(str)]

    def forward(self, patches, cls, slot_mask, text, **_):
        scores = torch.zeros(len(text.anchors), self.ws.kg.num_entities)
        for i, (a, r) in enumerate(zip(text.anchors.tolist(), text.relations.tolist())):
            kind = self.kinds[r]
            segment = self.ws.prompts.relation_ids[TAIL][r]  # the workspace's, answer prefix included
            assert text.ids[i][text.mask[i]].tolist()[-len(segment):] == segment
            if self.reads:
                words = self.ws.backbone.tokenizer.decode(text.ids[i][text.mask[i]])
                pattern = FACT_CLAUSES[kind].replace("{}", "(\\w+)")
                found = [v for v in re.findall(pattern, words) if v in CONCEPTS[kind]]
                assert found, (words, pattern)
                value = found[0]
            else:
                value = self.truth.loc[a, kind]
            scores[i, self.entity[f"{kind}:{value}"]] = 1.0
        return QueryOutput(scores=scores, query=scores, image_tokens=0)


@pytest.mark.parametrize("reads", [True, False])
def test_a_reader_follows_the_rewrite_and_a_memoriser_keeps_its_answer(make_workspace, micro_env, reads) -> None:
    ws = make_workspace(micro_env.params_with(max_text_tokens=512))  # the micro params cut descriptions at 8
    latent = pd.read_parquet(Path(micro_env.kg_dir) / "latent.parquet")
    tok = ws.backbone.tokenizer
    for r, kind in enumerate(ATTRIBUTE_RELATIONS.get(x) for x in ws.kg.relations["id"].astype(str)):
        if kind in TEXT_FACTS:  # model.answer_prefix (the default): the cue is followed by the concept's kind
            assert tok.decode(ws.prompts.relation_ids[TAIL][r]).rstrip().endswith(f"answer: {kind}")
    table = fact_swap(ws, _Oracle(ws, latent, reads), latent, batch_size=3)
    relations = {f"{ws.kg.relations['name'].iloc[i]} ({s})" for i, r in enumerate(ws.kg.relations["id"].astype(str))
                 if ATTRIBUTE_RELATIONS.get(r) in TEXT_FACTS for s in SPLITS}
    assert relations <= set(table) and {f"text relations ({s})" for s in SPLITS} <= set(table)
    for s in SPLITS:  # each fact's query counted once, in the split its triple is in
        in_split = {tuple(t) for t in ws.kg.triples[s].tolist()}
        facts = sum((o, r, ws.kg.entities["id"].tolist().index(f"{kind}:{latent[kind][o]}")) in in_split
                    for r, kind in enumerate(ATTRIBUTE_RELATIONS.get(x) for x in ws.kg.relations["id"].astype(str))
                    if kind in TEXT_FACTS for o in latent["entity"] if latent[kind][o])
        pooled = table[f"text relations ({s})"]["queries"]
        assert pooled == sum(table[k]["queries"] for k in relations if k.endswith(f"({s})")) == facts
    assert table["text relations (train)"]["queries"] > 0
    for key, row in table.items():
        if row["queries"]:
            assert row["accuracy"] == 1.0
            assert (row["follows"], row["keeps"]) == ((1.0, 0.0) if reads else (0.0, 1.0)), key


def test_the_rewrite_is_another_value_of_the_same_kind() -> None:
    for kind in TEXT_FACTS:
        values = CONCEPTS[kind]
        assert sorted(swapped(v, values) for v in values) == sorted(values)
        assert all(swapped(v, values) != v for v in values)


def test_clauses_cut_off_by_the_prompt_length_are_left_out(make_workspace, micro_env) -> None:
    """At the micro params' 8 description tokens most clauses are cut off: fewer queries are probed."""
    latent = pd.read_parquet(Path(micro_env.kg_dir) / "latent.parquet")
    counts = []
    for tokens in (8, 512):
        ws = make_workspace(micro_env.params_with(max_text_tokens=tokens))
        table = fact_swap(ws, _Oracle(ws, latent, reads=False), latent)
        counts.append(sum(row["queries"] for key, row in table.items() if key.startswith("text relations")))
    assert counts[0] < counts[1]


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_rev_resolves_experiment_names_and_materialises_its_files(tmp_path, monkeypatch) -> None:
    """--rev: an experiment's name is its refs/exps commit (anything else is passed on as a rev);
    the probe's inputs come out as committed there, and a commit without them is a clear error."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@t")
    _git(repo, "config", "user.name", "t")
    subprocess.run(["dvc", "init", "-q"], cwd=repo, check=True)
    for path in NEEDS:
        target = repo / path if path.endswith(".yaml") else repo / path / "part.txt"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"{path} at the experiment\n")
    subprocess.run(["dvc", "add", "-q", "data/model"], cwd=repo, check=True)  # a DVC output, as in the pipeline
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "experiment")
    sha = _git(repo, "rev-parse", "HEAD")
    _git(repo, "update-ref", "refs/exps/ab/cdef/my-run", sha)
    (repo / "params.yaml").write_text("changed later\n")
    (repo / "data/model/part.txt").write_text("a later model\n")
    subprocess.run(["dvc", "add", "-q", "data/model"], cwd=repo, check=True)
    _git(repo, "commit", "-qam", "later")
    monkeypatch.chdir(repo)
    assert resolve_rev("my-run") == sha and resolve_rev("HEAD~1") == "HEAD~1"
    out = materialise(resolve_rev("my-run"), tmp_path / "out")
    assert (out / "params.yaml").read_text() == "params.yaml at the experiment\n"
    assert (out / "data/model/part.txt").read_text() == "data/model at the experiment\n"  # from the cache
    _git(repo, "rm", "-q", "data/model.dvc")
    _git(repo, "commit", "-qm", "no model")
    with pytest.raises(SystemExit, match="data/model is not in the commit"):
        materialise("HEAD", tmp_path / "out2")
