"""Floors and ceilings every result is read against (model-free; docs/baselines.md).

- **Frequency prior** (a floor): for a tail query `(h, r, ?)` every entity is scored by how often
  it is the tail of `r` in the *train* split; for a head query `(?, r, t)` by how often it is the
  head of `r`. Ranked by `elmm.evaluation.compute_ranks` exactly like the model: every entity a
  candidate, the other known answers (train + valid + test) filtered, realistic ranks (counts tie
  often: that is what realistic ranks are for).
- **Bayes ceilings** (synthetic world only): the expected MRR / Hits@k of an oracle that knows
  every object's latent attributes (data/kg/latent.parquet) and the generator's rules
  (elmm.kg.synthetic), sees the train graph, but neither which valid/test edges exist nor the
  random out-degrees. It ranks the candidates left after the usual filter by their posterior
  probability of being the answer, ties broken uniformly at random (`oracle_weights`). For a target
  tied with `B` candidates (itself included) after `A` strictly better ones, the expected
  reciprocal rank is `(1/B) * sum_{i=1..B} 1/(A+i)` and the expected Hits@k the fraction of the
  positions `A+1 .. A+B` that are `<= k` (not `1 / realistic rank`: by Jensen that would
  understate a ceiling). For real data there is no ground truth and no ceiling.
- **Leak guard**: `check_against_ceilings` lists every relation and side whose MRR lies more than
  `sigmas` standard errors above its ceiling.

Every result is a table per relation and side: `mrr`, `mrr_se` (sample sd of the per-query
reciprocal ranks / sqrt(n); `None` below 2 queries), `hits_at_1`, `hits_at_3`, `hits_at_10`,
`count` (models also `mr`), plus the same figures overall and per side (`metrics_table`).

Why one module of ~440 lines: the prior, the ceilings and the leak guard share one result shape
and one reading of the world's rules; the RotatE baseline, which needs PyKEEN, lives in `elmm.kge`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch

from .evaluation import TIE_ATOL, TIE_RTOL, compute_ranks, summarize
from .kg.format import SPLITS, KnowledgeGraph
from .kg.queries import HEAD, TAIL, FilterIndex, Queries, queries_from_triples
from .kg.synthetic import ATTRIBUTE_RELATIONS, CONCEPTS
from .rank_table import COLUMNS, write_rank_table

__all__ = [
    "SIDES", "HITS", "RANK_COLUMNS", "CeilingViolation", "rank_queries", "frequency_prior_scorer", "metrics_table",
    "expected_rank_values", "remaining_edges", "structure_weight", "oracle_weights", "bayes_ceilings",
    "kg_ceilings", "check_against_ceilings", "GroupPrecision", "filtered_topk", "write_ranks_csv",
]

#: Side names; index = the direction code of elmm.kg.queries (TAIL = 0, HEAD = 1).
SIDES = ("tail", "head")
HITS = (1, 3, 10)
#: Columns of the per-query rank tables (metrics/ranks/*.csv), the format `evaluate` writes for the model.
RANK_COLUMNS = COLUMNS  # the per-query ranks format (elmm.rank_table)
#: Structure relations of the synthetic world: the meta.json param holding the mean out-degree.
STRUCTURE_DEGREE = {"knows": "knows_degree", "works_with": "works_with_degree", "rival_of": "rival_degree"}
_DECIMALS = 6

Scorer = Callable[[Queries], torch.Tensor]
#: (query, entity) scores ranked at once by `rank_queries` (float64: 16 MB, a few copies in compute_ranks).
RANK_CELLS = 2**21


# ----------------------------------------------------------------------------- ranking


def rank_queries(scorer: Scorer, queries: Queries, filters: FilterIndex, batch_size: int | None = None, *,
                 exact: bool = False, on_batch: Callable[[Queries, torch.Tensor, torch.Tensor], None] | None = None,
                 ) -> dict[str, np.ndarray]:
    """Filtered ranks (elmm.evaluation.compute_ranks) of every query, in query order.

    `scorer(batch)` returns `[len(batch), num_entities]` scores (higher = better) for a batch of
    queries; by default a batch holds `RANK_CELLS` scores, so memory does not grow with the number
    of queries. Scores tie within the model's tolerance (`TIE_ATOL`, `TIE_RTOL`), or only when equal
    with `exact`. Returns numpy arrays `optimistic`, `pessimistic`, `realistic`, `candidates`.
    `on_batch(batch, scores, known)` sees each batch's scores and filter mask (`GroupPrecision`).
    """
    batch_size = batch_size or max(1, RANK_CELLS // filters.num_entities)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("optimistic", "pessimistic", "realistic", "candidates")}
    for start in range(0, len(queries), batch_size):
        batch = queries.subset(slice(start, start + batch_size))
        scores = scorer(batch)
        if scores.shape != (len(batch), filters.num_entities):
            raise ValueError(f"scorer returned shape {tuple(scores.shape)}, expected ({len(batch)}, {filters.num_entities})")
        mask = filters.mask(batch.anchors, batch.relations, batch.directions)
        ranks = compute_ranks(scores, batch.targets, mask, atol=0.0 if exact else TIE_ATOL, rtol=0.0 if exact else TIE_RTOL)
        if on_batch is not None:
            on_batch(batch, scores, mask)
        for key in parts:
            parts[key].append(ranks[key].cpu().numpy())
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}


def frequency_prior_scorer(train: np.ndarray, num_entities: int, num_relations: int) -> Scorer:
    """The frequency prior: tail query -> how often each entity is the tail of r in `train`;
    head query -> how often it is the head of r."""
    train = np.asarray(train, dtype=np.int64).reshape(-1, 3)
    counts = np.zeros((2, num_relations, num_entities), dtype=np.float64)
    np.add.at(counts[TAIL], (train[:, 1], train[:, 2]), 1.0)
    np.add.at(counts[HEAD], (train[:, 1], train[:, 0]), 1.0)
    table = torch.from_numpy(counts)

    def scorer(batch: Queries) -> torch.Tensor:
        return table[batch.directions, batch.relations]

    return scorer


# ----------------------------------------------------------------------------- metrics


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), _DECIMALS)


def _stats(rr: np.ndarray, hits: Mapping[int, np.ndarray]) -> dict[str, Any]:
    """Mean reciprocal rank with its standard error, mean hits, count (per-query values given)."""
    n = len(rr)
    if n == 0:
        return {"mrr": None, "mrr_se": None, **{f"hits_at_{k}": None for k in hits}, "count": 0}
    se = float(np.std(rr, ddof=1) / math.sqrt(n)) if n >= 2 else None
    return {"mrr": _round(rr.mean()), "mrr_se": _round(se),
            **{f"hits_at_{k}": _round(np.mean(h)) for k, h in hits.items()}, "count": int(n)}


def rank_values(ranks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-query reciprocal rank and hits of ranked queries (the realistic rank, as `summarize`)."""
    real = np.asarray(ranks["realistic"], dtype=np.float64)
    return {"rr": 1.0 / real, **{f"hits_at_{k}": (real <= k).astype(np.float64) for k in HITS}}


