"""Stage `evaluate`: exact filtered ranking of every entity for head and tail queries of the test
split (filters from train + valid + test); writes metrics/evaluate.json."""

from _common import device, params, setup

from elmm.evaluation import FilterIndex
from elmm.io import write_json
from elmm.training import evaluate_ranking
from elmm.workspace import load_trained, open_workspace, queries_from_triples


def main() -> None:
    p = params()
    setup(p.seed)
    dev = device()
    ws = open_workspace(p)
    model = load_trained(ws, "data/model").to(dev)
    kg = ws.kg
    queries = queries_from_triples(kg.triples[p.evaluate.split])
    filters = FilterIndex(kg.all_triples(), kg.num_entities)
    res = evaluate_ranking(model, ws, queries, filters, p.evaluate.batch_size, precision=p.train.precision,
                           desc="evaluate")
    m = res.metrics
    report = {
        **{k: m[k] for k in ("mr", "mrr", "hits_at_1", "hits_at_3", "hits_at_10")},
        "mrr_optimistic": m["mrr_optimistic"], "mrr_pessimistic": m["mrr_pessimistic"], "amr": m["amr"],
        "candidates": kg.num_entities, "queries": res.queries, "split": p.evaluate.split,
        "head": m["head"], "tail": m["tail"], "per_relation": m["per_relation"],
        "efficiency": {
            "queries_per_second": round(res.queries_per_second, 2),
            "ms_per_query": round(1000 * res.seconds / max(1, res.queries), 4),
            "batch_size": p.evaluate.batch_size,
            "image_tokens_per_query": res.image_tokens,
            "pruned_layers": len(model.config.pruned_layers),
            "device": str(dev),
        },
    }
    write_json("metrics/evaluate.json", report)
    print(f"evaluate: {p.evaluate.split} MRR {m['mrr']:.4f}  MR {m['mr']:.1f}  Hits@1 {m['hits_at_1']:.4f}  "
          f"Hits@3 {m['hits_at_3']:.4f}  Hits@10 {m['hits_at_10']:.4f}  ({res.queries} queries, "
          f"{res.queries_per_second:.1f}/s)")
    for name, r in m["per_relation"].items():
        print(f"evaluate:   {name:24s} MRR {r['mrr']:.4f}  Hits@10 {r['hits_at_10']:.4f}  ({r['count']} queries)")


if __name__ == "__main__":
    main()
