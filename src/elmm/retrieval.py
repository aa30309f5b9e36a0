"""Top-k retrieval over the scoring head's entity vectors with faiss.

The completion layer scores entity e for a query as  s_e = E'_m . w_e + b_e  (w_e a row of the
final Linear(3D, E), b_e its bias). Appending 1 to the query and b_e to each row folds the bias
into a plain inner product,  s_e = [E'_m, 1] . [w_e, b_e],  so `faiss.IndexFlatIP` over the folded
rows returns the exact top-k. HNSW and IVF are approximate options for millions of entities; their
recall@k against the exact ranking is measured by the evaluate stage. With `model.head=lm_head`
the rows are those of the entity embedding (Linear(D, E)) and the query is the last token's state.

Filtered retrieval over-fetches k + (number of known answers) and drops the known ones, so k
results remain whenever the index returns enough candidates.

faiss is imported lazily: an image without it (e.g. a GPU image) still trains and evaluates.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from .io import atomic_dir

INDEX_FILE = "entities.faiss"


def import_faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - depends on the image
        raise ImportError("faiss is not installed (pip install faiss-cpu); it is needed for data/index and "
                          "train.hard_negatives=faiss") from e
    return faiss


def faiss_available() -> bool:
    try:
        import_faiss()
        return True
    except ImportError:
        return False


def entity_vectors(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [E, Q], bias [E]) of the layer that scores entities (with the knowledge path's
    candidate term P h_e added to each row when model.knowledge.candidates is graph)."""
    layer = model.answer_rows
    bias = layer.bias if layer.bias is not None else torch.zeros(layer.weight.shape[0], device=layer.weight.device)
    knowledge = getattr(model, "knowledge", None)
    if knowledge is not None and knowledge.candidate is not None:
        return layer.weight + knowledge.candidate_rows(model.backbone, layer.weight).to(layer.weight.dtype), bias
    return layer.weight, bias


def folded_vectors(model) -> np.ndarray:
    """[E, Q + 1] float32 rows [w_e, b_e]: inner products with fold_queries() are the scores."""
    weight, bias = entity_vectors(model)
    return torch.cat([weight.detach().float(), bias.detach().float()[:, None]], dim=1).cpu().numpy().copy()


def fold_queries(query: torch.Tensor) -> np.ndarray:
    """[B, Q + 1] float32 queries [q, 1]."""
    q = query.detach().float().cpu()
    return torch.cat([q, torch.ones(q.shape[0], 1)], dim=1).numpy().copy()


