"""`elmm-predict`: the top-k entities for (head, relation, ?) or (?, relation, tail) from a trained pipeline.

    elmm-predict --head "Zapus Rotun" --relation "has colour"
    elmm-predict --relation "knows" --tail obj:000042 -k 5 --include-known
    elmm-predict --head 17 --relation 4 --json

Entities and relations are given by row index, id or name (names case-insensitively). Reads
params.yaml, data/kg, data/backbone, data/encoded and data/model under --root (the repository
after `dvc repro`). Entities are ranked as the evaluate stage ranks them; known answers of the query
(train + valid + test) are left out unless --include-known, which marks them instead.

- Tail queries (--head): the completion layer's logits; `p` is their sigmoid.
- Head queries (--tail) follow `evaluate.head_scoring` (elmm.head_scoring): `direct`, the head
  query's own logits (`p` their sigmoid); `triples`, log p(t | e, r) from every candidate e's own
  tail query (`p` is that probability); `sum`, both directions' log-probabilities added (no `p`).
  Under `per_relation`, the mode the evaluate stage chose for the relation, read from
  metrics/evaluate.json. --head-scoring overrides.
  `triples` and `sum` cost one tail query per entity (334 on the default world; 14,541 on FB15k-237).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import sys
from contextlib import chdir
from pathlib import Path

import torch

EVALUATE_METRICS = "metrics/evaluate.json"


class PredictError(ValueError):
    """A bad query (unknown or ambiguous entity/relation): printed as `error: ...`."""


def resolve(table, spec: str, what: str) -> int:
    """Row index of `spec` in `table` (columns id, name): an id, a row index, or a unique name."""
    n = len(table)
    ids = table["id"].astype(str).tolist()
    if spec in ids:  # ids first: real KGs have numeric ids (WN18) that are not row indices
        return ids.index(spec)
    if spec.strip().lstrip("-").isdigit():
        i = int(spec)
        if 0 <= i < n:
            return i
        raise PredictError(f"{what} index {i} is out of range (0..{n - 1})")
    names = table["name"].astype(str).tolist()
    hits = [i for i, name in enumerate(names) if name.casefold() == spec.casefold()]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise PredictError(f"{what} name {spec!r} is ambiguous: ids {', '.join(ids[i] for i in hits)}")
    close = difflib.get_close_matches(spec, names, n=3) + difflib.get_close_matches(spec, ids, n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise PredictError(f"unknown {what} {spec!r}{hint}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="elmm-predict", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head", help="the known head entity (predict the tail)")
    ap.add_argument("--tail", help="the known tail entity (predict the head)")
    ap.add_argument("--relation", "-r", required=True, help="relation: index, id or name")
    ap.add_argument("-k", type=int, default=10, help="how many entities to print (default 10)")
    ap.add_argument("--include-known", action="store_true", help="keep known answers (marked '*') in the list")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--root", default=".", help="the pipeline's repository (default: the current directory)")
    ap.add_argument("--head-scoring", choices=("evaluated", "direct", "triples", "sum"), default="evaluated",
                    help="how a head query (--tail) is scored (default: as the evaluate stage scored the relation's)")
    args = ap.parse_args(argv)
    if (args.head is None) == (args.tail is None):
        ap.error("give exactly one of --head (predict the tail) or --tail (predict the head)")
    if args.k < 1:
        ap.error("-k must be at least 1")
    return args


def head_mode(requested: str, configured: str, relation: str, metrics: Path) -> tuple[str, str]:
    """The mode a head query of `relation` is scored with, and where it comes from: `requested`
    (--head-scoring) unless "evaluated"; then `configured` (evaluate.head_scoring) unless
    per_relation; then the evaluate stage's recorded choice, or direct (said) where there is none."""
    if requested != "evaluated":
        return requested, "--head-scoring"
    if configured != "per_relation":
        return configured, "evaluate.head_scoring"
    try:
        report = json.loads(metrics.read_text()).get("head_scoring", {})
    except FileNotFoundError:
        return "direct", f"{metrics} not found (run `dvc repro evaluate`): per_relation's choice unknown"
    except json.JSONDecodeError as e:
        raise PredictError(f"{metrics}: not valid JSON ({e}); rerun `dvc repro evaluate`") from e
    chosen = report.get("chosen", {}) if report.get("mode") == "per_relation" else {}
    if relation not in chosen:
        return "direct", f"{metrics} records no per_relation choice for {relation!r}"
    return chosen[relation], f"per_relation, chosen on valid ({metrics})"


