"""Rank-based evaluation for knowledge graph completion queries `(h, r, ?)` and `(?, r, t)`.

Conventions (follow PyKEEN's `RankBasedEvaluator` and LibKGE's `entity_ranking`):

Ranks
    For one query with score vector `s` over `C` candidates and true index `t`
    (higher score = better):

    * optimistic rank  = `1 + #{j : s_j > s_t}`
    * pessimistic rank = `#{j : s_j >= s_t}` (the true entity itself is counted)
    * realistic rank   = `(optimistic + pessimistic) / 2`

    Ties use a tolerance (LibKGE): `s_j` counts as equal to `s_t` when
    `|s_j - s_t| <= atol + rtol * |s_t|` (defaults `atol=1e-5`, `rtol=1e-4`);
    "greater" means strictly greater *and* not tied. Exactly equal scores (including equal
    infinities) are always ties; an infinite true score gets no tolerance band.

Filtered setting
    All other known true answers of the query (from train + valid + test, see
    `elmm.kg.queries.FilterIndex`) are removed from the candidates; the target itself is never removed,
    even if the mask marks it. Removed candidates do not count towards the candidate count
    `C_i`. NaN scores are treated as removed as well. A query whose *target* score is NaN
    cannot be placed, so it is ranked last (optimistic = pessimistic = `C_i`).

Metrics (`summarize`)
    `mr` mean realistic rank; `mrr` mean of `1 / realistic`; `hits_at_k` fraction of
    queries with realistic rank `<= k`; `mrr_optimistic` / `mrr_pessimistic` the MRR of
    the optimistic / pessimistic ranks; `amr` adjusted mean rank
    `mr / mean((C_i + 1) / 2)` (PyKEEN's AMR: a random scorer gets about 1, a perfect one
    about `1 / mean((C_i + 1) / 2)`); `candidates` the mean filtered candidate count;
    `count` the number of ranks. Values are plain Python floats/ints rounded to 6 decimals;
    for an empty set every metric except `count` is `None`.

Anchor rank (self-denoising)
    `anchor_ranks` ranks each query's own anchor entity among the same filtered candidates (the
    answer stays one, and the anchor is kept even where it is a known answer), from the scores of
    the same pass. `anchor_rank` in the metrics gives, per side and per relation and side, its
    mean realistic rank (`mean_rank`) and the fraction of queries where it ranks first, above
    every candidate including the answer (`first`): how often the model would answer a query
    with the entity it was shown.

Direction
    `0` = predict the tail given `(anchor=head, relation)`, reported as `"tail"`;
    `1` = predict the head given `(relation, anchor=tail)`, reported as `"head"`.

Ranks are computed by counting comparisons only (no sorting), batch by batch, so memory per
call is `O(B * C)` and no step needs the scores of all queries at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .kg.queries import HEAD, TAIL, as_int_array

__all__ = ["compute_ranks", "anchor_ranks", "RankAccumulator", "summarize", "TIE_ATOL", "TIE_RTOL"]

#: Tie tolerance of `compute_ranks` (LibKGE's): scores within TIE_ATOL + TIE_RTOL * |s_true| tie.
TIE_ATOL = 1e-5
TIE_RTOL = 1e-4

_DECIMALS = 6


# --------------------------------------------------------------------------------------------
# Ranks of one batch
# --------------------------------------------------------------------------------------------
def compute_ranks(
    scores: torch.Tensor,
    targets: torch.Tensor,
    filter_mask: torch.Tensor | None = None,
    atol: float = TIE_ATOL,
    rtol: float = TIE_RTOL,
) -> dict[str, torch.Tensor]:
    """Optimistic, pessimistic and realistic rank of the target of each query in a batch.

    Args:
        scores: `[B, C]` float scores, higher is better. Half/bfloat16 is upcast to float32
            (tolerances of `1e-5` are below half precision); float64 stays float64.
        targets: `[B]` long, index of the true candidate of each query.
        filter_mask: optional `[B, C]` bool, `True` = remove this candidate (other known
            answers). The target is never removed, even where marked.
        atol: absolute tie tolerance.
        rtol: relative tie tolerance (relative to `|s_t|`).

    Returns:
        `{"optimistic": [B] float, "pessimistic": [B] float, "realistic": [B] float,
        "candidates": [B] long}` on the device of `scores`.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, C], got shape {tuple(scores.shape)}")
    batch, num_candidates = scores.shape
    device = scores.device
    targets = torch.as_tensor(targets, device=device).long().reshape(-1)
    if targets.shape[0] != batch:
        raise ValueError(f"targets has {targets.shape[0]} entries, scores has {batch} rows")
    if batch and (targets.min() < 0 or targets.max() >= num_candidates):
        raise ValueError(f"targets must lie in [0, {num_candidates})")

    # Counting below compares against a tolerance, so keep at least float32 precision.
    if scores.dtype not in (torch.float32, torch.float64):
        scores = scores.float()

    rows = torch.arange(batch, device=device)
    true_scores = scores[rows, targets].unsqueeze(1)  # [B, 1]

    removed = torch.isnan(scores)
    if filter_mask is not None:
        filter_mask = torch.as_tensor(filter_mask, device=device)
        if filter_mask.shape != scores.shape:
            raise ValueError(
                f"filter_mask shape {tuple(filter_mask.shape)} != scores shape {tuple(scores.shape)}"
            )
        removed = removed | filter_mask.bool()
    # The target is never filtered out (a NaN target is handled separately below).
    removed[rows, targets] = False
    kept = ~removed

    # No tolerance band around an infinite true score: |s - inf| would be inf <= inf for every
    # finite s and tie everything with it.
    tolerance = torch.where(
        torch.isfinite(true_scores),
        atol + rtol * true_scores.abs(),
        torch.zeros_like(true_scores),
    )
    # `==` makes equal infinities ties (inf - inf is NaN, which fails the `<=` test).
    tied = ((scores - true_scores).abs() <= tolerance) | (scores == true_scores)
    tied &= kept
    greater = (scores > true_scores) & ~tied & kept

    num_greater = greater.sum(dim=1)
    num_tied = tied.sum(dim=1)  # includes the target itself
    candidates = kept.sum(dim=1)

    optimistic = 1 + num_greater
    pessimistic = num_greater + num_tied
    # A NaN target compares false with everything (it would get rank 1 and pessimistic 0);
    # rank it last instead so broken scores are never rewarded.
    nan_target = torch.isnan(true_scores.squeeze(1))
    optimistic = torch.where(nan_target, candidates, optimistic)
    pessimistic = torch.where(nan_target, candidates, pessimistic)

    optimistic = optimistic.to(scores.dtype)
    pessimistic = pessimistic.to(scores.dtype)
    return {
        "optimistic": optimistic,
        "pessimistic": pessimistic,
        "realistic": (optimistic + pessimistic) / 2,
        "candidates": candidates.long(),
    }


