"""Floors, ceilings and the structure-only KGE baseline (elmm.baselines, elmm.kge, stages/baselines.py)."""

from __future__ import annotations

import csv
import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from elmm.baselines import (
    RANK_COLUMNS,
    bayes_ceilings,
    check_against_ceilings,
    expected_rank_values,
    frequency_prior_scorer,
    metrics_table,
    rank_queries,
    rank_values,
    remaining_edges,
    structure_weight,
)
from elmm.config import Params, to_dict
from elmm.kg.format import SPLITS, load_kg
from elmm.kg.queries import FilterIndex, queries_from_triples
from elmm.kg.synthetic import generate_synthetic

# ----------------------------------------------------------------------------- a 4-entity world
# Objects 0, 1, 2 (all red, one community), concept 3 = "colour red"; relations 0 = has colour, 1 = knows
# (mean out-degree 2, so k - 1 ~ Poisson(1), capped at the pool size 2).
HC, KNOWS = 0, 1
TRIPLES = {
    "train": np.array([[0, HC, 3], [1, HC, 3], [2, KNOWS, 0], [1, KNOWS, 0]]),
    "valid": np.zeros((0, 3), dtype=np.int64),
    "test": np.array([[0, KNOWS, 1], [1, KNOWS, 2], [2, HC, 3]]),
}
ENTITY_IDS = ["obj:000000", "obj:000001", "obj:000002", "colour:red"]
RELATION_IDS, NAMES = ["has_colour", "knows"], ["has colour", "knows"]
WORLD_PARAMS = {"communities": 1, "teams": 1, "knows_degree": 2.0}


def _latent() -> pd.DataFrame:
    obj = {"colour": "red", "shape": "circle", "mark": "white", "category": "river", "region": "coast",
           "material": "wood", "community": 0, "team": 0, "colour_in_text": False}
    concept = {**{k: "" for k in ("colour", "shape", "mark", "category", "region", "material")},
               "community": -1, "team": -1, "colour_in_text": False}
    return pd.DataFrame([{"entity": i, **obj} for i in range(3)] + [{"entity": 3, **concept}])


def _hand_prior():
    queries = queries_from_triples(TRIPLES["test"])
    filters = FilterIndex(np.concatenate([TRIPLES[s] for s in SPLITS]), 4)
    ranks = rank_queries(frequency_prior_scorer(TRIPLES["train"], 4, 2), queries, filters)
    return queries, ranks, metrics_table(rank_values(ranks), queries, NAMES, ranks)


def test_frequency_prior_on_a_hand_built_world():
    queries, ranks, table = _hand_prior()
    # Query order: tails (0,knows,?)->1, (1,knows,?)->2, (2,hc,?)->3, then heads (?,knows,1)->0, (?,knows,2)->1,
    # (?,hc,3)->2. Train counts: knows tails {0: 2}, knows heads {1: 1, 2: 1}, hc tails {3: 2}, hc heads {0: 1, 1: 1}.
    # (0,knows,?): entity 0 (count 2) beats the target; 1, 2, 3 tie at 0 -> optimistic 2, pessimistic 4.
    # (1,knows,?): 0 is a known answer (filtered); 1, 2, 3 tie -> 1, 3.   (2,hc,?): 3 alone on top -> 1, 1.
    # (?,knows,1): 1 and 2 (count 1) beat 0; 0 and 3 tie -> 3, 4.   (?,knows,2): 1 and 2 tie at 1 -> 1, 2.
    # (?,hc,3): 0 and 1 filtered; 2 and 3 tie at 0 -> 1, 2.
    assert ranks["optimistic"].tolist() == [2, 1, 1, 3, 1, 1]
    assert ranks["pessimistic"].tolist() == [4, 3, 1, 4, 2, 2]
    assert ranks["realistic"].tolist() == [3, 2, 1, 3.5, 1.5, 1.5]
    knows = table["per_relation"]["knows"]
    assert knows["tail"]["mrr"] == pytest.approx((1 / 3 + 1 / 2) / 2, abs=1e-6)
    assert knows["tail"]["mrr_se"] == pytest.approx(np.std([1 / 3, 1 / 2], ddof=1) / math.sqrt(2), abs=1e-6)
    assert (knows["tail"]["hits_at_1"], knows["tail"]["hits_at_3"], knows["tail"]["count"]) == (0, 1, 2)
    assert knows["head"]["mrr"] == pytest.approx((2 / 7 + 2 / 3) / 2, abs=1e-6)
    assert (knows["head"]["hits_at_1"], knows["head"]["hits_at_3"]) == (0, 0.5)
    colour = table["per_relation"]["has colour"]
    assert colour["tail"]["mrr"] == 1 and colour["head"]["mrr"] == pytest.approx(2 / 3, abs=1e-6)
    assert colour["tail"]["mrr_se"] is None  # one query: no standard error
    assert table["mrr"] == pytest.approx(np.mean([1 / 3, 1 / 2, 1, 2 / 7, 2 / 3, 2 / 3]), abs=1e-6)
    assert table["tail"]["count"] == table["head"]["count"] == 3


