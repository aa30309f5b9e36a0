"""Does a trained model read the facts in its descriptions? A counterfactual probe on the synthetic world.

Every object's description names its three text facts in one clause each ("made of iron",
`kg.synthetic.FACT_CLAUSES`). For each object and text relation the probe rewrites that clause to
the next value of the same kind ("made of glass") and ranks the kind's concepts for the tail query
(object, relation, ?) under both descriptions. A model that reads follows the rewrite; one that
memorised the fact (in its entity token, or from the name) keeps its answer. Queries whose triple
is in train can be answered from memory; those in valid (which only chose the kept epoch) and test
only by reading, so the three are reported apart.

    python -m elmm.fact_swap                 # the workspace's model after `dvc repro`; JSON to stdout
    python -m elmm.fact_swap --rev NAME      # a finished DVC experiment's (or a commit's), from the cache

Per relation and split: `accuracy` (top-1 among the kind's concepts, the description as it is),
`follows` (top-1 is the rewritten value), `keeps` (top-1 is still the original value) and
`chance` (1 / the kind's number of values). A reader scores `follows` near its accuracy, a
memoriser near 0 with `keeps` near its accuracy. Objects whose clause `model.max_text_tokens` cuts
off entirely are left out (the default's descriptions fit whole).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from contextlib import chdir
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .kg.queries import TAIL, Queries
from .kg.synthetic import ATTRIBUTE_RELATIONS, CONCEPTS, FACT_CLAUSES
from .workspace import Workspace

TEXT_FACTS = ("category", "region", "material")  # the attributes only the description shows
SPLITS = ("train", "valid", "test")  # train: trained on (memorisable); valid: only chose the epoch; test


def swapped(value: str, values: tuple[str, ...]) -> str:
    """The value the probe writes instead of `value`: the next one of its kind."""
    return values[(values.index(value) + 1) % len(values)]


@torch.no_grad()
def fact_swap(ws: Workspace, model, latent: pd.DataFrame, batch_size: int = 128) -> dict:
    """The probe's table (module docstring) for `model` on the workspace's synthetic KG."""
    split_of = {tuple(t): name for name in SPLITS for t in ws.kg.triples[name].tolist()}
    was_training = model.training
    model.eval()
    try:
        return _probe(ws, model, latent, batch_size, split_of)
    finally:
        model.train(was_training)


def _probe(ws: Workspace, model, latent: pd.DataFrame, batch_size: int, split_of: dict) -> dict:
    from .batches import forward_batch, make_batch

    kg = ws.kg
    names, descriptions = kg.entities["name"].tolist(), kg.entities["description"].tolist()
    relation_ids = kg.relations["id"].astype(str).tolist()
    entity = {e: i for i, e in enumerate(kg.entities["id"].astype(str))}
    out: dict[str, dict] = {}
    pooled: dict[str, list[np.ndarray]] = {}
    for rel_id, kind in ATTRIBUTE_RELATIONS.items():
        if kind not in TEXT_FACTS or rel_id not in relation_ids:
            continue
        r, values = relation_ids.index(rel_id), CONCEPTS[kind]
        concepts = torch.tensor([entity[f"{kind}:{v}"] for v in values])
        clause = FACT_CLAUSES[kind]
        objects, original, rewritten, split = [], [], [], []
        edited = list(descriptions)
        for o, v in zip(latent["entity"].tolist(), latent[kind].tolist()):
            if not v or clause.format(v) not in descriptions[o]:
                continue  # concepts have no facts; a description without the clause cannot be rewritten
            where = split_of.get((o, r, int(concepts[values.index(v)])))
            if where is None:
                continue  # the fact is not a triple of this KG
            w = swapped(v, values)
            edited[o] = descriptions[o].replace(clause.format(v), clause.format(w))
            objects.append(o)
            original.append(values.index(v))
            rewritten.append(values.index(w))
            split.append(where)
        if not objects:
            continue
        # Only the descriptions differ (the relation segments keep model.answer_prefix's tokens).
        builders = {"as is": ws.prompts, "rewritten": ws.prompts.with_entities(names, edited)}
        # A clause cut off by model.max_text_tokens is in neither prompt: nothing to probe there.
        seen = [builders["as is"].entity_ids[o] != builders["rewritten"].entity_ids[o] for o in objects]
        objects, original, rewritten, split = ([x for x, keep in zip(xs, seen) if keep]
                                               for xs in (objects, original, rewritten, split))
        if not objects:
            continue
        top = {}
        for tag, prompts in builders.items():
            w = dataclasses.replace(ws, prompts=prompts)
            picks = []
            for lo in range(0, len(objects), batch_size):
                anchors = torch.tensor(objects[lo:lo + batch_size])
                n = len(anchors)
                q = Queries(anchors, torch.full((n,), r), torch.full((n,), TAIL), torch.zeros(n, dtype=torch.long))
                scores = forward_batch(model, make_batch(w, q)).scores.float().cpu()
                picks.append(scores[:, concepts].argmax(1))
            top[tag] = torch.cat(picks).numpy()
        orig, new, where = np.array(original), np.array(rewritten), np.array(split)
        name = kg.relations["name"].iloc[r]
        for s in SPLITS:
            m = where == s
            rows = np.stack([top["as is"][m] == orig[m], top["rewritten"][m] == new[m], top["rewritten"][m] == orig[m]])
            pooled.setdefault(s, []).append(rows)
            out[f"{name} ({s})"] = _row(rows, 1 / len(values))
    for s, parts in pooled.items():
        out[f"text relations ({s})"] = _row(np.concatenate(parts, axis=1), None)
    return out


def _row(hits: np.ndarray, chance: float | None) -> dict:
    n = hits.shape[1]
    row = {"queries": n, **{k: round(float(h.mean()), 4) if n else None
                            for k, h in zip(("accuracy", "follows", "keeps"), hits)}}
    if chance is not None:
        row["chance"] = round(chance, 4)
    return row


NEEDS = ("params.yaml", "data/kg", "data/backbone", "data/encoded", "data/model")  # what load_trained reads


def resolve_rev(name: str) -> str:
    """The commit of a DVC experiment called `name` (refs/exps/.../name), else `name` as a git rev."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps"],
                          capture_output=True, text=True).stdout.split("\n")
    hits = [line.split()[0] for line in refs if line.endswith(f"/{name}")]
    if len(hits) > 1:
        raise SystemExit(f"error: {len(hits)} experiments are called {name!r}; pass the commit instead")
    return hits[0] if hits else name


