"""Head queries scored as triples from the tail direction (elmm.head_scoring)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from elmm.batches import forward_batch, make_batch
from elmm.evaluation import compute_ranks
from elmm.head_scoring import MODES, HeadRescorer, TripleView, head_rescorer
from elmm.kg.queries import HEAD, TAIL, FilterIndex, Queries, queries_from_triples
from elmm.model_io import build_model
from elmm.ranking import evaluate_ranking


def trained_like(ws):
    """A micro model whose scores differ by entity (random rows and bias, not the init's)."""
    model = build_model(ws, seed=0).eval()
    with torch.no_grad():
        model.completion.entities.weight.normal_()
        model.completion.entities.bias.normal_()
    return model


def tail_logp(model, ws, e: int, r: int) -> torch.Tensor:
    """The log-probabilities p(. | e, r) of one tail query, written out."""
    q = Queries(torch.tensor([e]), torch.tensor([r]), torch.tensor([TAIL]), torch.tensor([0]))
    with torch.no_grad():
        return torch.log_softmax(forward_batch(model, make_batch(ws, q)).scores.float(), 1)[0]


def test_triple_view_is_each_candidates_tail_query(micro_workspace) -> None:
    """Row (r, t) at entity e is log p(t | e, r) of e's own tail query; it does not depend on which
    other queries the view was built for, nor on the chunk size."""
    ws = micro_workspace
    model = trained_like(ws)
    test = queries_from_triples(ws.kg.triples["test"])
    view = TripleView(model, ws, [test], batch_size=7, progress=False)
    heads = test.directions == HEAD
    r, t = int(test.relations[heads][0]), int(test.anchors[heads][0])
    row = view.scores(torch.tensor([r]), torch.tensor([t]))[0]
    assert row.shape == (ws.kg.num_entities,)
    for e in (0, 3, ws.kg.num_entities - 1):
        assert_close(row[e], tail_logp(model, ws, e, r)[t], rtol=1e-5, atol=1e-5)
    one = Queries(torch.tensor([t]), torch.tensor([r]), torch.tensor([HEAD]), torch.tensor([0]))
    alone = TripleView(model, ws, [one], batch_size=64, progress=False)
    assert_close(alone.scores(torch.tensor([r]), torch.tensor([t]))[0], row, rtol=1e-5, atol=1e-6)
    with pytest.raises(KeyError, match="not among"):
        alone.scores(torch.tensor([r]), torch.tensor([(t + 1) % ws.kg.num_entities]))


def test_rescorer_replaces_head_rows_by_mode_and_leaves_tails(micro_workspace) -> None:
    ws = micro_workspace
    model = trained_like(ws)
    q = queries_from_triples(ws.kg.triples["test"])
    view = TripleView(model, ws, [q], batch_size=16, progress=False)
    with torch.no_grad():
        direct = forward_batch(model, make_batch(ws, q)).scores.float()
    relations = sorted(set(q.relations.tolist()))
    modes = {r: MODES[i % 3] for i, r in enumerate(relations)}
    out = HeadRescorer(view, modes)(q, direct)
    for i in range(len(q)):
        r, d = int(q.relations[i]), int(q.directions[i])
        mode = modes[r] if d == HEAD else "direct"
        want = direct[i]
        if mode != "direct":
            triples = view.scores(q.relations[i:i + 1], q.anchors[i:i + 1])[0]
            want = triples if mode == "triples" else torch.log_softmax(direct[i], 0) + triples
        assert_close(out[i], want, rtol=1e-6, atol=1e-6)
    assert any(m != "direct" for m in modes.values())
    with pytest.raises(ValueError, match="unknown mode"):
        HeadRescorer(view, {0: "both"})


def test_per_relation_takes_the_best_valid_mode_and_ranks_test_with_it(micro_workspace) -> None:
    """The valid MRRs reported per mode are those of a plain ranking pass; the choice is their
    argmax; the test ranks under the choice equal those of the chosen mode's rows ranked directly."""
    ws = micro_workspace
    kg = ws.kg
    model = trained_like(ws)
    filters = FilterIndex(kg.all_triples(), kg.num_entities)
    test, valid = queries_from_triples(kg.triples["test"]), queries_from_triples(kg.triples["valid"])
    rescore, report = head_rescorer(model, ws, "per_relation", test, valid, filters, 16)
    names = kg.relations["name"].tolist()
    heads = valid.subset(torch.nonzero(valid.directions == HEAD).squeeze(1))
    plain = evaluate_ranking(model, ws, heads, filters, 16, progress=False).metrics["per_relation"]
    for name, mrr in report["valid_head_mrr"].items():
        assert mrr["direct"] == plain[name]["head"]["mrr"]
        best = max(mrr.values())
        assert mrr[report["chosen"][name]] == best
        assert report["chosen"][name] == next(m for m in MODES if mrr[m] == best)
    assert report["tail_queries"] == kg.num_entities * len(set(test.relations.tolist()) | set(valid.relations.tolist()))
    res = evaluate_ranking(model, ws, test, filters, 16, progress=False, rescore=rescore)
    view = rescore.view
    with torch.no_grad():
        direct = forward_batch(model, make_batch(ws, test)).scores.float()
    for i in range(len(test)):
        if int(test.directions[i]) != HEAD:
            continue
        mode = report["chosen"].get(names[int(test.relations[i])], "direct")
        s = direct[i]
        if mode != "direct":
            tv = view.scores(test.relations[i:i + 1], test.anchors[i:i + 1])[0]
            s = tv if mode == "triples" else torch.log_softmax(s, 0) + tv
        known = filters.mask(test.anchors[i:i + 1], test.relations[i:i + 1], test.directions[i:i + 1])
        rank = compute_ranks(s[None], test.targets[i:i + 1], known)["realistic"][0]
        assert float(res.ranks["realistic"][i]) == float(rank)


def test_direct_is_the_ranking_without_a_view(micro_workspace) -> None:
    ws = micro_workspace
    model = trained_like(ws)
    filters = FilterIndex(ws.kg.all_triples(), ws.kg.num_entities)
    test = queries_from_triples(ws.kg.triples["test"])
    rescore, report = head_rescorer(model, ws, "direct", test, test, filters, 16)
    assert rescore is None and report == {"mode": "direct"}
    with pytest.raises(ValueError, match="head_scoring"):
        head_rescorer(model, ws, "both", test, test, filters, 16)
