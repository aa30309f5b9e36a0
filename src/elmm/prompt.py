"""The text part of an ELMM query, tokenised once per entity and relation, assembled per batch.

Template (tokens after the image block):

    " entity: {name} , {description}"  " relation: {relation name} answer:"            predict the tail
    " entity: {name} , {description}"  " relation: inverse of {relation name} answer:" predict the head

The closing " answer:" is the cue the tiny backbone was pretrained with (elmm.pretraining writes the
training triples in these same words, followed by the answer's name), so E_relation is read where
the language model predicts the answer.

With `model.answer_prefix`, the cue is followed by the tokens that every training answer's name of
the relation (and direction) starts with, short of any whole name (`answer_prefixes`): " answer:
region" when every `comes from` answer is a "region ...". A language model decoding the answer
would emit those tokens first whatever the entity; the value that tells the answers apart is
predicted one position later, and that is where the pretrained backbone reads the description
(docs/model.md). Where the answers share no first token (the synthetic world's objects) nothing is added.

The description is truncated to `max_text_tokens` tokens. The completion layer reads the hidden
state at the last token of the entity segment (E_entity: in a causal decoder it has seen the
whole entity text and the image tokens; `model.entity_readout: name_end` takes the last token of
the entity's name instead) and at the last token of the relation segment (E_relation: it has seen
everything). Head prediction uses the inverse-relation phrasing, so one completion layer serves
both directions. A query's text comes only from the known entity and the relation: the answer
entity never enters it.

`TextBatch.query_mask` marks the tokens of the entity's name and of the relation phrase
(`inverse of {relation name}` for head queries), not the template words (" entity:",
" relation:") nor the description: the paper's text-view query X_t pools exactly those
(`model.mvtc.text_query: entity_relation`). Which tokens they are is read from the tokenizer's
character offsets, so the token ids are those of the whole segment tokenised at once.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch

from .kg.queries import HEAD, TAIL  # direction codes: predict the tail of (e, r, ?) / the head of (?, r, e)

__all__ = ["HEAD", "TAIL", "PromptBuilder", "TextBatch", "answer_prefixes"]


@dataclass
class TextBatch:
    ids: torch.Tensor  # [B, L] token ids, right-padded with pad_id
    mask: torch.Tensor  # [B, L] True on real tokens
    entity_pos: torch.Tensor  # [B] index (within the text) of the entity segment's last token
    relation_pos: torch.Tensor  # [B] index of the relation segment's last token
    entity_len: torch.Tensor  # [B] tokens in the entity segment
    name_pos: torch.Tensor | None = None  # [B] index of the entity name's last token
    query_mask: torch.Tensor | None = None  # [B, L] True on the entity-name and relation-phrase tokens
    anchors: torch.Tensor | None = None  # [B] the anchor entities' rows (model.entity_token reads them)
    relations: torch.Tensor | None = None  # [B] the queries' relations and directions (entity_token: relational, complex)
    directions: torch.Tensor | None = None


ANSWER_CUE = " answer:"  # closes the relation segment (and the pretraining corpus's triple lines)


def _marked_ids(tokenizer, prefix: str, body: str, suffix: str = "") -> tuple[list[int], list[bool]]:
    """The token ids of `prefix + body + suffix` (tokenised as one string) and, per token, whether it
    covers a character of `body`.

    Fast tokenizers report character offsets; for a slow one, the tokens after the longest common
    prefix with the tokenised `prefix` (without its trailing space), and before the tokens of the
    suffix, count as `body`.
    """
    text = prefix + body + suffix
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # slow tokenizers have no offsets
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        head = tokenizer(prefix.rstrip(), add_special_tokens=False)["input_ids"]
        tail = len(tokenizer(suffix, add_special_tokens=False)["input_ids"]) if suffix else 0
        n = 0
        while n < min(len(head), len(ids)) and head[n] == ids[n]:
            n += 1
        return ids, [n <= i < len(ids) - tail for i in range(len(ids))]
    start, end = len(prefix), len(prefix) + len(body)
    return list(enc["input_ids"]), [s < end and e > start for s, e in enc["offset_mapping"]]


def answer_prefixes(tokenizer, entity_names: list[str], triples, num_relations: int) -> list[list[list[int]]]:
    """[direction][relation] -> the token ids every answer's name (" {name}") starts with, among the
    answers of `triples` (the TRAINING split's [N, 3] (h, r, t) rows) of that relation and direction,
    cut one token short of the shortest name, so no answer is ever spelt out whole. Empty where the
    answers share no first token or the relation has none. Leading tokens that decode to whitespace
    alone are left out: a SentencePiece tokenizer (Llama's) starts every " {name}" with a lone "▁",
    which says nothing about the answer."""
    cache: dict[int, list[int]] = {}

    def name_ids(e: int) -> list[int]:
        if e not in cache:
            cache[e] = tokenizer(f" {entity_names[e]}", add_special_tokens=False)["input_ids"]
        return cache[e]

    out: list[list[list[int]]] = [[[] for _ in range(num_relations)] for _ in (TAIL, HEAD)]
    rows = torch.as_tensor(triples).long().reshape(-1, 3)
    for r in range(num_relations):
        mine = rows[rows[:, 1] == r]
        for direction, column in ((TAIL, 2), (HEAD, 0)):
            answers = [name_ids(e) for e in sorted(set(mine[:, column].tolist()))]
            if not answers:
                continue
            prefix = os.path.commonprefix(answers)[:min(len(a) for a in answers) - 1]  # elementwise on lists
            while prefix and not tokenizer.decode(prefix[:1]).strip():
                prefix = prefix[1:]
            out[direction][r] = prefix
    return out


class PromptBuilder:
    def __init__(self, tokenizer, entity_names: list[str], entity_descriptions: list[str], relation_names: list[str],
                 max_text_tokens: int, prefixes: list[list[list[int]]] | None = None):
        """`prefixes`: `answer_prefixes`' output, appended after the answer cue (None: nothing)."""
        self.pad_id = tokenizer.pad_token_id
        self.bos_id = tokenizer.bos_token_id

        self._tokenizer, self._max_text_tokens = tokenizer, max_text_tokens
        # Tokenise every entity and relation once; batches only concatenate id lists. Each id list
        # has a parallel list of flags: True on the tokens of the name / the relation phrase.
        self._set_entities(entity_names, entity_descriptions)
        self.relation_ids: list[list[list[int]]] = [[], []]
        self.relation_flags: list[list[list[bool]]] = [[], []]
        for r in relation_names:
            for direction, phrase in ((TAIL, r), (HEAD, f"inverse of {r}")):
                rel_ids, rel_flags = _marked_ids(tokenizer, " relation: ", phrase, ANSWER_CUE)
                extra = prefixes[direction][len(self.relation_ids[direction])] if prefixes else []
                self.relation_ids[direction].append(rel_ids + list(extra))
                self.relation_flags[direction].append(rel_flags + [False] * len(extra))

    def _set_entities(self, names: list[str], descriptions: list[str]) -> None:
        self.entity_ids: list[list[int]] = []
        self.entity_flags: list[list[bool]] = []
        self.name_end: list[int] = []  # index of the name's last token (a name without tokens: the template's)
        for name, desc in zip(names, descriptions):
            desc_ids = (self._tokenizer(f" , {desc}", add_special_tokens=False)["input_ids"][:self._max_text_tokens]
                        if desc else [])
            name_ids, name_flags = _marked_ids(self._tokenizer, " entity: ", name)
            self.entity_ids.append(name_ids + desc_ids)
            self.entity_flags.append(name_flags + [False] * len(desc_ids))
            marked = [i for i, f in enumerate(name_flags) if f]
            self.name_end.append(marked[-1] if marked else len(name_ids) - 1)

    def with_entities(self, names: list[str], descriptions: list[str]) -> PromptBuilder:
        """The same prompts with other entity names / descriptions: the relation segments (answer
        prefixes included) stay as built, since they belong to the training split, not to an entity."""
        other = copy.copy(self)
        other._set_entities(names, descriptions)
        return other

    def build(self, anchors: torch.Tensor, relations: torch.Tensor, directions: torch.Tensor) -> TextBatch:
        seqs, flags, ent_pos, rel_pos, ent_len, name_pos = [], [], [], [], [], []
        for e, r, d in zip(anchors.tolist(), relations.tolist(), directions.tolist()):
            ent = self.entity_ids[e]
            rel = self.relation_ids[d][r]
            seqs.append(ent + rel)
            flags.append(self.entity_flags[e] + self.relation_flags[d][r])
            ent_pos.append(len(ent) - 1)
            rel_pos.append(len(ent) + len(rel) - 1)
            ent_len.append(len(ent))
            name_pos.append(self.name_end[e])
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.bool)
        query_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
        for i, (s, f) in enumerate(zip(seqs, flags)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = True
            query_mask[i, : len(f)] = torch.tensor(f, dtype=torch.bool)
        return TextBatch(ids, mask, torch.tensor(ent_pos), torch.tensor(rel_pos), torch.tensor(ent_len),
                         torch.tensor(name_pos), query_mask, anchors.detach().cpu().clone(),
                         relations.detach().cpu().clone(), directions.detach().cpu().clone())