def anchor_ranks(
    scores: torch.Tensor,
    anchors: torch.Tensor,
    targets: torch.Tensor,
    filter_mask: torch.Tensor | None = None,
    atol: float = TIE_ATOL,
    rtol: float = TIE_RTOL,
) -> dict[str, torch.Tensor]:
    """The ranks (as `compute_ranks`) of each query's own anchor entity, not filtered.

    The candidates are those the target is ranked among: `filter_mask` removes the other known
    answers, the target stays, and the anchor is kept even where the mask marks it.
    """
    removed = torch.zeros_like(scores, dtype=torch.bool) if filter_mask is None else filter_mask.bool().clone()
    rows = torch.arange(scores.shape[0], device=scores.device)
    removed[rows, torch.as_tensor(targets, device=scores.device).long().reshape(-1)] = False
    return compute_ranks(scores, anchors, removed, atol, rtol)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def _round(value: float) -> float:
    return round(float(value), _DECIMALS)


def summarize(ranks: dict[str, Any], hits: Sequence[int] = (1, 3, 10)) -> dict[str, float | int | None]:
    """The flat metric dict for one set of ranks (output of `compute_ranks`, any batch size).

    Keys: `mr, mrr, hits_at_<k>..., mrr_se, mrr_optimistic, mrr_pessimistic, amr, candidates, count`.
    """
    # float64 on CPU: means over millions of ranks should not lose precision.
    opt = torch.as_tensor(ranks["optimistic"]).detach().cpu().double().reshape(-1)
    pes = torch.as_tensor(ranks["pessimistic"]).detach().cpu().double().reshape(-1)
    real = torch.as_tensor(ranks["realistic"]).detach().cpu().double().reshape(-1)
    cand = torch.as_tensor(ranks["candidates"]).detach().cpu().double().reshape(-1)
    count = int(real.numel())
    keys = ["mr", "mrr", *(f"hits_at_{k}" for k in hits)]
    keys += ["mrr_se", "mrr_optimistic", "mrr_pessimistic", "amr", "candidates"]
    if count == 0:
        return {**{key: None for key in keys}, "count": 0}

    mr = real.mean().item()
    result: dict[str, float | int | None] = {"mr": _round(mr), "mrr": _round((1.0 / real).mean().item())}
    for k in hits:
        result[f"hits_at_{k}"] = _round((real <= k).double().mean().item())
    # Standard error of the MRR over queries (sample sd of the reciprocal ranks / sqrt(n)).
    result["mrr_se"] = _round((1.0 / real).std().item() / count**0.5) if count > 1 else 0.0
    result["mrr_optimistic"] = _round((1.0 / opt).mean().item())
    result["mrr_pessimistic"] = _round((1.0 / pes).mean().item())
    # Expected mean rank of a random scorer is mean((C_i + 1) / 2).
    result["amr"] = _round(mr / ((cand + 1) / 2).mean().item())
    result["candidates"] = _round(cand.mean().item())
    result["count"] = count
    return result


# What a per-relation side breakdown keeps (the full set would make `dvc metrics show` unreadable).
SIDE_KEYS = ("mr", "mrr", "mrr_se", "hits_at_1", "hits_at_10", "count")


