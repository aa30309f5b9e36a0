"""Queries over a knowledge graph and their known answers.

A triple (h, r, t) gives two ranking queries: predict the tail of (h, r, ?) and the head of
(?, r, t). `Queries` holds them as parallel tensors (anchor, relation, direction, target), and
`FilterIndex` holds every known answer of every (anchor, relation, direction), which the filtered
setting removes before ranking and negative sampling never draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["TAIL", "HEAD", "Queries", "queries_from_triples", "FilterIndex"]

#: Direction codes: predict the tail of (anchor, r, ?) / the head of (?, r, anchor).
TAIL = 0
HEAD = 1


@dataclass
class Queries:
    """Queries in both directions: (anchor, relation, direction) with the answer `target`."""

    anchors: torch.Tensor
    relations: torch.Tensor
    directions: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.anchors)

    def subset(self, index) -> Queries:
        return Queries(self.anchors[index], self.relations[index], self.directions[index], self.targets[index])


def queries_from_triples(triples: np.ndarray) -> Queries:
    """Each triple (h, r, t) gives a tail query (h, r, ?) -> t and a head query (?, r, t) -> h."""
    t = torch.as_tensor(np.asarray(triples), dtype=torch.long)
    h, r, tl = t[:, 0], t[:, 1], t[:, 2]
    n = len(t)
    return Queries(
        anchors=torch.cat([h, tl]),
        relations=torch.cat([r, r]),
        directions=torch.cat([torch.full((n,), TAIL), torch.full((n,), HEAD)]),
        targets=torch.cat([tl, h]),
    )


def as_int_array(values: Any) -> np.ndarray:
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
        """(start, count) into `values` for each query key; count 0 for unknown keys."""
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
    lookups are binary searches, so `mask` costs `O(B log n + answers)` plus the
    `[B, num_entities]` output.
    """

    def __init__(self, triples: np.ndarray, num_entities: int) -> None:
        """
        Args:
            triples: int `[n, 3]` rows `(head, relation, tail)`, normally train + valid + test.
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
            as_int_array(anchors), as_int_array(relations), as_int_array(directions)
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
        """Bool `[B, num_entities]`, `True` at every known answer of each query.

        `directions` may be a scalar applied to the whole batch. The result includes the
        query's own target; `compute_ranks` keeps the target regardless.
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
