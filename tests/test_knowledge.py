"""The knowledge path (elmm.knowledge): retrieval from the training graph, leak-proofing, the RGAT,
the alignment loss, and its hooks into the model, batches, training and model_io."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from elmm.backbone import load_backbone
from elmm.batches import forward_batch, make_batch
from elmm.config import ParamsError, from_dict
from elmm.kg.queries import HEAD, TAIL, Queries, queries_from_triples
from elmm.knowledge.encoder import GCNConv, GraphEncoder, RGATConv, segment_softmax
from elmm.knowledge.path import alignment_loss
from elmm.knowledge.source import attach_knowledge
from elmm.knowledge.subgraph import EXPAND_LIMIT, SubgraphIndex, retrieval_timing
from elmm.model import ELMM, ELMMConfig, elmm_loss, masked_max
from elmm.model_io import add_lora, build_model, load_trained, lora_config, save_trained, set_trainable
from elmm.retrieval import entity_vectors
from test_model import EXACT, perturb_

KNOWLEDGE = {"enabled": True, "dim": 16, "max_triples": 6, "seed_triples": 3, "tokens": 3}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def knowledge_workspace(make_workspace, micro_env, train: dict | None = None, **settings):
    """A fresh workspace whose params enable the knowledge path (KNOWLEDGE + `settings`); `train`
    overrides train params (the micro default is softmax)."""
    return make_workspace(micro_env.params_with(train=train or {}, knowledge={**KNOWLEDGE, **settings}))


def random_index(entities=60, relations=5, triples=400, dim=8, seed=0, **kw) -> SubgraphIndex:
    rng = np.random.default_rng(seed)
    tr = np.stack([rng.integers(0, entities, triples), rng.integers(0, relations, triples),
                   rng.integers(0, entities, triples)], 1)
    return SubgraphIndex(tr, entities, relations, rng.standard_normal((entities, dim)),
                         rng.standard_normal((relations, dim)), **kw)


def random_queries(index: SubgraphIndex, n: int, seed: int = 1):
    """Training queries (both directions) of `n` random training triples of `index`."""
    rng = np.random.default_rng(seed)
    q = queries_from_triples(index.triples[rng.choice(len(index.triples), n, replace=False)])
    return q.anchors.numpy(), q.relations.numpy(), q.directions.numpy(), q.targets.numpy()


def edge_of(a, r, d, t):
    return (t, r, a) if d == HEAD else (a, r, t)


# ---------------------------------------------------------------------------------------- retrieval
def reference_subgraph(index: SubgraphIndex, a: int, r: int, d: int, target: int | None) -> list[int]:
    """The retrieval written out with python sets for one query (module docstring of subgraph)."""
    tr = index.triples.tolist()
    every = np.arange(len(tr))
    q = index.entity_vectors[a] + index.relation_vectors[r]
    score = dict(zip(every.tolist(), index._score((q / np.linalg.norm(q))[None], np.zeros(len(tr), np.int64), every)))
    banned = set()
    if target is not None:
        h, rel, t = edge_of(a, r, d, target)
        banned.add((h, rel, t))
        if index.reverse_edge == "remove":
            banned.add((t, rel, h))
    key = lambda i: (-score[i], i)  # noqa: E731
    pool1 = [i for i, (h, _, t) in enumerate(tr) if a in (h, t) and tuple(tr[i]) not in banned]
    seeds = sorted(pool1, key=key)[: index.seed_triples]
    others = {t if h == a else h for h, _, t in (tr[i] for i in seeds)} - {a}
    pool2 = set()
    for o in others:
        lo = index.indptr[o]
        for i in index.incident[lo:min(index.indptr[o + 1], lo + EXPAND_LIMIT)].tolist():
            if a not in (tr[i][0], tr[i][2]):
                pool2.add(i)
    rest = [i for i in pool1 if i not in seeds] + sorted(pool2)
    fill = sorted(rest, key=key)[: index.max_triples - len(seeds)]
    return sorted(seeds + fill, key=key)


@pytest.mark.parametrize("reverse_edge", ["remove", "keep"])
@pytest.mark.parametrize("train", [True, False])
def test_retrieval_matches_the_written_out_algorithm(reverse_edge, train) -> None:
    index = random_index(reverse_edge=reverse_edge, max_triples=7, seed_triples=3)
    a, r, d, t = random_queries(index, 12)
    sub = index.query_subgraphs(a, r, d, t if train else None)
    for g in range(len(a)):
        expected = reference_subgraph(index, a[g], r[g], d[g], t[g] if train else None)
        assert sub.of(g).tolist() == expected, g


def test_subgraph_size_caps_seeds_and_connectivity() -> None:
    index = random_index(entities=40, triples=600, max_triples=8, seed_triples=3)
    a, r, d, t = random_queries(index, 20)
    sub = index.query_subgraphs(a, r, d, t)
    assert sub.sizes().max() == 8 and (sub.sizes() <= 8).all()
    for g in range(len(a)):
        rows = index.triples[sub.of(g)]
        touching = (rows[:, 0] == a[g]) | (rows[:, 2] == a[g])
        assert touching.sum() >= min(3, index.degree(a[g])[0] - 2)  # the seeds (<= 2 triples removed)
        # every kept triple touches the anchor or an endpoint of a triple that does: connected
        near = set(rows[touching][:, [0, 2]].ravel().tolist())
        assert all(h in near or tl in near for h, _, tl in rows.tolist())
    # a small cap keeps the seeds only
    small = random_index(entities=40, triples=600, max_triples=2, seed_triples=2)
    sizes = small.query_subgraphs(a, r, d).sizes()
    assert sizes.max() == 2


def test_retrieval_is_deterministic_and_independent_of_batch_and_file_order() -> None:
    index = random_index()
    a, r, d, t = random_queries(index, 10)
    sub = index.query_subgraphs(a, r, d, t)
    again = index.query_subgraphs(a, r, d, t)
    assert np.array_equal(sub.tid, again.tid) and np.array_equal(sub.seg, again.seg)
    for g in (0, 7, 19):  # alone = in the batch
        alone = index.query_subgraphs(a[g:g + 1], r[g:g + 1], d[g:g + 1], t[g:g + 1])
        assert alone.tid.tolist() == sub.of(g).tolist()
    # the training file in another order (and with a duplicate row) gives the same triples
    rng = np.random.default_rng(5)
    shuffled = np.concatenate([index.triples[rng.permutation(len(index.triples))], index.triples[:3]])
    other = SubgraphIndex(shuffled, index.num_entities, index.num_relations, index.entity_vectors,
                          index.relation_vectors, max_triples=index.max_triples, seed_triples=index.seed_triples)
    sub2 = other.query_subgraphs(a, r, d, t)
    assert np.array_equal(other.triples[sub2.tid], index.triples[sub.tid]) and np.array_equal(sub2.seg, sub.seg)


def test_ties_are_broken_by_triple_index() -> None:
    """With all feature vectors zero every score ties: the smallest triple indices win."""
    base = random_index(max_triples=5, seed_triples=2)
    index = SubgraphIndex(base.triples, base.num_entities, base.num_relations, np.zeros((base.num_entities, 4)),
                          np.zeros((base.num_relations, 4)), max_triples=5, seed_triples=2)
    a, r, d, _ = random_queries(index, 6)
    sub = index.query_subgraphs(a, r, d)
    for g in range(len(a)):
        tids = sub.of(g).tolist()
        assert tids == sorted(tids)
        pool1 = [i for i, (h, _, t) in enumerate(index.triples.tolist()) if a[g] in (h, t)]
        assert set(pool1[:2]) <= set(tids)  # the seeds: the anchor's two smallest triple indices


def test_the_answer_edge_is_never_in_a_training_subgraph() -> None:
    """Training: the query edge is removed, and with reverse_edge=remove its reverse too; evaluation
    (no target) removes nothing. A symmetric pair is planted so that `keep` visibly keeps it."""
    rng = np.random.default_rng(3)
    tr = np.stack([rng.integers(0, 30, 300), rng.integers(0, 4, 300), rng.integers(0, 30, 300)], 1)
    tr = np.concatenate([tr, [[1, 0, 2], [2, 0, 1]]])  # (1, r0, 2) and its reverse
    vec = rng.standard_normal((30, 6)), rng.standard_normal((4, 6))
    for reverse_edge in ("remove", "keep"):
        index = SubgraphIndex(tr, 30, 4, *vec, max_triples=40, seed_triples=40, reverse_edge=reverse_edge)
        q = queries_from_triples(index.triples)
        a, r, d, t = (x.numpy() for x in (q.anchors, q.relations, q.directions, q.targets))
        sub = index.query_subgraphs(a, r, d, t)
        kept = {(int(g), tuple(index.triples[i])) for g, i in zip(sub.seg, sub.tid)}
        for g in range(len(a)):
            h, rel, tl = edge_of(a[g], r[g], d[g], t[g])
            assert (g, (h, rel, tl)) not in kept
            if reverse_edge == "remove":
                assert (g, (tl, rel, h)) not in kept
        planted = [g for g in range(len(a)) if edge_of(a[g], r[g], d[g], t[g]) == (1, 0, 2)]
        assert planted and all(((g, (2, 0, 1)) in kept) == (reverse_edge == "keep") for g in planted)
        # the candidate side: the target's own neighbourhood lacks the edge as well
        own = index.entity_subgraphs(t, index.exclusion_keys(a, r, d, t))
        own_kept = {(int(g), tuple(index.triples[i])) for g, i in zip(own.seg, own.tid)}
        assert all((g, edge_of(a[g], r[g], d[g], t[g])) not in own_kept for g in range(len(a)))
        # evaluation keeps it: the 40-triple cap holds the whole neighbourhood of these small degrees
        full = index.query_subgraphs(a, r, d)
        g = planted[0]
        assert index.keys[full.of(g)].tolist().count(int(index.exclusion_keys(a, r, d, t)[0][g])) == 1


def test_entity_neighbourhoods_are_capped_and_ranked() -> None:
    index = random_index(max_triples=4)
    ents = np.arange(index.num_entities)
    sub = index.entity_subgraphs(ents)
    assert (sub.sizes() == np.minimum(index.degree(ents), 4)).all()
    for e in (0, 5):
        rows = index.triples[sub.of(e)]
        assert ((rows[:, 0] == e) | (rows[:, 2] == e)).all()


def test_retrieval_timing_reports_its_work() -> None:
    index = random_index()
    a, r, d, t = random_queries(index, 8)
    report = retrieval_timing(index, a, r, d, t, repeats=2)
    assert report["queries"] == 16 and report["seconds"] > 0 and report["candidates_scored"] > 0
    assert 0 < report["triples_kept_mean"] <= index.max_triples


# ---------------------------------------------------------------------------------------- encoder, loss
def test_segment_softmax_normalises_each_segment() -> None:
    logits = torch.tensor([1.0, 2.0, 3.0, -1.0, 0.5])
    index = torch.tensor([0, 0, 2, 2, 2])
    out = segment_softmax(logits, index, 3)
    assert_close(out[:2], torch.softmax(logits[:2], 0))
    assert_close(out[2:], torch.softmax(logits[2:], 0))


def test_rgat_attention_and_output_on_a_hand_computed_example() -> None:
    """Nodes 0, 1, 2; edges 1 -> 0 (relation 0), 2 -> 0 (relation 1), 0 -> 1 (relation 1).

    With W = I, W_a e_0 = (1, 0 | 2, 0), W_a e_1 = (0, 1 | 0, -1) and W_m swapping coordinates:
      logit(1 -> 0) = LeakyReLU((1, 0).h0 + (2, 0).h1) = LeakyReLU(1 + 0) = 1
      logit(2 -> 0) = LeakyReLU((0, 1).h0 + (0, -1).h2) = LeakyReLU(-1) = -0.2
    so node 0 attends with softmax(1, -0.2); node 1 has one incoming edge (weight 1); node 2 none.
    """
    conv = RGATConv(2)
    with torch.no_grad():
        conv.w.weight.copy_(torch.eye(2))
        conv.att.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, -1.0]]))
        conv.rel_msg.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    relations = torch.eye(2)  # e_0, e_1
    src, dst, rel = torch.tensor([1, 2, 0]), torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1])
    with torch.no_grad():
        alpha = conv.attention(conv.w(h), src, dst, rel, relations)
        out = conv(h, src, dst, rel, relations)
    z = math.exp(1) + math.exp(-0.2)
    assert_close(alpha, torch.tensor([math.exp(1) / z, math.exp(-0.2) / z, 1.0]))
    # messages g_j + W_m e_r: 1 -> 0: (0, 1) + (0, 1); 2 -> 0: (1, 1) + (1, 0); 0 -> 1: (1, 0) + (1, 0)
    agg0 = torch.tensor([0.0, 2.0]) * math.exp(1) / z + torch.tensor([2.0, 1.0]) * math.exp(-0.2) / z
    expected = torch.stack([h[0] + torch.nn.functional.elu(agg0), h[1] + torch.nn.functional.elu(torch.tensor([2.0, 0.0])),
                            h[2]])
    assert_close(out, expected)


def test_gcn_is_the_symmetric_normalised_sum_with_self_loops() -> None:
    conv = GCNConv(2)
    with torch.no_grad():
        conv.w.weight.copy_(torch.eye(2))
        h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        out = conv(h, torch.tensor([1, 2]), torch.tensor([0, 0]))  # 1 -> 0, 2 -> 0: deg 3, 1, 1 with loops
    agg0 = h[0] / 3 + h[1] / math.sqrt(3) + h[2] / math.sqrt(3)
    f = torch.nn.functional.elu
    assert_close(out, torch.stack([h[0] + f(agg0), h[1] + f(h[1]), h[2] + f(h[2])]))


@pytest.mark.parametrize("conv", ["rgat", "gat", "gcn"])
def test_graphs_of_a_union_do_not_interact(conv) -> None:
    torch.manual_seed(0)
    enc = GraphEncoder(conv, 8, 2)
    h = torch.randn(5, 8)
    relations = torch.randn(4, 8)
    src, dst, rel = torch.tensor([1, 0, 3, 4]), torch.tensor([0, 1, 4, 3]), torch.tensor([0, 2, 1, 3])
    with torch.no_grad():
        both = enc(h, src, dst, rel, relations)
        first = enc(h[:3], src[:2], dst[:2], rel[:2], relations)
    assert_close(both[:3], first, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("conv", ["rgat", "gat", "gcn"])
def test_layer_gradients_are_bitwise_reproducible_at_two_threads(conv) -> None:
    """Nodes with many edges: every gradient must come out the same bits on each backward at two
    threads. Gathering rows by indexing failed this (its backward adds a node's edge gradients in
    thread order), so a knowledge-path training run was not reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        layer = GraphEncoder(conv, 32, 1).layers[0]
        g = torch.Generator().manual_seed(1)
        n, e = 500, 20000  # about 40 edges per node
        h = torch.randn(n, 32, generator=g, requires_grad=True)
        src, dst = torch.randint(0, n, (e,), generator=g), torch.randint(0, n, (e,), generator=g)
        rel, relations = torch.randint(0, 6, (e,), generator=g), torch.randn(6, 32, generator=g)
        digests = set()
        for _ in range(5):
            layer.zero_grad()
            h.grad = None
            layer(h, src, dst, rel, relations).square().sum().backward()
            grads = [h.grad, *(p.grad for p in layer.parameters())]
            digests.add(b"".join(t.numpy().tobytes() for t in grads))
        assert len(digests) == 1
    finally:
        torch.set_num_threads(threads)


