"""Negative sampling: uniform draws with known answers masked, self-denoising, hard negatives."""

from __future__ import annotations

import copy

import numpy as np
import torch

from elmm.kg.queries import queries_from_triples
from elmm.negatives import NegativeSampler, nearest_entities, sample_negatives


def test_sample_negatives_masks_known_answers_and_appends_anchor() -> None:
    """Self-denoising puts the anchor last; known answers (the target included) are masked False."""
    e = 6
    anchors = torch.tensor([0, 3, 5])
    targets = torch.tensor([2, 1, 4])
    known = torch.zeros(3, e, dtype=torch.bool)
    known[torch.arange(3), targets] = True
    known[0, 4] = True  # a second known answer of query 0
    gen = torch.Generator().manual_seed(0)
    neg, mask = sample_negatives(anchors, known, 200, True, gen)
    assert neg.shape == (3, 201) and mask.shape == (3, 201)
    assert torch.equal(neg[:, -1], anchors)
    assert torch.equal(mask, ~known.gather(1, neg))
    for i in range(3):
        hits = neg[i, :-1] == targets[i]
        assert hits.any(), "200 uniform draws over 6 entities must hit the target"
        assert not mask[i, :-1][hits].any()
        assert mask[i, :-1][~known[i, neg[i, :-1]]].all()
    assert not mask[0][neg[0] == 4].any()
    assert mask[:, -1].all()  # the anchors are not known answers here

    neg2, mask2 = sample_negatives(anchors, known, 5, False, torch.Generator().manual_seed(0))
    assert neg2.shape == (3, 5) and neg2.min() >= 0 and neg2.max() < e
    assert torch.equal(mask2, ~known.gather(1, neg2))


def test_nearest_entities_exclude_self_and_match_brute_force() -> None:
    v = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    table = nearest_entities(v, 5)
    assert table.shape == (50, 5)
    assert not (table == torch.arange(50)[:, None]).any()
    cos = torch.nn.functional.normalize(v, dim=1) @ torch.nn.functional.normalize(v, dim=1).T
    cos.fill_diagonal_(-2)
    assert torch.equal(table, cos.topk(5, dim=1).indices)
    assert nearest_entities(v[:3], 10).shape == (3, 2)  # pool capped at E - 1


def test_hard_negative_sampler_draws_from_the_target_neighbours(micro_env) -> None:
    tp = copy.deepcopy(micro_env.params.train)
    tp.hard_negatives, tp.negatives, tp.hard_negatives_fraction, tp.self_denoise = "faiss", 8, 0.5, True
    sampler = NegativeSampler(tp)
    e = 30
    sampler.table = torch.randint(0, e, (e, 6), generator=torch.Generator().manual_seed(0))
    q = queries_from_triples(np.array([[0, 0, 5], [1, 1, 7], [2, 0, 9]]))
    known = torch.zeros(len(q), e, dtype=torch.bool)
    known[0, sampler.table[q.targets[0], 0]] = True
    neg, mask = sampler.sample(q, known, torch.Generator().manual_seed(1))
    assert neg.shape == (len(q), 9)  # 4 hard + 4 uniform + the anchor
    for row in range(len(q)):
        assert set(neg[row, :4].tolist()) <= set(sampler.table[q.targets[row]].tolist())
        assert neg[row, -1] == q.anchors[row]
    assert torch.equal(mask, ~known.gather(1, neg))
