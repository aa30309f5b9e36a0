"""Tests for elmm.model (MVTC, masked max, loss, ELMM forward) and elmm.batches (no answer leakage,
no influence between batch mates)."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from elmm.batches import forward_batch, make_batch
from elmm.config import ParamsError, from_dict, validate
from elmm.kg.queries import HEAD, TAIL, Queries, queries_from_triples
from elmm.model import ELMM, ELMMConfig, MVTCView, elmm_loss, masked_max, softmax_loss
from elmm.prompt import PromptBuilder, answer_prefixes
from elmm.workspace import Workspace

EXACT = {"atol": 0.0, "rtol": 0.0}


# ---------------------------------------------------------------------------------------- helpers
def reference_view(view: MVTCView, query: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor):
    """MVTC written out head by head, V applied to every token *before* pooling.

    head_i = softmax(LN(q) W_i^Q (LN(I) W_i^K)^T / sqrt(d)) (I W_i^V); masked tokens are removed
    from the softmax, a row without any real token gives zero. LN is written out (biased variance,
    eps, then the affine). Returns (output [B, H, D], weights [B, H, T]).
    """
    def layer_norm(x, ln):
        centred = x - x.mean(-1, keepdim=True)
        out = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + ln.eps) * ln.weight
        return out if ln.bias is None else out + ln.bias

    b, t, dim = tokens.shape
    hd = view.head_dim
    outs, weights = [], []
    for i in range(view.heads):
        wq = view.q.weight[i * hd:(i + 1) * hd]  # nn.Linear stores [out, in]
        wk = view.k.weight[i * hd:(i + 1) * hd]
        q = layer_norm(query, view.query_norm) @ wq.T  # [B, d]
        k = layer_norm(tokens, view.token_norm) @ wk.T  # [B, T, d]
        v = tokens @ value_matrix(view, i)  # [B, T, D]: per-head value of every token
        head_out = torch.zeros(b, dim)
        head_w = torch.zeros(b, t)
        for r in range(b):
            real = mask[r].nonzero().flatten()
            if len(real) == 0:
                continue
            logits = (k[r, real] @ q[r]) / math.sqrt(hd)
            w = torch.softmax(logits, dim=0)
            head_w[r, real] = w
            head_out[r] = w @ v[r, real]
        outs.append(head_out)
        weights.append(head_w)
    return torch.stack(outs, 1), torch.stack(weights, 1)


def value_matrix(view: MVTCView, head: int) -> torch.Tensor:
    """W_i^V [D, D] of head `head`, written out for each `view.value`."""
    if view.value == "per_head":
        return view.v[head]
    if view.value == "shared":
        return view.v
    return torch.eye(view.value_u.shape[1]) + view.value_u[head] @ view.value_v[head].T


def random_view(dim: int, heads: int, value: str = "per_head") -> MVTCView:
    """An MVTCView with non-identity value matrices, so the value projection is really exercised."""
    view = MVTCView(dim, heads, value, rank=3)
    with torch.no_grad():
        for v in (p for n, p in view.named_parameters() if n in ("v", "value_u", "value_v")):
            v.copy_(torch.randn_like(v) / math.sqrt(dim))
        for ln in (view.query_norm, view.token_norm):  # non-trivial affines, so the reference checks them
            ln.weight.copy_(1 + 0.3 * torch.randn_like(ln.weight))
            if ln.bias is not None:
                ln.bias.copy_(0.1 * torch.randn_like(ln.bias))
    return view


def perturb_(params, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * scale)


# ---------------------------------------------------------------------------------------- MVTC
def test_mvtc_view_shapes() -> None:
    """Query [B, D], tokens [B, T, D], mask [B, T] -> [B, H, D]."""
    torch.manual_seed(0)
    view = MVTCView(16, 4)
    out = view(torch.randn(3, 16), torch.randn(3, 5, 16), torch.ones(3, 5, dtype=torch.bool))
    assert out.shape == (3, 4, 16)
    assert view.head_dim == 4


def test_mvtc_attention_does_not_depend_on_the_input_scale() -> None:
    """Scaling query and tokens by c scales the output by c: the pooling weights are those of the
    normalised inputs, so a backbone with small activations (the tiny default's projected tokens
    have norm ~0.2) gets as selective an attention as one with large activations."""
    torch.manual_seed(4)
    view = random_view(16, 4)
    query, tokens = torch.randn(3, 16), torch.randn(3, 6, 16)
    mask = torch.ones(3, 6, dtype=torch.bool)
    with torch.no_grad():
        out = view(query, tokens, mask)
        for c in (3.0, 30.0):  # (far above LayerNorm eps, which is the only scale it sees)
            assert_close(view(c * query, c * tokens, mask), c * out, atol=1e-4 * c, rtol=1e-4)
        _, weights = reference_view(view, 0.1 * query, 0.1 * tokens, mask)
    assert weights.std(-1).mean() > 0.02  # far from uniform (1/6 each) at a small input scale


def test_mvtc_masked_tokens_have_no_influence_and_zero_weight() -> None:
    """A padded token's content never reaches the output, and its attention weight is exactly 0."""
    torch.manual_seed(1)
    view = random_view(16, 4)
    query, tokens = torch.randn(3, 16), torch.randn(3, 6, 16)
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    with torch.no_grad():
        out = view(query, tokens, mask)
        garbage = tokens.clone()
        garbage[~mask] = torch.randn(int((~mask).sum()), 16) * 1e4
        out_garbage = view(query, garbage, mask)
        ref, weights = reference_view(view, query, garbage, mask)
    assert_close(out_garbage, out, **EXACT)
    assert torch.all(weights[~mask[:, None, :].expand_as(weights)] == 0)
    assert_close(weights.sum(-1), torch.ones(3, 4))
    assert_close(out_garbage, ref, rtol=1e-5, atol=1e-5)


