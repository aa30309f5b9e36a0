"""Negative entities for the training loss (eq. 15).

Each training query gets `train.negatives` entities drawn uniformly (known answers of the query
are masked out of the loss, not redrawn), plus the query's own anchor entity as a hard negative
when `train.self_denoise` is on: without it the model learns to rank the entity it was shown. With
`train.hard_negatives: faiss` a share of the uniform draws comes instead from the target's nearest
entities in the scoring head's vector space, a table rebuilt every `hard_negatives_refresh` steps.
"""

from __future__ import annotations

import torch

from .config import TrainParams
from .kg.queries import Queries


def sample_negatives(anchors: torch.Tensor, known: torch.Tensor, num: int, self_denoise: bool,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`num` uniform negatives per query and their mask ([B, K] each).

    The mask is False where a drawn entity is a known answer (`known` [B, E]); the query's own
    anchor is appended as a hard negative (self-denoising) when asked.
    """
    b, e = known.shape
    neg = torch.randint(0, e, (b, num), generator=generator)
    if self_denoise:
        neg = torch.cat([neg, anchors[:, None].cpu()], dim=1)
    mask = ~known.cpu().gather(1, neg)
    return neg, mask


def nearest_entities(vectors: torch.Tensor, pool: int) -> torch.Tensor:
    """[E, pool] the `pool` entities whose vectors are most cosine-similar to each entity's (itself excluded)."""
    from .retrieval import knn_search

    e = vectors.shape[0]
    pool = max(1, min(pool, e - 1))
    v = torch.nn.functional.normalize(vectors.detach().float().cpu(), dim=1).numpy()
    ids = torch.from_numpy(knn_search(v, v, min(pool + 1, e))).long()
    keep = (ids != torch.arange(e)[:, None]) & (ids >= 0)
    # The kept neighbours first, in their order; each row has at most one self-match to drop.
    first = torch.argsort((~keep).int(), dim=1, stable=True)[:, :pool]
    return ids.gather(1, first)


class NegativeSampler:
    """Uniform negatives, or with train.hard_negatives=faiss a share drawn from the target's
    nearest entity vectors, rebuilt every `hard_negatives_refresh` steps."""

    def __init__(self, tp: TrainParams):
        self.tp = tp
        self.table: torch.Tensor | None = None  # [E, pool] nearest entities of each entity
        self.hard = tp.hard_negatives == "faiss"

    def refresh(self, model, step: int) -> None:
        """Rebuild the nearest-entity table from `model`'s scoring head when it is due."""
        if self.hard and (self.table is None or step % self.tp.hard_negatives_refresh == 0):
            from .retrieval import entity_vectors

            weight, _ = entity_vectors(model)
            self.table = nearest_entities(weight, self.tp.hard_negatives_pool)

    def sample(self, q: Queries, known: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(negatives [B, K], mask [B, K]) for the queries `q` with known answers `known` [B, E]."""
        tp = self.tp
        if not self.hard:
            return sample_negatives(q.anchors, known, tp.negatives, tp.self_denoise, gen)
        b, e = known.shape
        n_hard = min(tp.negatives, round(tp.negatives * tp.hard_negatives_fraction))
        uniform = torch.randint(0, e, (b, tp.negatives - n_hard), generator=gen)
        pick = torch.randint(0, self.table.shape[1], (b, n_hard), generator=gen)
        hard = self.table[q.targets.cpu()].gather(1, pick)
        neg = torch.cat([hard, uniform], dim=1)
        if tp.self_denoise:
            neg = torch.cat([neg, q.anchors[:, None].cpu()], dim=1)
        return neg, ~known.cpu().gather(1, neg)