def test_alignment_loss_against_its_formula() -> None:
    torch.manual_seed(0)
    u, t = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    nodes = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    anchors = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    margin = 0.3
    terms = []
    for g in range(2):
        for i in range(4):
            if not anchors[g, i]:
                continue
            ui, pos = u[g, i] / u[g, i].norm(), t[g, i] / t[g, i].norm()
            for j in range(4):
                if j != i and nodes[g, j]:
                    neg = t[g, j] / t[g, j].norm()
                    terms.append(max(0.0, float((ui - pos).norm() - (ui - neg).norm()) + margin))
    assert_close(alignment_loss(u, t, anchors, nodes, margin), torch.tensor(sum(terms) / len(terms)))
    none = torch.zeros(2, 4, dtype=torch.bool)
    assert alignment_loss(u, t, none, nodes, margin) == 0


# ---------------------------------------------------------------------------------------- params
def test_knowledge_params_are_validated() -> None:
    with pytest.raises(ParamsError, match="model.knowledge.seed_triples"):
        from_dict({"model": {"knowledge": {"max_triples": 3, "seed_triples": 5}}})
    with pytest.raises(ParamsError, match="model.knowledge.conv"):
        from_dict({"model": {"knowledge": {"conv": "sage"}}})
    with pytest.raises(ParamsError, match="model.knowledge.align_lambda"):
        from_dict({"model": {"knowledge": {"align_lambda": -1}}})


