"""The ELMM model: multi-view visual token compression, the decoder, and the completion layer.

One query = a known entity (its stored image tokens and its text) plus a relation and a direction.

    image tokens I_t [N*M, Dv] --projector (frozen)--> [N*M, D]
    textual view:  X_t = maxpool(token embeddings of the prompt, or of the entity
                   name + relation phrase with mvtc.text_query=entity_relation) -> H tokens
    visual view:   X_i = maxpool(projected CLS tokens of the N images)          -> H tokens
    decoder input: [<s>, I_image (H), I_text (H), text tokens]
    completion:    E_m = [maxpool(h at image positions), h at entity token, h at relation token]
                   scores = Linear(3D, E)(Linear(3D, 3D)(E_m))

Choices where the paper is silent (docs/model.md):
- Per-head value projections are D x D as written (V_i = I_t W_i^V); they start as the identity,
  so an untrained view is attention pooling of the projected image tokens (the decoder's own
  input distribution) rather than a random projection of it. At D = 4096 and 32 heads that is
  537M parameters per view, so `mvtc.value` also offers one shared D x D map (`shared`) and the
  identity plus a rank-r update per head (`low_rank`); both also start as the identity.
- E_entity is read at the last token of the entity segment (its last description token) or, with
  `model.entity_readout: name_end`, at the last token of the entity's name.
- An entity without images gets no image tokens: its image positions are masked out of the
  decoder's attention and E_image is zero.
- `head="lm_head"` (the paper's "head layer" ablation) scores entities with a learned entity
  embedding (Linear(D, E)) on the final hidden state of the last prompt token.
- `knowledge` (off by default): MR-MKG's knowledge path (`elmm.knowledge`, docs/knowledge.md) puts
  T knowledge tokens from the anchor's training subgraph before the image block,
  [<s>, knowledge (T), I_image, I_text, text], and may add a graph term to the entity scores.
- `entity_token` (model.entity_token; params.yaml's default `complex`, ELMMConfig's `none`): a learned
  vector per entity, zero at start, added to the input embedding of the closing answer cue, where
  E_relation is read (`entity_token_at: answer`, the default), of the anchor name's last token
  (`name`), or of both; the anchor side's free row. `free` adds it as it is; `relational` scales it
  elementwise by a learned vector per relation and direction (DistMult's relation diagonal), so one
  entity vector can serve relations that group entities differently; `complex` multiplies its D/2
  complex pairs by the row's (ComplEx's relation: a scaled rotation per plane), which can also map
  one group onto another. `entity_token_tied` adds a learned map of the anchor's own answer-side
  row (completion row) to the vector, so both roles train one representation, as a KGE model's
  single embedding per entity does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Backbone
from .knowledge.encoder import gather_rows
from .knowledge.path import KnowledgePath
from .knowledge.source import KnowledgeBatch, knowledge_params
from .prompt import TextBatch
from .pruning.layers import PrunedDecoderLayer, hidden_at


@dataclass
class ELMMConfig:
    num_entities: int
    mvtc_enabled: bool = True
    text_view: bool = True
    image_view: bool = True
    heads: int = 8
    head: str = "completion"
    max_image_tokens: int = 256
    pruned_layers: list[int] = field(default_factory=list)
    compensation: str = "none"  # ridge | paper | none: whether pruned layers carry a W_c
    text_query: str = "prompt"  # prompt | entity_relation: the tokens the text view's query pools
    entity_readout: str = "segment_end"  # segment_end | name_end: where E_entity is read
    value: str = "per_head"  # per_head | shared | low_rank: the MVTC value maps W^V
    value_rank: int = 8  # r of value=low_rank
    knowledge: dict = field(default_factory=dict)  # model.knowledge when enabled; {} = no knowledge path
    entity_token: str = "none"  # none | free | relational | complex: a learned per-entity vector added to the anchor's prompt
    entity_token_at: str = "name"  # name | answer | both: the token(s) it is added to (name: as models saved before it)
    num_relations: int = 0  # the relational entity token's table has one row per relation and direction
    entity_token_tied: bool = False  # + a learned map (zero at start) of the anchor's own answer-side row
    entity_token_dropout: float = 0.0  # training only: the share of queries whose vector is left out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_params(cls, params, num_entities: int, pruned_layers=(), compensation: str = "none",
                    num_relations: int = 0) -> ELMMConfig:
        m = params.model
        return cls(
            num_entities=num_entities,
            mvtc_enabled=m.mvtc.enabled,
            text_view=m.mvtc.text_view,
            image_view=m.mvtc.image_view,
            heads=m.mvtc.heads,
            head=m.head,
            max_image_tokens=m.max_image_tokens,
            pruned_layers=sorted(pruned_layers),
            compensation=compensation,
            text_query=m.mvtc.text_query,
            entity_readout=m.entity_readout,
            value=m.mvtc.value,
            value_rank=m.mvtc.value_rank,
            knowledge=asdict(m.knowledge) if m.knowledge.enabled else {},
            entity_token=m.entity_token,
            entity_token_at=m.entity_token_at,
            num_relations=num_relations if m.entity_token in RELATIONAL_TOKENS else 0,
            entity_token_tied=m.entity_token_tied,
            entity_token_dropout=m.entity_token_dropout,
        )


#: model.entity_token kinds with a row per relation and direction.
RELATIONAL_TOKENS = ("relational", "complex")
#: model.entity_token_at: the TextBatch positions the anchor's vector is added at.
ENTITY_TOKEN_AT = {"name": ("name_pos",), "answer": ("relation_pos",), "both": ("name_pos", "relation_pos")}


def masked_max(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Max over `dim` of the positions where mask is True; zero where no position is."""
    filled = x.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim)
    return torch.where(torch.isfinite(filled), filled, torch.zeros_like(filled))


