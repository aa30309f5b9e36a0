"""Cost of the knowledge path: subgraph retrieval next to one training step, at three graph sizes.

Synthetic random graphs of FB15k-237's density (237 relations, 19 training triples per entity on
average, uniform endpoints) at 300, 3,000 and 14,541 entities. For a batch of 128 training
queries (64 triples, both directions) it measures:

- index_build_seconds: `SubgraphIndex` (CSR, triple norms, every entity's ranked neighbourhood);
- retrieval: `query_subgraphs` with the query edges removed (`retrieval_timing`: median of 5);
- knowledge_batch_seconds: everything `make_batch` adds (retrieval, graph tensors, and with
  candidates=graph the loss columns' neighbourhoods: the target and 32 negatives + the anchor;
  `candidates_graph_softmax`: only the targets', the all-entity table being the model's);
- train_step_seconds: forward + backward + AdamW of the tiny default backbone (LoRA r=8, MVTC,
  completion layer) on the prepared batch, without the path, with it (candidates free) and with
  candidates=graph (median of 2 after one warm-up, which also computes the node features), all
  under bce over the 33 loss columns; then with the path under softmax over every entity (the
  default loss), candidates free and graph (graph: the whole all-entity table with gradients at
  every step; `softmax_step_ratio_graph_over_free`);
- train_queries_per_second / train_triples_per_second: the same step as throughput (a triple is two
  queries);
- eval_ms_per_query: an evaluation batch of the same queries (its subgraphs, built without the
  target, and every entity's score), per query, next to the same without the path;
- candidate_table_seconds: the all-entity table h_e used by candidates=graph at evaluation.

    python benchmarks/knowledge.py            # under 2 minutes on one CPU core

Prints one JSON object. Needs only torch, transformers, peft and tokenizers.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import statistics
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch

from elmm.backbone import build_tiny_backbone, load_backbone
from elmm.config import KnowledgeParams, TinyBackboneParams
from elmm.kg.queries import queries_from_triples
from elmm.knowledge.source import KnowledgeSource, mean_embeddings, retrieval_vectors
from elmm.knowledge.subgraph import SubgraphIndex, retrieval_timing
from elmm.model import ELMM, ELMMConfig, elmm_loss, softmax_loss
from elmm.model_io import add_lora, lora_config, set_trainable
from elmm.prompt import TextBatch

RELATIONS = 237
TRIPLES_PER_ENTITY = 19  # FB15k-237: 272,115 training triples / 14,541 entities
IMAGES, TEXT_TOKENS, NEGATIVES = 10, 32, 32


def graph(entities: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = TRIPLES_PER_ENTITY * entities
    return np.stack([rng.integers(0, entities, n), rng.integers(0, RELATIONS, n), rng.integers(0, entities, n)], 1)


def source(backbone, triples: np.ndarray, entities: int, settings: KnowledgeParams, seed: int) -> tuple[KnowledgeSource, float]:
    """A KnowledgeSource over a synthetic graph (random names and CLS tokens), and its index build time."""
    rng = np.random.default_rng(seed)
    vocab = len(backbone.tokenizer)
    src = object.__new__(KnowledgeSource)
    src.settings, src.num_entities, src.num_relations = settings, entities, RELATIONS
    src.entity_name_ids = rng.integers(5, vocab, (entities, 3)).tolist()
    src.relation_name_ids = rng.integers(5, vocab, (2 * RELATIONS, 4)).tolist()
    ev, rv = retrieval_vectors(mean_embeddings(backbone, src.entity_name_ids, "cpu"),
                               mean_embeddings(backbone, src.relation_name_ids[:RELATIONS], "cpu"))
    start = time.perf_counter()
    src.index = SubgraphIndex(triples, entities, RELATIONS, ev, rv, max_triples=settings.max_triples,
                              seed_triples=settings.seed_triples, reverse_edge=settings.reverse_edge)
    build = time.perf_counter() - start
    mask = torch.from_numpy(rng.random((entities, IMAGES)) < 0.9)
    src.tokens = SimpleNamespace(cls=torch.randn(entities, IMAGES, backbone.vision_hidden_size).half(), mask=mask)
    return src, build


def image_and_text(backbone, batch: int):
    g = torch.Generator().manual_seed(0)
    patches = torch.randn(batch, IMAGES, 16, backbone.vision_hidden_size, generator=g).half()
    cls = torch.randn(batch, IMAGES, backbone.vision_hidden_size, generator=g).half()
    ids = torch.randint(5, 250, (batch, TEXT_TOKENS), generator=g)
    text = TextBatch(ids, torch.ones_like(ids, dtype=torch.bool), torch.full((batch,), TEXT_TOKENS // 2),
                     torch.full((batch,), TEXT_TOKENS - 1), torch.full((batch,), TEXT_TOKENS // 2))
    return patches, cls, torch.ones(batch, IMAGES, dtype=torch.bool), text


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def batch_seconds(src: KnowledgeSource, q, **kw) -> float:
    """What make_batch's knowledge part takes for training queries `q` (median of 3)."""
    return round(median_time(functools.partial(src.batch, q, train=True, **kw), 3), 4)


