"""Query subgraphs from the training graph: MR-MKG's relevance retrieval, vectorised and leak-proof.

Every entity e and relation r has a fixed feature vector x_e, x_r (unit-normalised; see
`knowledge.source`: the mean frozen token embedding of the name). A query (anchor a, relation r)
has the query vector q = x_a + x_r, a triple (h, r', t) the triple vector x_h + x_r' + x_t, and a
triple's relevance to the query is their cosine. MR-MKG retrieves the top-n triples by cosine,
expands them by one hop and keeps the top N; for a completion query the anchor is known, so:

1. pool 1: every training triple incident to the anchor (either side), scored;
2. seeds: the top n = `seed_triples` of pool 1;
3. pool 2: the triples incident to the seeds' other endpoints (one hop further), scored; at most
   `EXPAND_LIMIT` per expanded entity (a fixed pseudo-random sample of a hub's triples), so a hub
   costs no more than any other node;
4. the subgraph: the seeds plus the top N - n of (pool 1 without the seeds) u pool 2.

The seeds always stay, so every kept triple is joined to the anchor through a seed: the subgraph
is connected. Ranks are by descending score, ties broken by the smaller triple index (triples are
indexed in sorted (h, r, t) order), so the result is a function of the query alone: it does not
depend on batch mates or on the order of the training file.

Cost: only the anchor's incident triples and those of its <= n expanded neighbours are scored,
never every triple; all of a batch is scored at once with numpy (flat arrays with a segment id per
query, sorted with lexsort for the per-query top-k). `retrieval_timing` measures it.

Leak-proofing. The graph holds the training split only, so valid/test triples never enter it. In
training the query's own edge is removed from its subgraph (the answer would otherwise be read
off the input), and with `reverse_edge="remove"` its reverse (t, r, h) too, which matters for
symmetric relations. At evaluation nothing is removed. This is MKGL's / NBFNet's rule; MKGL's
`remove_one_hop` (every edge between the pair) is stricter than both options here.

Candidate neighbourhoods (`entity_subgraphs`) are the 1-hop part only: an entity's top N incident
triples by cosine to its own vector x_e, precomputed once for every entity (N + 2 kept, so that
removing the query edge and its reverse still leaves N).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np

from ..kg.queries import HEAD, as_int_array

EXPAND_LIMIT = 128  # triples read per expanded entity (pool 2)
_CHUNK = 32768  # candidates scored per numpy block (bounds the temporary [chunk, d] arrays)


@dataclass
class Subgraphs:
    """Triples selected for `num_graphs` graphs: row i puts training triple `tid[i]` into graph
    `seg[i]`; rows are sorted by graph, then by rank (score descending, triple index ascending)."""

    seg: np.ndarray  # int64 [S]
    tid: np.ndarray  # int64 [S]
    score: np.ndarray  # float32 [S] the cosine the triple was ranked by
    num_graphs: int
    scored: int = 0  # candidates scored to select them (the retrieval's work)

    def sizes(self) -> np.ndarray:
        return np.bincount(self.seg, minlength=self.num_graphs)

    def of(self, graph: int) -> np.ndarray:
        """The triple indices of one graph, in rank order."""
        return self.tid[self.seg == graph]


def segment_top(seg: np.ndarray, tid: np.ndarray, score: np.ndarray, k) -> np.ndarray:
    """Positions of the top-k rows of each segment (score descending, tid ascending), in
    (segment, rank) order. `k` is an int or an array indexed by segment id."""
    if not len(seg):
        return np.zeros(0, np.int64)
    order = np.lexsort((tid, -score, seg))
    seg_sorted = seg[order]
    rank = np.arange(len(order)) - np.searchsorted(seg_sorted, seg_sorted, side="left")
    limit = k[seg_sorted] if isinstance(k, np.ndarray) else k
    return order[rank < limit]


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


class SubgraphIndex:
    """The training graph in CSR form plus the fixed vectors, built once (vectorised numpy).

    Args:
        triples: int [T, 3] (head, relation, tail) of the training split only.
        num_entities, num_relations: table sizes.
        entity_vectors, relation_vectors: float [E, d], [R, d] fixed features (normalised here).
        max_triples: N, triples per subgraph. seed_triples: n, seeds expanded by one hop.
        reverse_edge: "remove" | "keep" (training exclusion of the query edge's reverse).
    """

    def __init__(self, triples: np.ndarray, num_entities: int, num_relations: int, entity_vectors: np.ndarray,
                 relation_vectors: np.ndarray, *, max_triples: int = 10, seed_triples: int = 5,
                 reverse_edge: str = "remove") -> None:
        if reverse_edge not in ("remove", "keep"):
            raise ValueError(f"reverse_edge must be 'remove' or 'keep', got {reverse_edge!r}")
        tr = np.asarray(triples, dtype=np.int64).reshape(-1, 3)
        tr = np.unique(tr, axis=0) if len(tr) else tr  # sorted (h, r, t): the triple index order
        e, r = int(num_entities), int(num_relations)
        self.triples, self.num_entities, self.num_relations = tr, e, r
        self.max_triples, self.seed_triples = int(max_triples), min(int(seed_triples), int(max_triples))
        self.reverse_edge = reverse_edge
        h, rel, t = tr[:, 0], tr[:, 1], tr[:, 2]
        n = len(tr)
        self.keys = (h * r + rel) * e + t  # one int64 per (h, r, t): exclusion by key, no lookup table
        # CSR incidence lists: every triple under its head and (unless a self-loop) its tail. Within an
        # entity the order is a fixed pseudo-random one, so EXPAND_LIMIT samples a hub without bias.
        ent = np.concatenate([h, t])
        tid = np.concatenate([np.arange(n), np.arange(n)])
        once = np.concatenate([np.ones(n, bool), h != t])
        ent, tid = ent[once], tid[once]
        shuffle = np.random.default_rng(0).permutation(n)
        order = np.lexsort((shuffle[tid], ent))
        self.incident = tid[order]
        self.indptr = np.concatenate([[0], np.cumsum(np.bincount(ent, minlength=e))]).astype(np.int64)
        self.entity_vectors = _unit(entity_vectors)
        self.relation_vectors = _unit(relation_vectors)
        if self.entity_vectors.shape[0] != e or self.relation_vectors.shape[0] != r:
            raise ValueError("one feature vector per entity and per relation is needed")
        self.triple_norm = np.empty(n, np.float32)
        for lo in range(0, n, _CHUNK):
            s = slice(lo, lo + _CHUNK)
            v = self.entity_vectors[h[s]] + self.relation_vectors[rel[s]] + self.entity_vectors[t[s]]
            self.triple_norm[s] = np.maximum(np.linalg.norm(v, axis=1), 1e-12)
        self.own = self._own_neighbourhoods()

    # ---- pieces ------------------------------------------------------------------------------
    def degree(self, entities) -> np.ndarray:
        entities = as_int_array(entities)
        return self.indptr[entities + 1] - self.indptr[entities]

    def _incident(self, entities: np.ndarray, seg: np.ndarray, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(segment, triple index) of every triple incident to each entity (at most `limit` each)."""
        starts = self.indptr[entities]
        counts = self.indptr[entities + 1] - starts
        if limit is not None:
            counts = np.minimum(counts, limit)
        total = int(counts.sum())
        offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        return np.repeat(seg, counts), self.incident[np.repeat(starts, counts) + offsets]

    def _score(self, q: np.ndarray, seg: np.ndarray, tid: np.ndarray) -> np.ndarray:
        """cos(q[seg], x_h + x_r + x_t) for each (segment, triple), in blocks of _CHUNK rows."""
        out = np.empty(len(tid), np.float32)
        ev, rv, tr = self.entity_vectors, self.relation_vectors, self.triples
        for lo in range(0, len(tid), _CHUNK):
            s = slice(lo, lo + _CHUNK)
            rows = tr[tid[s]]
            v = ev[rows[:, 0]] + rv[rows[:, 1]] + ev[rows[:, 2]]
            out[s] = np.einsum("ij,ij->i", q[seg[s]], v) / self.triple_norm[tid[s]]
        return out

    def exclusion_keys(self, anchors, relations, directions, targets) -> tuple[np.ndarray, np.ndarray]:
        """Keys of each training query's own edge and (with reverse_edge="remove") of its reverse;
        -1 where nothing is removed."""
        a, rel, d, tg = (as_int_array(x) for x in (anchors, relations, directions, targets))
        e, r = self.num_entities, self.num_relations
        head = np.where(d == HEAD, tg, a)  # (head, r, tail) of the query's edge
        tail = np.where(d == HEAD, a, tg)
        fwd = (head * r + rel) * e + tail
        rev = (tail * r + rel) * e + head if self.reverse_edge == "remove" else np.full_like(fwd, -1)
        return fwd, rev

    def _kept(self, seg: np.ndarray, tid: np.ndarray, exclude) -> np.ndarray:
        if exclude is None:
            return np.ones(len(tid), bool)
        fwd, rev = exclude
        k = self.keys[tid]
        return (k != fwd[seg]) & (k != rev[seg])

    def _own_neighbourhoods(self) -> np.ndarray:
        """[E, N + 2] each entity's incident triples ranked by cosine to its own vector (-1 padded)."""
        e, width = self.num_entities, self.max_triples + 2
        ents = np.arange(e)
        seg, tid = self._incident(ents, ents, None)
        pick = segment_top(seg, tid, self._score(self.entity_vectors, seg, tid), width)
        seg, tid = seg[pick], tid[pick]
        table = np.full((e, width), -1, np.int64)
        rank = np.arange(len(seg)) - np.searchsorted(seg, seg, side="left")
        table[seg, rank] = tid
        return table

    # ---- the two retrievals ----------------------------------------------------------------
    def query_subgraphs(self, anchors, relations, directions, targets=None) -> Subgraphs:
        """One subgraph per query (module docstring). `targets` is given in training only: the
        query's own edge (and its reverse, by `reverse_edge`) is then left out; at evaluation
        (`targets=None`) nothing is removed and the answer is never read."""
        a, rel = as_int_array(anchors), as_int_array(relations)
        b, e = len(a), self.num_entities
        exclude = None if targets is None else self.exclusion_keys(a, rel, directions, targets)
        q = _unit(self.entity_vectors[a] + self.relation_vectors[rel])
        # 1-2. the anchor's triples, and the seeds among them
        seg1, tid1 = self._incident(a, np.arange(b), None)
        keep = self._kept(seg1, tid1, exclude)
        seg1, tid1 = seg1[keep], tid1[keep]
        s1 = self._score(q, seg1, tid1)
        seeds = segment_top(seg1, tid1, s1, self.seed_triples)
        rest = np.ones(len(seg1), bool)
        rest[seeds] = False
        # 3. one hop further: the seeds' other endpoints (the anchor itself is pool 1 already)
        head, tail = self.triples[tid1[seeds], 0], self.triples[tid1[seeds], 2]
        other = np.where(head == a[seg1[seeds]], tail, head)
        pairs = np.unique((seg1[seeds] * e + other)[other != a[seg1[seeds]]])
        seg2, tid2 = self._incident(pairs % e, pairs // e, EXPAND_LIMIT)
        rows = self.triples[tid2]
        keep = (rows[:, 0] != a[seg2]) & (rows[:, 2] != a[seg2]) & self._kept(seg2, tid2, exclude)
        _, first = np.unique(seg2[keep] * len(self.triples) + tid2[keep], return_index=True)
        seg2, tid2 = seg2[keep][first], tid2[keep][first]
        s2 = self._score(q, seg2, tid2)
        # 4. fill each subgraph up to N from the rest of pool 1 and pool 2
        seg_c, tid_c, s_c = (np.concatenate(x) for x in ((seg1[rest], seg2), (tid1[rest], tid2), (s1[rest], s2)))
        quota = self.max_triples - np.bincount(seg1[seeds], minlength=b)
        fill = segment_top(seg_c, tid_c, s_c, quota)
        seg = np.concatenate([seg1[seeds], seg_c[fill]])
        tid = np.concatenate([tid1[seeds], tid_c[fill]])
        score = np.concatenate([s1[seeds], s_c[fill]])
        order = np.lexsort((tid, -score, seg))
        return Subgraphs(seg[order], tid[order], score[order], b, scored=len(s1) + len(s2))

    def entity_subgraphs(self, entities, exclude: tuple[np.ndarray, np.ndarray] | None = None) -> Subgraphs:
        """Each entity's own 1-hop neighbourhood: its top N triples from the precomputed table,
        after removing the keys in `exclude` (per entity: forward, reverse; -1 = none)."""
        ents = as_int_array(entities)
        table = self.own[ents]
        valid = table >= 0
        if exclude is not None:
            k = np.where(valid, self.keys[np.maximum(table, 0)], -2)
            valid &= (k != exclude[0][:, None]) & (k != exclude[1][:, None])
        valid &= np.cumsum(valid, axis=1) <= self.max_triples
        seg, col = np.nonzero(valid)
        tid = table[seg, col]
        return Subgraphs(seg.astype(np.int64), tid, np.zeros(len(tid), np.float32), len(ents), scored=0)


def retrieval_timing(index: SubgraphIndex, anchors, relations, directions, targets=None, repeats: int = 5) -> dict:
    """Wall time of `query_subgraphs` for one batch (median of `repeats`), and its work."""
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        sub = index.query_subgraphs(anchors, relations, directions, targets)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    n = len(as_int_array(anchors))
    sizes = sub.sizes()
    return {"queries": n, "seconds": round(seconds, 6), "ms_per_query": round(1000 * seconds / max(1, n), 4),
            "candidates_scored": int(sub.scored), "triples_kept_mean": round(float(sizes.mean()) if n else 0.0, 3),
            "triples_kept_max": int(sizes.max()) if n else 0}
