"""From queries to model inputs: the anchor's stored image tokens and the prompt's token ids.

The answer entity is never read: a batch depends on (anchor, relation, direction) only, so the
model cannot see what it must predict (tested by changing every feature of the answer).
"""

from __future__ import annotations

import torch

from .kg.queries import Queries, queries_from_triples
from .workspace import Workspace


def make_batch(ws: Workspace, q: Queries) -> dict:
    """Model inputs for a batch of queries: patches, cls, slot_mask (image tokens) and text."""
    patches, cls, mask = ws.tokens.get(q.anchors)
    return {"patches": patches, "cls": cls, "slot_mask": mask, "text": ws.prompts.build(q.anchors, q.relations, q.directions)}


def forward_batch(model, batch: dict):
    """`model`'s QueryOutput for a batch from `make_batch`."""
    return model(batch["patches"], batch["cls"], batch["slot_mask"], batch["text"])


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