def materialise(rev: str, dest: Path) -> Path:
    """The probe's inputs (NEEDS) as committed at `rev`, copied from git and the DVC cache into `dest`."""
    from dvc.api import DVCFileSystem

    fs = DVCFileSystem(".", rev=rev)
    for path in NEEDS:
        if not fs.exists(path):
            raise SystemExit(f"error: {path} is not in the commit {rev} (an experiment still running, or "
                             "outputs not in this cache)")
        try:
            fs.get(path, str(dest / path), recursive=fs.isdir(path))
        except FileNotFoundError as e:
            raise SystemExit(f"error: {path} at {rev}: not in this repository's DVC cache ({e})") from e
    return dest


def probe(root: Path) -> dict | None:
    """The table for the trained pipeline under `root`; None (after saying why) if its files are missing."""
    from .config import load_params
    from .model_io import load_trained
    from .workspace import open_workspace

    for need in ("params.yaml", "data/kg/latent.parquet", "data/model"):
        if not (root / need).exists():
            print(f"error: {root / need}: missing (the probe needs the synthetic world and a trained model; "
                  "run `dvc repro`)", file=sys.stderr)
            return None
    with chdir(root):
        ws = open_workspace(load_params("params.yaml"))
        model = load_trained(ws, "data/model")
        latent = pd.read_parquet("data/kg/latent.parquet")
    return fact_swap(ws, model, latent)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m elmm.fact_swap", description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=".", help="the repository after `dvc repro` (default: here)")
    ap.add_argument("--rev", help="a DVC experiment's name or a commit: its outputs, from this repository's cache")
    ap.add_argument("--out", help="also write the table to this JSON file")
    args = ap.parse_args(argv)
    root = Path(args.root)
    if args.rev:
        with tempfile.TemporaryDirectory(prefix="fact_swap-") as tmp:
            with chdir(root):
                materialise(resolve_rev(args.rev), Path(tmp))
            table = probe(Path(tmp))
    else:
        table = probe(root)
    if table is None:
        return 2
    print(json.dumps(table, indent=1))
    if args.out:
        from .io import write_json
        write_json(args.out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