# ---------------------------------------------------------------------------------------- model
def test_knowledge_off_is_the_model_without_the_option(make_workspace, micro_env) -> None:
    """Disabled, the option adds nothing: same config, parameters, batches and scores as a model
    whose config predates it; enabled, every other component still starts from the same values."""
    ws = make_workspace()
    off = build_model(ws, seed=0).eval()
    assert off.knowledge is None and off.config.knowledge == {} and ws.knowledge is None
    plain = {k: v for k, v in off.config.to_dict().items() if k != "knowledge"}
    torch.manual_seed(0)
    old = ELMM(ws.backbone, ELMMConfig(**plain)).eval()
    q = queries_from_triples(ws.kg.triples["test"][:5])
    batch = make_batch(ws, q)
    assert "knowledge" not in batch
    with torch.no_grad():
        assert_close(forward_batch(off, batch).scores, forward_batch(old, batch).scores, **EXACT)
    assert off.state_dict().keys() == old.state_dict().keys()

    ws_on = knowledge_workspace(make_workspace, micro_env)
    on = build_model(ws_on, seed=0)
    state = on.elmm_state_dict()
    assert any(k.startswith("knowledge.") for k in state)
    for k, v in off.elmm_state_dict().items():
        assert torch.equal(state[k], v), k


def test_knowledge_tokens_enter_before_the_image_block(make_workspace, micro_env) -> None:
    ws = knowledge_workspace(make_workspace, micro_env)
    model = build_model(ws, seed=0).eval()
    q = queries_from_triples(ws.kg.triples["test"][:6])
    batch = make_batch(ws, q)
    seen = {}
    hook = ws.backbone.decoder.register_forward_pre_hook(
        lambda m, a, kw: seen.update(embeds=kw["inputs_embeds"], mask=kw["attention_mask"]), with_kwargs=True)
    with torch.no_grad():
        out = forward_batch(model, batch)
    hook.remove()
    assert out.scores.shape == (len(q), ws.kg.num_entities) and torch.isfinite(out.scores).all()
    t = KNOWLEDGE["tokens"]
    with torch.no_grad():
        text_query = masked_max(ws.backbone.embed_tokens(batch["text"].ids), batch["text"].mask, 1)
        tokens, token_mask, _ = model.knowledge.tokens(batch["knowledge"], text_query, ws.backbone)
    assert_close(seen["embeds"][:, 1:1 + t], tokens, rtol=1e-6, atol=1e-6)
    assert torch.equal(seen["mask"][:, 1:1 + t].bool(), token_mask)
    has_triples = batch["knowledge"].query.roots >= 0
    assert torch.equal(token_mask[:, 0], has_triples)