def summarize_anchor(realistic: Any) -> dict[str, float | int | None]:
    """`mean_rank` of the anchors' realistic ranks, `first` the fraction ranked first, `count`."""
    real = torch.as_tensor(realistic).detach().cpu().double().reshape(-1)
    if real.numel() == 0:
        return {"mean_rank": None, "first": None, "count": 0}
    return {"mean_rank": _round(real.mean().item()), "first": _round((real <= 1).double().mean().item()),
            "count": int(real.numel())}


class RankAccumulator:
    """Collects ranks of many batches with their side and relation, then reports metrics."""

    _RANK_KEYS = ("optimistic", "pessimistic", "realistic", "candidates")

    def __init__(self) -> None:
        keys = (*self._RANK_KEYS, "direction", "relation", "anchor")
        self._parts: dict[str, list[torch.Tensor]] = {key: [] for key in keys}

    def __len__(self) -> int:
        return sum(part.numel() for part in self._parts["direction"])

    def add(self, ranks: dict[str, torch.Tensor], directions: Any, relations: Any,
            anchor: dict[str, torch.Tensor] | None = None) -> None:
        """Store one batch of ranks; `directions` may be a scalar for the whole batch. `anchor`: the
        `anchor_ranks` of the batch, given for every batch or for none."""
        batch = torch.as_tensor(ranks["realistic"]).numel()
        if (anchor is None) != (not self._parts["anchor"]) and self._parts["direction"]:
            raise ValueError("anchor ranks must be given for every batch or for none")
        if anchor is not None:
            values = torch.as_tensor(anchor["realistic"]).detach().cpu().reshape(-1).double()
            if values.numel() != batch:
                raise ValueError(f"anchor ranks have {values.numel()} entries, expected {batch}")
            self._parts["anchor"].append(values)
        # Stored on CPU so GPU memory is not held across the whole evaluation.
        for key in self._RANK_KEYS:
            values = torch.as_tensor(ranks[key]).detach().cpu().reshape(-1)
            if values.numel() != batch:
                raise ValueError(f"ranks[{key!r}] has {values.numel()} entries, expected {batch}")
            self._parts[key].append(values.to(self._dtype(key)))
        for key, values in (("direction", directions), ("relation", relations)):
            array = np.broadcast_to(as_int_array(values), (batch,))
            self._parts[key].append(torch.from_numpy(array.copy()))

    @staticmethod
    def _dtype(key: str) -> torch.dtype:
        return torch.double if key in ("optimistic", "pessimistic", "realistic", "anchor") else torch.long

    def ranks(self) -> dict[str, torch.Tensor]:
        """Every stored rank in the order added: optimistic, pessimistic, realistic, candidates,
        direction, relation (and anchor, the anchors' realistic ranks, when given)."""
        data = self._all()
        return {k: v for k, v in data.items() if k != "anchor" or self._parts["anchor"]}

    def _all(self) -> dict[str, torch.Tensor]:
        return {
            key: torch.cat(parts) if parts else torch.zeros(0, dtype=self._dtype(key))
            for key, parts in self._parts.items()
        }

    def metrics(self, relation_names: list[str] | None = None, hits: tuple[int, ...] = (1, 3, 10)) -> dict:
        """Overall metrics plus `"head"`, `"tail"` and `"per_relation"` breakdowns.

        `per_relation` pools both sides and is keyed by `relation_names[index]` when names
        are given, else `str(index)`; only relations that occurred are listed, in index order.
        Each entry also carries compact `"head"` and `"tail"` breakdowns (SIDE_KEYS): the
        two sides of one relation can differ in kind (on the synthetic world, a tail query of
        `has colour` shows the anchor's images, a head query's anchor is a colour concept with none).
        """
        data = self._all()

        def subset(selection: torch.Tensor) -> dict:
            return summarize({key: data[key][selection] for key in self._RANK_KEYS}, hits)

        with_anchor = bool(self._parts["anchor"])
        everything = torch.ones_like(data["direction"], dtype=torch.bool)
        result = subset(everything)
        result["head"] = subset(data["direction"] == HEAD)
        result["tail"] = subset(data["direction"] == TAIL)
        if with_anchor:
            result["anchor_rank"] = {**summarize_anchor(data["anchor"]),
                                     **{side: summarize_anchor(data["anchor"][data["direction"] == code])
                                        for side, code in (("head", HEAD), ("tail", TAIL))}}
        per_relation = {}
        for relation in torch.unique(data["relation"]).tolist():
            name = relation_names[relation] if relation_names is not None else str(relation)
            of_relation = data["relation"] == relation
            per_relation[name] = subset(of_relation)
            for side, code in (("head", HEAD), ("tail", TAIL)):
                selection = of_relation & (data["direction"] == code)
                if selection.any():
                    per_relation[name][side] = {k: v for k, v in subset(selection).items() if k in SIDE_KEYS}
                    if with_anchor:
                        per_relation[name][side]["anchor_rank"] = summarize_anchor(data["anchor"][selection])
        result["per_relation"] = per_relation
        return result