def predict(args: argparse.Namespace) -> dict:
    import transformers

    from .batches import forward_batch, make_batch
    from .config import load_params
    from .device import default_device
    from .head_scoring import HeadRescorer, TripleView
    from .kg.queries import HEAD, TAIL, FilterIndex, Queries
    from .model_io import load_trained
    from .workspace import open_workspace

    # A command-line tool: no model-loading progress bars or backend notices around the answer.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    root = Path(args.root)
    for need in ("params.yaml", "data/kg", "data/backbone", "data/encoded", "data/model"):
        if not (root / need).exists():
            raise PredictError(f"{root / need}: missing; run `dvc repro` first (or pass --root)")
    with chdir(root):  # params and stage outputs use paths relative to the repository
        p = load_params("params.yaml")
        ws = open_workspace(p)
        kg = ws.kg
        direction = TAIL if args.head is not None else HEAD
        anchor = resolve(kg.entities, args.head if args.head is not None else args.tail, "entity")
        relation = resolve(kg.relations, args.relation, "relation")
        model = load_trained(ws, "data/model").to(default_device())
    rel_name = kg.relations["name"].iloc[relation]
    mode, source = ("direct", "tail query") if direction == TAIL else head_mode(
        args.head_scoring, p.evaluate.head_scoring, rel_name, root / EVALUATE_METRICS)
    q = Queries(torch.tensor([anchor]), torch.tensor([relation]), torch.tensor([direction]), torch.tensor([0]))
    with torch.no_grad():
        scores = forward_batch(model, make_batch(ws, q)).scores.float()
    if mode != "direct":  # the triple (e, r, anchor) scored from every candidate e's tail query
        view = TripleView(model, ws, [q], p.evaluate.batch_size, p.train.precision, progress=sys.stderr.isatty())
        scores = HeadRescorer(view, {relation: mode})(q, scores)
    scores = scores[0].cpu()
    known = FilterIndex(kg.all_triples(), kg.num_entities).answers(anchor, relation, direction)
    ranked = scores.clone()
    if not args.include_known and len(known):
        ranked[torch.as_tensor(known)] = float("-inf")
    k = min(args.k, kg.num_entities - (0 if args.include_known else len(known)))
    top = ranked.topk(max(k, 0)) if k > 0 else None
    names, ids = kg.entities["name"].tolist(), kg.entities["id"].astype(str).tolist()
    known_set = set(known.tolist())
    rows = []
    if top is not None:
        for rank, (score, e) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
            rows.append({"rank": rank, "index": e, "id": ids[e], "name": names[e], "score": round(score, 4),
                         "probability": probability(score, mode), "known": e in known_set})
    query = (f"({names[anchor]}, {rel_name}, ?)" if direction == TAIL else f"(?, {rel_name}, {names[anchor]})")
    return {"query": query, "direction": "tail" if direction == TAIL else "head", "anchor": ids[anchor],
            "relation": str(kg.relations["id"].iloc[relation]), "candidates": kg.num_entities,
            "known": [ids[e] for e in known.tolist()], "known_excluded": not args.include_known,
            "scoring": {"mode": mode, "source": source}, "results": rows}


def probability(score: float, mode: str) -> float | None:
    """`direct`: the logit's sigmoid; `triples`: the score is log p(t | e, r); `sum` adds two
    directions' log-probabilities, which is no probability of one event."""
    if mode == "sum":
        return None
    return round(math.exp(score) if mode == "triples" else torch.sigmoid(torch.tensor(score)).item(), 4)


def format_table(res: dict) -> str:
    known = len(res["known"])
    note = (f"{known} known answer{'s' * (known != 1)} " + ("excluded" if res["known_excluded"] else "marked *"))
    width = max([2] + [len(r["id"]) for r in res["results"]])
    scoring = res["scoring"]
    lines = [f"{res['query']}  top {len(res['results'])} of {res['candidates']} entities; {note}",
             f"{'rank':>4}  {'score':>8}  {'p':>6}  {'id':<{width}}  name"]
    for r in res["results"]:
        mark = " *" if r["known"] else ""
        p = "-" if r["probability"] is None else f"{r['probability']:.4f}"
        lines.append(f"{r['rank']:>4}  {r['score']:>8.4f}  {p:>6}  {r['id']:<{width}}  {r['name']}{mark}")
    if res["direction"] == "head":
        lines.append(f"scored as {scoring['mode']} ({scoring['source']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        res = predict(args)
    except PredictError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2) if args.json else format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