def test_node_rows_start_as_the_path_without_them_and_train_the_nodes_rows(make_workspace, micro_env) -> None:
    """node_rows: W_C starts at 0 (scores equal to the path without it, same seed), and once it is
    not 0 the knowledge tokens reach the answer-side rows of their subgraph's nodes and no other."""
    scores = {}
    for on in (False, True):
        ws = knowledge_workspace(make_workspace, micro_env, node_rows=on)
        model = build_model(ws, seed=0).eval()
        q = queries_from_triples(ws.kg.triples["test"][:6])
        batch = make_batch(ws, q)
        with torch.no_grad():
            scores[on] = forward_batch(model, batch).scores
    assert torch.equal(scores[True], scores[False])
    with torch.no_grad():
        model.knowledge.row_map.normal_(0, 0.1)
    rows = model.answer_rows.weight
    text_query = masked_max(ws.backbone.embed_tokens(batch["text"].ids), batch["text"].mask, 1)
    tokens, token_mask, _ = model.knowledge.tokens(batch["knowledge"], text_query, ws.backbone, rows)
    (tokens * token_mask[..., None]).square().sum().backward()
    touched = rows.grad.abs().sum(1) > 0
    nodes = torch.zeros_like(touched)
    nodes[batch["knowledge"].query.nodes] = True
    assert touched.any() and torch.equal(touched, nodes)
    with pytest.raises(ValueError, match="node_rows"):
        model.knowledge.tokens(batch["knowledge"], text_query, ws.backbone)


