"""Message passing in plain torch over a disjoint union of small graphs: RGAT, GAT and GCN layers.

A batch of subgraphs is one graph with node features h [n, d], directed edges src -> dst and a
relation id per edge (the caller adds each triple in both directions, the reverse with relation
id r + R). Softmaxes and sums run per target node with `index_add` / `scatter_reduce`, so graphs
of a union never exchange anything. Every layer is residual: h' = h + ELU(aggregate), so a node
without incoming edges keeps its input and the three variants differ only in the aggregate:

- `rgat` (relational graph attention, after Ishiwatari et al. 2020 / Busbridge et al. 2019): with
  g = W h and a relation embedding e_r per edge type,
      [a_r^dst ; a_r^src] = W_a e_r                       (relation-specific attention vector)
      logit_ij = LeakyReLU_0.2(a_r^dst . g_i + a_r^src . g_j)   for the edge j -> i of relation r
      alpha_ij = softmax of logit_ij over all incoming edges of i
      aggregate_i = sum_j alpha_ij (g_j + W_m e_r)        (relation-aware message)
  The per-relation attention parameters are generated from the relation embeddings rather than
  stored per relation (2R x d x d would dominate the model at 237 relations).
- `gat` (Velickovic et al. 2018): the same with one shared attention vector a and messages g_j.
- `gcn` (Kipf and Welling 2017): aggregate_i = sum over j -> i and i itself of g_j / sqrt(deg_i deg_j),
  degrees counting the self-loop; relations ignored.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x[index]` along dim 0, through `F.embedding`: the same values, but indexing's backward adds the
    gradients of a row picked several times (a node with many edges, a negative shared by queries)
    in thread order, so training was not bit-reproducible at two threads; embedding's backward adds
    them in a fixed order. Used wherever a trained tensor's rows are gathered (also `score_rows`)."""
    if x.dim() == 1:
        return F.embedding(index, x[:, None]).squeeze(-1)
    return F.embedding(index, x)


def segment_softmax(logits: torch.Tensor, index: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Softmax of `logits` [n] within the groups of equal `index` [n] (e.g. a node's incoming edges)."""
    if logits.numel() == 0:
        return logits
    top = logits.new_full((num_segments,), float("-inf"))
    top = top.scatter_reduce(0, index, logits.detach(), reduce="amax", include_self=True)
    ex = (logits - top[index]).exp()
    return ex / gather_rows(logits.new_zeros(num_segments).index_add(0, index, ex), index)


def _aggregate(weights: torch.Tensor, messages: torch.Tensor, dst: torch.Tensor, num_nodes: int) -> torch.Tensor:
    return messages.new_zeros(num_nodes, messages.shape[1]).index_add(0, dst, weights[:, None].to(messages.dtype) * messages)


class RGATConv(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.w = nn.Linear(dim, dim, bias=False)
        self.att = nn.Linear(dim, 2 * dim, bias=False)  # e_r -> [a_r^dst ; a_r^src]
        self.rel_msg = nn.Linear(dim, dim, bias=False)  # e_r -> its message term
        # a_r entries of variance 1/dim for unit-variance e_r: logits of GAT's initial spread
        nn.init.normal_(self.att.weight, std=1 / dim)

    def attention(self, g: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, rel: torch.Tensor,
                  relations: torch.Tensor) -> torch.Tensor:
        """The attention weights [n_edges] (g = W h): per edge, its share among the incoming edges of its target."""
        a = gather_rows(self.att(relations), rel)  # [types, 2d] (a few hundred rows) gathered per edge
        logits = F.leaky_relu((a[:, :self.dim] * gather_rows(g, dst)).sum(-1)
                              + (a[:, self.dim:] * gather_rows(g, src)).sum(-1), 0.2)
        return segment_softmax(logits.float(), dst, g.shape[0])

    def forward(self, h, src, dst, rel, relations):
        g = self.w(h)
        alpha = self.attention(g, src, dst, rel, relations)
        messages = gather_rows(g, src) + gather_rows(self.rel_msg(relations), rel)
        return h + F.elu(_aggregate(alpha, messages, dst, h.shape[0]))


class GATConv(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.w = nn.Linear(dim, dim, bias=False)
        self.att = nn.Parameter(torch.randn(2 * dim) / math.sqrt(dim))  # [a^dst ; a^src]

    def attention(self, g, src, dst, rel=None, relations=None) -> torch.Tensor:
        """The attention weights [n_edges] (g = W h)."""
        per_node = g @ self.att.view(2, self.dim).T  # [n, 2]: a^dst . g_i and a^src . g_i once per node
        logits = F.leaky_relu(gather_rows(per_node, dst)[:, 0] + gather_rows(per_node, src)[:, 1], 0.2)
        return segment_softmax(logits.float(), dst, g.shape[0])

    def forward(self, h, src, dst, rel=None, relations=None):
        g = self.w(h)
        alpha = self.attention(g, src, dst)
        return h + F.elu(_aggregate(alpha, gather_rows(g, src), dst, h.shape[0]))


class GCNConv(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.w = nn.Linear(dim, dim, bias=False)

    def forward(self, h, src, dst, rel=None, relations=None):
        n = h.shape[0]
        loops = torch.arange(n, device=h.device)
        src, dst = torch.cat([src, loops]), torch.cat([dst, loops])
        deg = torch.zeros(n, device=h.device).index_add(0, dst, torch.ones(len(dst), device=h.device))
        norm = (deg[src] * deg[dst]).rsqrt()
        return h + F.elu(_aggregate(norm, gather_rows(self.w(h), src), dst, n))


CONVS = {"rgat": RGATConv, "gat": GATConv, "gcn": GCNConv}


class GraphEncoder(nn.Module):
    """`layers` residual layers of one kind (`conv`: rgat | gat | gcn) of width `dim`."""

    def __init__(self, conv: str, dim: int, layers: int):
        super().__init__()
        if conv not in CONVS:
            raise ValueError(f"unknown conv {conv!r} (known: {', '.join(CONVS)})")
        self.layers = nn.ModuleList(CONVS[conv](dim) for _ in range(layers))

    def forward(self, h: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, rel: torch.Tensor,
                relations: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h, src, dst, rel, relations)
        return h