def test_expected_reciprocal_rank_under_random_tie_breaking():
    # A = 1 better, B = 3 tied (target included): positions 2, 3, 4 equally likely.
    values = expected_rank_values({"optimistic": np.array([2, 1, 1]), "pessimistic": np.array([4, 1, 2])})
    assert values["rr"] == pytest.approx([(1 / 2 + 1 / 3 + 1 / 4) / 3, 1.0, 0.75])
    assert values["rr"][0] > 1 / 3  # not 1 / realistic rank (Jensen)
    assert values["hits_at_1"] == pytest.approx([0, 1, 0.5])
    assert values["hits_at_3"] == pytest.approx([2 / 3, 1, 1])


def test_exact_ranking_keeps_large_distinct_scores_apart():
    # Dense ranks (the ceilings' scores) are integers 1 apart; past 1 / TIE_RTOL the model's tolerance
    # would tie them. Entity 1 (the target) scores 20,000, entity 2 scores 20,001.
    queries = queries_from_triples(np.array([[0, 0, 1]]))
    tail = queries.subset(queries.directions == 0)
    filters = FilterIndex(np.array([[0, 0, 1]]), 3)
    scorer = lambda batch: torch.tensor([[0.0, 20_000.0, 20_001.0]], dtype=torch.float64)  # noqa: E731
    tolerant = rank_queries(scorer, tail, filters)
    exact = rank_queries(scorer, tail, filters, exact=True)
    assert (tolerant["optimistic"][0], tolerant["pessimistic"][0]) == (1, 2)  # within 1e-5 + 1e-4 * 20,000
    assert (exact["optimistic"][0], exact["pessimistic"][0]) == (2, 2)


def test_bayes_ceilings_on_a_hand_built_world():
    c = bayes_ceilings(TRIPLES, _latent(), ENTITY_IDS, RELATION_IDS, NAMES, WORLD_PARAMS)
    # The posterior weight of a head candidate h: E[k_h - o_h | o_h] / (2 - o_h), q = 2/4 train edges of knows,
    # prior P(k=1) = e^-1, P(k=2) = 1 - e^-1 (the cap at the pool size 2).
    e = math.exp(-1)
    w_none = (0.5 * e * 1 + 0.25 * (1 - e) * 2) / (0.5 * e + 0.25 * (1 - e)) / 2  # o = 0: = 1 / (1 + e^-1)
    w_one = (0.5 * (1 - e) * 1) / (0.5 * e + 0.5 * (1 - e)) / 1  # o = 1: = 1 - e^-1
    assert structure_weight(0, 2, 2.0, 0.5) == pytest.approx(w_none) == pytest.approx(1 / (1 + e))
    assert structure_weight(1, 2, 2.0, 0.5) == pytest.approx(w_one) == pytest.approx(1 - e)
    knows = c["per_relation"]["knows"]
    # tail (0,knows,?)->1: pool(0) = {1, 2}, neither known -> a tie of 2: E[RR] = (1 + 1/2) / 2 = 0.75;
    # tail (1,knows,?)->2: 0 is a train answer (filtered) -> 2 alone: 1.
    assert knows["tail"]["mrr"] == pytest.approx((0.75 + 1) / 2, abs=1e-6)
    assert knows["tail"]["hits_at_1"] == pytest.approx((0.5 + 1) / 2, abs=1e-6)
    assert knows["tail"]["mrr_se"] == pytest.approx(np.std([0.75, 1], ddof=1) / math.sqrt(2), abs=1e-6)
    # head (?,knows,1)->0: candidates 0 (o=0, w_none) and 2 (o=1, w_one): the target first -> 1;
    # head (?,knows,2)->1: 0 (o=0, w_none) beats the target 1 (o=1, w_one) -> 1/2, Hits@1 0.
    assert w_none > w_one
    assert knows["head"]["mrr"] == pytest.approx((1 + 0.5) / 2, abs=1e-6)
    assert (knows["head"]["hits_at_1"], knows["head"]["hits_at_3"]) == (0.5, 1)
    colour = c["per_relation"]["has colour"]  # attributes: the oracle knows the answer
    assert colour["tail"]["mrr"] == colour["head"]["mrr"] == 1
    assert c["mrr"] == pytest.approx((0.75 + 1 + 1 + 1 + 0.5 + 1) / 6, abs=1e-6)