def test_an_anchor_without_training_triples_gets_masked_knowledge(make_workspace, micro_env) -> None:
    """Its knowledge positions are masked out: its scores are those of the same model with its
    knowledge tokens replaced by anything else."""
    ws = knowledge_workspace(make_workspace, micro_env)
    train = ws.kg.triples["train"]
    lonely = int(train[0, 0])
    kg = dataclasses.replace(ws.kg, triples={**ws.kg.triples, "train": train[(train[:, 0] != lonely) & (train[:, 2] != lonely)]})
    ws = dataclasses.replace(ws, kg=kg, knowledge=None)
    model = build_model(ws, seed=0).eval()
    q = Queries(torch.tensor([lonely, 0]), torch.tensor([0, 0]), torch.tensor([TAIL, TAIL]), torch.tensor([1, 1]))
    batch = make_batch(ws, q)
    assert batch["knowledge"].query.roots.tolist()[0] == -1 and batch["knowledge"].query.roots.tolist()[1] >= 0
    with torch.no_grad():
        out = forward_batch(model, batch)
        model.knowledge.adapter.proj.bias.add_(3.0)  # changes every knowledge token
        changed = forward_batch(model, batch)
    assert torch.isfinite(out.scores).all()
    assert_close(changed.scores[0], out.scores[0], **EXACT)
    assert (changed.scores[1] - out.scores[1]).abs().max() > 1e-4