def test_mvtc_is_permutation_invariant() -> None:
    """Permuting the image tokens (and their mask) along T leaves the output unchanged."""
    torch.manual_seed(2)
    view = random_view(16, 2)
    query, tokens = torch.randn(2, 16), torch.randn(2, 7, 16)
    mask = torch.tensor([[1, 1, 1, 0, 1, 0, 1], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    perm = torch.randperm(7)
    while torch.equal(perm, torch.arange(7)):
        perm = torch.randperm(7)
    with torch.no_grad():
        assert_close(view(query, tokens[:, perm], mask[:, perm]), view(query, tokens, mask), rtol=1e-6, atol=1e-6)


def test_mvtc_all_masked_row_is_zero_and_finite() -> None:
    """An entity without images (all tokens masked) gives zeros, no NaN, and finite gradients."""
    torch.manual_seed(3)
    view = random_view(8, 2)
    tokens = torch.randn(2, 4, 8, requires_grad=True)
    mask = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
    out = view(torch.randn(2, 8), tokens, mask)
    assert torch.isfinite(out).all()
    assert_close(out[0], torch.zeros(2, 8), **EXACT)
    assert out[1].abs().sum() > 0
    out.sum().backward()
    for p in (view.q.weight, view.k.weight, view.v, tokens):
        assert torch.isfinite(p.grad).all()
    assert_close(tokens.grad[0], torch.zeros(4, 8), **EXACT)


@pytest.mark.parametrize("value", ["per_head", "shared", "low_rank"])
@pytest.mark.parametrize("heads", [1, 2, 4])
def test_mvtc_pool_then_project_matches_explicit_formula(heads: int, value: str) -> None:
    """Head i equals softmax(q W_i^Q (I W_i^K)^T / sqrt(d)) I W_i^V with V applied per token, for
    every form of W_i^V (per head, shared, identity + U_i V_i^T)."""
    torch.manual_seed(4 + heads)
    view = random_view(16, heads, value)
    query, tokens = torch.randn(4, 16), torch.randn(4, 9, 16)
    mask = torch.rand(4, 9) > 0.3
    mask[:, 0] = True
    with torch.no_grad():
        ref, _ = reference_view(view, query, tokens, mask)
        assert_close(view(query, tokens, mask), ref, rtol=1e-5, atol=1e-5)


def test_mvtc_gradients_match_explicit_formula() -> None:
    """The folded keys (q into W^K and the token LN's gain) give the explicit formula's gradients
    for every parameter, not only its values."""
    torch.manual_seed(11)
    view = random_view(16, 4)
    query, tokens = torch.randn(3, 16), torch.randn(3, 7, 16)
    mask = torch.rand(3, 7) > 0.3
    mask[:, 0] = True
    target = torch.randn(3, 4, 16)
    grads = []
    for forward in (lambda: view(query, tokens, mask), lambda: reference_view(view, query, tokens, mask)[0]):
        view.zero_grad()
        (forward() * target).sum().backward()
        grads.append({n: p.grad.clone() for n, p in view.named_parameters()})
    assert set(grads[0]) == set(grads[1]) and "k.weight" in grads[0] and "token_norm.weight" in grads[0]
    for name in grads[0]:
        assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_mvtc_value_projection_starts_as_identity() -> None:
    """Untrained, each head is attention pooling of the raw tokens: output rows are convex mixes."""
    torch.manual_seed(5)
    view = MVTCView(8, 2)
    assert_close(view.v.detach(), torch.eye(8).repeat(2, 1, 1), **EXACT)
    tokens = torch.randn(1, 3, 8)
    with torch.no_grad():
        _, weights = reference_view(view, torch.randn(1, 8), tokens, torch.ones(1, 3, dtype=torch.bool))
        out = view(torch.randn(1, 8), tokens, torch.ones(1, 3, dtype=torch.bool))
    assert weights.shape == (1, 2, 3)
    # every head lies in the convex hull of the tokens: per-dim within [min, max]
    assert torch.all(out <= tokens.amax(1, keepdim=True) + 1e-6) and torch.all(out >= tokens.amin(1, keepdim=True) - 1e-6)


def test_mvtc_value_forms_start_equal_and_have_their_sizes() -> None:
    """The shared and low_rank value maps start as the identity too: with the same seed, all three views compute
    the same output at init; their value parameters are H D^2, D^2 and 2 H D r."""
    dim, heads, rank = 8, 2, 3
    query, tokens = torch.randn(2, dim), torch.randn(2, 5, dim)
    mask = torch.ones(2, 5, dtype=torch.bool)
    outs, sizes = {}, {}
    for value in MVTCView.VALUES:
        torch.manual_seed(7)
        view = MVTCView(dim, heads, value, rank)
        with torch.no_grad():
            outs[value] = view(query, tokens, mask)
        sizes[value] = sum(p.numel() for n, p in view.named_parameters() if n in ("v", "value_u", "value_v"))
    assert_close(outs["shared"], outs["per_head"], **EXACT)
    assert_close(outs["low_rank"], outs["per_head"], **EXACT)
    assert sizes == {"per_head": heads * dim * dim, "shared": dim * dim, "low_rank": 2 * heads * dim * rank}
    view = MVTCView(dim, heads, "low_rank", rank)
    assert torch.count_nonzero(view.value_v) == 0 and torch.count_nonzero(view.value_u) > 0
    with pytest.raises(ValueError, match=r"model\.mvtc\.value"):
        MVTCView(dim, heads, "diagonal")


# ---------------------------------------------------------------------------------------- masked max
def test_masked_max_hand_example() -> None:
    """Max over real positions only (even if padding holds larger values); fully masked -> 0."""
    x = torch.tensor([
        [[1.0, -5.0], [100.0, 100.0], [3.0, -2.0]],
        [[-1.0, -2.0], [-3.0, -0.5], [50.0, 50.0]],
        [[7.0, 7.0], [8.0, 8.0], [9.0, 9.0]],
    ])
    mask = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    expected = torch.tensor([[3.0, -2.0], [-1.0, -0.5], [0.0, 0.0]])
    assert_close(masked_max(x, mask, 1), expected, **EXACT)


# ---------------------------------------------------------------------------------------- loss
def test_elmm_loss_hand_example() -> None:
    """-log sigmoid(s_t) - mean over valid negatives of log(1 - sigmoid(s_n)), averaged over the batch."""
    scores = torch.tensor([[2.0, -1.0, 0.5, 3.0], [0.0, 1.0, -2.0, 4.0]])
    targets = torch.tensor([0, 1])
    negatives = torch.tensor([[1, 2, 3], [0, 3, 2]])
    mask = torch.tensor([[True, False, True], [True, True, True]])

    def sig(v: float) -> float:
        return 1.0 / (1.0 + math.exp(-v))

    row0 = -math.log(sig(2.0)) - (math.log(1 - sig(-1.0)) + math.log(1 - sig(3.0))) / 2
    row1 = -math.log(sig(1.0)) - (math.log(1 - sig(0.0)) + math.log(1 - sig(4.0)) + math.log(1 - sig(-2.0))) / 3
    expected = torch.tensor((row0 + row1) / 2)
    assert_close(elmm_loss(scores, targets, negatives, mask), expected, rtol=1e-6, atol=1e-6)


def test_elmm_loss_ignores_masked_negative_score() -> None:
    """A masked negative (a true answer) does not move the loss, however high its score."""
    scores = torch.tensor([[1.0, 0.0, -1.0]])
    args = (torch.tensor([0]), torch.tensor([[1, 2]]), torch.tensor([[True, False]]))
    base = elmm_loss(scores, *args)
    high = scores.clone()
    high[0, 2] = 80.0
    assert_close(elmm_loss(high, *args), base, **EXACT)


def test_softmax_loss_hand_example() -> None:
    """-log of the target's softmax over every entity but the query's other known answers, batch mean."""
    scores = torch.tensor([[2.0, -1.0, 0.5, 3.0], [0.0, 1.0, -2.0, 4.0]])
    targets = torch.tensor([0, 1])
    known = torch.tensor([[True, False, False, True], [False, True, False, False]])  # row 0: entity 3 also answers

    def nll(row: list[float], t: int) -> float:
        return -(row[t] - math.log(sum(math.exp(v) for v in row)))

    expected = torch.tensor((nll([2.0, -1.0, 0.5], 0) + nll([0.0, 1.0, -2.0, 4.0], 1)) / 2)
    before = known.clone()
    assert_close(softmax_loss(scores, targets, known), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(known, before), "the known mask is not modified in place"


def test_softmax_loss_label_smoothing() -> None:
    """Without masked entities it is F.cross_entropy's label smoothing; with them, the smoothing mass
    goes to the normaliser's entities only (hand-computed); 0 is the plain loss bit for bit."""
    scores = torch.tensor([[2.0, -1.0, 0.5, 3.0], [0.0, 1.0, -2.0, 4.0]])
    targets, none = torch.tensor([0, 1]), torch.zeros(2, 4, dtype=torch.bool)
    assert_close(softmax_loss(scores, targets, none, label_smoothing=0.2),
                 F.cross_entropy(scores, targets, label_smoothing=0.2), rtol=1e-6, atol=1e-6)
    assert torch.equal(softmax_loss(scores, targets, none, label_smoothing=0.0), softmax_loss(scores, targets, none))
    known = torch.tensor([[True, False, False, True], [False, True, False, False]])  # row 0: entity 3 also answers
    row = [2.0, -1.0, 0.5]  # row 0's normaliser: entity 3 left out
    logz = math.log(sum(math.exp(v) for v in row))
    first = 0.7 * (logz - row[0]) + 0.3 * sum(logz - v for v in row) / 3
    row1 = [0.0, 1.0, -2.0, 4.0]
    logz1 = math.log(sum(math.exp(v) for v in row1))
    second = 0.7 * (logz1 - row1[1]) + 0.3 * sum(logz1 - v for v in row1) / 4
    assert_close(softmax_loss(scores, targets, known, label_smoothing=0.3), torch.tensor((first + second) / 2),
                 rtol=1e-6, atol=1e-6)
    # gradients stay finite and leave the masked entries (another known answer, the left-out anchor) alone
    x = scores.clone().requires_grad_(True)
    softmax_loss(x, targets, known, anchors=torch.tensor([2, 0]), label_smoothing=0.3).backward()
    assert torch.isfinite(x.grad).all() and x.grad[0, 3] == 0 and x.grad[0, 2] == 0 and x.grad[1, 0] == 0
    with pytest.raises(ParamsError, match=r"train.label_smoothing: must be in \[0, 1\)"):
        validate(from_dict({"train": {"label_smoothing": 1.0}}))
    with pytest.raises(ParamsError, match="train.label_smoothing: applies to train.loss: softmax"):
        validate(from_dict({"train": {"label_smoothing": 0.1, "loss": "bce"}}))


def test_softmax_loss_ignores_other_answers_not_the_anchor() -> None:
    """Another known answer's score does not move the loss; any other entity's (the anchor's too) raises it."""
    scores = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    targets, known = torch.tensor([0]), torch.tensor([[True, False, True, False]])
    base = softmax_loss(scores, targets, known)
    other_answer, negative = scores.clone(), scores.clone()
    other_answer[0, 2], negative[0, 3] = 80.0, 5.0
    assert_close(softmax_loss(other_answer, targets, known), base, **EXACT)
    assert softmax_loss(negative, targets, known) > base + 1
    # train.self_denoise: false leaves the anchor (here entity 3) out of the normaliser as well
    assert_close(softmax_loss(negative, targets, known, anchors=torch.tensor([3])),
                 softmax_loss(scores, targets, known | torch.tensor([[False, False, False, True]])), **EXACT)


# ---------------------------------------------------------------------------------------- negatives


# ---------------------------------------------------------------------------------------- forward
def _queries(ws, n: int = 4) -> Queries:
    return queries_from_triples(ws.kg.triples["train"][:n])


@pytest.mark.parametrize("head", ["completion", "lm_head"])
@pytest.mark.parametrize(("mvtc", "text_view", "image_view", "max_image_tokens", "expected_tokens"), [
    (True, True, True, 256, 4),  # 2 views x 2 heads
    (True, False, True, 256, 2),
    (True, True, False, 256, 2),
    (False, True, True, 256, 12),  # N * M = 3 images x 4 patches
    (False, True, True, 5, 5),  # capped
])
def test_elmm_forward_shapes(micro_workspace, head, mvtc, text_view, image_view, max_image_tokens,
                             expected_tokens) -> None:
    """Scores are [B, num_entities]; the image block width follows the MVTC / cap configuration."""
    ws = micro_workspace
    torch.manual_seed(0)
    config = ELMMConfig(num_entities=ws.kg.num_entities, mvtc_enabled=mvtc, text_view=text_view,
                        image_view=image_view, heads=2, head=head, max_image_tokens=max_image_tokens)
    model = ELMM(ws.backbone, config).eval()
    q = _queries(ws)
    batch = make_batch(ws, q)
    with torch.no_grad():
        out = forward_batch(model, batch)
    b = len(q)
    assert out.scores.shape == (b, ws.kg.num_entities)
    assert torch.isfinite(out.scores).all()
    assert out.image_tokens == expected_tokens
    assert out.query.shape == (b, 3 * ws.backbone.hidden_size if head == "completion" else ws.backbone.hidden_size)
    # image_mask() predicts exactly the mask image_block() builds, without building the block.
    with torch.no_grad():
        ids, text_mask = batch["text"].ids, batch["text"].mask
        block, block_mask = model.image_block(batch["patches"], batch["cls"], batch["slot_mask"],
                                              ws.backbone.embed_tokens(ids), text_mask)
    assert block.shape == (b, expected_tokens, ws.backbone.hidden_size)
    assert torch.equal(model.image_mask(batch["slot_mask"], ws.tokens.num_tokens), block_mask)


def test_elmm_forward_entity_without_images_is_finite(micro_workspace) -> None:
    """An anchor with no images gets a masked image block and still finite scores and gradients."""
    ws = micro_workspace
    no_img = int((~ws.tokens.mask.any(1)).nonzero()[0])
    q = Queries(torch.tensor([no_img, 0]), torch.tensor([0, 0]), torch.tensor([TAIL, HEAD]), torch.tensor([1, 1]))
    torch.manual_seed(0)
    model = ELMM(ws.backbone, ELMMConfig(num_entities=ws.kg.num_entities, heads=2))
    batch = make_batch(ws, q)
    assert not batch["slot_mask"][0].any()
    out = forward_batch(model, batch)
    assert torch.isfinite(out.scores).all()
    out.scores.sum().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


# ---------------------------------------------------------------------------------------- trainable split


# ---------------------------------------------------------------------------------------- save / load


# ---------------------------------------------------------------------------------------- leakage
def _leak_query(ws) -> Queries:
    """A tail query whose anchor and answer are distinct entities that both have images."""
    has = ws.tokens.mask.any(1)
    for h, r, t in ws.kg.triples["train"].tolist():
        if h != t and has[h] and has[t]:
            return Queries(torch.tensor([h]), torch.tensor([r]), torch.tensor([TAIL]), torch.tensor([t]))
    raise AssertionError("no suitable query in the synthetic KG")


def _with_entity_changed(ws, entity: int, *, tokens: bool = True, text: bool = True) -> Workspace:
    """A copy of `ws` in which every feature of `entity` (image tokens, name, description) differs."""
    new = copy.copy(ws.tokens)
    if tokens:
        g = torch.Generator().manual_seed(123)
        new.patches = ws.tokens.patches.clone()
        new.cls = ws.tokens.cls.clone()
        new.patches[entity] = (torch.randn(new.patches[entity].shape, generator=g) * 3).half()
        new.cls[entity] = (torch.randn(new.cls[entity].shape, generator=g) * 3).half()
    prompts = ws.prompts
    if text:
        names = ws.kg.entities["name"].tolist()
        descs = ws.kg.entities["description"].tolist()
        names[entity] = "zebra quantum xylophone"
        descs[entity] = "A completely different description of something else entirely."
        # the relation segments as the workspace built them (model.answer_prefix: a property of the
        # training split's answers, computed once, never of one query's answer)
        prompts = ws.prompts.with_entities(names, descs)
        assert prompts.entity_ids[entity] != ws.prompts.entity_ids[entity]
    return dataclasses.replace(ws, tokens=new, prompts=prompts)


@pytest.mark.parametrize(("head", "mvtc"), [("completion", True), ("completion", False), ("lm_head", True)])
def test_no_answer_leakage(micro_workspace, head, mvtc) -> None:
    """Changing every feature of the answer entity leaves the query's scores unchanged; changing the
    anchor's image tokens (control) does change them."""
    ws = micro_workspace
    torch.manual_seed(0)
    config = ELMMConfig(num_entities=ws.kg.num_entities, mvtc_enabled=mvtc, heads=2, head=head)
    model = ELMM(ws.backbone, config).eval()
    q = _leak_query(ws)
    anchor, answer = int(q.anchors[0]), int(q.targets[0])
    with torch.no_grad():
        base = forward_batch(model, make_batch(ws, q)).scores
        changed_answer = forward_batch(model, make_batch(_with_entity_changed(ws, answer), q)).scores
        changed_anchor = forward_batch(model, make_batch(_with_entity_changed(ws, anchor, text=False), q)).scores
        changed_anchor_text = forward_batch(model, make_batch(_with_entity_changed(ws, anchor, tokens=False), q)).scores
    assert_close(changed_answer, base, **EXACT)
    assert (changed_anchor - base).abs().max() > 1e-4
    assert (changed_anchor_text - base).abs().max() > 1e-4


@pytest.mark.parametrize("mvtc", [True, False])
def test_scores_do_not_depend_on_batch_mates(micro_workspace, mvtc) -> None:
    """A query scores the same alone or batched with others (different text lengths, image counts,
    an entity without images): padding never leaks across rows."""
    ws = micro_workspace
    no_img = int((~ws.tokens.mask.any(1)).nonzero()[0])
    fewer = int((ws.tokens.mask.sum(1) == 1).nonzero()[0])
    anchors = torch.tensor([0, no_img, fewer, ws.kg.num_entities - 1, 3])
    q = Queries(anchors, torch.tensor([0, 4, 2, 3, 1]), torch.tensor([TAIL, HEAD, TAIL, HEAD, TAIL]),
                torch.zeros(5, dtype=torch.long))
    torch.manual_seed(0)
    model = ELMM(ws.backbone, ELMMConfig(num_entities=ws.kg.num_entities, mvtc_enabled=mvtc, heads=2)).eval()
    with torch.no_grad():
        batched = forward_batch(model, make_batch(ws, q)).scores
        single = torch.cat([forward_batch(model, make_batch(ws, q.subset(slice(i, i + 1)))).scores for i in range(5)])
    assert_close(batched, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", ["completion", "lm_head"])
def test_candidate_scores_are_the_full_scores_columns_with_the_same_loss_gradient(micro_workspace, head) -> None:
    """Training scores only target + negatives: the same values as the full [B, E] scores'
    columns, and elmm_loss on them has the same gradient for every parameter."""
    ws = micro_workspace
    q = queries_from_triples(ws.kg.triples["train"][:6])
    torch.manual_seed(0)
    model = ELMM(ws.backbone, ELMMConfig(num_entities=ws.kg.num_entities, heads=2, head=head))
    perturb_([p for n, p in model.named_parameters() if not n.startswith("llm.")], 0.05)
    negatives = torch.randint(0, ws.kg.num_entities, (len(q), 5), generator=torch.Generator().manual_seed(1))
    mask = torch.rand(len(q), 5, generator=torch.Generator().manual_seed(2)) > 0.2
    candidates = torch.cat([q.targets[:, None], negatives], 1)
    batch = make_batch(ws, q)
    grads, scores = [], []
    for picked in (None, candidates):
        model.zero_grad()
        out = forward_batch(model, batch, picked)
        if picked is None:
            loss = elmm_loss(out.scores, q.targets, negatives, mask)
            scores.append(out.scores.gather(1, candidates))
        else:
            b, c = candidates.shape
            loss = elmm_loss(out.scores, torch.zeros(b, dtype=torch.long), torch.arange(1, c).expand(b, c - 1), mask)
            scores.append(out.scores)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert scores[1].shape == candidates.shape
    assert_close(scores[1], scores[0], rtol=1e-5, atol=1e-6)
    assert set(grads[0]) == set(grads[1]) and grads[0]
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("head", ["completion", "lm_head"])
@pytest.mark.parametrize("mvtc", [True, False])
def test_pruned_top_reads_the_same_positions_as_the_full_decoder_pass(make_workspace, head, mvtc) -> None:
    """With the top layers pruned the decoder's top runs on the read positions only
    (pruning.layers.hidden_at): scores and gradients equal those of the full pass, which a hook on
    the decoder forces."""
    from elmm.pruning.layers import attention_free_top, prune_layers

    ws = make_workspace()  # its own backbone: pruned here
    dim = ws.backbone.hidden_size
    g = torch.Generator().manual_seed(4)
    prune_layers(ws.backbone.layers, {i: 0.1 * torch.randn(dim, dim, generator=g) for i in (1, 2)})
    assert attention_free_top(ws.backbone.layers) == 1
    torch.manual_seed(0)
    model = ELMM(ws.backbone, ELMMConfig(num_entities=ws.kg.num_entities, heads=2, head=head, mvtc_enabled=mvtc))
    perturb_([p for n, p in model.named_parameters() if not n.startswith("llm.")], 0.05)
    batch = make_batch(ws, queries_from_triples(ws.kg.triples["train"][:6]))
    results, calls = [], []
    for full in (False, True):
        handle = ws.backbone.decoder.register_forward_hook(lambda *a: calls.append(1)) if full else None
        model.zero_grad()
        out = forward_batch(model, batch)
        out.scores.square().sum().backward()
        results.append((out.scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                              if p.grad is not None}))
        if handle is not None:
            handle.remove()
    assert calls == [1]  # the hooked pass ran the decoder's forward to its end
    (fast, fast_grads), (whole, whole_grads) = results
    assert_close(fast, whole, rtol=1e-5, atol=1e-6)
    assert set(fast_grads) == set(whole_grads) and fast_grads
    for name, grad in whole_grads.items():
        assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()), msg=name)


def test_candidate_scores_gradient_is_bitwise_reproducible_with_shared_rows() -> None:
    """Many queries pick the same entity rows (shared negatives): the rows' gradient must come out
    the same bits on every backward at two threads. `weight[candidates]` failed this (its backward
    adds a shared row's gradients in thread order), which made training differ run to run."""
    from elmm.model import score_rows

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        rows = torch.nn.Linear(96, 4000)
        candidates = torch.randint(0, 200, (256, 65), generator=g)  # every row picked ~80 times
        query = torch.randn(256, 96, generator=g)
        upstream = torch.randn(256, 65, generator=g)
        digests, grads = set(), []
        for _ in range(5):
            rows.zero_grad()
            score_rows(rows, query, candidates).backward(upstream)
            grads.append(rows.weight.grad.clone())
            digests.add((rows.weight.grad.numpy().tobytes(), rows.bias.grad.numpy().tobytes()))
        assert len(digests) == 1
        # and it is the gradient of the explicit formula: sum over picks of upstream * query
        expected = torch.zeros(4000, 96).index_add_(0, candidates.reshape(-1),
                                                     (upstream[:, :, None] * query[:, None, :]).reshape(-1, 96))
        assert_close(grads[0], expected, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------- text-view query, E_entity
def _hand_prompt(tokenizer) -> tuple[PromptBuilder, list[int]]:
    """Two entities (names of several tokens, a description) and one relation."""
    names, descs = ["Ada Lovelace", "Bo"], ["a painter of the world", ""]
    prompts = PromptBuilder(tokenizer, names, descs, ["has colour"], max_text_tokens=8)
    return prompts, tokenizer(" entity: Ada Lovelace", add_special_tokens=False)["input_ids"]


def test_prompt_marks_the_entity_name_and_the_relation_phrase(micro_backbone) -> None:
    """query_mask covers the name and the relation phrase ("inverse of ..." for head queries), not the
    template words nor the description; name_pos is the name's last token; the ids are unchanged."""
    tok = micro_backbone.tokenizer
    prompts, name_ids = _hand_prompt(tok)

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    text = prompts.build(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 0]), torch.tensor([TAIL, HEAD, TAIL]))
    desc = ids(" , a painter of the world")[:8]
    assert text.ids[0, : text.mask[0].sum()].tolist() == name_ids + desc + ids(" relation: has colour answer:")
    assert text.ids[1, : text.mask[1].sum()].tolist() == name_ids + desc + ids(" relation: inverse of has colour answer:")
    assert text.entity_pos.tolist() == [len(name_ids) + len(desc) - 1] * 2 + [len(ids(" entity: Bo")) - 1]
    assert text.name_pos.tolist() == [len(name_ids) - 1] * 2 + [len(ids(" entity: Bo")) - 1]

    def marked(i, lo, hi):  # the marked text of row i within [lo, hi), spaces dropped (a lone leading
        # space token before a phrase is the template's, not the phrase's)
        sel = text.query_mask[i, lo:hi]
        return "".join(tok.decode(text.ids[i, lo:hi][sel].tolist()).split())

    ends = text.entity_len.tolist()
    assert [marked(i, 0, ends[i]) for i in range(3)] == ["AdaLovelace", "AdaLovelace", "Bo"]
    assert [marked(i, ends[i], text.ids.shape[1]) for i in range(3)] == ["hascolour", "inverseofhascolour", "hascolour"]
    assert not (text.query_mask & ~text.mask).any()
    # the template words and the description are outside the mask
    assert not text.query_mask[0, : len(ids(" entity:"))].any()
    assert not text.query_mask[0, len(name_ids): len(name_ids) + len(desc) + len(ids(" relation:"))].any()


