"""The ranking pass over a model (chunked, filtered) and the faiss index over the entity vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from elmm.batches import forward_batch, make_batch
from elmm.kg.queries import FilterIndex, queries_from_triples
from elmm.model_io import build_model
from elmm.ranking import evaluate_ranking
from elmm.retrieval import build_index, exact_topk, fold_queries, folded_vectors, recall_at_k, search_filtered


def test_ranking_does_not_depend_on_the_query_batch_size(micro_workspace) -> None:
    """Chunked scoring: the metrics are the same whether queries go 1, 5 or all at a time."""
    model = build_model(micro_workspace, seed=0)
    kg = micro_workspace.kg
    queries = queries_from_triples(kg.triples["test"])
    filters = FilterIndex(kg.all_triples(), kg.num_entities)
    forwards = []
    handle = model.register_forward_hook(lambda *args: forwards.append(1))
    try:
        passes = [evaluate_ranking(model, micro_workspace, queries, filters, b, progress=False) for b in (1, 5, len(queries))]
    finally:
        handle.remove()
    results = [r.metrics for r in passes]
    assert results[0] == results[1] == results[2]
    assert results[0]["count"] == len(queries) == 40
    # One forward per chunk: the anchors' ranks come from the same scores, not a second pass.
    assert len(forwards) == 40 + 8 + 1
    assert results[0]["anchor_rank"]["count"] == 40
    # Per-query ranks in the order of the queries, whatever the chunking.
    for r in passes[1:]:
        assert all(torch.equal(r.ranks[k], passes[0].ranks[k]) for k in passes[0].ranks)
    assert torch.equal(passes[0].ranks["direction"], queries.directions)
    assert torch.equal(passes[0].ranks["relation"], queries.relations)


@pytest.mark.parametrize("head", ["completion", "lm_head"])
def test_folded_bias_reproduces_the_model_scores(make_workspace, head) -> None:
    """Inner products of [E'_m, 1] with the rows [w_e, b_e] are the scoring head's scores."""
    ws = make_workspace()
    model = build_model(ws, seed=0, head=head).eval()
    with torch.no_grad():
        layer = model.completion.entities if head == "completion" else model.entity_embedding
        layer.bias.normal_()  # a real bias, not zeros
        q = queries_from_triples(ws.kg.triples["test"][:4])
        out = forward_batch(model, make_batch(ws, q))
    assert_close(torch.from_numpy(fold_queries(out.query) @ folded_vectors(model).T), out.scores, rtol=1e-5, atol=1e-5)


def test_filtered_search_over_fetches_and_drops_known_answers() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((200, 16)).astype(np.float32)
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    flat = build_index(base, "flat")
    exact = exact_topk(torch.from_numpy(queries @ base.T), 10)
    ids, scores = search_filtered(flat, queries, 10)
    assert (ids == exact).all() and np.all(np.diff(scores, axis=1) <= 0)
    # Remove each query's 7 best: the next 10 come back, none of the removed.
    known = torch.zeros(20, 200, dtype=torch.bool)
    known.scatter_(1, torch.from_numpy(exact[:, :7]), True)
    ids, _ = search_filtered(flat, queries, 10, known)
    assert (ids == exact_topk(torch.from_numpy(queries @ base.T), 10, known)).all()
    assert not known.gather(1, torch.from_numpy(ids)).any()
    for kind in ("hnsw", "ivf"):
        approx = build_index(base, kind, nprobe=14)
        recall = recall_at_k(search_filtered(approx, queries, 10, known)[0], ids).mean()
        assert recall >= 0.9, (kind, recall)