def test_filtered_topk_keeps_the_target_and_breaks_ties_by_lower_id():
    from elmm.baselines import filtered_topk

    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 3.0, 2.0, 5.0]])
    known = torch.tensor([[True, False, True, False], [False, True, True, False]])
    # row 0: 0 is filtered, 2 is known but the target (kept); all tie -> ids in order, -1 past the 3 left
    # row 1: 1 filtered, 2 the target: 3 (5.0), 2 (2.0), 0 (0.0)
    top = filtered_topk(scores, known, torch.tensor([2, 2]), 4)
    assert top.tolist() == [[1, 2, 3, -1], [3, 2, 0, -1]]


def test_group_precision_on_a_hand_built_world():
    from elmm.baselines import GroupPrecision

    queries = queries_from_triples(TRIPLES["test"])
    filters = FilterIndex(np.concatenate([TRIPLES[s] for s in SPLITS]), 4)
    meter = GroupPrecision(_latent(), ENTITY_IDS, RELATION_IDS, NAMES, WORLD_PARAMS, k=2)
    scorer = lambda batch: torch.tensor([[4.0, 3.0, 2.0, 1.0]] * len(batch))  # noqa: E731  (0 first, 3 last)
    rank_queries(scorer, queries, filters, batch_size=4, on_batch=meter)  # two batches: the meter accumulates
    out = meter.result()
    # Pools (one community): tail of h -> the objects but h; head of t -> the objects but t. Top 2:
    # (0,knows,?)->1: nothing filtered but the target -> [0, 1], pool {1, 2}: 1/2; chance 2 of 4.
    # (1,knows,?)->2: 0 filtered (train) -> [1, 2], pool {0, 2}: 1/2; chance {2} of {1, 2, 3}.
    # (?,knows,1)->0: [0, 1], pool {0, 2}: 1/2; chance 2/4.   (?,knows,2)->1: [0, 1], pool {0, 1}: 1; chance 2/4.
    knows = out["per_relation"]["knows"]
    assert knows["tail"] == {"precision": 0.5, "precision_se": 0.0, "chance": pytest.approx((0.5 + 1 / 3) / 2,
                                                                                        abs=1e-6), "count": 2}
    assert knows["head"]["precision"] == 0.75 and knows["head"]["chance"] == 0.5 and knows["head"]["count"] == 2
    assert knows["head"]["precision_se"] == pytest.approx(np.std([0.5, 1], ddof=1) / math.sqrt(2), abs=1e-6)
    assert "has colour" not in out["per_relation"]  # attribute relations have no pool
    assert out["k"] == 2 and out["overall"]["count"] == 4 and out["overall"]["precision"] == 0.625


def _prior(k: int, pool: int, lam: float) -> float:
    poisson = [math.exp(-lam) * lam**j / math.factorial(j) for j in range(pool)]
    return poisson[k - 1] if k < pool else 1 - sum(poisson[: pool - 1])


@pytest.mark.parametrize("pool,observed,mean,q", [(4, 0, 2.5, 0.8), (4, 1, 3.0, 0.6), (5, 2, 5.0, 0.8),
                                                  (3, 1, 1.0, 0.5), (5, 0, 1.5, 0.3), (4, 3, 4.0, 0.9)])