class _WordTokenizer:
    """One id per space-separated word: prefixes of names can be written down by hand. With
    `space`, every text starts with a lone space token, as SentencePiece's (Llama's) " {name}" does."""

    def __init__(self, space: bool = False):
        self.vocab: dict[str, int] = {" ": 0}
        self.space = space

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        words = [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]
        return {"input_ids": [0] * self.space + words}

    def decode(self, ids: list[int]) -> str:
        words = {i: w for w, i in self.vocab.items()}
        return " ".join(words[i] for i in ids)


def test_answer_prefixes_are_the_tokens_every_training_answer_starts_with() -> None:
    tok = _WordTokenizer()
    names = ["colour red", "colour dark blue", "Ada Lovelace", "Ada Byron", "region far north", "Bo"]
    ids = {w: tok(f" {w}")["input_ids"][0] for w in ("colour", "Ada", "region", "far")}
    triples = [(2, 0, 0), (3, 0, 1), (5, 0, 0),  # relation 0: answers "colour ..."; heads Ada, Ada, Bo
               (5, 1, 4), (5, 1, 4),             # relation 1: one answer, three tokens long
               (0, 2, 2), (1, 2, 3),             # relation 2: answers "Ada ..." (tails), "colour ..." (heads)
               (2, 3, 5), (3, 3, 0)]             # relation 3: "Bo" and "colour red" share nothing
    out = answer_prefixes(tok, names, torch.tensor(triples), num_relations=5)
    assert out[TAIL] == [[ids["colour"]], [ids["region"], ids["far"]], [ids["Ada"]], [], []]
    # heads: relation 0's Ada, Ada, Bo share nothing; relation 1's only head "Bo" is one token, so
    # nothing is left short of it; relation 2's heads are colours
    assert out[HEAD] == [[], [], [ids["colour"]], [ids["Ada"]], []]
    # a lone leading space token, shared by every name, is no prefix: the same answer
    spaced = _WordTokenizer(space=True)
    spaced.vocab = dict(tok.vocab)
    assert answer_prefixes(spaced, names, torch.tensor(triples), num_relations=5) == out


