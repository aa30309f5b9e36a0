"""Head queries (?, r, t) scored as triples, from the model's tail direction.

ELMM answers a head query with its own prompt (the anchor t and "inverse of r"), so a candidate e
enters only through its completion row: the model never reads e's pictures or description, only
what e's row has learnt from the training triples in which e was an answer. On the testbed that
leaves the head queries of the image and text relations near chance (MRR ~0.02; "which object is
red?" cannot be answered by looking at the objects). KGE models (RotatE) and KG-BERT rank heads
the other way: they score the triple (e, r, t) for every candidate e. `TripleView` does that with
the model's tail direction: per relation with head queries, one tail query (e, r, ?) for every
entity e, a log-softmax over the answers, and the columns of the queries' t kept, log p(t | e, r).

Modes (`evaluate.head_scoring`):

- `direct`: the head query's own scores (the paper's; in-training validation always uses these).
- `triples`: log p(t | e, r) for every candidate e.
- `sum`: log p(e | ?, r, t) + log p(t | e, r), the product of the two directions' probabilities.
- `per_relation`: per relation, whichever of the three has the highest MRR on the head queries of
  the valid split (ties: the earlier in this list), recorded in metrics/evaluate.json.

Cost: E x R_h tail queries (R_h: relations that have head queries), whatever the number of head
queries, and E x (distinct (r, t) pairs) floats kept. On the default 334 x 9 = 3,006 queries
(3x the test split's 1,008), at FB15k-237 14,541 x 237 = 3.4M (170x its test split): use `direct` there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from .batches import forward_batch, make_batch
from .device import autocast
from .kg.queries import HEAD, TAIL, FilterIndex, Queries
from .ranking import evaluate_ranking
from .workspace import Workspace

MODES = ("direct", "sum", "triples")  # the order also breaks ties of per_relation's choice
HEAD_SCORING = (*MODES, "per_relation")


class TripleView:
    """log p(t | e, r) for every entity e and each (r, t) of the given head queries."""

    def __init__(self, model, ws: Workspace, heads: Sequence[Queries], batch_size: int, precision: str = "fp32",
                 progress: bool = True):
        pairs = torch.cat([torch.stack([q.relations[q.directions == HEAD], q.anchors[q.directions == HEAD]], 1)
                           for q in heads])
        self.num_entities = n = ws.kg.num_entities
        self.tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # r -> (tails [T] sorted, [E, T])
        device = next(model.parameters()).device
        model.eval()
        relations = sorted(set(pairs[:, 0].tolist()))
        steps = len(relations) * ((n + batch_size - 1) // batch_size)
        bar = tqdm(total=steps, desc="head queries as triples", unit="batch", disable=not progress)
        with torch.no_grad():
            for r in relations:
                tails = torch.unique(pairs[pairs[:, 0] == r, 1])
                rows = []
                for lo in range(0, n, batch_size):
                    anchors = torch.arange(lo, min(lo + batch_size, n))
                    q = Queries(anchors, torch.full_like(anchors, r), torch.full_like(anchors, TAIL),
                                torch.zeros_like(anchors))
                    with autocast(device, precision):
                        scores = forward_batch(model, make_batch(ws, q)).scores
                    rows.append(torch.log_softmax(scores.float(), 1)[:, tails.to(device)].cpu())
                    bar.update()
                self.tables[r] = (tails, torch.cat(rows))
        bar.close()

    def scores(self, relations: torch.Tensor, tails: torch.Tensor) -> torch.Tensor:
        """[Q, E]: row i is log p(tails[i] | e, relations[i]) for every entity e."""
        out = torch.empty(len(relations), self.num_entities)
        for i, (r, t) in enumerate(zip(relations.tolist(), tails.tolist())):
            if r not in self.tables:
                raise KeyError(f"TripleView: relation {r} had no head query when the view was built")
            known, table = self.tables[r]
            j = int(torch.searchsorted(known, t))
            if j >= len(known) or int(known[j]) != t:
                raise KeyError(f"TripleView: (relation {r}, tail {t}) was not among the head queries it was built for")
            out[i] = table[:, j]
        return out


class HeadRescorer:
    """`evaluate_ranking`'s `rescore` hook: the head queries' rows replaced by `modes[relation]`'s
    scores (a relation missing from `modes` keeps `direct`); tail queries untouched."""

    def __init__(self, view: TripleView, modes: dict[int, str]):
        unknown = set(modes.values()) - set(MODES)
        if unknown:
            raise ValueError(f"head scoring: unknown mode(s) {sorted(unknown)} ({', '.join(MODES)})")
        self.view, self.modes = view, modes

    def __call__(self, q: Queries, scores: torch.Tensor) -> torch.Tensor:
        mode = [self.modes.get(r, "direct") if d == HEAD else "direct"
                for r, d in zip(q.relations.tolist(), q.directions.tolist())]
        rows = torch.tensor([m != "direct" for m in mode])
        if not rows.any():
            return scores
        idx = torch.nonzero(rows).squeeze(1)
        view = self.view.scores(q.relations[idx], q.anchors[idx]).to(scores.device)
        direct = torch.log_softmax(scores[idx.to(scores.device)].float(), 1)
        use_sum = torch.tensor([mode[i] == "sum" for i in idx.tolist()], device=scores.device)[:, None]
        scores = scores.clone()
        scores[idx.to(scores.device)] = torch.where(use_sum, direct + view, view).to(scores.dtype)
        return scores


def choose_per_relation(model, ws: Workspace, view: TripleView, valid: Queries, filters: FilterIndex,
                        batch_size: int, precision: str = "fp32") -> tuple[dict[int, str], dict[str, dict[str, float]]]:
    """Per relation, the mode with the highest MRR on `valid`'s head queries, and every mode's MRR
    per relation name."""
    heads = valid.subset(torch.nonzero(valid.directions == HEAD).squeeze(1))
    names = ws.kg.relations["name"].tolist()
    relations = sorted(set(heads.relations.tolist()))
    mrr: dict[str, dict[str, float]] = {names[r]: {} for r in relations}
    for mode in MODES:
        res = evaluate_ranking(model, ws, heads, filters, batch_size, precision=precision, progress=False,
                               desc=f"valid heads ({mode})", rescore=HeadRescorer(view, dict.fromkeys(relations, mode)))
        for r in relations:
            mrr[names[r]][mode] = res.metrics["per_relation"][names[r]]["head"]["mrr"]
    chosen = {r: max(MODES, key=lambda m, r=r: (mrr[names[r]][m], -MODES.index(m))) for r in relations}
    return chosen, mrr


def head_rescorer(model, ws: Workspace, mode: str, test: Queries, valid: Queries, filters: FilterIndex,
                  batch_size: int, precision: str = "fp32") -> tuple[HeadRescorer | None, dict]:
    """The rescore hook for `evaluate.head_scoring` = `mode` and what to report about it."""
    if mode not in HEAD_SCORING:
        raise ValueError(f"evaluate.head_scoring: unknown mode {mode!r} ({', '.join(HEAD_SCORING)})")
    if mode == "direct":
        return None, {"mode": mode}
    view = TripleView(model, ws, [test, valid] if mode == "per_relation" else [test], batch_size, precision)
    report: dict = {"mode": mode, "tail_queries": ws.kg.num_entities * len(view.tables)}
    if mode != "per_relation":
        return HeadRescorer(view, dict.fromkeys(view.tables, mode)), report
    chosen, mrr = choose_per_relation(model, ws, view, valid, filters, batch_size, precision)
    names = ws.kg.relations["name"].tolist()
    report.update(chosen={names[r]: m for r, m in chosen.items()}, valid_head_mrr=mrr)
    return HeadRescorer(view, chosen), report