def test_head_posterior_weight_matches_brute_force_enumeration(pool, observed, mean, q):
    """P(t is one of h's r-targets outside train | h's train targets are exactly S), by enumerating every
    degree k, every target set of size k and every way its edges fall into train."""
    lam = max(0.0, mean - 1)
    seen = set(range(observed))  # the train targets S
    total = hit = 0.0
    for k in range(1, pool + 1):
        for targets in itertools.combinations(range(pool), k):
            for in_train in itertools.product((False, True), repeat=k):
                if {t for t, kept in zip(targets, in_train) if kept} != seen:
                    continue
                p = _prior(k, pool, lam) / math.comb(pool, k) * q ** sum(in_train) * (1 - q) ** (k - sum(in_train))
                total += p
                hit += p * (pool - 1 in targets)  # the candidate t: a member not in S
    assert structure_weight(observed, pool, mean, q) == pytest.approx(hit / total, rel=1e-9)
    assert remaining_edges(observed, pool, mean, q) == pytest.approx(hit / total * (pool - observed), rel=1e-9)


def test_check_against_ceilings_flags_scores_above_ceiling_plus_3_se():
    ceilings = {"knows": {"tail": {"mrr": 0.2, "mrr_se": 0.01, "count": 100}, "head": {"mrr": 0.3, "mrr_se": 0.02}},
                "has colour": {"tail": {"mrr": 1.0, "mrr_se": 0.0}}}
    fine = {"knows": {"tail": {"mrr": 0.2 + 3 * 0.01 * math.sqrt(2) - 1e-4, "mrr_se": 0.01, "count": 100},
                      "head": {"mrr": 0.25}}, "has colour": {"tail": {"mrr": 1.0}, "head": {"mrr": 0.1}}}
    assert check_against_ceilings(fine, ceilings) == []
    leak = {"knows": {"tail": {"mrr": 0.3, "mrr_se": 0.01, "count": 100}, "head": {"mrr": 0.37}}}
    found = check_against_ceilings(leak, ceilings)
    assert [(v.relation, v.side) for v in found] == [("knows", "tail"), ("knows", "head")]
    assert found[0].score == 0.3 and found[0].ceiling == 0.2 and found[0].se == pytest.approx(0.01 * math.sqrt(2))
    assert found[1].se == 0.02  # no model SE: the ceiling's
    assert check_against_ceilings(leak, ceilings, sigmas=10) == []
    with pytest.raises(ValueError, match="another split"):
        check_against_ceilings({"knows": {"tail": {"mrr": 0.1, "count": 50}}}, ceilings)


# ----------------------------------------------------------------------------- the stage and the KGE

MICRO_WORLD = dict(entities=40, images_per_entity=1, image_size=8, fewer_images=0.0, no_images=0.0, corrupt_images=0,
                   communities=3, teams=4)
MICRO_KGE = {"dim": 8, "max_epochs": 3, "eval_every": 1, "patience": 2, "negatives": 4, "batch_size": 64}


@pytest.fixture(scope="module")
def micro_kg(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines-kg") / "kg"
    generate_synthetic(root, seed=0, progress=False, **MICRO_WORLD)
    return root


def _project(tmp_path, kg_dir, baselines: dict):
    raw = to_dict(Params())
    raw["data"]["synthetic"].update(MICRO_WORLD)
    raw["baselines"].update(baselines)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "kg").symlink_to(kg_dir, target_is_directory=True)
    return tmp_path


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _check_rank_table(path, kg):
    rows = _read_csv(path)
    assert tuple(rows[0]) == RANK_COLUMNS
    q = queries_from_triples(kg.triples["test"])
    body = rows[1:]
    assert len(body) == len(q)
    for i, row in enumerate(body):
        query, rel, direction, anchor, target, rank, opt, pes = row
        assert int(query) == i and int(rel) == int(q.relations[i]) and int(anchor) == int(q.anchors[i])
        assert int(target) == int(q.targets[i]) and direction == ("tail", "head")[int(q.directions[i])]
        assert float(rank) == (int(opt) + int(pes)) / 2 and 1 <= int(opt) <= int(pes) <= kg.num_entities
        assert rank == (str(int(float(rank))) if float(rank).is_integer() else f"{float(rank):.1f}")
    return np.array([float(r[5]) for r in body])