def test_prompt_appends_the_answer_prefix_and_reads_after_it(micro_backbone) -> None:
    """With prefixes, the relation segment ends with them: the ids, E_relation's position (and so
    where entity_token_at: answer adds the vector) move to the prefix's last token, which the text
    view's query leaves out; a relation without one is unchanged."""
    tok = micro_backbone.tokenizer
    plain, _ = _hand_prompt(tok)
    names, descs = ["Ada Lovelace", "Bo"], ["a painter of the world", ""]
    prefix = tok(" colour", add_special_tokens=False)["input_ids"]
    prompts = PromptBuilder(tok, names, descs, ["has colour"], max_text_tokens=8, prefixes=[[prefix], [[]]])
    q = (torch.tensor([0, 0]), torch.tensor([0, 0]), torch.tensor([TAIL, HEAD]))
    a, b = prompts.build(*q), plain.build(*q)
    n = int(b.mask[0].sum())
    assert a.ids[0, : n + len(prefix)].tolist() == b.ids[0, :n].tolist() + prefix
    assert a.relation_pos.tolist() == [b.relation_pos[0] + len(prefix), b.relation_pos[1]]
    assert not a.query_mask[0, n:].any() and a.query_mask[0, :n].equal(b.query_mask[0, :n])
    assert a.ids[1, : int(a.mask[1].sum())].equal(b.ids[1, : int(b.mask[1].sum())])


