"""The ranking pass over a model: filtered ranks of every query against every entity.

Shared by validation (during training) and the evaluate stage. The rank definitions themselves
live in `elmm.evaluation`; this module only runs the model batch by batch and feeds them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .batches import forward_batch, make_batch
from .device import autocast, synchronize
from .evaluation import RankAccumulator, anchor_ranks, compute_ranks
from .kg.queries import FilterIndex, Queries
from .model import ELMM, QueryOutput
from .workspace import Workspace


@dataclass
class RankingResult:
    metrics: dict
    queries: int
    seconds: float  # wall time of the pass (batch assembly + model + ranking), without on_batch hooks
    image_tokens: int  # image tokens per query entering the decoder
    forward_seconds: float = 0.0  # time inside the model's forward only
    ranks: dict[str, torch.Tensor] | None = None  # per query, in the order given: RankAccumulator.ranks()

    @property
    def queries_per_second(self) -> float:
        return self.queries / self.seconds if self.seconds else 0.0


BatchHook = Callable[[Queries, QueryOutput, torch.Tensor, torch.Tensor], None]
Rescore = Callable[[Queries, torch.Tensor], torch.Tensor]


@torch.no_grad()
def evaluate_ranking(model: ELMM, ws: Workspace, queries: Queries, filters: FilterIndex, batch_size: int, *,
                     precision: str = "fp32", desc: str = "rank", progress: bool = True,
                     on_batch: BatchHook | None = None, rescore: Rescore | None = None) -> RankingResult:
    """Filtered ranks of every query against all entities, in chunks of `batch_size` queries.

    Memory is O(batch_size x entities) whatever the number of queries: ranks are counted per
    chunk (never sorted) and only the ranks are kept. From the same scores, each query's own anchor
    is ranked too (`evaluation.anchor_ranks`: how the model ranks the entity it was shown). The
    per-query ranks come back in `ranks`. `rescore(queries, scores)` may replace a chunk's scores
    before ranking (`elmm.head_scoring`: head queries scored as triples). `on_batch(queries,
    output, known, scores)` sees each chunk's model output, filter mask and the scores ranked (the
    faiss recall check reads the output, in-group precision the scores).
    """
    model.eval()
    device = next(model.parameters()).device
    acc = RankAccumulator()
    image_tokens = 0
    forward = hooks = 0.0
    start = time.perf_counter()
    for lo in tqdm(range(0, len(queries), batch_size), desc=desc, unit="batch", disable=not progress):
        q = queries.subset(slice(lo, lo + batch_size))
        batch = make_batch(ws, q)
        synchronize(device)
        t0 = time.perf_counter()
        with autocast(device, precision):
            out = forward_batch(model, batch)
        synchronize(device)
        forward += time.perf_counter() - t0
        known = filters.mask(q.anchors, q.relations, q.directions).to(device)
        scores = out.scores.float()
        if rescore is not None:
            scores = rescore(q, scores)
        ranks = compute_ranks(scores, q.targets.to(device), known)
        anchor = anchor_ranks(scores, q.anchors.to(device), q.targets.to(device), known)
        acc.add({k: v.cpu() for k, v in ranks.items()}, q.directions, q.relations,
                anchor={k: v.cpu() for k, v in anchor.items()})
        if on_batch is not None:
            t0 = time.perf_counter()
            on_batch(q, out, known, scores)
            hooks += time.perf_counter() - t0
        image_tokens = out.image_tokens
    seconds = time.perf_counter() - start - hooks
    metrics = acc.metrics(relation_names=ws.kg.relations["name"].tolist())
    return RankingResult(metrics, len(queries), seconds, image_tokens, forward, acc.ranks())