def test_stage_writes_metrics_and_rank_tables_without_kge(tmp_path, micro_kg, run_stage):
    project = _project(tmp_path, micro_kg, {"kge": "none"})
    run_stage("baselines", project, argv=[])
    kg = load_kg(micro_kg)
    report = json.loads((project / "metrics/baselines.json").read_text())
    assert report["queries"] == 2 * len(kg.triples["test"]) and report["split"] == "test"
    assert report["kge"]["available"] is False
    prior_ranks = _check_rank_table(project / "metrics/ranks/prior.csv", kg)
    assert report["prior"]["mrr"] == pytest.approx(np.mean(1 / prior_ranks), abs=1e-6)
    assert _read_csv(project / "metrics/ranks/kge.csv") == [list(RANK_COLUMNS)]  # disabled: header only
    for name, sides in report["prior"]["per_relation"].items():
        for side, entry in sides.items():
            assert {"mrr", "mrr_se", "hits_at_1", "hits_at_3", "hits_at_10", "count"} <= set(entry)
            ceiling = report["ceiling"]["per_relation"][name][side]
            assert ceiling["count"] == entry["count"]
            assert ceiling["mrr"] >= entry["mrr"] - 3 * (entry["mrr_se"] or 0)  # the floor stays under the ceiling
    assert check_against_ceilings(report["prior"]["per_relation"], report["ceiling"]["per_relation"]) == []
    attribute = report["ceiling"]["per_relation"]["has colour"]
    assert attribute["tail"]["mrr"] == attribute["head"]["mrr"] == 1
    group = report["prior"]["group_precision"]  # one row per structure query
    structure = {"knows", "works with", "rival of"}
    assert set(group["per_relation"]) == structure
    for name in structure:
        for side in ("tail", "head"):
            entry = group["per_relation"][name][side]
            assert entry["count"] == report["prior"]["per_relation"][name][side]["count"]
            assert 0 <= entry["precision"] <= 1 and 0 < entry["chance"] < 1


def test_ceilings_are_absent_for_real_data(tmp_path, micro_kg):
    from elmm.baselines import kg_ceilings

    kg = load_kg(micro_kg)
    kg.meta = {**kg.meta, "source": "fb15k-237-img"}
    result, note = kg_ceilings(kg)
    assert result is None and "no ground truth" in note


# ---- PyKEEN

def _pykeen():
    return pytest.importorskip("pykeen", reason="PyKEEN is not installed (pip install -e '.[kge]'): KGE tests skipped")


def _train(kg_triples, num_entities, num_relations):
    from elmm.kge import KGEConfig, train_kge

    return train_kge(kg_triples["train"], kg_triples["valid"], num_entities, num_relations, KGEConfig(**MICRO_KGE),
                     seed=0)


def test_kge_sees_only_train_and_scores_exactly_the_test_queries(micro_kg):
    _pykeen()
    from elmm.kge import score_queries

    torch.set_num_threads(1)
    kg = load_kg(micro_kg)
    test = kg.triples["test"]
    known = {tuple(t) for t in kg.all_triples().tolist()}
    other = next((h, r, t) for h in range(40) for r in (6, 7, 8) for t in range(40) if h != t and (h, r, t) not in known)
    changed = test.copy()
    changed[0] = other

    first = _train(kg.triples, kg.num_entities, kg.num_relations)
    second = _train({**kg.triples, "test": changed}, kg.num_entities, kg.num_relations)
    q1, q2 = queries_from_triples(test), queries_from_triples(changed)
    s1, s2 = score_queries(first.model, q1), score_queries(second.model, q2)
    assert s1.shape == (len(q1), kg.num_entities)
    same = np.ones(len(q1), dtype=bool)
    same[[0, len(test)]] = False  # the replaced triple's tail and head queries
    assert torch.equal(s1[same], s2[same])  # bitwise: the test split never reaches training
    # Row i is query i: its tail/head scores of (anchor, relation), nothing else.
    with torch.inference_mode():
        i, j = 1, len(test) + 1
        assert torch.equal(s1[i], first.model.score_t(torch.tensor([[test[1, 0], test[1, 1]]]))[0].float())
        assert torch.equal(s1[j], first.model.score_h(torch.tensor([[test[1, 1], test[1, 2]]]))[0].float())