def _text_query(model: ELMM, ws, batch: dict, perturb: torch.Tensor | None = None) -> torch.Tensor:
    """The text view's query X_t [B, D] for `batch`, with `perturb` [B, L] positions' token embeddings
    shifted by a large random vector."""
    captured = {}
    handle = model.text_view.register_forward_pre_hook(lambda m, args: captured.update(q=args[0].clone()))
    embed = ws.backbone.embed_tokens

    def shifted(ids):
        e = embed(ids)
        if perturb is not None:
            e = e + perturb[..., None] * torch.randn(e.shape, generator=torch.Generator().manual_seed(5)) * 10
        return e

    try:
        ws.backbone.embed_tokens = shifted
        with torch.no_grad():
            forward_batch(model, batch)
    finally:
        del ws.backbone.embed_tokens
        handle.remove()
    return captured["q"]


def test_entity_relation_query_pools_only_name_and_relation_tokens(micro_workspace) -> None:
    """text_query=entity_relation: perturbing any other token's embedding (template, description)
    leaves X_t unchanged; perturbing a name token or a relation token changes it. The prompt query
    (default) changes with a description token."""
    ws = micro_workspace
    q = _queries(ws, 3)
    batch = make_batch(ws, q)
    text = batch["text"]
    models = {}
    for query in ("prompt", "entity_relation"):
        torch.manual_seed(0)
        models[query] = ELMM(ws.backbone, ELMMConfig(num_entities=ws.kg.num_entities, heads=2, text_query=query)).eval()
    model = models["entity_relation"]
    base = _text_query(model, ws, batch)
    others = text.mask & ~text.query_mask
    assert others.any(dim=1).all()
    assert_close(_text_query(model, ws, batch, others.float()), base, **EXACT)
    name_token = torch.zeros_like(text.mask).scatter(1, text.name_pos[:, None], True)
    assert ((_text_query(model, ws, batch, name_token.float()) - base).abs().amax(dim=1) > 1e-3).all()
    last_marked = text.query_mask.shape[1] - 1 - text.query_mask.flip(1).int().argmax(1)  # the phrase's last token
    relation_token = torch.zeros_like(text.mask).scatter(1, last_marked[:, None], True)
    assert ((_text_query(model, ws, batch, relation_token.float()) - base).abs().amax(dim=1) > 1e-3).all()
    # The default query pools the whole prompt: a description token moves it.
    prompt_base = _text_query(models["prompt"], ws, batch)
    assert ((_text_query(models["prompt"], ws, batch, others.float()) - prompt_base).abs().amax(dim=1) > 1e-3).all()


