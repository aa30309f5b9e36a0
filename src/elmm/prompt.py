"""The text part of an ELMM query, tokenised once per entity and relation, assembled per batch.

Template (tokens after the image block):

    " entity: {name} , {description}"  " relation: {relation name}"            predict the tail
    " entity: {name} , {description}"  " relation: inverse of {relation name}" predict the head

The description is truncated to `max_text_tokens` tokens. The completion layer reads the hidden
state at the last token of the entity segment (E_entity: in a causal decoder it has seen the
whole entity text and the image tokens) and at the last token of the relation segment
(E_relation: it has seen everything). Head prediction uses the inverse-relation phrasing, so one
completion layer serves both directions. A query's text comes only from the known entity and the
relation: the answer entity never enters it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kg.queries import HEAD, TAIL  # direction codes: predict the tail of (e, r, ?) / the head of (?, r, e)

__all__ = ["HEAD", "TAIL", "PromptBuilder", "TextBatch"]


@dataclass
class TextBatch:
    ids: torch.Tensor  # [B, L] token ids, right-padded with pad_id
    mask: torch.Tensor  # [B, L] True on real tokens
    entity_pos: torch.Tensor  # [B] index (within the text) of the entity segment's last token
    relation_pos: torch.Tensor  # [B] index of the relation segment's last token
    entity_len: torch.Tensor  # [B] tokens in the entity segment (for the text-view query)


class PromptBuilder:
    def __init__(self, tokenizer, entity_names: list[str], entity_descriptions: list[str], relation_names: list[str],
                 max_text_tokens: int):
        self.pad_id = tokenizer.pad_token_id
        self.bos_id = tokenizer.bos_token_id

        def ids(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        # Tokenise every entity and relation once; batches only concatenate id lists.
        self.entity_ids: list[list[int]] = []
        for name, desc in zip(entity_names, entity_descriptions):
            desc_ids = ids(f" , {desc}")[:max_text_tokens] if desc else []
            self.entity_ids.append(ids(f" entity: {name}") + desc_ids)
        self.relation_ids = [
            [ids(f" relation: {r}") for r in relation_names],
            [ids(f" relation: inverse of {r}") for r in relation_names],
        ]

    def build(self, anchors: torch.Tensor, relations: torch.Tensor, directions: torch.Tensor) -> TextBatch:
        seqs, ent_pos, rel_pos, ent_len = [], [], [], []
        for e, r, d in zip(anchors.tolist(), relations.tolist(), directions.tolist()):
            ent = self.entity_ids[e]
            rel = self.relation_ids[d][r]
            seqs.append(ent + rel)
            ent_pos.append(len(ent) - 1)
            rel_pos.append(len(ent) + len(rel) - 1)
            ent_len.append(len(ent))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = True
        return TextBatch(ids, mask, torch.tensor(ent_pos), torch.tensor(rel_pos), torch.tensor(ent_len))