def test_kge_scores_in_batches_bounded_by_the_memory_budget(micro_kg, monkeypatch):
    _pykeen()
    import elmm.kge as kge

    assert kge.query_batch_size(14_541) * 14_541 <= kge.SCORE_BUDGET
    assert kge.query_batch_size(10**9) == 1  # never zero
    torch.set_num_threads(1)
    kg = load_kg(micro_kg)
    model = _train(kg.triples, kg.num_entities, kg.num_relations).model
    queries = queries_from_triples(kg.triples["test"])
    whole = kge.score_queries(model, queries)
    monkeypatch.setattr(kge, "SCORE_BUDGET", 3 * kg.num_entities)  # 3 queries a batch
    assert kge.query_batch_size(kg.num_entities) == 3
    assert torch.equal(kge.score_queries(model, queries), whole)


def test_real_view_rotate_scores_like_pykeens_rotate():
    _pykeen()
    from pykeen.models import RotatE
    from pykeen.triples import CoreTriplesFactory

    from elmm.kge import rotate_class

    factory = CoreTriplesFactory.create(mapped_triples=torch.tensor([[0, 0, 1], [1, 1, 2]]), num_entities=30,
                                        num_relations=2)
    reference = RotatE(triples_factory=factory, embedding_dim=16, random_seed=1)
    ours = rotate_class()(triples_factory=factory, embedding_dim=16, random_seed=2)
    ours.load_state_dict(reference.state_dict())
    pairs = torch.tensor([[0, 0], [5, 1], [29, 0]])
    some = torch.tensor([3, 4, 29])
    triples = torch.tensor([[0, 0, 1], [5, 1, 29], [29, 0, 29]])
    with torch.inference_mode():
        # against every entity: one matrix product (all_entity_distances), not PyKEEN's [B, N, D] form
        assert torch.allclose(ours.score_t(pairs), reference.score_t(pairs), atol=1e-5)
        assert torch.allclose(ours.score_h(pairs.flip(1)), reference.score_h(pairs.flip(1)), atol=1e-5)
        assert torch.allclose(ours.score_t(pairs, tails=some), reference.score_t(pairs, tails=some), atol=1e-5)
        assert torch.allclose(ours.score_t(pairs, slice_size=7), reference.score_t(pairs), atol=1e-5)
        # one (h, r, t) at a time (training's path): the direct form
        assert torch.allclose(ours.score_hrt(triples), reference.score_hrt(triples), atol=1e-5)


def test_all_entity_distances_match_the_direct_form():
    from elmm.kge import all_entity_distances

    g = torch.Generator().manual_seed(0)
    queries = torch.randn(5, 64, dtype=torch.cfloat, generator=g)
    entities = torch.randn(40, 64, dtype=torch.cfloat, generator=g)
    entities[7] = queries[2]  # an exact match: distance 0, not NaN
    direct = torch.view_as_real(queries[:, None] - entities[None]).double().square().sum((-1, -2)).sqrt()
    got = all_entity_distances(queries, entities)
    assert got.shape == (5, 40) and got.dtype == torch.float32
    assert torch.allclose(got.double(), direct, rtol=1e-6, atol=1e-6)
    assert got[2, 7] < 1e-6


def test_stage_with_kge_writes_its_ranks(tmp_path, micro_kg, run_stage):
    _pykeen()
    project = _project(tmp_path, micro_kg, {"kge": "rotate", **MICRO_KGE})
    run_stage("baselines", project, argv=[])
    kg = load_kg(micro_kg)
    report = json.loads((project / "metrics/baselines.json").read_text())
    ranks = _check_rank_table(project / "metrics/ranks/kge.csv", kg)
    assert report["kge"]["mrr"] == pytest.approx(np.mean(1 / ranks), abs=1e-6)
    assert report["kge"]["training"]["dim"] == MICRO_KGE["dim"]
    assert set(report["kge"]["per_relation"]) == set(report["prior"]["per_relation"])