@pytest.mark.parametrize("readout", ["segment_end", "name_end"])
def test_entity_readout_position(micro_workspace, readout) -> None:
    """E_entity (the middle third of E_m) is the decoder's last hidden state at the entity segment's
    last token (default) or at the name's last token (name_end), offset by <s> and the image block."""
    ws = micro_workspace
    torch.manual_seed(0)
    model = ELMM(ws.backbone, ELMMConfig(num_entities=ws.kg.num_entities, heads=2, entity_readout=readout)).eval()
    batch = make_batch(ws, _queries(ws, 4))
    text = batch["text"]
    assert (text.name_pos < text.entity_pos).all()  # the synthetic entities have descriptions
    seen = {}
    hooks = [ws.backbone.decoder.register_forward_hook(lambda m, a, out: seen.update(h=out.last_hidden_state)),
             model.completion.proj.register_forward_pre_hook(lambda m, args: seen.update(e=args[0]))]
    try:
        with torch.no_grad():
            out = forward_batch(model, batch)
    finally:
        for h in hooks:
            h.remove()
    d, p = ws.backbone.hidden_size, out.image_tokens
    pos = text.entity_pos if readout == "segment_end" else text.name_pos
    assert_close(seen["e"][:, d:2 * d], seen["h"][torch.arange(len(pos)), 1 + p + pos], **EXACT)