@pytest.mark.parametrize("candidates", ["free", "graph"])
def test_evaluation_does_not_depend_on_the_test_split(make_workspace, micro_env, candidates) -> None:
    """The graph is the training split: adding or removing test triples leaves every score as it was;
    removing a training triple (control) changes some."""
    ws = knowledge_workspace(make_workspace, micro_env, candidates=candidates)
    model = build_model(ws, seed=0).eval()
    q = queries_from_triples(ws.kg.triples["test"])
    with torch.no_grad():
        base = forward_batch(model, make_batch(ws, q)).scores

    def scores_with(split: str, triples: np.ndarray) -> torch.Tensor:
        kg = dataclasses.replace(ws.kg, triples={**ws.kg.triples, split: triples})
        other = dataclasses.replace(ws, kg=kg, knowledge=None)
        model.knowledge.attach(attach_knowledge(other, model.config.knowledge))
        with torch.no_grad():
            return forward_batch(model, make_batch(other, q)).scores

    test = ws.kg.triples["test"]
    added = np.concatenate([test, [[test[0, 2], test[0, 1], test[1, 0]]]])
    assert_close(scores_with("test", added), base, **EXACT)
    assert_close(scores_with("test", test[1:]), base, **EXACT)
    anchor = int(q.anchors[0])
    train = ws.kg.triples["train"]
    touching = (train[:, 0] == anchor) | (train[:, 2] == anchor)
    assert (scores_with("train", train[~touching]) - base).abs().max() > 1e-5


def test_training_batches_read_the_target_only_to_remove_its_edge(make_workspace, micro_env) -> None:
    ws = knowledge_workspace(make_workspace, micro_env, max_triples=40, seed_triples=40)
    q = queries_from_triples(ws.kg.triples["train"])
    index = attach_knowledge(ws, ws.params.model.knowledge).index
    train_batch = make_batch(ws, q, train=True)["knowledge"].query
    eval_batch = make_batch(ws, q)["knowledge"].query
    shuffled = Queries(q.anchors, q.relations, q.directions, q.targets.flip(0))
    assert torch.equal(make_batch(ws, shuffled)["knowledge"].query.src, eval_batch.src)  # eval ignores targets

    def edges(g):
        nodes = g.nodes.numpy()
        return {(int(gr), int(nodes[s]), int(r), int(nodes[d])) for gr, s, r, d in
                zip(g.graph[g.src].numpy(), g.src.numpy(), g.rel.numpy(), g.dst.numpy())}

    tr, ev = edges(train_batch), edges(eval_batch)
    for i in range(len(q)):
        h, r, t = edge_of(int(q.anchors[i]), int(q.relations[i]), int(q.directions[i]), int(q.targets[i]))
        assert (i, h, r, t) not in tr and (i, t, r, h) not in tr
        assert (i, h, r, t) in ev  # evaluation removes nothing (the whole neighbourhood fits in 40)
    assert index.reverse_edge == "remove"