def expected_rank_values(ranks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-query expected reciprocal rank and Hits@k under uniform random tie-breaking.

    With `A = optimistic - 1` strictly better candidates and `B = pessimistic - optimistic + 1`
    tied ones (the target included), the target is equally likely at each position `A+1 .. A+B`:
    E[1/rank] = (H(A+B) - H(A)) / B (H the harmonic numbers), E[Hits@k] = clip(k - A, 0, B) / B.
    """
    opt = np.asarray(ranks["optimistic"], dtype=np.int64)
    pes = np.asarray(ranks["pessimistic"], dtype=np.int64)
    a, b = opt - 1, pes - opt + 1
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, int(pes.max(initial=0)) + 1))])
    rr = (harmonic[a + b] - harmonic[a]) / b
    return {"rr": rr, **{f"hits_at_{k}": np.clip(k - a, 0, b) / b for k in HITS}}


def metrics_table(values: Mapping[str, np.ndarray], queries: Queries, relation_names: list[str],
                  ranks: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Overall, per side and per relation and side figures of per-query `values` (`rr`, `hits_at_k`).

    With `ranks` (a ranked model, not an expectation) each table also carries `mr` and the
    overall one `summarize`'s optimistic/pessimistic MRR, AMR and mean candidate count.
    """
    rel = queries.relations.numpy()
    dirs = queries.directions.numpy()

    def table(sel: np.ndarray, full: bool = False) -> dict[str, Any]:
        out = _stats(values["rr"][sel], {k: values[f"hits_at_{k}"][sel] for k in HITS})
        if ranks is not None:
            summary = summarize({k: torch.from_numpy(np.asarray(v)[sel]) for k, v in ranks.items()}, HITS)
            if summary["count"]:
                assert abs(summary["mrr"] - out["mrr"]) < 1e-5  # one definition of the MRR
            extra = ("mr", "mrr_optimistic", "mrr_pessimistic", "amr", "candidates") if full else ("mr",)
            out = {**{k: summary[k] for k in extra}, **out}
        return out

    everything = np.ones(len(rel), dtype=bool)
    result = table(everything, full=True)
    for code, side in enumerate(SIDES):
        result[side] = table(dirs == code)
    per_relation: dict[str, dict] = {}
    for r in np.unique(rel).tolist():
        per_relation[relation_names[r]] = {side: table((rel == r) & (dirs == code))
                                           for code, side in enumerate(SIDES) if ((rel == r) & (dirs == code)).any()}
    result["per_relation"] = per_relation
    return result


# ----------------------------------------------------------------------------- Bayes ceilings


def _poisson(j: int, lam: float) -> float:
    if lam == 0:
        return 1.0 if j == 0 else 0.0
    return math.exp(j * math.log(lam) - lam - math.lgamma(j + 1))


@functools.lru_cache(maxsize=4096)
def remaining_edges(observed: int, pool: int, mean_degree: float, train_fraction: float) -> float:
    """E[k - o | o]: how many of an object's r-edges are expected outside train, given `observed` in train.

    The generator's prior (elmm.kg.synthetic._draw_edges): k = min(pool, 1 + Poisson(mean - 1))
    distinct targets (none when the pool is empty or mean <= 0); each edge lands in train with
    probability `train_fraction`, so o | k ~ Binomial(k, q). The posterior P(k | o) is computed
    exactly over k = max(o, 1) .. pool.
    """
    if pool <= 0 or mean_degree <= 0 or observed >= pool:
        return 0.0
    lam = max(0.0, mean_degree - 1.0)
    q = float(train_fraction)
    num = den = 0.0
    for k in range(max(observed, 1), pool + 1):
        # P(k): 1 + X = k with X ~ Poisson(lam); the cap puts all of X >= pool - 1 on k = pool
        prior = _poisson(k - 1, lam) if k < pool else max(0.0, 1.0 - sum(_poisson(j, lam) for j in range(pool - 1)))
        weight = prior * math.comb(k, observed) * q**observed * (1.0 - q) ** (k - observed)
        num += weight * (k - observed)
        den += weight
    return num / den if den > 0 else 0.0


def structure_weight(observed: int, pool: int, mean_degree: float, train_fraction: float) -> float:
    """Posterior probability that a given pool member not yet an r-target of h in train is one
    outside train: E[k_h - o_h | o_h] / (|pool(h)| - o_h) (the remaining edges, uniform over the
    remaining pool members). The oracle ranks head-query candidates by this weight."""
    free = pool - observed
    return remaining_edges(observed, pool, mean_degree, train_fraction) / free if free > 0 else 0.0


class _World:
    """The latent facts of a synthetic world, indexed by entity row."""

    def __init__(self, latent: pd.DataFrame, entity_ids: list[str], params: Mapping[str, Any]):
        latent = latent.set_index("entity").reindex(range(len(entity_ids)))
        self.num_entities = len(entity_ids)
        self.community = latent["community"].fillna(-1).to_numpy(dtype=np.int64)
        self.team = latent["team"].fillna(-1).to_numpy(dtype=np.int64)
        self.is_object = self.community >= 0
        self.communities = int(params["communities"])
        self.params = params
        index = {e: i for i, e in enumerate(entity_ids)}
        # attribute kind -> per entity the entity row of its concept (-1 for concepts / unknown values)
        self.concept_of: dict[str, np.ndarray] = {}
        for kind in CONCEPTS:
            values = latent[kind].fillna("").astype(str).tolist()
            self.concept_of[kind] = np.array([index.get(f"{kind}:{v}", -1) if v else -1 for v in values], np.int64)

    def groups(self, relation: str) -> tuple[np.ndarray, np.ndarray]:
        """(pool group, member group) per entity: h draws its r-targets from the members of its pool
        group (minus h); t is a member of its member group (-1: not an object)."""
        if relation == "knows":
            return self.community, self.community
        if relation == "works_with":
            return self.team, self.team
        if relation == "rival_of":
            return np.where(self.is_object, (self.community + 1) % self.communities, -1), self.community
        raise KeyError(relation)


def oracle_weights(world: _World, relation: str, train_fraction: float, train_r: np.ndarray) -> Callable:
    """A scorer of queries of one relation: the oracle's posterior weights (up to a factor per query).

    `train_r` are the train triples of this relation. Attribute relations: the object's true concept
    (tail) / every object with that attribute value (head) weigh 1, everything else 0. Structure
    relations: tail `(h, r, ?)`: every member of pool(h) weighs the same; head `(?, r, t)`: candidate
    h weighs `structure_weight(o_h, |pool(h)|, mean, q)` if t is in pool(h), else 0.
    """
    n = world.num_entities
    if relation in ATTRIBUTE_RELATIONS:
        concept = world.concept_of[ATTRIBUTE_RELATIONS[relation]]

        def attribute(anchor: int, direction: int) -> np.ndarray:
            w = np.zeros(n)
            if direction == TAIL:
                if concept[anchor] >= 0:
                    w[concept[anchor]] = 1.0
            else:
                w[(concept == anchor) & world.is_object] = 1.0
            return w

        return attribute

    mean = float(world.params[STRUCTURE_DEGREE[relation]])
    pool_group, member_group = world.groups(relation)
    group_size = np.bincount(member_group[world.is_object], minlength=int(max(member_group.max(), pool_group.max())) + 1)
    # |pool(h)|: the members of h's pool group, minus h itself when h belongs to it
    pool_size = np.where(world.is_object, group_size[np.maximum(pool_group, 0)] - (pool_group == member_group), 0)
    observed = np.bincount(train_r[:, 0], minlength=n) if len(train_r) else np.zeros(n, np.int64)
    head_weight = np.array([structure_weight(int(observed[h]), int(pool_size[h]), mean, train_fraction)
                            if world.is_object[h] else 0.0 for h in range(n)])
    ids = np.arange(n)

    def structure(anchor: int, direction: int) -> np.ndarray:
        if direction == TAIL:  # every member of pool(anchor) is equally likely: they tie
            return (world.is_object & (member_group == pool_group[anchor]) & (ids != anchor)).astype(np.float64)
        # t = anchor is in pool(h) iff h's pool group is t's group (and h != t)
        in_pool = world.is_object & (pool_group == member_group[anchor]) & (ids != anchor)
        return in_pool * head_weight

    return structure


def _dense(weights: np.ndarray) -> torch.Tensor:
    """Weights as exactly comparable scores (ranked with `exact=True`): the dense rank of each value
    (rounded to 12 digits, so equal posteriors computed along different paths still tie), 1 apart."""
    _, inverse = np.unique(np.round(weights, 12), return_inverse=True)
    return torch.from_numpy(inverse.reshape(weights.shape).astype(np.float64))


def bayes_ceilings(triples: Mapping[str, np.ndarray], latent: pd.DataFrame, entity_ids: list[str],
                   relation_ids: list[str], relation_names: list[str], params: Mapping[str, Any],
                   split: str = "test") -> dict[str, Any]:
    """The Bayes ceilings of the queries of `split` (module docstring), as `metrics_table`.

    `triples` maps train/valid/test to `[n, 3]` arrays; `latent` is latent.parquet; `params` the
    generator's params (meta.json "params": communities, *_degree). The train fraction q of each
    relation is the empirical one, `|train_r| / |train_r + valid_r + test_r|`. Relations the
    generator does not know are left out (listed under "unknown_relations").
    """
    triples = {s: np.asarray(triples[s], dtype=np.int64).reshape(-1, 3) for s in SPLITS}
    everything = np.concatenate([triples[s] for s in SPLITS])
    world = _World(latent, list(entity_ids), params)
    queries = queries_from_triples(triples[split])
    filters = FilterIndex(everything, len(entity_ids))
    scorers: dict[int, Callable] = {}
    unknown = []
    for r, rid in enumerate(relation_ids):
        if rid not in ATTRIBUTE_RELATIONS and rid not in STRUCTURE_DEGREE:
            unknown.append(relation_names[r])
            continue
        train_r = triples["train"][triples["train"][:, 1] == r]
        total = int((everything[:, 1] == r).sum())
        scorers[r] = oracle_weights(world, rid, len(train_r) / total if total else 0.0, train_r)
    keep = torch.tensor([int(r) in scorers for r in queries.relations.tolist()], dtype=torch.bool)
    queries = queries.subset(keep)

    def scorer(batch: Queries) -> torch.Tensor:
        rows = [scorers[r](a, d) for a, r, d in zip(batch.anchors.tolist(), batch.relations.tolist(),
                                                    batch.directions.tolist())]
        return _dense(np.stack(rows) if rows else np.zeros((0, world.num_entities)))

    # exact: with the tolerance, dense ranks past 1 / TIE_RTOL (10,000 distinct posteriors) would tie
    ranks = rank_queries(scorer, queries, filters, exact=True)
    result = metrics_table(expected_rank_values(ranks), queries, list(relation_names))
    if unknown:
        result["unknown_relations"] = unknown
    return result


def kg_ceilings(kg: KnowledgeGraph, split: str = "test") -> tuple[dict | None, str]:
    """`bayes_ceilings` of a loaded KG, or `(None, reason)` when it has no ground truth (real data)."""
    path = Path(kg.root) / "latent.parquet"
    if kg.meta.get("source") != "synthetic" or not path.is_file():
        return None, ("no ground truth: the Bayes ceilings need the synthetic world's latent.parquet "
                      f"(source {kg.meta.get('source')!r})")
    result = bayes_ceilings(kg.triples, pd.read_parquet(path), kg.entities["id"].tolist(), kg.relations["id"].tolist(),
                            kg.relations["name"].tolist(), kg.meta.get("params", {}), split)
    return result, "expected ranks of the Bayes oracle (latent attributes + rules + train graph), uniform tie-breaking"


# ----------------------------------------------------------------------------- in-group precision


def filtered_topk(scores: torch.Tensor, known: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k entity ids [B, k] among the filtered setting's candidates (every known answer removed
    but the query's own target), best first; ties go to the lower id (a stable sort), so a scorer
    that ties, like the prior, gets a reproducible list. -1 where fewer than k candidates remain."""
    s = scores.detach().to(torch.float64).masked_fill(known.to(scores.device), float("-inf"))
    rows = torch.arange(len(s), device=s.device)
    s[rows, targets.to(s.device)] = scores.detach().to(torch.float64)[rows, targets.to(s.device)]
    order = torch.sort(s, dim=1, descending=True, stable=True)
    top, ids = order.values[:, :k], order.indices[:, :k]
    ids = torch.where(torch.isfinite(top), ids, torch.full_like(ids, -1))
    if ids.shape[1] < k:
        ids = torch.cat([ids, ids.new_full((len(ids), k - ids.shape[1]), -1)], dim=1)
    return ids.cpu()


class GroupPrecision:
    """In-group precision@k of the structure relations of a synthetic world, batch by batch.

    The generator draws the answers of `(h, r, ?)` from h's pool (`knows`: h's community; `works
    with`: its team; `rival of`: the next community), so the share of a query's filtered top-k that
    lies in that pool says whether a model learnt the membership, whichever member it ranks first.
    A head query `(?, r, t)` counts the candidates h whose pool holds t. `chance` is the same share
    for a uniform draw from the filtered candidates (the anchor itself excluded from the pool).
    Call it as an `on_batch` hook (`rank_queries`, `elmm.ranking.evaluate_ranking`) with the
    scores and the filter mask; `result()` gives, per relation name and side, `precision`,
    `precision_se` (sample sd over queries / sqrt(n)), `chance` and `count`, and `overall`.
    """

    def __init__(self, latent: pd.DataFrame, entity_ids: list[str], relation_ids: list[str],
                 relation_names: list[str], params: Mapping[str, Any], k: int = 10):
        self.k = k
        self.world = _World(latent, list(entity_ids), params)
        n = self.world.num_entities
        # relation row -> (name, [pool group, member group] as tensors); only relations with a pool
        self.relations = {}
        for r, rid in enumerate(relation_ids):
            if rid in STRUCTURE_DEGREE:
                pool, member = self.world.groups(rid)
                self.relations[r] = (relation_names[r], torch.tensor(pool), torch.tensor(member))
        self.is_object = torch.tensor(self.world.is_object)
        self.ids = torch.arange(n)
        self.rows: list[tuple[int, int, float, float]] = []  # relation, direction, precision, chance

    @classmethod
    def of_kg(cls, kg: KnowledgeGraph, k: int = 10) -> GroupPrecision | None:
        """The meter of a loaded KG, or None when it has no ground truth or no structure relation."""
        path = Path(kg.root) / "latent.parquet"
        if kg.meta.get("source") != "synthetic" or not path.is_file():
            return None
        meter = cls(pd.read_parquet(path), kg.entities["id"].tolist(), kg.relations["id"].tolist(),
                    kg.relations["name"].tolist(), kg.meta.get("params", {}), k)
        return meter if meter.relations else None

    def plausible(self, anchor: int, relation: int, direction: int) -> torch.Tensor:
        """[E] bool: the entities the generator could draw the answer from."""
        _, pool, member = self.relations[relation]
        if direction == TAIL:
            mask = member == pool[anchor]
        else:
            mask = pool == member[anchor]
        return mask & self.is_object & (self.ids != anchor)

    def __call__(self, batch: Queries, scores: torch.Tensor, known: torch.Tensor) -> None:
        keep = [i for i, r in enumerate(batch.relations.tolist()) if r in self.relations]
        if not keep:
            return
        sel = torch.tensor(keep)
        targets = batch.targets[sel]
        top = filtered_topk(scores[sel.to(scores.device)], known[sel.to(known.device)], targets, self.k)
        candidates = ~known[sel.to(known.device)].cpu()
        candidates[torch.arange(len(sel)), targets] = True
        for j, i in enumerate(keep):
            a, r, d = int(batch.anchors[i]), int(batch.relations[i]), int(batch.directions[i])
            plausible = self.plausible(a, r, d)
            ids = top[j][top[j] >= 0]
            precision = float(plausible[ids].float().mean()) if len(ids) else 0.0
            chance = float((plausible & candidates[j]).sum() / max(1, int(candidates[j].sum())))
            self.rows.append((r, d, precision, chance))

    def result(self) -> dict[str, Any]:
        rows = np.array(self.rows, dtype=np.float64).reshape(-1, 4)

        def block(sel: np.ndarray) -> dict[str, Any] | None:
            p, c = rows[sel, 2], rows[sel, 3]
            if not len(p):
                return None
            se = float(p.std(ddof=1) / math.sqrt(len(p))) if len(p) > 1 else None
            return {"precision": _round(float(p.mean())), "precision_se": _round(se),
                    "chance": _round(float(c.mean())), "count": int(len(p))}

        out: dict[str, Any] = {"k": self.k, "overall": block(np.ones(len(rows), bool)), "per_relation": {}}
        for r, (name, _, _) in self.relations.items():
            sides = {SIDES[d]: b for d in (TAIL, HEAD)
                     if (b := block((rows[:, 0] == r) & (rows[:, 1] == d))) is not None}
            if sides:
                out["per_relation"][name] = sides
        return out


# ----------------------------------------------------------------------------- leak guard


class CeilingViolation(NamedTuple):
    relation: str
    side: str
    score: float
    ceiling: float
    se: float


def check_against_ceilings(metrics_by_relation_side: Mapping[str, Mapping[str, Mapping[str, Any]]],
                           ceilings: Mapping[str, Mapping[str, Mapping[str, Any]]],
                           sigmas: float = 3.0) -> list[CeilingViolation]:
    """Every relation and side whose MRR exceeds its Bayes ceiling by more than `sigmas` SE.

    Both arguments map relation name -> side ("tail"/"head") -> a dict with `mrr` (and
    optionally `mrr_se`, `count`); e.g. `metrics/evaluate.json["per_relation"]` and
    `metrics/baselines.json["ceiling"]["per_relation"]`. The SE is
    `sqrt(se_model^2 + se_ceiling^2)` (each the sample sd of the per-query reciprocal ranks /
    sqrt(n); a missing model SE counts as 0). Relation-sides without an MRR or without a ceiling
    SE (fewer than 2 queries) are not checked; a different query count on the two sides is an error
    (the ceiling is for other queries).
    """
    violations = []
    for relation, sides in metrics_by_relation_side.items():
        for side in SIDES:
            model = (sides or {}).get(side)
            ceiling = ceilings.get(relation, {}).get(side)
            if not model or not ceiling or model.get("mrr") is None or ceiling.get("mrr") is None:
                continue
            if "count" in model and "count" in ceiling and model["count"] != ceiling["count"]:
                raise ValueError(f"{relation} {side}: {model['count']} queries scored but the ceiling is for "
                                 f"{ceiling['count']} (another split or data)")
            if ceiling.get("mrr_se") is None:
                continue
            se = math.sqrt(float(model.get("mrr_se") or 0.0) ** 2 + float(ceiling["mrr_se"]) ** 2)
            if model["mrr"] > ceiling["mrr"] + sigmas * se + 1e-9:
                violations.append(CeilingViolation(relation, side, float(model["mrr"]), float(ceiling["mrr"]), se))
    return violations


def read_against_baselines(model: Mapping[str, Any], baselines: Mapping[str, Any]) -> dict:
    """The model's metrics beside the floor, the KGE and the ceiling of `metrics/baselines.json`.

    `model` is evaluate's metrics (overall keys plus `per_relation`). Returns `overall` (MRR of
    each) and, per relation and side, the four MRRs and the model's margin over the prior in units
    of the paired-free SE sqrt(se_model^2 + se_prior^2) (`z_prior`; > 2 is the testbed's bar).
    """
    def mrr(block):
        return None if not block else block.get("mrr")

    out = {"overall": {"model": model.get("mrr"), **{k: mrr(baselines.get(k)) for k in ("prior", "kge", "ceiling")}},
           "per_relation": {}}
    for relation, sides in model.get("per_relation", {}).items():
        for side in SIDES:
            if side not in sides:
                continue
            m = sides[side]
            row = {"model": m.get("mrr"), "model_se": m.get("mrr_se")}
            for k in ("prior", "kge", "ceiling"):
                ref = ((baselines.get(k) or {}).get("per_relation") or {}).get(relation, {}).get(side)
                row[k] = mrr(ref)
                row[f"{k}_se"] = None if not ref else ref.get("mrr_se")
            if row["prior"] is not None and row["model"] is not None:
                se = math.sqrt((row["model_se"] or 0.0) ** 2 + (row["prior_se"] or 0.0) ** 2)
                row["z_prior"] = round((row["model"] - row["prior"]) / se, 2) if se > 0 else None
            out["per_relation"].setdefault(relation, {})[side] = row
    return out


def format_against_baselines(table: Mapping[str, Any]) -> str:
    """`read_against_baselines`'s table as the evaluate stage prints it."""
    def f(x):
        return "   -  " if x is None else f"{x:.4f}"

    o = table["overall"]
    lines = [f"evaluate: MRR overall: model {f(o['model'])}  prior {f(o['prior'])}  KGE {f(o['kge'])}  "
             f"ceiling {f(o['ceiling'])}",
             f"evaluate:   {'relation':24s} side  model(±SE)        prior   KGE     ceiling  z vs prior"]
    for relation, sides in table["per_relation"].items():
        for side, r in sides.items():
            se = "" if r["model_se"] is None else f"±{r['model_se']:.3f}"
            z = "" if r.get("z_prior") is None else f"{r['z_prior']:+.1f}"
            lines.append(f"evaluate:   {relation:24s} {side:4s}  {f(r['model'])}{se:8s}  {f(r['prior'])}  "
                         f"{f(r['kge'])}  {f(r['ceiling'])}   {z}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- rank tables


def write_ranks_csv(path: str | Path, queries: Queries, ranks: Mapping[str, np.ndarray] | None) -> None:
    """Per-query ranks in `elmm.rank_table`'s format (what `evaluate` writes for the model), one row
    per query in query order; `ranks=None` writes the header only (the baseline is disabled)."""
    if ranks is None:
        empty = np.zeros(0, dtype=np.int64)
        write_rank_table(path, *([empty] * 7))
        return
    write_rank_table(path, queries.relations, queries.directions, queries.anchors, queries.targets,
                     ranks["realistic"], ranks["optimistic"], ranks["pessimistic"])
