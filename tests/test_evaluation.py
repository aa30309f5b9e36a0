"""Tests for elmm.evaluation: rank conventions, filtering, metrics and the filter index."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from elmm.evaluation import RankAccumulator, anchor_ranks, compute_ranks, summarize
from elmm.kg.queries import FilterIndex


def _ranks(opt, pes, cand) -> dict[str, torch.Tensor]:
    """A ranks dict as compute_ranks returns it, from plain lists."""
    opt_t = torch.tensor(opt, dtype=torch.float64)
    pes_t = torch.tensor(pes, dtype=torch.float64)
    return {
        "optimistic": opt_t,
        "pessimistic": pes_t,
        "realistic": (opt_t + pes_t) / 2,
        "candidates": torch.tensor(cand, dtype=torch.long),
    }


# ---------------------------------------------------------------------------- compute_ranks
def test_pykeen_known_values() -> None:
    nan = float("nan")
    scores = torch.tensor([[2.0, 2, 1, 3, 5], [1, 1, 3, 4, 0], [1, 1, 3, nan, 0]])
    targets = torch.tensor([0, 2, 2])
    ranks = compute_ranks(scores, targets)
    assert ranks["optimistic"].tolist() == [3, 2, 1]
    assert ranks["pessimistic"].tolist() == [4, 2, 1]
    assert ranks["realistic"].tolist() == [3.5, 2, 1]
    assert ranks["candidates"].tolist() == [5, 5, 4]
    assert ranks["candidates"].dtype == torch.long


def test_half_precision_is_upcast() -> None:
    scores = torch.tensor([[2.0, 2, 1, 3, 5]], dtype=torch.bfloat16)
    ranks = compute_ranks(scores, torch.tensor([0]))
    assert ranks["realistic"].dtype == torch.float32
    assert ranks["optimistic"].item() == 3 and ranks["pessimistic"].item() == 4


def test_tolerance_counts_near_scores_as_ties() -> None:
    # 1.0 + 5e-6 is within atol of the true score 1.0; 1.1 is clearly greater.
    scores = torch.tensor([[1.0, 1.0 + 5e-6, 1.0 - 5e-6, 1.1, 0.5]], dtype=torch.float64)
    ranks = compute_ranks(scores, torch.tensor([0]))
    assert ranks["optimistic"].item() == 2  # only 1.1 is greater
    assert ranks["pessimistic"].item() == 4  # 1.1 plus three ties (target included)
    # Without tolerance the slightly higher score is greater and the lower one is not a tie.
    exact = compute_ranks(scores, torch.tensor([0]), atol=0.0, rtol=0.0)
    assert exact["optimistic"].item() == 3 and exact["pessimistic"].item() == 3


def test_relative_tolerance_scales_with_true_score() -> None:
    scores = torch.tensor([[1000.0, 1000.05, 1000.5]], dtype=torch.float64)
    ranks = compute_ranks(scores, torch.tensor([0]))  # tol = 1e-5 + 1e-4 * 1000 = 0.10001
    assert ranks["optimistic"].item() == 2
    assert ranks["pessimistic"].item() == 3


def test_infinite_scores() -> None:
    inf = float("inf")
    scores = torch.tensor([[inf, inf, 5.0], [-inf, 0.0, -inf]])
    ranks = compute_ranks(scores, torch.tensor([0, 0]))
    assert ranks["optimistic"].tolist() == [1, 2]
    assert ranks["pessimistic"].tolist() == [2, 3]


def test_nan_target_is_ranked_last() -> None:
    scores = torch.tensor([[float("nan"), 1.0, 2.0, float("nan")]])
    ranks = compute_ranks(scores, torch.tensor([0]))
    assert ranks["candidates"].item() == 3
    assert ranks["optimistic"].item() == 3 and ranks["pessimistic"].item() == 3


def test_filter_removes_other_answers_but_never_the_target() -> None:
    scores = torch.tensor([[0.5, 0.9, 0.8, 0.1, 0.7], [0.5, 0.9, 0.8, 0.1, 0.7]])
    targets = torch.tensor([0, 0])
    mask = torch.tensor(
        [
            [False, True, False, False, True],  # remove two better-scoring other answers
            [True, True, False, False, False],  # also marks the target: it must stay
        ]
    )
    raw = compute_ranks(scores, targets)
    assert raw["optimistic"].tolist() == [4, 4]
    ranks = compute_ranks(scores, targets, mask)
    assert ranks["optimistic"].tolist() == [2, 3]
    assert ranks["pessimistic"].tolist() == [2, 3]
    assert ranks["candidates"].tolist() == [3, 4]
    assert mask[1, 0].item()  # the caller's mask is not modified


def test_filter_and_nan_both_reduce_candidates() -> None:
    scores = torch.tensor([[1.0, float("nan"), 3.0, 0.0]])
    mask = torch.tensor([[False, False, True, False]])
    ranks = compute_ranks(scores, torch.tensor([0]), mask)
    assert ranks["candidates"].item() == 2
    assert ranks["optimistic"].item() == 1 and ranks["pessimistic"].item() == 1


def test_constant_scores_give_middle_rank_and_amr_one() -> None:
    num_queries, num_candidates = 7, 9
    scores = torch.zeros(num_queries, num_candidates)
    targets = torch.arange(num_queries) % num_candidates
    ranks = compute_ranks(scores, targets)
    assert torch.all(ranks["optimistic"] == 1)
    assert torch.all(ranks["pessimistic"] == num_candidates)
    metrics = summarize(ranks)
    assert metrics["mr"] == pytest.approx((num_candidates + 1) / 2)
    assert metrics["amr"] == pytest.approx(1.0)
    assert metrics["candidates"] == num_candidates


def test_constant_scores_with_filter_amr_one() -> None:
    # Different filtered candidate counts per query: AMR still 1 for an uninformative scorer.
    scores = torch.ones(2, 6)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 3:] = True
    ranks = compute_ranks(scores, torch.tensor([0, 0]), mask)
    assert ranks["realistic"].tolist() == [3.5, 2.0]
    assert summarize(ranks)["amr"] == pytest.approx(1.0)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError):
        compute_ranks(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError):
        compute_ranks(torch.zeros(2, 3), torch.tensor([0]))
    with pytest.raises(ValueError):
        compute_ranks(torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(2, 4, dtype=torch.bool))


# ---------------------------------------------------------------------------- metrics
# optimistic [1, 2, 3, 10], pessimistic [1, 2, 5, 15] -> realistic [1, 2, 4, 12.5]
OPT, PES, CAND = [1, 2, 3, 10], [1, 2, 5, 15], [10, 10, 20, 30]
DIRECTIONS, RELATIONS = [0, 1, 0, 1], [0, 0, 1, 1]


def test_summarize_hand_computed() -> None:
    metrics = summarize(_ranks(OPT, PES, CAND))
    assert metrics["count"] == 4
    assert metrics["mr"] == pytest.approx(19.5 / 4)
    assert metrics["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 12.5) / 4)
    assert metrics["hits_at_1"] == pytest.approx(0.25)
    assert metrics["hits_at_3"] == pytest.approx(0.5)
    assert metrics["hits_at_10"] == pytest.approx(0.75)
    rr = [1, 1 / 2, 1 / 4, 1 / 12.5]
    mean = sum(rr) / 4
    sd = (sum((x - mean) ** 2 for x in rr) / 3) ** 0.5  # sample sd
    assert metrics["mrr_se"] == pytest.approx(sd / 2, abs=1e-6)
    assert metrics["mrr_optimistic"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 10) / 4, abs=1e-6)
    assert metrics["mrr_pessimistic"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 15) / 4, abs=1e-6)
    assert metrics["amr"] == pytest.approx((19.5 / 4) / ((5.5 + 5.5 + 10.5 + 15.5) / 4), abs=1e-6)
    assert metrics["candidates"] == pytest.approx(17.5)


def test_summarize_empty() -> None:
    metrics = summarize(_ranks([], [], []))
    assert metrics["count"] == 0 and metrics["mrr"] is None


def test_accumulator_sides_and_relations() -> None:
    acc = RankAccumulator()
    # Two batches, one per side; a scalar direction applies to the whole batch.
    tail_idx, head_idx = [0, 2], [1, 3]
    for idx, direction in ((tail_idx, 0), (head_idx, 1)):
        ranks = _ranks([OPT[i] for i in idx], [PES[i] for i in idx], [CAND[i] for i in idx])
        acc.add(ranks, direction, torch.tensor([RELATIONS[i] for i in idx]))
    assert len(acc) == 4

    metrics = acc.metrics(relation_names=["likes", "knows"])
    overall = summarize(_ranks(OPT, PES, CAND))
    assert {k: metrics[k] for k in overall} == overall

    tail, head = metrics["tail"], metrics["head"]
    assert tail["count"] == 2 and head["count"] == 2
    assert tail["mr"] == pytest.approx(2.5)  # realistic [1, 4]
    assert tail["mrr"] == pytest.approx(0.625)
    assert (tail["hits_at_1"], tail["hits_at_3"], tail["hits_at_10"]) == (0.5, 0.5, 1.0)
    assert head["mr"] == pytest.approx(7.25)  # realistic [2, 12.5]
    assert head["mrr"] == pytest.approx(0.29)
    assert (head["hits_at_1"], head["hits_at_3"], head["hits_at_10"]) == (0.0, 0.5, 0.5)

    per_relation = metrics["per_relation"]
    assert list(per_relation) == ["likes", "knows"]
    assert per_relation["likes"]["mr"] == pytest.approx(1.5)  # realistic [1, 2], both sides pooled
    assert per_relation["likes"]["mrr"] == pytest.approx(0.75)
    assert per_relation["knows"]["mr"] == pytest.approx(8.25)  # realistic [4, 12.5]
    assert per_relation["knows"]["count"] == 2
    # ... and split by side: likes tail 1 / head 2, knows tail 4 / head 12.5.
    assert per_relation["likes"]["tail"] == {"mr": 1.0, "mrr": 1.0, "mrr_se": 0.0, "hits_at_1": 1.0, "hits_at_10": 1.0,
                                             "count": 1}
    assert per_relation["likes"]["head"]["mrr"] == pytest.approx(0.5)
    assert per_relation["knows"]["tail"]["mr"] == pytest.approx(4.0)
    assert per_relation["knows"]["head"]["mrr"] == pytest.approx(1 / 12.5)
    assert per_relation["knows"]["head"]["hits_at_10"] == 0.0

    # Without names the relation index is the key; everything is plain JSON.
    unnamed = acc.metrics()
    assert list(unnamed["per_relation"]) == ["0", "1"]
    assert json.loads(json.dumps(unnamed)) == unnamed
    assert isinstance(unnamed["mr"], float) and isinstance(unnamed["count"], int)


def test_accumulator_custom_hits_and_rounding() -> None:
    acc = RankAccumulator()
    acc.add(_ranks([3], [3], [7]), torch.tensor([0]), [0])
    metrics = acc.metrics(hits=(5,))
    assert metrics["hits_at_5"] == 1.0 and "hits_at_10" not in metrics
    assert metrics["mrr"] == round(1 / 3, 6)
    assert metrics["head"]["count"] == 0 and metrics["head"]["mr"] is None


def test_end_to_end_batches_match_single_pass() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(20, 15, generator=generator).round(decimals=1)  # rounding forces ties
    targets = torch.randint(0, 15, (20,), generator=generator)
    mask = torch.rand(20, 15, generator=generator) < 0.2
    whole = compute_ranks(scores, targets, mask)
    acc = RankAccumulator()
    for start in range(0, 20, 6):
        part = slice(start, start + 6)
        ranks = compute_ranks(scores[part], targets[part], mask[part])
        acc.add(ranks, 0, torch.zeros(len(targets[part]), dtype=torch.long))
    metrics = acc.metrics()
    expected = summarize(whole)
    assert {k: metrics[k] for k in expected} == expected
    assert not math.isnan(metrics["mrr"])


# ---------------------------------------------------------------------------- FilterIndex
TRIPLES = np.array(
    [
        [0, 0, 1],
        [0, 0, 2],
        [0, 1, 3],
        [4, 0, 1],
        [2, 1, 3],
        [0, 0, 1],  # duplicate
        [3, 2, 0],
    ]
)


def test_filter_index_answers_both_directions() -> None:
    index = FilterIndex(TRIPLES, num_entities=5)
    # direction 0: tails of (head, relation)
    assert index.answers(0, 0, 0).tolist() == [1, 2]
    assert index.answers(0, 1, 0).tolist() == [3]
    assert index.answers(3, 2, 0).tolist() == [0]
    # direction 1: heads of (relation, tail)
    assert index.answers(1, 0, 1).tolist() == [0, 4]
    assert index.answers(3, 1, 1).tolist() == [0, 2]
    # unknown queries and unseen relations have no answers
    assert index.answers(1, 0, 0).tolist() == []
    assert index.answers(0, 7, 0).tolist() == []


def test_filter_index_mask() -> None:
    index = FilterIndex(TRIPLES, num_entities=5)
    mask = index.mask(np.array([0, 1, 3, 2]), torch.tensor([0, 0, 1, 2]), np.array([0, 1, 1, 0]))
    assert mask.dtype == torch.bool and mask.shape == (4, 5)
    expected = torch.zeros(4, 5, dtype=torch.bool)
    expected[0, [1, 2]] = True  # (0, 0, ?)
    expected[1, [0, 4]] = True  # (?, 0, 1)
    expected[2, [0, 2]] = True  # (?, 1, 3)
    # row 3: (2, 2, ?) has no answers
    assert torch.equal(mask, expected)
    # a scalar direction broadcasts over the batch
    tails = index.mask(torch.tensor([0, 4]), torch.tensor([0, 0]), 0)
    assert tails[0].nonzero().flatten().tolist() == [1, 2]
    assert tails[1].nonzero().flatten().tolist() == [1]


def test_filter_index_with_compute_ranks() -> None:
    index = FilterIndex(TRIPLES, num_entities=5)
    # Query (0, 0, ?) with target 2; entity 1 is another true answer and scores higher.
    scores = torch.tensor([[0.0, 0.9, 0.5, 0.1, 0.2]])
    mask = index.mask([0], [0], [0])
    ranks = compute_ranks(scores, torch.tensor([2]), mask)
    assert ranks["optimistic"].item() == 1 and ranks["candidates"].item() == 4


def test_filter_index_validates_entities() -> None:
    with pytest.raises(ValueError):
        FilterIndex(TRIPLES, num_entities=4)
    index = FilterIndex(TRIPLES, num_entities=5)
    with pytest.raises(ValueError):
        index.mask([5], [0], [0])
    with pytest.raises(ValueError):
        index.mask([0], [0], [2])


# ---------------------------------------------------------------------------- anchor ranks (self-denoising)
def test_anchor_ranks_hand_made_scores() -> None:
    """The anchor is ranked among the target's filtered candidates (the answer stays one; the
    anchor is kept even when it is itself a known answer); `first` counts anchors above everything."""
    scores = torch.tensor([
        [0.9, 0.1, 0.5, 0.95, 0.2],  # anchor 0, target 2; 3 is another answer (filtered): anchor first
        [0.3, 0.2, 0.8, 0.1, 0.6],  # anchor 1, target 4: 0.3, 0.8, 0.6 above it -> rank 4
        [0.9, 0.5, 0.5, 0.5, 0.1],  # anchor 3 = target 3, 0 filtered: ties with 1 and 2 -> 1..3 -> 2
        [0.1, 0.2, 0.7, 0.9, 0.0],  # anchor 2 is a known answer, kept; target 0; only 3 above -> 2
    ])
    anchors, targets = torch.tensor([0, 1, 3, 2]), torch.tensor([2, 4, 3, 0])
    known = torch.zeros(4, 5, dtype=torch.bool)
    known[0, [2, 3]] = True
    known[1, 4] = True
    known[2, [0, 3]] = True
    known[3, [0, 2]] = True
    ranks = anchor_ranks(scores, anchors, targets, known)
    assert ranks["optimistic"].tolist() == [1, 4, 1, 2]
    assert ranks["pessimistic"].tolist() == [1, 4, 3, 2]
    assert ranks["realistic"].tolist() == [1, 4, 2, 2]
    assert ranks["candidates"].tolist() == [4, 5, 4, 5]
    assert known[3, 2] and known[0, 2]  # the caller's mask is not modified

    acc = RankAccumulator()
    acc.add(compute_ranks(scores[:2], targets[:2], known[:2]), torch.tensor([0, 1]), [0, 0],
            anchor=anchor_ranks(scores[:2], anchors[:2], targets[:2], known[:2]))
    acc.add(compute_ranks(scores[2:], targets[2:], known[2:]), torch.tensor([0, 1]), [1, 1],
            anchor=anchor_ranks(scores[2:], anchors[2:], targets[2:], known[2:]))
    m = acc.metrics(relation_names=["r0", "r1"])
    assert m["anchor_rank"] == {"mean_rank": 2.25, "first": 0.25, "count": 4,
                                "tail": {"mean_rank": 1.5, "first": 0.5, "count": 2},
                                "head": {"mean_rank": 3.0, "first": 0.0, "count": 2}}
    rel = m["per_relation"]
    assert rel["r0"]["tail"]["anchor_rank"] == {"mean_rank": 1.0, "first": 1.0, "count": 1}
    assert rel["r0"]["head"]["anchor_rank"] == {"mean_rank": 4.0, "first": 0.0, "count": 1}
    assert rel["r1"]["tail"]["anchor_rank"] == {"mean_rank": 2.0, "first": 0.0, "count": 1}
    assert rel["r1"]["head"]["anchor_rank"] == {"mean_rank": 2.0, "first": 0.0, "count": 1}
    # The target's ranks are those of compute_ranks, whatever the anchor ranks.
    assert m["mr"] == summarize(compute_ranks(scores, targets, known))["mr"]
    assert acc.ranks()["anchor"].tolist() == [1, 4, 2, 2]

    plain = RankAccumulator()
    plain.add(compute_ranks(scores, targets, known), 0, [0] * 4)
    assert "anchor_rank" not in plain.metrics() and "anchor" not in plain.ranks()
    with pytest.raises(ValueError, match="every batch or for none"):
        plain.add(compute_ranks(scores, targets, known), 0, [0] * 4, anchor=anchor_ranks(scores, anchors, targets))
