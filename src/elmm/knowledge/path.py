"""The knowledge path's trainable modules: node initialisation, graph encoder, knowledge adapter,
candidate term and cross-modal alignment (MR-MKG, arXiv 2406.02030; docs/knowledge.md).

    node init   h0_e = LN(W_T n_e + W_I v_e + b)     n_e: mean frozen embedding of e's name tokens
                                                     v_e: max over e's images of the projected CLS
                                                          token (0 without images)
                (node_rows: + W_C r_e, r_e the entity's answer-side row, W_C zero at start)
    relations   e_r = LN(W_R m_r + b_R)              m_r: mean embedding of the relation's name
                                                     (r + R: of "inverse of {name}")
    encoder     X_K = RGAT/GAT/GCN layers over the query's subgraph (`knowledge.encoder`)
    adapter     H_K = W_K X_K + b_K                  (linear map to decoder width D)
                k_j = softmax(q_j LN(H_K)^T / sqrt(D)) H_K,  q_j = W_Q LN(x_t) + p_j,  j = 1..T
                x_t: the pooled text query of the MVTC (max over the prompt's token embeddings);
                p_j: a learned offset per knowledge token; one head; a query without subgraph
                triples gets its T positions masked out of the decoder's attention
    candidates  (graph) s_e += E'_m . P h_e          h_e: the encoder's output at e in e's own
                                                     1-hop training neighbourhood; P starts at 0
    alignment   L_align = mean over (e, e') of max(0, |u_e - t_e| - |u_e - t_e'| + margin)
                image node u_e = normalise(W_U v_e + b_U)  (for entities with images)
                text node  t_e = normalise(X_K at e)       (the entity's node after the encoder)
                e' every other node of the same query subgraph; L = L_task + lambda L_align

Node and relation features n_e, v_e, m_r come from frozen parts of the backbone (embedding table,
projector) and are computed once per device for every entity, then gathered per node. The
LayerNorms make the encoder's input scale independent of the backbone's embedding scale (the tiny
default's token embeddings have entries of ~0.02); W_K starts at a scale that gives the knowledge
tokens the size of the backbone's token embeddings (`token_scale`), and b_K at 0.
The candidate term at evaluation uses a table of h_e for all entities, computed in chunks and
cached while the parameters are unchanged (eval mode); in training the loss columns' neighbourhoods
are encoded, with gradients (with softmax every entity's, the whole table at every step), and the
target's lacks the query edge.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import KnowledgeParams
from .encoder import GraphEncoder
from .source import GraphBatch, KnowledgeBatch, KnowledgeSource, mean_embeddings

ENTITY_CHUNK = 1024  # entities per block when computing all-entity features and the candidate table


def dense(g: GraphBatch, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Node rows [n, ...] -> per graph [G, M, ...] (zero padded) and the mask [G, M]."""
    out = x.new_zeros((g.num_graphs, g.width, *x.shape[1:]))
    mask = torch.zeros(g.num_graphs, g.width, dtype=torch.bool, device=x.device)
    out = out.index_put((g.graph, g.position), x)
    mask[g.graph, g.position] = True
    return out, mask


def alignment_loss(image_nodes: torch.Tensor, text_nodes: torch.Tensor, anchors: torch.Tensor, nodes: torch.Tensor,
                   margin: float) -> torch.Tensor:
    """Euclidean triplet loss over each subgraph, on unit-normalised embeddings.

    image_nodes, text_nodes [G, M, d]; `anchors` [G, M] True where node i has an image node (an
    anchor), `nodes` [G, M] True at real nodes. Mean over every triplet (i, i, j), j != i a real
    node of the same graph, of max(0, |u_i - t_i| - |u_i - t_j| + margin); 0 without any triplet.
    """
    u, t = F.normalize(image_nodes.float(), dim=-1), F.normalize(text_nodes.float(), dim=-1)
    # |u_i - t_j| for unit vectors: sqrt(2 - 2 u_i . t_j), one batched matmul instead of a [G, M, M, d] difference
    dist = (2 - 2 * torch.bmm(u, t.transpose(1, 2))).clamp_min(1e-12).sqrt()  # [G, M, M]
    pos = dist.diagonal(dim1=1, dim2=2)
    eye = torch.eye(dist.shape[1], dtype=torch.bool, device=dist.device)
    valid = anchors[:, :, None] & nodes[:, None, :] & ~eye
    terms = F.relu(pos[:, :, None] - dist + margin) * valid
    return terms.sum() / valid.sum().clamp(min=1)