def step_time(backbone_dir: str, entities: int, knowledge: KnowledgeParams | None, src, q, neg, repeats: int,
              loss: str = "bce") -> dict:
    """One training step's time (`loss` bce over `neg`, or softmax over every entity), then the
    evaluation batch's and, with candidates=graph, the all-entity table's."""
    backbone = load_backbone(backbone_dir)  # a fresh copy: add_lora changes it
    torch.manual_seed(0)
    config = ELMMConfig(num_entities=entities, heads=8, knowledge=dataclasses.asdict(knowledge) if knowledge else {})
    model = ELMM(backbone, config)
    if model.knowledge is not None:
        model.knowledge.attach(src)
    add_lora(model, lora_config(8, 16, 0.0))
    set_trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = image_and_text(backbone, len(q))
    softmax = loss == "softmax"
    kb = src.batch(q, train=True, negatives=None if softmax else neg) if model.knowledge is not None else None
    mask = torch.ones_like(neg, dtype=torch.bool)
    known = torch.zeros(len(q), entities, dtype=torch.bool)

    def step():
        out = model(*x, knowledge=kb)
        value = (softmax_loss(out.scores.float(), q.targets, known) if softmax
                 else elmm_loss(out.scores.float(), q.targets, neg, mask))
        if out.extra_loss is not None:
            value = value + out.extra_loss
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = median_time(step, repeats)
    row = {"train_step_seconds": round(seconds, 4), "train_queries_per_second": round(len(q) / seconds, 1),
           "train_triples_per_second": round(len(q) / 2 / seconds, 1)}
    model.eval()
    with torch.no_grad():
        if model.knowledge is not None and model.knowledge.candidate is not None:
            t0 = time.perf_counter()
            model.knowledge.entity_table(backbone)
            row["candidate_table_seconds"] = round(time.perf_counter() - t0, 4)

        def evaluate():  # an evaluation batch: its subgraphs (never the target) and all entities' scores
            model(*x, knowledge=src.batch(q, train=False) if model.knowledge is not None else None)

        row["eval_ms_per_query"] = round(1000 * median_time(evaluate, max(repeats, 3)) / len(q), 3)
    return row


def measure(args) -> dict:
    tmp = tempfile.mkdtemp(prefix="elmm-bench-")
    build_tiny_backbone(tmp, TinyBackboneParams(), ["entity relation inverse of, a painter of the north"] * 20, seed=0)
    backbone = load_backbone(tmp)
    settings = KnowledgeParams(enabled=True)
    graph_settings = dataclasses.replace(settings, candidates="graph")
    results = {}
    for entities in args.entities:
        triples = graph(entities, seed=entities)
        src, build = source(backbone, triples, entities, settings, seed=entities)
        rng = np.random.default_rng(1)
        q = queries_from_triples(src.index.triples[rng.choice(len(src.index.triples), args.batch // 2, replace=False)])
        neg = torch.cat([torch.randint(0, entities, (len(q), NEGATIVES), generator=torch.Generator().manual_seed(2)),
                         q.anchors[:, None]], 1)
        a, r, d, t = (x.numpy() for x in (q.anchors, q.relations, q.directions, q.targets))
        row = {"entities": entities, "training_triples": int(len(src.index.triples)),
               "index_build_seconds": round(build, 4),
               "retrieval": retrieval_timing(src.index, a, r, d, t, repeats=5)}
        src.settings = settings
        row["knowledge_batch_seconds"] = {"candidates_free": batch_seconds(src, q)}
        src.settings = graph_settings  # bce: the loss columns' neighbourhoods; softmax: the targets' (the table is the model's)
        row["knowledge_batch_seconds"].update(candidates_graph=batch_seconds(src, q, negatives=neg),
                                              candidates_graph_softmax=batch_seconds(src, q))
        steps = {"no_knowledge": step_time(tmp, entities, None, src, q, neg, args.repeats)}
        src.settings = settings
        steps["knowledge_free"] = step_time(tmp, entities, settings, src, q, neg, args.repeats)
        src.settings = graph_settings
        steps["knowledge_graph"] = step_time(tmp, entities, graph_settings, src, q, neg, args.repeats)
        # under softmax (the default loss) every entity is a column: the whole table with gradients
        src.settings = settings
        steps["softmax_knowledge_free"] = step_time(tmp, entities, settings, src, q, neg, args.repeats, "softmax")
        src.settings = graph_settings
        steps["softmax_knowledge_graph"] = step_time(tmp, entities, graph_settings, src, q, neg, args.repeats, "softmax")
        row["train_step"] = steps
        base = steps["no_knowledge"]["train_step_seconds"]
        row["retrieval_vs_step"] = round(row["retrieval"]["seconds"] / base, 4)
        row["step_ratio_knowledge_free"] = round(steps["knowledge_free"]["train_step_seconds"] / base, 3)
        row["step_ratio_knowledge_graph"] = round(steps["knowledge_graph"]["train_step_seconds"] / base, 3)
        row["softmax_step_ratio_graph_over_free"] = round(steps["softmax_knowledge_graph"]["train_step_seconds"]
                                                          / steps["softmax_knowledge_free"]["train_step_seconds"], 3)
        plain = steps["no_knowledge"]["eval_ms_per_query"]
        row["eval_ratio_knowledge_free"] = round(steps["knowledge_free"]["eval_ms_per_query"] / plain, 3)
        row["eval_ratio_knowledge_graph"] = round(steps["knowledge_graph"]["eval_ms_per_query"] / plain, 3)
        results[str(entities)] = row
    return {"benchmark": "knowledge", "device": f"cpu ({platform.processor() or platform.machine()}, "
                                                 f"{torch.get_num_threads()} threads)",
            "batch_queries": args.batch, "negatives": NEGATIVES + 1, "settings": dataclasses.asdict(settings),
            "backbone": dataclasses.asdict(TinyBackboneParams()), "results": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entities", type=int, nargs="+", default=[300, 3000, 14541])
    ap.add_argument("--batch", type=int, default=128, help="queries per batch (half as many triples)")
    ap.add_argument("--repeats", type=int, default=2, help="timed training steps (after one warm-up)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(measure(args), indent=2))


if __name__ == "__main__":
    main()
