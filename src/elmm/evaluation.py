"""Rank-based evaluation for knowledge graph completion queries ``(h, r, ?)`` and ``(?, r, t)``.

Conventions (follow PyKEEN's ``RankBasedEvaluator`` and LibKGE's ``entity_ranking``):

Ranks
    For one query with score vector ``s`` over ``C`` candidates and true index ``t``
    (higher score = better):

    * optimistic rank  = ``1 + #{j : s_j > s_t}``
    * pessimistic rank = ``#{j : s_j >= s_t}`` (the true entity itself is counted)
    * realistic rank   = ``(optimistic + pessimistic) / 2``

    Ties use a tolerance (LibKGE): ``s_j`` counts as equal to ``s_t`` when
    ``|s_j - s_t| <= atol + rtol * |s_t|`` (defaults ``atol=1e-5``, ``rtol=1e-4``);
    "greater" means strictly greater *and* not tied. Exactly equal scores (including equal
    infinities) are always ties; an infinite true score gets no tolerance band.

Filtered setting
    All other known true answers of the query (from train + valid + test, see
    :class:`FilterIndex`) are removed from the candidates; the target itself is never removed,
    even if the mask marks it. Removed candidates do not count towards the candidate count
    ``C_i``. NaN scores are treated as removed as well. A query whose *target* score is NaN
    cannot be placed, so it is ranked last (optimistic = pessimistic = ``C_i``).

Metrics (:func:`summarize`)
    ``mr`` mean realistic rank; ``mrr`` mean of ``1 / realistic``; ``hits_at_k`` fraction of
    queries with realistic rank ``<= k``; ``mrr_optimistic`` / ``mrr_pessimistic`` the MRR of
    the optimistic / pessimistic ranks; ``amr`` adjusted mean rank
    ``mr / mean((C_i + 1) / 2)`` (PyKEEN's AMR: a random scorer gets about 1, a perfect one
    about ``1 / mean((C_i + 1) / 2)``); ``candidates`` the mean filtered candidate count;
    ``count`` the number of ranks. Values are plain Python floats/ints rounded to 6 decimals;
    for an empty set every metric except ``count`` is ``None``.

Direction
    ``0`` = predict the tail given ``(anchor=head, relation)``, reported as ``"tail"``;
    ``1`` = predict the head given ``(relation, anchor=tail)``, reported as ``"head"``.

Ranks are computed by counting comparisons only (no sorting), batch by batch, so memory per
call is ``O(B * C)`` and no step needs the scores of all queries at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["compute_ranks", "FilterIndex", "RankAccumulator", "summarize", "TAIL", "HEAD"]

#: Direction codes: predict the tail of (anchor, r, ?) / the head of (?, r, anchor).
TAIL = 0
HEAD = 1

_DECIMALS = 6


# --------------------------------------------------------------------------------------------
# Ranks of one batch
# --------------------------------------------------------------------------------------------
def compute_ranks(
    scores: torch.Tensor,
    targets: torch.Tensor,
    filter_mask: torch.Tensor | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> dict[str, torch.Tensor]:
    """Optimistic, pessimistic and realistic rank of the target of each query in a batch.

    Args:
        scores: ``[B, C]`` float scores, higher is better. Half/bfloat16 is upcast to float32
            (tolerances of ``1e-5`` are below half precision); float64 stays float64.
        targets: ``[B]`` long, index of the true candidate of each query.
        filter_mask: optional ``[B, C]`` bool, ``True`` = remove this candidate (other known
            answers). The target is never removed, even where marked.
        atol: absolute tie tolerance.
        rtol: relative tie tolerance (relative to ``|s_t|``).

    Returns:
        ``{"optimistic": [B] float, "pessimistic": [B] float, "realistic": [B] float,
        "candidates": [B] long}`` on the device of ``scores``.
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


# --------------------------------------------------------------------------------------------
# Known answers for the filtered setting
# --------------------------------------------------------------------------------------------
def _to_numpy_int(values: Any) -> np.ndarray:
    """Any int array-like / tensor / scalar as a 1-D int64 numpy array."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.atleast_1d(np.asarray(values, dtype=np.int64)).reshape(-1)


class _AnswerTable:
    """Compressed (CSR-like) map from an int64 query key to its sorted answers."""

    def __init__(self, keys: np.ndarray, values: np.ndarray) -> None:
        # lexsort: primary key `keys`, secondary `values`, so each key's answers come sorted.
        order = np.lexsort((values, keys))
        keys, values = keys[order], values[order]
        self.keys, self.starts, self.counts = np.unique(keys, return_index=True, return_counts=True)
        self.values = values

    def lookup(self, query_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, count) into ``values`` for each query key; count 0 for unknown keys."""
        starts = np.zeros(len(query_keys), dtype=np.int64)
        counts = np.zeros(len(query_keys), dtype=np.int64)
        if not len(self.keys):
            return starts, counts
        pos = np.minimum(np.searchsorted(self.keys, query_keys), len(self.keys) - 1)
        found = self.keys[pos] == query_keys
        starts[found] = self.starts[pos[found]]
        counts[found] = self.counts[pos[found]]
        return starts, counts


