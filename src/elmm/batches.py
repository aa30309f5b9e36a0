"""From queries to model inputs: the anchor's stored image tokens and the prompt's token ids.

The answer entity is never read: a batch depends on (anchor, relation, direction) only, so the
model cannot see what it must predict (tested by changing every feature of the answer).

With the knowledge path (`ws.knowledge`, attached by model_io) a batch also carries the queries'
training subgraphs. Training batches (`train=True`) read the target for one purpose only: to
leave the query's own edge out of its subgraph (and, with candidates=graph, out of the target's
neighbourhood); evaluation batches never read it.
"""

from __future__ import annotations

import torch

from .kg.queries import Queries, queries_from_triples
from .workspace import Workspace


def make_batch(ws: Workspace, q: Queries, *, train: bool = False, negatives: torch.Tensor | None = None) -> dict:
    """Model inputs for a batch of queries: patches, cls, slot_mask (image tokens) and text, plus
    `knowledge` when the workspace has a knowledge source. `train` and `negatives` (the loss's
    negative entities [B, K]) matter only then."""
    patches, cls, mask = ws.tokens.get(q.anchors)
    batch = {"patches": patches, "cls": cls, "slot_mask": mask, "text": ws.prompts.build(q.anchors, q.relations, q.directions)}
    if ws.knowledge is not None:
        batch["knowledge"] = ws.knowledge.batch(q, train=train, negatives=negatives)
    return batch


def forward_batch(model, batch: dict, candidates: torch.Tensor | None = None):
    """`model`'s QueryOutput for a batch from `make_batch`: scores of all entities, or of
    `candidates` [B, C] only."""
    extra = {"knowledge": batch["knowledge"]} if "knowledge" in batch else {}
    if candidates is not None:
        extra["candidates"] = candidates
    return model(batch["patches"], batch["cls"], batch["slot_mask"], batch["text"], **extra)


def calibration_batches(ws: Workspace, model, samples: int, batch_size: int, seed: int) -> list[dict]:
    """`samples` training queries (both directions), drawn with `seed`, as batches that also carry
    the decoder's attention mask ("decoder_mask") for pruning statistics."""
    queries = queries_from_triples(ws.kg.triples["train"])
    pick = torch.randperm(len(queries), generator=torch.Generator().manual_seed(seed))[:samples]
    pick, _ = pick.sort()
    batches = []
    for lo in range(0, len(pick), batch_size):
        b = make_batch(ws, queries.subset(pick[lo:lo + batch_size]))
        b["decoder_mask"] = model.decoder_mask(model.image_mask(b["slot_mask"], ws.tokens.num_tokens), b["text"].mask)
        batches.append(b)
    return batches