class KnowledgeAdapter(nn.Module):
    """X_K [B, M, d] -> T knowledge tokens [B, T, D]: a linear map, then one attention head queried
    by the pooled text query (module docstring)."""

    def __init__(self, dim: int, hidden: int, tokens: int, token_scale: float = 0.02):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)  # W_K, b_K
        nn.init.normal_(self.proj.weight, std=token_scale / math.sqrt(dim))  # inputs are O(1) per entry
        nn.init.zeros_(self.proj.bias)
        self.query_norm = nn.LayerNorm(hidden)
        self.key_norm = nn.LayerNorm(hidden, bias=False)
        self.q = nn.Linear(hidden, hidden, bias=False)  # W_Q
        self.offsets = nn.Parameter(torch.randn(tokens, hidden))  # p_j
        nn.init.normal_(self.q.weight, std=hidden ** -0.5)

    def forward(self, text_query: torch.Tensor, nodes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hk = self.proj(nodes)  # [B, M, D]
        q = self.q(self.query_norm(text_query))[:, None, :] + self.offsets  # [B, T, D]
        logits = torch.einsum("btd,bmd->btm", q, self.key_norm(hk)) / math.sqrt(hk.shape[-1])
        logits = logits.float().masked_fill(~mask[:, None, :], float("-inf"))
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a query without nodes -> zeros
        return torch.einsum("btm,bmd->btd", weights.to(hk.dtype), hk)


class KnowledgePath(nn.Module):
    """Everything the knowledge option adds to ELMM; `attach(source)` before the first forward."""

    def __init__(self, hidden: int, query_dim: int, settings: KnowledgeParams, token_scale: float = 0.02):
        super().__init__()
        self.settings = s = settings
        d = s.dim
        self.name_init = nn.Linear(hidden, d)  # W_T, b
        self.image_init = nn.Linear(hidden, d, bias=False)  # W_I
        self.node_norm = nn.LayerNorm(d)
        # W_C: reads the entity's own answer-side (completion) row, trained with it; zero at start,
        # so the untrained path is the one without it. Features fixed by the backbone say who a
        # neighbour is; its row says what it has been learnt to answer.
        # [d, Q], drawn from no RNG: the other modules get the same initial values with or without it.
        self.row_map = nn.Parameter(torch.zeros(d, query_dim)) if s.node_rows else None
        rgat = s.conv == "rgat" and s.layers > 0
        self.relation_init = nn.Linear(hidden, d) if rgat else None  # W_R, b_R
        self.relation_norm = nn.LayerNorm(d) if rgat else None
        self.encoder = GraphEncoder(s.conv, d, s.layers)
        self.adapter = KnowledgeAdapter(d, hidden, s.tokens, token_scale)
        self.image_node = nn.Linear(hidden, d) if s.align_lambda > 0 else None  # W_U, b_U
        self.candidate = nn.Linear(d, query_dim, bias=False) if s.candidates == "graph" else None  # P
        if self.candidate is not None:
            nn.init.zeros_(self.candidate.weight)  # untrained: exactly the free completion rows
        self.source: KnowledgeSource | None = None
        self._features = None  # (name [E, D], image [E, D], relation [2R, D], has_image [E]) on one device
        self._table = None  # (key, [E, d]) the candidate table of an unchanged eval-mode model
        self._entity_graphs = None  # every entity's own neighbourhood, in chunks of ENTITY_CHUNK

    def attach(self, source: KnowledgeSource) -> None:
        self.source = source
        self._features = self._table = self._entity_graphs = None

    # ---- fixed features ----------------------------------------------------------------------
    @torch.no_grad()
    def features(self, backbone) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        weight = backbone.decoder.embed_tokens.weight
        device = weight.device
        if self._features is not None and self._features[0].device == device:
            return self._features
        if self.source is None:
            raise RuntimeError("the knowledge path has no source: build the model with elmm.model_io "
                               "(or call model.knowledge.attach(attach_knowledge(ws, settings)))")
        src = self.source
        name = mean_embeddings(backbone, src.entity_name_ids, device)
        relation = mean_embeddings(backbone, src.relation_name_ids, device)
        cls, slots = src.tokens.cls, src.tokens.mask  # [E, N, Dv], [E, N]
        image = torch.zeros(src.num_entities, weight.shape[1], device=device)
        for lo in range(0, src.num_entities, ENTITY_CHUNK):
            m = slots[lo:lo + ENTITY_CHUNK].to(device)
            p = backbone.project_cls(cls[lo:lo + ENTITY_CHUNK].to(device, weight.dtype)).float()
            top = p.masked_fill(~m[..., None], float("-inf")).amax(1)
            image[lo:lo + ENTITY_CHUNK] = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        self._features = (name, image, relation, slots.any(1).to(device))
        return self._features

    # ---- encoder -----------------------------------------------------------------------------
    def encode(self, g: GraphBatch, backbone, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Node embeddings [n, d] of a graph union (on the backbone's device); `rows` [E, Q]: the
        answer-side rows, read when `node_rows` is on."""
        name, image, relation, _ = self.features(backbone)
        g = g.to(name.device)
        h = self.name_init(name[g.nodes]) + self.image_init(image[g.nodes])
        if self.row_map is not None:
            if rows is None:
                raise ValueError("model.knowledge.node_rows needs the answer-side rows (ELMM.answer_rows.weight)")
            h = h + F.linear(rows[g.nodes.to(rows.device)].to(h.device, h.dtype), self.row_map.to(h.dtype))
        h = self.node_norm(h)
        r = self.source.num_relations
        relations = self.relation_norm(self.relation_init(relation)) if self.relation_init is not None else None
        src, dst = torch.cat([g.src, g.dst]), torch.cat([g.dst, g.src])
        return self.encoder(h, src, dst, torch.cat([g.rel, g.rel + r]), relations)

    # ---- query side --------------------------------------------------------------------------
    def tokens(self, kb: KnowledgeBatch, text_query: torch.Tensor, backbone, rows: torch.Tensor | None = None):
        """(knowledge tokens [B, T, D], their mask [B, T], lambda * L_align or None)."""
        g = kb.query.to(text_query.device)
        h = self.encode(g, backbone, rows)
        nodes, mask = dense(g, h)
        tokens = self.adapter(text_query, nodes, mask)
        token_mask = mask.any(1)[:, None].expand(-1, tokens.shape[1])
        align = None
        if self.image_node is not None:
            _, image, _, has_image = self.features(backbone)
            u, _ = dense(g, self.image_node(image[g.nodes]))
            anchors, _ = dense(g, has_image[g.nodes])
            align = self.settings.align_lambda * alignment_loss(u, nodes, anchors & mask, mask, self.settings.align_margin)
        return tokens, token_mask, align

    # ---- candidate side ----------------------------------------------------------------------
    def entity_table(self, backbone, rows: torch.Tensor | None = None) -> torch.Tensor:
        """h_e [E, d] of every entity from its own neighbourhood; cached in eval mode until a
        parameter changes (optimizer steps and load_state_dict bump the version counters)."""
        read_rows = self.row_map is not None and rows is not None
        versions = tuple(p._version for p in self.parameters()) + ((rows._version,) if read_rows else ())
        key = (backbone.decoder.embed_tokens.weight.device, versions)
        if not self.training and self._table is not None and self._table[0] == key:
            return self._table[1]
        device = self.features(backbone)[0].device
        if self._entity_graphs is None:  # fixed by the training graph; softmax training reads them every step
            n = self.source.num_entities
            self._entity_graphs = [self.source.entity_graphs(torch.arange(lo, min(lo + ENTITY_CHUNK, n)))
                                   for lo in range(0, n, ENTITY_CHUNK)]
        table = torch.cat([self.encode(g, backbone, rows)[g.roots.to(device)] for g in self._entity_graphs])
        if not self.training:
            self._table = (key, table.detach())
        return table

    @torch.no_grad()
    def candidate_rows(self, backbone, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[E, Q] the candidate term as extra entity rows: s_e = E'_m . (w_e + P h_e) + b_e."""
        return self.entity_table(backbone, rows) @ self.candidate.weight.T

    def score_candidates(self, scores: torch.Tensor, query: torch.Tensor, kb: KnowledgeBatch | None,
                         backbone, rows: torch.Tensor | None = None) -> torch.Tensor:
        """`scores` [B, E] plus E'_m . P h_e. With loss columns in `kb` (training, bce) only those
        columns get the term (the rest of the row is not used by the loss); with `every_entity`
        (training, softmax) every column gets it from the table, the target's from its own graph."""
        if self.candidate is None:
            return scores
        qp = query @ self.candidate.weight.to(query.dtype)  # [B, d]
        if kb is None or kb.candidates is None:
            return scores + qp @ self.entity_table(backbone, rows).to(qp.dtype).T
        g = kb.candidates.to(query.device)
        h = self.encode(g, backbone, rows)[g.roots]  # [G, d]
        cols, graph = kb.columns.to(query.device), kb.column_graph.to(query.device)
        term = (qp[:, None, :] * h[graph].to(qp.dtype)).sum(-1)  # [B, C]
        base = scores.gather(1, cols)
        value = (base + term).to(scores.dtype)
        if kb.every_entity:  # softmax: every column from the table (with gradients), then the target's own
            scores = scores + (qp @ self.entity_table(backbone, rows).to(qp.dtype).T).to(scores.dtype)
            return scores.scatter(1, cols, value)
        # negatives first, then the target, whose own value (its neighbourhood without the query edge)
        # wins should it also have been drawn as a negative
        scores = scores.scatter(1, cols[:, 1:], value[:, 1:])
        return scores.scatter(1, cols[:, :1], value[:, :1])