class MVTCView(nn.Module):
    """One view of the compressor: H heads, each pooling all image tokens into one D-wide token.

    head_i = softmax(LN(q) W_i^Q (LN(I) W_i^K)^T / sqrt(d)) I W_i^V, with d = D / H.

    `value` picks W_i^V: `per_head` an own D x D map per head (H D^2 parameters), `shared` one D x D
    map for all heads (D^2), `low_rank` I + U_i V_i^T per head with U_i, V_i of D x `rank`
    (2 H D r). Each starts as the identity (for `low_rank`, V = 0 and U random, as in LoRA).

    The LayerNorms (ours, as in the Perceiver resampler and Q-Former) act on the attention
    logits' inputs only; the values stay the raw projected tokens. Without them the logits scale
    with |q| |I|, which depends on the backbone. On the tiny default (|I| ~ 0.2) they spread by
    ~4e-4 within an entity and 5 epochs only reach ~1e-2, so every head stays an exact mean pool,
    whatever the query. The two views are then one view (docs/model.md, "MVTC").
    """

    VALUES = ("per_head", "shared", "low_rank")

    def __init__(self, dim: int, heads: int, value: str = "per_head", rank: int = 8):
        super().__init__()
        if value not in self.VALUES:
            raise ValueError(f"model.mvtc.value: unknown value map {value!r} ({', '.join(self.VALUES)})")
        self.value = value
        self.heads = heads
        self.head_dim = max(1, dim // heads)
        self.query_norm = nn.LayerNorm(dim)
        # No bias: it would shift every key's logit by the same amount, which softmax ignores; its
        # gradient is then pure rounding noise that Adam turns into drift.
        self.token_norm = nn.LayerNorm(dim, bias=False)
        self.q = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k = nn.Linear(dim, heads * self.head_dim, bias=False)
        if value == "per_head":
            self.v = nn.Parameter(torch.eye(dim).repeat(heads, 1, 1))  # [H, D, D], identity start
        elif value == "shared":
            self.v = nn.Parameter(torch.eye(dim))  # [D, D], identity start
        nn.init.normal_(self.q.weight, std=dim**-0.5)
        nn.init.normal_(self.k.weight, std=dim**-0.5)
        if value == "low_rank":  # W_i^V = I + U_i V_i^T; drawn after q and k, so those match per_head's
            self.value_u = nn.Parameter(torch.randn(heads, dim, rank) * dim**-0.5)  # [H, D, r]
            self.value_v = nn.Parameter(torch.zeros(heads, dim, rank))  # [H, D, r]: zero, so the start is I

    def forward(self, query: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Query [B, D], tokens [B, T, D], mask [B, T] -> [B, H, D]; masked tokens get zero weight."""
        pooled = torch.einsum("bht,btd->bhd", self.weights(query, tokens, mask), tokens)
        # Applying W_i^V after pooling is the same product, and costs H*D*D instead of T*H*D*D.
        if self.value == "per_head":
            return torch.einsum("bhd,hde->bhe", pooled, self.v)
        if self.value == "shared":
            return pooled @ self.v
        low = torch.einsum("bhd,hdr->bhr", pooled, self.value_u)
        return pooled + torch.einsum("bhr,her->bhe", low, self.value_v)

    def weights(self, query: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, H, T] each head's attention over the tokens (rows sum to 1; all-masked rows are 0)."""
        b, t, dim = tokens.shape
        q = self.q(self.query_norm(query)).view(b, self.heads, self.head_dim)
        # q_i . (LN(I) W_i^K)^T = LN(I) . (W_i^K^T q_i): folding q into the key map leaves the same
        # logits without the [B, T, H d] keys, T times fewer multiply-adds (the step's largest
        # matmul before, with its copy); the token LN's gain folds in the same way.
        probe = torch.einsum("bhd,hdc->bhc", q, self.k.weight.view(self.heads, self.head_dim, dim))
        probe = probe * self.token_norm.weight
        normed = F.layer_norm(tokens, (dim,), eps=self.token_norm.eps)
        logits = torch.bmm(probe, normed.transpose(1, 2)) / math.sqrt(self.head_dim)  # [B, H, T]
        logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
        return torch.softmax(logits, dim=-1).nan_to_num(0.0)  # an all-masked row -> zeros


class CompletionLayer(nn.Module):
    """E_m [B, 3D] -> E'_m = Linear(3D, 3D)(E_m) -> scores = Linear(3D, num_entities)(E'_m)."""

    def __init__(self, dim: int, num_entities: int):
        super().__init__()
        self.proj = nn.Linear(3 * dim, 3 * dim)
        self.entities = nn.Linear(3 * dim, num_entities)

    def query(self, e_image: torch.Tensor, e_entity: torch.Tensor, e_relation: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([e_image, e_entity, e_relation], dim=-1))


@dataclass
class QueryOutput:
    scores: torch.Tensor  # [B, num_entities], or [B, C] for the `candidates` forward was given
    query: torch.Tensor  # [B, Q] the vector the entity rows are dotted with (E'_m, or h for lm_head)
    image_tokens: int  # image tokens entering the decoder per query (block width)
    extra_loss: torch.Tensor | None = None  # knowledge path: lambda * L_align, added to the task loss in training


class ELMM(nn.Module):
    def __init__(self, backbone: Backbone, config: ELMMConfig):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.llm = backbone.model  # registered so .to(), state_dict and peft see the real modules
        self.lora = None  # the peft LoraConfig once model_io.add_lora injected an adapter
        dim = backbone.hidden_size
        c = config
        if c.text_query not in ("prompt", "entity_relation"):
            raise ValueError(f"model.mvtc.text_query: unknown query {c.text_query!r} (prompt, entity_relation)")
        if c.entity_readout not in ("segment_end", "name_end"):
            raise ValueError(f"model.entity_readout: unknown position {c.entity_readout!r} (segment_end, name_end)")
        view = lambda: MVTCView(dim, c.heads, c.value, c.value_rank)  # noqa: E731
        self.text_view = view() if c.mvtc_enabled and c.text_view else None
        self.image_view = view() if c.mvtc_enabled and c.image_view else None
        if c.head == "completion":
            self.completion = CompletionLayer(dim, c.num_entities)
        elif c.head == "lm_head":
            self.entity_embedding = nn.Linear(dim, c.num_entities)
        else:
            raise ValueError(f"model.head: unknown head {c.head!r}")
        # Built last, so the other components get the same initial values with or without it.
        self.knowledge = None
        if c.knowledge:
            scale = float(backbone.decoder.embed_tokens.weight.detach().float().std())  # knowledge tokens start at it
            self.knowledge = KnowledgePath(dim, 3 * dim if c.head == "completion" else dim, knowledge_params(c.knowledge),
                                           token_scale=scale)
        if c.entity_token not in ("none", "free", *RELATIONAL_TOKENS):
            raise ValueError(f"model.entity_token: unknown kind {c.entity_token!r} (none, free, relational, complex)")
        if c.entity_token in RELATIONAL_TOKENS and c.num_relations < 1:
            raise ValueError(f"model.entity_token={c.entity_token} needs ELMMConfig.num_relations (the KG's relation count)")
        if c.entity_token == "complex" and dim % 2:
            raise ValueError(f"model.entity_token=complex needs an even hidden size, not {dim}")
        if c.entity_token_at not in ENTITY_TOKEN_AT:
            raise ValueError(f"model.entity_token_at: unknown position {c.entity_token_at!r} ({', '.join(ENTITY_TOKEN_AT)})")
        # Zeros, drawn from no RNG: the model starts as the one without it, with the same other weights.
        self.entity_tokens = nn.Parameter(torch.zeros(c.num_entities, dim)) if c.entity_token != "none" else None
        # The identity, so at start these tokens are the free one: ones (relational), 1 + 0i per pair
        # (complex, stored [re, im, re, im, ...]). Row: direction * num_relations + relation.
        self.relation_scales = None
        if c.entity_token in RELATIONAL_TOKENS:
            ones = torch.ones(2 * c.num_relations, dim)
            self.relation_scales = nn.Parameter(ones if c.entity_token == "relational" else ones * (torch.arange(dim) % 2 == 0))
        # [D, row width], zeros (no random draw): the tied token starts as the untied one.
        self.entity_token_tie = None
        if c.entity_token_tied:
            if c.entity_token == "none":
                raise ValueError("model.entity_token_tied needs an entity token (model.entity_token is none)")
            self.entity_token_tie = nn.Parameter(torch.zeros(dim, 3 * dim if c.head == "completion" else dim))

    @property
    def answer_rows(self) -> nn.Linear:
        """The answer side's row per entity (weight [E, Q], bias [E]): the completion layer's, or
        lm_head's entity embedding."""
        return self.completion.entities if self.config.head == "completion" else self.entity_embedding

    # ---- inputs -------------------------------------------------------------------------
    def image_block(self, patches: torch.Tensor, cls: torch.Tensor, slot_mask: torch.Tensor,
                    text_embeds: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image tokens entering the decoder: [B, P, D] and their mask [B, P].

        `query_mask` [B, L] marks the text tokens whose embeddings the text view's query max-pools.
        """
        b, n = slot_mask.shape
        dtype = text_embeds.dtype
        tokens = self.backbone.project_images(patches.to(dtype))  # [B, N, M', D]
        m = tokens.shape[2]
        tokens = tokens.reshape(b, n * m, -1)
        token_mask = slot_mask.repeat_interleave(m, dim=1)
        if not self.config.mvtc_enabled:
            cap = self.config.max_image_tokens  # slots fill from 0, so the cap keeps real tokens first
            return tokens[:, :cap], token_mask[:, :cap]
        views = []
        has_images = slot_mask.any(dim=1)
        if self.image_view is not None:
            cls_proj = self.backbone.project_cls(cls.to(dtype))
            views.append(self.image_view(masked_max(cls_proj, slot_mask, 1), tokens, token_mask))
        if self.text_view is not None:
            views.append(self.text_view(masked_max(text_embeds, query_mask, 1), tokens, token_mask))
        block = torch.cat(views, dim=1)
        return block, has_images[:, None].expand(b, block.shape[1])

    def forward(self, patches: torch.Tensor, cls: torch.Tensor, slot_mask: torch.Tensor, text: TextBatch,
                knowledge: KnowledgeBatch | None = None, candidates: torch.Tensor | None = None) -> QueryOutput:
        """Scores of every entity for each query, or only of `candidates` [B, C] (entity indices).

        bce training scores only the target and its negatives: the same values as the matching
        columns of the full scores, without the [B, E] product and its two backward products.
        """
        device = self.llm.device if hasattr(self.llm, "device") else patches.device
        ids, text_mask = text.ids.to(device), text.mask.to(device)
        text_embeds = self.backbone.embed_tokens(ids)
        images, image_mask = self.image_block(patches.to(device), cls.to(device), slot_mask.to(device), text_embeds,
                                              self.query_mask(text).to(device))
        b, p = image_mask.shape
        if self.entity_tokens is not None:  # after the image block: the text view's query stays the text's
            text_embeds = self.add_entity_tokens(text_embeds, text)
        k, extra_loss = 0, None  # k: knowledge tokens before the image block
        if self.knowledge is not None:
            if knowledge is None:
                raise ValueError("this model has the knowledge path: its batches need make_batch's 'knowledge' entry")
            tokens, token_mask, extra_loss = self.knowledge.tokens(knowledge, masked_max(text_embeds, text_mask, 1),
                                                                   self.backbone, self.answer_rows.weight)
            k = tokens.shape[1]
            images, image_mask = torch.cat([tokens.to(images.dtype), images], 1), torch.cat([token_mask, image_mask], 1)
        bos = self.backbone.embed_tokens(torch.full((b, 1), self.backbone.start_token_id, device=device))
        embeds = torch.cat([bos, images.to(text_embeds.dtype), text_embeds], dim=1)
        attention_mask = self.decoder_mask(image_mask, text_mask)
        entity_pos = text.entity_pos if self.config.entity_readout == "segment_end" else text.name_pos
        if entity_pos is None:
            raise ValueError("model.entity_readout=name_end needs TextBatch.name_pos (PromptBuilder fills it)")
        # The positions read: the image block, the entity token, the relation token.
        image_pos = torch.arange(1 + k, 1 + k + p, device=device).expand(b, p)
        text_pos = 1 + k + p + torch.stack([entity_pos, text.relation_pos], 1).to(device)
        hidden = hidden_at(self.backbone.decoder, embeds, attention_mask, torch.cat([image_pos, text_pos], 1))
        e_entity, e_relation = hidden[:, p], hidden[:, p + 1]
        if self.config.head == "completion":
            e_image = masked_max(hidden[:, :p], image_mask[:, k:], 1)
            query = self.completion.query(e_image, e_entity, e_relation)
        else:
            query = e_relation
        rows = self.answer_rows
        if self.knowledge is not None:  # its graph term is defined on all entities' scores
            scores = self.knowledge.score_candidates(rows(query), query, knowledge, self.backbone, rows.weight)
            scores = scores if candidates is None else scores.gather(1, candidates.to(device))
        else:
            scores = score_rows(rows, query, None if candidates is None else candidates.to(device))
        return QueryOutput(scores=scores, query=query, image_tokens=p, extra_loss=extra_loss)

    def add_entity_tokens(self, text_embeds: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """`text_embeds` [B, L, D] with the anchor's own vector added at the last token of its name
        (`entity_token_at: name`), at the closing answer cue where E_relation is read (`answer`), or
        at both.

        The anchor side's free row: a KGE model has one per entity on both sides, the completion
        layer gives ELMM one on the answer side only, and the decoder must otherwise recover an
        entity's graph neighbourhood from its name alone (docs/results.md, "Why the acceptance
        fails"). At the name it reaches E_relation only through attention; at the cue it is in that
        position's residual stream, where the layers' MLPs can combine it with the relation that
        attention brings. Added to existing tokens, not new ones, so positions and masks do not change.

        `relational`: the vector times the (relation, direction)'s scale row, elementwise. The frozen
        MLPs between it and the completion layer hardly make a relation-specific map of it, and
        relations that group the same entities differently (`knows` by community, `works with` by
        team) need one; a diagonal per relation is DistMult's, D parameters each. `complex`: each pair
        of dimensions (re, im) times the row's pair as complex numbers, a scaled rotation per plane
        (ComplEx's relation, D parameters each); a diagonal cannot map a group onto another (`rival
        of`: the next community), a rotation can (RotatE's argument).

        `entity_token_tied`: the free vector plus T r_e, r_e the anchor's own answer-side row (its
        completion row), T learned. Untied, an entity's anchor vector learns only from its queries
        as anchor and its row only from those as answer; tied, both roles train the row, as a KGE
        model's one embedding per entity is trained from both sides of every triple.

        `entity_token_dropout` (training only): a query's vector is left out with that probability.
        The vector can memorise every training fact of its entity, the pictures' and the
        description's too, and then nothing rewards reading them, which held-out facts need.
        """
        fields = ENTITY_TOKEN_AT[self.config.entity_token_at]
        needed = ("anchors", *fields, *(("relations", "directions") if self.relation_scales is not None else ()))
        if any(getattr(text, f) is None for f in needed):
            raise ValueError(f"model.entity_token={self.config.entity_token} needs TextBatch.{', '.join(needed)} "
                             "(PromptBuilder fills them)")
        positions = [getattr(text, f) for f in fields]
        device = text_embeds.device
        anchors = text.anchors.to(device)
        vectors = gather_rows(self.entity_tokens, anchors)  # [B, D]
        if self.entity_token_tie is not None:
            vectors = vectors + gather_rows(self.answer_rows.weight, anchors) @ self.entity_token_tie.T
        if self.relation_scales is not None:
            pairs = text.directions.to(device) * self.config.num_relations + text.relations.to(device)
            scales = gather_rows(self.relation_scales, pairs)
            if self.config.entity_token == "relational":
                vectors = vectors * scales
            else:
                (a, b), (c, d) = vectors.unflatten(-1, (-1, 2)).unbind(-1), scales.unflatten(-1, (-1, 2)).unbind(-1)
                vectors = torch.stack([a * c - b * d, a * d + b * c], -1).flatten(-2)
        if self.training and self.config.entity_token_dropout > 0:
            keep = torch.rand(vectors.shape[0], 1, device=device) >= self.config.entity_token_dropout
            vectors = vectors * keep  # whole vectors, not rescaled: evaluation always adds it
        vectors = vectors.to(text_embeds.dtype)
        columns = torch.arange(text_embeds.shape[1], device=device)[None, :]
        at = torch.stack([columns == pos.to(device)[:, None] for pos in positions]).any(0)  # [B, L]
        return text_embeds + at.unsqueeze(-1).to(text_embeds.dtype) * vectors[:, None, :]

    def query_mask(self, text: TextBatch) -> torch.Tensor:
        """[B, L] the text tokens the text view's query pools: the whole prompt, or (text_query =
        entity_relation) the entity name and the relation phrase."""
        if self.config.text_query == "prompt":
            return text.mask
        if text.query_mask is None:
            raise ValueError("model.mvtc.text_query=entity_relation needs TextBatch.query_mask (PromptBuilder fills it)")
        return text.query_mask

    @staticmethod
    def decoder_mask(image_mask: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """[B, 1 + P + L] True at real positions of the decoder input [<s>, image block, text]."""
        ones = torch.ones(image_mask.shape[0], 1, dtype=torch.bool, device=image_mask.device)
        return torch.cat([ones, image_mask, text_mask.to(image_mask.device)], dim=1)

    def image_mask(self, slot_mask: torch.Tensor, tokens_per_slot: int) -> torch.Tensor:
        # tokens_per_slot: stored patch tokens per image (before the projector)
        """The image block's mask [B, P] without computing the block (same rule as image_block)."""
        if not self.config.mvtc_enabled:
            m = self.backbone.projected_tokens(tokens_per_slot)
            return slot_mask.repeat_interleave(m, dim=1)[:, : self.config.max_image_tokens]
        views = int(self.text_view is not None) + int(self.image_view is not None)
        return slot_mask.any(dim=1)[:, None].expand(-1, views * self.config.heads)

    # ---- parameters ---------------------------------------------------------------------
    def elmm_state_dict(self) -> dict[str, torch.Tensor]:
        """The components ELMM adds and trains (MVTC, head, compensation), not the backbone."""
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("llm.")}
        for layer in self.backbone.layers:
            if isinstance(layer, PrunedDecoderLayer) and layer.compensation is not None:
                state[f"compensation.{layer.index}"] = layer.compensation
        return state


def score_rows(rows: nn.Linear, query: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
    """`query` [B, Q] dotted with every row of `rows` (+ bias): [B, E]; or with the rows
    `candidates` [B, C] only: [B, C]."""
    if candidates is None:
        return rows(query)
    picked = gather_rows(rows.weight, candidates)  # [B, C, Q]; not weight[candidates] (gather_rows says why)
    return torch.bmm(picked, query.unsqueeze(2)).squeeze(2) + gather_rows(rows.bias, candidates)


def elmm_loss(scores: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor, negative_mask: torch.Tensor) -> torch.Tensor:
    """Eq. 15: -log sigma(s_target) - mean over valid negatives of log(1 - sigma(s_neg)), batch mean.

    A correction of the paper: eq. 15 is printed as `-log p(target) + mean log(1 - p(neg))`. With
    that sign, minimising the loss would drive every negative's probability towards 1, rewarding
    high negative scores. The binary cross-entropy it describes, and what this function computes,
    subtracts the negatives' term: each negative is pushed towards p = 0.

    `negatives` [B, K] entity indices, `negative_mask` [B, K] False for slots to ignore (a sampled
    entity that is in fact a true answer).
    """
    pos = F.logsigmoid(scores.gather(1, targets[:, None]).squeeze(1))
    neg_terms = F.logsigmoid(-scores.gather(1, negatives)) * negative_mask
    neg = neg_terms.sum(1) / negative_mask.sum(1).clamp(min=1)
    return -(pos + neg).mean()


def softmax_loss(scores: torch.Tensor, targets: torch.Tensor, known: torch.Tensor,
                 anchors: torch.Tensor | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of each query's target against every entity (`train.loss: softmax`), batch mean.

    The 1vsAll cross-entropy of KGE training (Lacroix et al. 2018; Ruffinelli et al. 2020 found it the
    strongest training type), in place of eq. 15's sampled negatives: each step contrasts the target
    with every entity, the anchor included (self-denoising). `scores` [B, E], `targets` [B], `known`
    [B, E] True at every known answer of the query: the others than the target are left out of the
    normaliser, as the filtered ranking leaves them out, since they are not negatives. `anchors` [B]
    (`train.self_denoise: false`) are left out too.

    `label_smoothing` eps (`train.label_smoothing`): the target gets 1 - eps of the mass and eps is
    spread evenly over the normaliser's entities (the target among them), as `F.cross_entropy`'s
    label smoothing over the classes that are not masked out. Why: against every entity, a query's
    step pushes down each entity it was not linked to, its community's unlinked members too; a soft
    target keeps the scores from memorising single edges (TuckER's and ConvE's KGE training).
    """
    others = known.clone()
    batch = torch.arange(len(targets), device=targets.device)
    if anchors is not None:
        others[batch, anchors] = True
    others[batch, targets] = False
    masked = scores.masked_fill(others, float("-inf"))
    if not label_smoothing:
        return F.cross_entropy(masked, targets)
    logp = torch.log_softmax(masked, dim=-1)
    nll = -logp.gather(1, targets[:, None]).squeeze(1)
    spread = -logp.masked_fill(others, 0.0).sum(1) / (~others).sum(1)
    return ((1 - label_smoothing) * nll + label_smoothing * spread).mean()