def test_entity_token_starts_as_the_model_without_it(micro_workspace) -> None:
    """model.entity_token=free adds a zero table and draws no random numbers: the same seed gives the
    same weights and the same scores as the model without it."""
    ws = micro_workspace
    batch = make_batch(ws, _queries(ws, 4))
    scores = {}
    for kind in ("none", "free"):
        torch.manual_seed(0)
        model = ELMM(ws.backbone, ELMMConfig(num_entities=ws.kg.num_entities, heads=2, entity_token=kind)).eval()
        with torch.no_grad():
            scores[kind] = forward_batch(model, batch).scores
    assert model.entity_tokens.shape == (ws.kg.num_entities, ws.backbone.hidden_size)
    assert_close(scores["free"], scores["none"], **EXACT)
    with pytest.raises(ValueError, match="model.entity_token"):
        ELMM(ws.backbone, ELMMConfig(num_entities=ws.kg.num_entities, heads=2, entity_token="tied"))
    with pytest.raises(ValueError, match="model.entity_token_at"):
        ELMM(ws.backbone, ELMMConfig(num_entities=ws.kg.num_entities, heads=2, entity_token="free",
                                     entity_token_at="description"))
    with pytest.raises(ValueError, match="num_relations"):
        ELMM(ws.backbone, ELMMConfig(num_entities=ws.kg.num_entities, heads=2, entity_token="relational"))


@pytest.mark.parametrize("kind", ["relational", "complex"])
def test_relational_entity_token_scales_the_vector_by_its_relation_and_direction(micro_workspace, kind) -> None:
    """entity_token=relational / complex starts as the free one (rows of ones / of 1 + 0i, no random
    numbers drawn); the vector added is e_anchor * s[direction * R + relation], elementwise, for
    complex as D/2 complex numbers (checked with torch's complex product); the loss's gradient
    reaches the rows of the batch's (relation, direction) pairs only."""
    ws = micro_workspace
    r = ws.kg.num_relations
    q = _queries(ws, 6)
    batch = make_batch(ws, q)
    models = {}
    for name in ("free", kind):
        torch.manual_seed(0)
        models[name] = ELMM(ws.backbone, ELMMConfig(num_entities=ws.kg.num_entities, heads=2, entity_token=name,
                                                    entity_token_at="answer", num_relations=r)).eval()
        with torch.no_grad():
            models[name].entity_tokens.copy_(torch.linspace(-1, 1, models[name].entity_tokens.numel())
                                             .reshape(models[name].entity_tokens.shape))
    model = models[kind]
    assert model.relation_scales.shape == (2 * r, ws.backbone.hidden_size) and models["free"].relation_scales is None
    with torch.no_grad():
        assert_close(forward_batch(model, batch).scores, forward_batch(models["free"], batch).scores, **EXACT)
        model.relation_scales.copy_(torch.rand(model.relation_scales.shape, generator=torch.Generator().manual_seed(1)))
    text = batch["text"]
    assert torch.equal(text.relations, q.relations) and torch.equal(text.directions, q.directions)
    embeds = ws.backbone.embed_tokens(text.ids)
    added = model.add_entity_tokens(embeds, text) - embeds
    rows = torch.arange(len(q))
    e, scale = model.entity_tokens[q.anchors], model.relation_scales[q.directions * r + q.relations]
    if kind == "relational":
        expected = e * scale
    else:
        as_complex = lambda x: torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())  # noqa: E731
        expected = torch.view_as_real(as_complex(e) * as_complex(scale)).flatten(-2)
    assert_close(added[rows, text.relation_pos], expected, rtol=0, atol=1e-6)

    model.train()
    model.zero_grad()
    forward_batch(model, batch).scores.sum().backward()
    touched = model.relation_scales.grad.abs().sum(1) > 0
    assert touched.nonzero().flatten().tolist() == sorted(set((q.directions * r + q.relations).tolist()))