def knn_search(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact inner-product top-k ids [B, k] (faiss IndexFlatIP, or torch where faiss is missing)."""
    k = min(k, base.shape[0])
    if faiss_available():
        faiss = import_faiss()
        index = faiss.IndexFlatIP(base.shape[1])
        index.add(np.ascontiguousarray(base, dtype=np.float32))
        return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)[1]
    scores = torch.from_numpy(queries).float() @ torch.from_numpy(base).float().T
    return scores.topk(k, dim=1).indices.numpy()


def default_nlist(entities: int) -> int:
    return max(1, min(entities, int(round(entities ** 0.5))))


def build_index(vectors: np.ndarray, kind: str = "flat", *, hnsw_m: int = 32, ef_search: int = 64, nlist: int = 0,
                nprobe: int = 4):
    """A faiss inner-product index over `vectors` [E, d]: flat (exact), hnsw or ivf."""
    faiss = import_faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    e, d = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
    elif kind == "ivf":
        lists = min(e, nlist or default_nlist(e))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.min_points_per_centroid = 1  # small KGs: no warning for few points per list
        index.train(vectors)
        index.nprobe = min(nprobe, lists)
    else:
        raise ValueError(f"unknown index kind {kind!r} (flat, hnsw, ivf)")
    index.add(vectors)
    return index


def search_filtered(index, queries: np.ndarray, k: int, known: torch.Tensor | np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (ids, scores) [B, k] per query with known answers removed; -1 / -inf pad short rows.

    `known` [B, E] bool marks each query's known answers. The index is asked for k + the largest
    number of known answers in the batch, so every row keeps k results if the index finds them.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    known_np = None if known is None else torch.as_tensor(known).cpu().numpy()
    extra = int(known_np.sum(1).max()) if known_np is not None and len(known_np) else 0
    fetch = min(k + extra, index.ntotal)
    scores, ids = index.search(queries, fetch)
    out_ids = np.full((len(queries), k), -1, dtype=np.int64)
    out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    for row in range(len(queries)):
        keep = ids[row] >= 0
        if known_np is not None:
            keep &= ~known_np[row][np.maximum(ids[row], 0)]
        r_ids, r_scores = ids[row][keep][:k], scores[row][keep][:k]
        out_ids[row, :len(r_ids)] = r_ids
        out_scores[row, :len(r_ids)] = r_scores
    return out_ids, out_scores


def exact_topk(scores: torch.Tensor, k: int, known: torch.Tensor | None = None) -> np.ndarray:
    """Top-k ids [B, k] of model scores with known answers removed; -1 where fewer remain."""
    s = scores.detach().float().clone()
    if known is not None:
        s = s.masked_fill(known.to(s.device), float("-inf"))
    values, ids = s.topk(min(k, s.shape[1]), dim=1)
    ids = ids.cpu().numpy()
    ids[~np.isfinite(values.cpu().numpy())] = -1
    out = np.full((len(ids), k), -1, dtype=np.int64)
    out[:, :ids.shape[1]] = ids
    return out


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Per query |approx & exact| / |exact| over valid (>= 0) ids; 1 where exact is empty."""
    out = np.ones(len(exact))
    for i, (a, e) in enumerate(zip(approx, exact)):
        e = set(e[e >= 0].tolist())
        if e:
            out[i] = len(e & set(a[a >= 0].tolist())) / len(e)
    return out


class RecallMeter:
    """Recall@k of an index against the model's exact filtered top-k, batch by batch."""

    def __init__(self, index, k: int):
        self.index, self.k = index, k
        self.recalls: list[np.ndarray] = []
        self.seconds = 0.0

    def __call__(self, q, out, known: torch.Tensor) -> None:
        # The query's own target is a known answer too: both lists rank the unknown entities.
        exact = exact_topk(out.scores, self.k, known)
        start = time.perf_counter()
        approx, _ = search_filtered(self.index, fold_queries(out.query), self.k, known)
        self.seconds += time.perf_counter() - start
        self.recalls.append(recall_at_k(approx, exact))

    def result(self) -> dict:
        r = np.concatenate(self.recalls) if self.recalls else np.zeros(0)
        n = len(r)
        return {"recall_at_k": round(float(r.mean()), 6) if n else None, "queries": n,
                "ms_per_query": round(1000 * self.seconds / n, 4) if n else None}


def index_file(kind: str) -> str:
    """File name of the index of `kind` inside data/index (the exact one is entities.faiss)."""
    return INDEX_FILE if kind == "flat" else f"entities-{kind}.faiss"


def save_indexes(out_dir: str | Path, indexes: dict, info: dict) -> None:
    """Write {kind: index} (faiss's own binary format, not pickle) and index.json, atomically."""
    faiss = import_faiss()
    with atomic_dir(out_dir) as tmp:
        for kind, index in indexes.items():
            faiss.write_index(index, str(tmp / index_file(kind)))
        (tmp / "index.json").write_text(json.dumps(info, indent=2) + "\n")


def write_index_info(out_dir: str | Path, info: dict) -> None:
    """index.json only (when faiss is missing the stage output still exists and says why)."""
    with atomic_dir(out_dir) as tmp:
        (tmp / "index.json").write_text(json.dumps(info, indent=2) + "\n")


def load_index(out_dir: str | Path, kind: str = "flat"):
    faiss = import_faiss()
    return faiss.read_index(str(Path(out_dir) / index_file(kind)))