class FilterIndex:
    """Known answers of every (head, relation) and (relation, tail) pair from a set of triples.

    Built with vectorised numpy (sort + unique), so 300k triples take well under a second;
    lookups are binary searches, so :meth:`mask` costs ``O(B log n + answers)`` plus the
    ``[B, num_entities]`` output.
    """

    def __init__(self, triples: np.ndarray, num_entities: int) -> None:
        """
        Args:
            triples: int ``[n, 3]`` rows ``(head, relation, tail)``, normally train + valid + test.
                Duplicates are harmless.
            num_entities: number of entities (width of the masks).
        """
        triples = np.asarray(triples, dtype=np.int64).reshape(-1, 3)
        entities = triples[:, [0, 2]]
        if entities.size and (triples.min() < 0 or entities.max() >= num_entities):
            raise ValueError(f"triples reference entities outside [0, {num_entities}) or negative ids")
        self.num_entities = int(num_entities)
        # Relations are only needed to build unique int64 keys anchor * R + relation.
        self.num_relations = int(triples[:, 1].max()) + 1 if len(triples) else 1
        triples = np.unique(triples, axis=0) if len(triples) else triples
        heads, relations, tails = triples[:, 0], triples[:, 1], triples[:, 2]
        self._tables = {
            TAIL: _AnswerTable(heads * self.num_relations + relations, tails),
            HEAD: _AnswerTable(tails * self.num_relations + relations, heads),
        }

    def _lookup(self, anchors: Any, relations: Any, directions: Any) -> tuple[np.ndarray, ...]:
        """Broadcast the query arrays and return (directions, starts, counts) per query."""
        anchors, relations, directions = np.broadcast_arrays(
            _to_numpy_int(anchors), _to_numpy_int(relations), _to_numpy_int(directions)
        )
        if not np.isin(directions, (TAIL, HEAD)).all():
            raise ValueError("directions must be 0 (predict tail) or 1 (predict head)")
        if len(anchors) and (anchors.min() < 0 or anchors.max() >= self.num_entities):
            raise ValueError(f"anchors must lie in [0, {self.num_entities})")
        # Relations never seen in the triples simply have no known answers.
        unknown = (relations < 0) | (relations >= self.num_relations)
        keys = np.where(unknown, -1, anchors * self.num_relations + relations)
        starts = np.zeros(len(keys), dtype=np.int64)
        counts = np.zeros(len(keys), dtype=np.int64)
        for direction, table in self._tables.items():
            sel = directions == direction
            if sel.any():
                starts[sel], counts[sel] = table.lookup(keys[sel])
        return directions, starts, counts

    def answers(self, anchor: int, relation: int, direction: int) -> np.ndarray:
        """Sorted known answers of one query (empty int64 array if none)."""
        _, starts, counts = self._lookup(anchor, relation, direction)
        start, count = int(starts[0]), int(counts[0])
        return self._tables[int(direction)].values[start : start + count].copy()

    def mask(
        self,
        anchors: np.ndarray | torch.Tensor,
        relations: np.ndarray | torch.Tensor,
        directions: np.ndarray | torch.Tensor | int,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Bool ``[B, num_entities]``, ``True`` at every known answer of each query.

        ``directions`` may be a scalar applied to the whole batch. The result includes the
        query's own target; :func:`compute_ranks` keeps the target regardless.
        """
        directions, starts, counts = self._lookup(anchors, relations, directions)
        batch = len(starts)
        out = np.zeros((batch, self.num_entities), dtype=bool)
        for direction, table in self._tables.items():
            sel = np.flatnonzero((directions == direction) & (counts > 0))
            if not len(sel):
                continue
            n = counts[sel]
            rows = np.repeat(sel, n)
            # Position of every answer inside `values`: each query's start plus 0..count-1.
            offsets = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
            cols = table.values[np.repeat(starts[sel], n) + offsets]
            out[rows, cols] = True
        return torch.from_numpy(out).to(device) if device is not None else torch.from_numpy(out)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def _round(value: float) -> float:
    return round(float(value), _DECIMALS)


def summarize(ranks: dict[str, Any], hits: Sequence[int] = (1, 3, 10)) -> dict[str, float | int | None]:
    """The flat metric dict for one set of ranks (output of :func:`compute_ranks`, any batch size).

    Keys: ``mr, mrr, hits_at_<k>..., mrr_optimistic, mrr_pessimistic, amr, candidates, count``.
    """
    # float64 on CPU: means over millions of ranks should not lose precision.
    opt = torch.as_tensor(ranks["optimistic"]).detach().cpu().double().reshape(-1)
    pes = torch.as_tensor(ranks["pessimistic"]).detach().cpu().double().reshape(-1)
    real = torch.as_tensor(ranks["realistic"]).detach().cpu().double().reshape(-1)
    cand = torch.as_tensor(ranks["candidates"]).detach().cpu().double().reshape(-1)
    count = int(real.numel())
    keys = ["mr", "mrr", *(f"hits_at_{k}" for k in hits)]
    keys += ["mrr_optimistic", "mrr_pessimistic", "amr", "candidates"]
    if count == 0:
        return {**{key: None for key in keys}, "count": 0}

    mr = real.mean().item()
    result: dict[str, float | int | None] = {"mr": _round(mr), "mrr": _round((1.0 / real).mean().item())}
    for k in hits:
        result[f"hits_at_{k}"] = _round((real <= k).double().mean().item())
    result["mrr_optimistic"] = _round((1.0 / opt).mean().item())
    result["mrr_pessimistic"] = _round((1.0 / pes).mean().item())
    # Expected mean rank of a random scorer is mean((C_i + 1) / 2).
    result["amr"] = _round(mr / ((cand + 1) / 2).mean().item())
    result["candidates"] = _round(cand.mean().item())
    result["count"] = count
    return result


# What a per-relation side breakdown keeps (the full set would make `dvc metrics show` unreadable).
SIDE_KEYS = ("mr", "mrr", "hits_at_1", "hits_at_10", "count")


class RankAccumulator:
    """Collects ranks of many batches with their side and relation, then reports metrics."""

    _RANK_KEYS = ("optimistic", "pessimistic", "realistic", "candidates")

    def __init__(self) -> None:
        keys = (*self._RANK_KEYS, "direction", "relation")
        self._parts: dict[str, list[torch.Tensor]] = {key: [] for key in keys}

    def __len__(self) -> int:
        return sum(part.numel() for part in self._parts["direction"])

    def add(self, ranks: dict[str, torch.Tensor], directions: Any, relations: Any) -> None:
        """Store one batch of ranks; ``directions`` may be a scalar for the whole batch."""
        batch = torch.as_tensor(ranks["realistic"]).numel()
        # Stored on CPU so GPU memory is not held across the whole evaluation.
        for key in self._RANK_KEYS:
            values = torch.as_tensor(ranks[key]).detach().cpu().reshape(-1)
            if values.numel() != batch:
                raise ValueError(f"ranks[{key!r}] has {values.numel()} entries, expected {batch}")
            self._parts[key].append(values.to(self._dtype(key)))
        for key, values in (("direction", directions), ("relation", relations)):
            array = np.broadcast_to(_to_numpy_int(values), (batch,))
            self._parts[key].append(torch.from_numpy(array.copy()))

    @staticmethod
    def _dtype(key: str) -> torch.dtype:
        return torch.double if key in ("optimistic", "pessimistic", "realistic") else torch.long

    def _all(self) -> dict[str, torch.Tensor]:
        return {
            key: torch.cat(parts) if parts else torch.zeros(0, dtype=self._dtype(key))
            for key, parts in self._parts.items()
        }

    def metrics(self, relation_names: list[str] | None = None, hits: tuple[int, ...] = (1, 3, 10)) -> dict:
        """Overall metrics plus ``"head"``, ``"tail"`` and ``"per_relation"`` breakdowns.

        ``per_relation`` pools both sides and is keyed by ``relation_names[index]`` when names
        are given, else ``str(index)``; only relations that occurred are listed, in index order.
        Each entry also carries compact ``"head"`` and ``"tail"`` breakdowns (SIDE_KEYS): the
        two sides of one relation can differ in kind (on the synthetic world, a tail query of
        `has colour` shows the anchor's images, a head query's anchor is a colour concept with none).
        """
        data = self._all()

        def subset(selection: torch.Tensor) -> dict:
            return summarize({key: data[key][selection] for key in self._RANK_KEYS}, hits)

        everything = torch.ones_like(data["direction"], dtype=torch.bool)
        result = subset(everything)
        result["head"] = subset(data["direction"] == HEAD)
        result["tail"] = subset(data["direction"] == TAIL)
        per_relation = {}
        for relation in torch.unique(data["relation"]).tolist():
            name = relation_names[relation] if relation_names is not None else str(relation)
            of_relation = data["relation"] == relation
            per_relation[name] = subset(of_relation)
            for side, code in (("head", HEAD), ("tail", TAIL)):
                selection = of_relation & (data["direction"] == code)
                if selection.any():
                    per_relation[name][side] = {k: v for k, v in subset(selection).items() if k in SIDE_KEYS}
        result["per_relation"] = per_relation
        return result
