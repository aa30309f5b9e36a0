"""What the knowledge path reads from the workspace: the retrieval index, the name token ids and
the image tokens, and the per-batch graph tensors built from them.

`attach_knowledge(ws, settings)` builds a `KnowledgeSource` once per workspace (and retrieval
settings) and stores it as `ws.knowledge`; `batches.make_batch` then adds a `KnowledgeBatch` to
every batch. The training graph is `ws.kg.triples["train"]` and nothing else.

Retrieval vectors (fixed): an entity's is the mean of the frozen token embeddings of its name
(" {name}"), a relation's the mean of those of " {relation name}". Wider than `RETRIEVAL_DIM`,
they are reduced by a fixed Gaussian random projection (seed 0), which keeps cosines nearly
unchanged (Johnson-Lindenstrauss) and bounds the retrieval's cost for a 4096-wide backbone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import numpy as np
import torch

from ..config import KnowledgeParams
from ..kg.queries import Queries, as_int_array
from .subgraph import SubgraphIndex, Subgraphs

RETRIEVAL_DIM = 256
RETRIEVAL_KEYS = ("max_triples", "seed_triples", "reverse_edge")  # the settings the index depends on


def knowledge_params(raw: dict | KnowledgeParams) -> KnowledgeParams:
    """model.knowledge as saved in ELMMConfig (a dict; unknown keys of newer versions ignored)."""
    if isinstance(raw, KnowledgeParams):
        return raw
    names = {f.name for f in fields(KnowledgeParams)}
    return KnowledgeParams(**{k: v for k, v in raw.items() if k in names})


@dataclass
class GraphBatch:
    """A disjoint union of `num_graphs` small graphs (one per query, or per candidate entity).

    Nodes are sorted by graph; `position` is a node's index within its graph. Edges are the
    triples, head -> tail, with their relation id (the encoder adds the reverse direction).
    """

    nodes: torch.Tensor  # [n] entity id of each node
    graph: torch.Tensor  # [n] graph of each node
    position: torch.Tensor  # [n] index of the node within its graph
    src: torch.Tensor  # [m] node index of each triple's head
    dst: torch.Tensor  # [m] node index of its tail
    rel: torch.Tensor  # [m] relation id
    roots: torch.Tensor  # [G] node index of each graph's root entity (anchor / candidate); -1: not a node
    num_graphs: int

    def to(self, device) -> GraphBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return GraphBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})

    @property
    def width(self) -> int:
        """Nodes of the largest graph (at least 1)."""
        return int(self.position.max()) + 1 if len(self.position) else 1


@dataclass
class KnowledgeBatch:
    """The knowledge inputs of a batch: one subgraph per query, and in training with
    `candidates: graph` the neighbourhoods of the loss columns (the target, whose neighbourhood
    lacks the query edge, then the negatives)."""

    query: GraphBatch
    candidates: GraphBatch | None = None
    columns: torch.Tensor | None = None  # [B, C] entity ids: target, then the negatives
    column_graph: torch.Tensor | None = None  # [B, C] the graph of `candidates` scoring each column
    # softmax: every entity is a loss column; `columns` holds only the targets, the rest of the row
    # comes from every entity's own neighbourhood (KnowledgePath.entity_table)
    every_entity: bool = False

    def to(self, device) -> KnowledgeBatch:
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return KnowledgeBatch(self.query.to(device), move(self.candidates), move(self.columns), move(self.column_graph),
                              self.every_entity)


def build_graphs(index: SubgraphIndex, sub: Subgraphs, roots: np.ndarray, keep_roots: bool) -> GraphBatch:
    """The union of `sub`'s graphs as tensors. `roots[g]` is graph g's root entity; with
    `keep_roots` it is a node even without any triple (a candidate), otherwise only if a triple
    touches it (a query's anchor)."""
    e, g = index.num_entities, sub.num_graphs
    rows = index.triples[sub.tid]
    root_keys = np.arange(g, dtype=np.int64) * e + as_int_array(roots)
    keys = [sub.seg * e + rows[:, 0], sub.seg * e + rows[:, 2]] + ([root_keys] if keep_roots else [])
    uniq, inv = np.unique(np.concatenate(keys), return_inverse=True)
    s = len(sub.tid)
    graph = uniq // e
    position = np.arange(len(uniq)) - np.searchsorted(graph, graph, side="left")
    pos = np.minimum(np.searchsorted(uniq, root_keys), max(len(uniq) - 1, 0))
    found = uniq[pos] == root_keys if len(uniq) else np.zeros(g, bool)
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64))  # noqa: E731
    return GraphBatch(nodes=t(uniq % e), graph=t(graph), position=t(position), src=t(inv[:s]), dst=t(inv[s:2 * s]),
                      rel=t(rows[:, 1]), roots=t(np.where(found, pos, -1)), num_graphs=g)


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