@pytest.mark.parametrize("where", ["name", "answer", "both"])
def test_entity_token_enters_at_its_positions_only_and_trains_the_anchor_rows(micro_workspace, where) -> None:
    """The anchor's vector is added at its name's last token and/or the answer cue
    (model.entity_token_at) and nowhere else; the loss's gradient reaches the rows of the batch's
    anchors only; the answer's vector never changes a score."""
    ws = micro_workspace
    torch.manual_seed(0)
    model = ELMM(ws.backbone, ELMMConfig(num_entities=ws.kg.num_entities, heads=2, entity_token="free",
                                         entity_token_at=where))
    with torch.no_grad():
        model.entity_tokens.normal_(0, 0.5)
    q = _queries(ws, 4)
    text = make_batch(ws, q)["text"]
    embeds = ws.backbone.embed_tokens(text.ids)
    added = model.add_entity_tokens(embeds, text) - embeds
    rows = torch.arange(len(q))
    positions = {"name": [text.name_pos], "answer": [text.relation_pos],
                 "both": [text.name_pos, text.relation_pos]}[where]
    assert bool((text.name_pos != text.relation_pos).all())  # two distinct tokens: "both" adds it twice
    for pos in positions:
        assert_close(added[rows, pos], model.entity_tokens[q.anchors], rtol=0, atol=1e-6)  # (e + v) - e
        added[rows, pos] = 0
    assert added.abs().max() == 0

    model.zero_grad()
    out = forward_batch(model, make_batch(ws, q))
    out.scores.sum().backward()
    touched = model.entity_tokens.grad.abs().sum(1) > 0
    assert touched.nonzero().flatten().tolist() == sorted(set(q.anchors.tolist()))

    model.eval()
    leak = _leak_query(ws)
    answer, anchor = int(leak.targets[0]), int(leak.anchors[0])
    with torch.no_grad():
        base = forward_batch(model, make_batch(ws, leak)).scores
        model.entity_tokens[answer] += 1.0
        assert_close(forward_batch(model, make_batch(ws, leak)).scores, base, **EXACT)
        model.entity_tokens[anchor] += 1.0
        assert (forward_batch(model, make_batch(ws, leak)).scores - base).abs().max() > 1e-4


def test_tied_entity_token_adds_a_map_of_the_anchors_own_row(micro_workspace) -> None:
    """entity_token_tied starts as the untied token (a zero map, no random numbers drawn), adds
    T r_anchor (r: the anchor's completion row) to the free vector, and sends the loss's gradient
    into the completion rows of the batch's anchors through it."""
    ws = micro_workspace
    q = _queries(ws, 4)
    batch = make_batch(ws, q)
    models = {}
    for tied in (False, True):
        torch.manual_seed(0)
        models[tied] = ELMM(ws.backbone, ELMMConfig(num_entities=ws.kg.num_entities, heads=2, entity_token="free",
                                                    entity_token_at="answer", entity_token_tied=tied)).eval()
    model = models[True]
    assert models[False].entity_token_tie is None and model.entity_token_tie.abs().max() == 0
    with torch.no_grad():
        assert_close(forward_batch(model, batch).scores, forward_batch(models[False], batch).scores, **EXACT)
        model.entity_token_tie.normal_(0, 0.1)
    text = batch["text"]
    embeds = ws.backbone.embed_tokens(text.ids)
    added = model.add_entity_tokens(embeds, text) - embeds
    expected = model.entity_tokens[q.anchors] + model.completion.entities.weight[q.anchors] @ model.entity_token_tie.T
    assert_close(added[torch.arange(len(q)), text.relation_pos], expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="entity_token_tied"):
        ELMM(ws.backbone, ELMMConfig(num_entities=ws.kg.num_entities, heads=2, entity_token_tied=True))

    # Only through the tie does an anchor's row get gradient from its own query: score only
    # non-anchor candidates, so the answer-side path gives the anchors' rows none.
    model.train()
    model.zero_grad()
    others = torch.tensor([e for e in range(ws.kg.num_entities) if e not in set(q.anchors.tolist())][:3])
    forward_batch(model, batch, candidates=others.expand(len(q), -1)).scores.sum().backward()
    grad = model.completion.entities.weight.grad.abs().sum(1)
    assert bool((grad[q.anchors] > 0).all())


def test_entity_token_dropout_leaves_whole_vectors_out_in_training_only(micro_workspace) -> None:
    """model.entity_token_dropout: in training each query's vector is added whole or not at all
    (about the given share left out, no rescaling); in evaluation it is always added, so the scores
    are those of the model without dropout."""
    ws = micro_workspace
    torch.manual_seed(0)
    model = ELMM(ws.backbone, ELMMConfig(num_entities=ws.kg.num_entities, heads=2, entity_token="free",
                                         entity_token_at="answer", entity_token_dropout=0.5))
    with torch.no_grad():
        model.entity_tokens.normal_(0, 0.5)
    q = _queries(ws, 8)
    text = make_batch(ws, q)["text"]
    embeds = ws.backbone.embed_tokens(text.ids)
    rows = torch.arange(len(q))
    vectors = model.entity_tokens[q.anchors]
    model.eval()
    assert_close((model.add_entity_tokens(embeds, text) - embeds)[rows, text.relation_pos], vectors, rtol=0, atol=1e-6)
    model.train()
    kept = []
    for _ in range(50):
        added = (model.add_entity_tokens(embeds, text) - embeds)[rows, text.relation_pos]
        whole = (added - vectors).abs().amax(1) < 1e-6
        none = added.abs().amax(1) == 0
        assert bool((whole ^ none).all())
        kept.append(whole.float().mean())
    assert 0.35 < float(torch.stack(kept).mean()) < 0.65
    with pytest.raises(ParamsError, match=r"model.entity_token_dropout: must be in \[0, 1\)"):
        validate(from_dict({"model": {"entity_token_dropout": 1.0}}))
    with pytest.raises(ParamsError, match="model.entity_token_dropout: needs an entity token"):
        validate(from_dict({"model": {"entity_token_dropout": 0.5, "entity_token": "none"}}))