def test_training_step_reaches_every_knowledge_parameter(make_workspace, micro_env) -> None:
    ws = knowledge_workspace(make_workspace, micro_env, candidates="graph", node_rows=True, train={"loss": "bce"})
    model = build_model(ws, seed=0)
    set_trainable(model)
    with torch.no_grad():  # P starts at 0 (the free rows): move it so the encoder gets a gradient through it
        model.knowledge.candidate.weight.normal_(0, 0.1)
    q = queries_from_triples(ws.kg.triples["train"][:6])
    neg = torch.randint(0, ws.kg.num_entities, (len(q), 4), generator=torch.Generator().manual_seed(0))
    out = forward_batch(model, make_batch(ws, q, train=True, negatives=neg))
    assert out.extra_loss is not None and out.extra_loss >= 0
    loss = elmm_loss(out.scores, q.targets, neg, torch.ones_like(neg, dtype=torch.bool)) + out.extra_loss
    loss.backward()
    for n, p in model.named_parameters():
        if n.startswith("knowledge."):
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            assert p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("candidates", ["free", "graph"])
def test_softmax_training_with_the_path(make_workspace, micro_env, candidates) -> None:
    """The default loss (softmax over every entity) trains with the path on, either candidate side:
    two finite steps that move the knowledge parameters."""
    from elmm.kg.queries import FilterIndex
    from elmm.training import train_model

    ws = knowledge_workspace(make_workspace, micro_env, candidates=candidates)
    model = build_model(ws, seed=0)
    set_trainable(model)
    tp = dataclasses.replace(micro_env.params.train, batch_size=8, max_steps=2)
    assert tp.loss == "softmax"
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("knowledge.")}
    summary = train_model(model, ws, queries_from_triples(ws.kg.triples["train"]),
                          FilterIndex(ws.kg.triples["train"], ws.kg.num_entities), tp, seed=0, progress=False)
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_graph_candidates_agree_between_training_columns_and_evaluation(make_workspace, micro_env) -> None:
    """The loss columns (training) and the all-entity table (evaluation) give one score per entity,
    except the target, whose neighbourhood lacks the query edge in training; the folded entity
    vectors of retrieval reproduce the evaluation scores."""
    ws = knowledge_workspace(make_workspace, micro_env, candidates="graph", align_lambda=0.0, train={"loss": "bce"})
    model = build_model(ws, seed=0)
    torch.manual_seed(2)
    perturb_([p for p in model.parameters() if p.requires_grad], 0.2)
    q = queries_from_triples(ws.kg.triples["train"][:5])
    neg = torch.randint(0, ws.kg.num_entities, (len(q), 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.train()
        columns = forward_batch(model, make_batch(ws, q, train=True, negatives=neg))
        model.eval()
        full = forward_batch(model, make_batch(ws, q))
        # the training subgraph differs from the evaluation one: compare the candidate term itself
        qp = full.query @ model.knowledge.candidate.weight
        table = model.knowledge.entity_table(ws.backbone)
        assert_close(full.scores - model.completion.entities(full.query), qp @ table.T, rtol=1e-5, atol=1e-5)
        base_cols = model.completion.entities(columns.query)
        term = (columns.scores - base_cols).gather(1, neg)
        qp_train = columns.query @ model.knowledge.candidate.weight
        expected = (qp_train[:, None, :] * table[neg]).sum(-1)
        drawn_target = neg == q.targets[:, None]  # the target's own value (query edge removed) wins there
        assert_close(term[~drawn_target], expected[~drawn_target], rtol=1e-5, atol=1e-5)
        weight, bias = entity_vectors(model)
        assert_close(full.query @ weight.T + bias, full.scores, rtol=1e-4, atol=1e-4)
        assert out_of_date_cache_is_refreshed(model, ws)


def test_graph_candidates_under_softmax_score_every_entity_from_the_table(make_workspace, micro_env) -> None:
    """Under softmax, with candidates: graph: every column gets the term from the all-entity table, except
    the target, whose neighbourhood lacks the query edge; the gradient reaches the encoder through
    the table."""
    ws = knowledge_workspace(make_workspace, micro_env, candidates="graph", align_lambda=0.0)
    model = build_model(ws, seed=0)
    set_trainable(model)
    torch.manual_seed(2)
    perturb_([p for p in model.parameters() if p.requires_grad], 0.2)
    with torch.no_grad():  # the knowledge tokens then carry nothing of the encoder: its gradient is the term's
        model.knowledge.adapter.proj.weight.zero_()
    q = queries_from_triples(ws.kg.triples["train"][:5])
    model.train()
    kb = make_batch(ws, q, train=True)["knowledge"]
    assert kb.every_entity and torch.equal(kb.columns[:, 0], q.targets)
    out = forward_batch(model, make_batch(ws, q, train=True))
    assert out.scores.shape == (len(q), ws.kg.num_entities)
    with torch.no_grad():
        model.eval()
        table = model.knowledge.entity_table(ws.backbone)
        model.train()
        qp = out.query @ model.knowledge.candidate.weight
        term = out.scores - model.completion.entities(out.query)
        others = torch.ones_like(term, dtype=torch.bool)
        others[torch.arange(len(q)), q.targets] = False
        assert_close(term[others], (qp @ table.T)[others], rtol=1e-5, atol=1e-5)
        g = kb.candidates
        own = model.knowledge.encode(g, ws.backbone)[g.roots]
        expected_target = (qp * own).sum(-1)
        assert_close(term[torch.arange(len(q)), q.targets], expected_target, rtol=1e-5, atol=1e-5)
        # the query edge is what makes the target's value differ from its table row
        assert (expected_target - (qp * table[q.targets]).sum(-1)).abs().max() > 1e-3
    out.scores[others].sum().backward()  # the targets' columns left out: the table alone must carry it
    assert model.knowledge.encoder.layers[0].w.weight.grad.abs().sum() > 0
    assert model.knowledge.candidate.weight.grad.abs().sum() > 0


def out_of_date_cache_is_refreshed(model, ws) -> bool:
    table = model.knowledge.entity_table(ws.backbone)
    assert model.knowledge.entity_table(ws.backbone) is table  # cached while nothing changes
    model.knowledge.encoder.layers[0].w.weight.mul_(1.5)
    return not torch.equal(model.knowledge.entity_table(ws.backbone), table)


@pytest.mark.parametrize("conv", ["rgat", "gcn"])
def test_save_load_roundtrip_with_knowledge(make_workspace, micro_env, tmp_path, conv) -> None:
    ws = knowledge_workspace(make_workspace, micro_env, candidates="graph", conv=conv)
    model = build_model(ws, seed=0)
    add_lora(model, lora_config(4, 8, 0.0))
    set_trainable(model)
    torch.manual_seed(1)
    perturb_([p for p in model.parameters() if p.requires_grad])
    model.eval()
    q = queries_from_triples(ws.kg.triples["test"][:6])
    with torch.no_grad():
        expected = forward_batch(model, make_batch(ws, q)).scores
    save_trained(tmp_path / "model", model, {})
    saved = load_file(str(tmp_path / "model" / "elmm.safetensors"))
    assert any(k.startswith("knowledge.encoder.") for k in saved) and "knowledge.candidate.weight" in saved
    assert json.loads((tmp_path / "model" / "config.json").read_text())["elmm"]["knowledge"]["conv"] == conv

    fresh = make_workspace()  # params without the knowledge path: the saved config decides
    assert fresh.knowledge is None
    loaded = load_trained(fresh, tmp_path / "model")
    assert loaded.config == model.config and fresh.knowledge is not None
    with torch.no_grad():
        assert_close(forward_batch(loaded, make_batch(fresh, q)).scores, expected, **EXACT)


def test_pruning_stages_build_without_the_knowledge_path(make_workspace, micro_env) -> None:
    ws = knowledge_workspace(make_workspace, micro_env)
    model = build_model(ws, seed=0, head="completion", knowledge=False)
    assert model.knowledge is None and ws.knowledge is None


def test_a_model_with_the_path_refuses_batches_without_subgraphs(make_workspace, micro_env) -> None:
    ws = knowledge_workspace(make_workspace, micro_env)
    model = build_model(ws, seed=0).eval()
    batch = make_batch(dataclasses.replace(ws, knowledge=None), queries_from_triples(ws.kg.triples["test"][:2]))
    with pytest.raises(ValueError, match="knowledge"):
        forward_batch(model, batch)


def test_a_new_backbone_copy_loads_the_same_features(make_workspace, micro_env) -> None:
    ws = knowledge_workspace(make_workspace, micro_env)
    model = build_model(ws, seed=0)
    name, image, relation, has_image = model.knowledge.features(ws.backbone)
    other = load_backbone(micro_env.backbone_dir)
    model.knowledge._features = None
    again = model.knowledge.features(other)
    for a, b in zip((name, image, relation, has_image), again):
        assert torch.equal(a, b)
    assert (image.abs().sum(1) > 0).sum() == int(has_image.sum()) and not has_image.all()


def test_train_and_evaluate_stages_with_the_knowledge_path(make_project, run_stage) -> None:
    """The stages run unchanged with the path on: training adds the alignment loss and feeds the loss
    columns' neighbourhoods, data/model holds the path, and evaluate's exact index (entity rows with
    the candidate term folded in) reproduces the model's ranking."""
    project = make_project({
        "model": {"knowledge": {**KNOWLEDGE, "candidates": "graph"}},
        # bce: the graph term encoded for the loss columns only (softmax, the whole table: its own test)
        "train": {"loss": "bce", "epochs": 1, "batch_size": 16, "grad_accum": 2, "negatives": 4, "warmup_steps": 1,
                  "lr": 0.002, "checkpoint_every": 0, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "evaluate": {"batch_size": 16, "index_k": 5},
    })
    run_stage("train", project)
    run_stage("evaluate", project)
    saved = load_file(str(project / "data/model/elmm.safetensors"))
    assert "knowledge.candidate.weight" in saved and saved["knowledge.candidate.weight"].abs().sum() > 0
    summary = json.loads((project / "metrics/train/metrics.json").read_text())
    assert summary["steps"] == 10 and math.isfinite(summary["final_loss"])  # 312 queries / (16 x 2)
    ev = json.loads((project / "metrics/evaluate.json").read_text())
    assert 0 < ev["mrr"] <= 1
    if ev["index"]["faiss"]:
        assert ev["index"]["flat_recall_at_k"] == pytest.approx(1.0, abs=0.02)