@torch.no_grad()
def mean_embeddings(backbone, id_lists: list[list[int]], device=None, chunk: int = 65536) -> torch.Tensor:
    """float32 [len(id_lists), D]: the mean frozen token embedding of each list (0 for an empty one)."""
    weight = backbone.decoder.embed_tokens.weight
    device = device or weight.device
    lengths = torch.tensor([len(x) for x in id_lists], dtype=torch.long)
    flat = torch.tensor([i for x in id_lists for i in x], dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(id_lists)), lengths)
    out = torch.zeros(len(id_lists), weight.shape[1], device=device)
    for lo in range(0, len(flat), chunk):
        emb = backbone.embed_tokens(flat[lo:lo + chunk].to(weight.device)).float().to(device)
        out.index_add_(0, rows[lo:lo + chunk].to(device), emb)
    return out / lengths.clamp(min=1).to(device)[:, None]


def retrieval_vectors(*tables: torch.Tensor) -> list[np.ndarray]:
    """The fixed retrieval features: as they are, or randomly projected to RETRIEVAL_DIM (seed 0)."""
    width = tables[0].shape[1]
    if width <= RETRIEVAL_DIM:
        return [t.float().cpu().numpy() for t in tables]
    proj = torch.randn(width, RETRIEVAL_DIM, generator=torch.Generator().manual_seed(0)) / RETRIEVAL_DIM ** 0.5
    return [(t.float().cpu() @ proj).numpy() for t in tables]


class KnowledgeSource:
    """The training graph's retrieval index, and what node features are computed from."""

    def __init__(self, ws, settings: KnowledgeParams):
        start = time.perf_counter()
        kg, backbone = ws.kg, ws.backbone
        self.settings = settings
        self.key = tuple(getattr(settings, k) for k in RETRIEVAL_KEYS)
        self.num_entities, self.num_relations = kg.num_entities, kg.num_relations
        names = kg.entities["name"].astype(str).tolist()
        relations = kg.relations["name"].astype(str).tolist()
        self.entity_name_ids = token_ids(backbone.tokenizer, [f" {n}" for n in names])
        # relation r, then its reverse r + R (the encoder's edge types), phrased as the prompt does
        self.relation_name_ids = token_ids(backbone.tokenizer, [f" {r}" for r in relations]
                                           + [f" inverse of {r}" for r in relations])
        ent = mean_embeddings(backbone, self.entity_name_ids, "cpu")
        rel = mean_embeddings(backbone, self.relation_name_ids[:len(relations)], "cpu")
        ev, rv = retrieval_vectors(ent, rel)
        self.index = SubgraphIndex(kg.triples["train"], kg.num_entities, kg.num_relations, ev, rv,
                                   max_triples=settings.max_triples, seed_triples=settings.seed_triples,
                                   reverse_edge=settings.reverse_edge)
        self.tokens = ws.tokens  # the stored CLS tokens: image features of the nodes
        self.build_seconds = time.perf_counter() - start

    def batch(self, q: Queries, *, train: bool = False, negatives=None) -> KnowledgeBatch:
        """The knowledge inputs of queries `q`. Only training (`train=True`) reads `q.targets`, to
        leave the query's own edge out. In training with candidates=graph it adds the loss columns'
        neighbourhoods: the target's (without the query edge), then those of `negatives` [B, K]
        (bce), or with `negatives` None (softmax, every entity a column) the target's alone."""
        a, r, d = (as_int_array(x) for x in (q.anchors, q.relations, q.directions))
        targets = as_int_array(q.targets) if train else None
        query = build_graphs(self.index, self.index.query_subgraphs(a, r, d, targets), a, keep_roots=False)
        if not (train and self.settings.candidates == "graph"):
            return KnowledgeBatch(query)
        b = len(a)
        own = self.index.entity_subgraphs(targets, self.index.exclusion_keys(a, r, d, targets))
        if negatives is None:
            graphs = build_graphs(self.index, own, targets, keep_roots=True)
            return KnowledgeBatch(query, graphs, torch.from_numpy(targets[:, None].copy()),
                                  torch.arange(b)[:, None], every_entity=True)
        neg = as_int_array(negatives).reshape(b, -1)
        others, inv = np.unique(neg, return_inverse=True)
        rest = self.index.entity_subgraphs(others)
        sub = Subgraphs(np.concatenate([own.seg, rest.seg + b]), np.concatenate([own.tid, rest.tid]),
                        np.concatenate([own.score, rest.score]), b + len(others))
        graphs = build_graphs(self.index, sub, np.concatenate([targets, others]), keep_roots=True)
        columns = torch.from_numpy(np.concatenate([targets[:, None], neg], axis=1))
        column_graph = torch.from_numpy(np.concatenate([np.arange(b)[:, None], b + inv.reshape(neg.shape)], axis=1))
        return KnowledgeBatch(query, graphs, columns, column_graph)

    def entity_graphs(self, entities) -> GraphBatch:
        """Each entity's own 1-hop neighbourhood (nothing removed): the candidate side at evaluation."""
        ents = as_int_array(entities)
        return build_graphs(self.index, self.index.entity_subgraphs(ents), ents, keep_roots=True)


def attach_knowledge(ws, settings: KnowledgeParams | dict) -> KnowledgeSource:
    """`ws.knowledge` for these settings, built on first use (and rebuilt if the retrieval
    settings differ from those it was built with)."""
    settings = knowledge_params(settings)
    source = getattr(ws, "knowledge", None)
    if source is None or source.key != tuple(getattr(settings, k) for k in RETRIEVAL_KEYS):
        source = KnowledgeSource(ws, settings)
    else:
        source.settings = settings
    ws.knowledge = source
    return source
