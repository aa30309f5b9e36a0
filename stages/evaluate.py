"""Stage `evaluate`: exact filtered ranking of every entity for head and tail queries of the test
split (filters from train + valid + test); writes metrics/evaluate.json, and every query's ranks
to metrics/ranks/model.csv (elmm.rank_table; git-tracked, for paired comparisons of experiments).

Also builds the faiss index over the scoring head's entity vectors (bias folded in, see
elmm.retrieval) into data/index, and measures its recall@k against the exact ranking.
"""

import sys
import time
from pathlib import Path

from _common import device, params, parse_args, setup
from elmm.baselines import GroupPrecision, check_against_ceilings, format_against_baselines, read_against_baselines
from elmm.evaluation import TIE_ATOL, TIE_RTOL
from elmm.head_scoring import head_rescorer
from elmm.io import read_json, write_json
from elmm.kg.queries import FilterIndex, queries_from_triples
from elmm.model_io import load_trained
from elmm.rank_table import ranks_path, write_rank_table
from elmm.ranking import evaluate_ranking
from elmm.retrieval import (
    RecallMeter,
    build_index,
    default_nlist,
    faiss_available,
    folded_vectors,
    index_file,
    save_indexes,
    write_index_info,
)
from elmm.workspace import open_workspace

INDEX_DIR = "data/index"
INDEX_TIMINGS = ("build_seconds", "ms_per_query", "flat_ms_per_query")  # wall clock: metrics only
BASELINES = "metrics/baselines.json"  # from the baselines stage


def main(argv: list[str] | None = None) -> None:
    parse_args("evaluate", __doc__, argv)
    p = params()
    setup(p.seed)
    ev = p.evaluate
    dev = device()
    ws = open_workspace(p)
    model = load_trained(ws, "data/model").to(dev)
    kg = ws.kg
    queries = queries_from_triples(kg.triples[ev.split])
    filters = FilterIndex(kg.all_triples(), kg.num_entities)

    # The exact index always; the configured approximate one besides it.
    indexes, meters, index_report = {}, {}, {"kind": ev.index, "k": ev.index_k, "faiss": faiss_available()}
    if index_report["faiss"]:
        vectors = folded_vectors(model)
        start = time.perf_counter()
        for kind in dict.fromkeys(["flat", ev.index]):
            indexes[kind] = build_index(vectors, kind, hnsw_m=ev.index_hnsw_m, ef_search=ev.index_ef_search,
                                        nlist=ev.index_nlist, nprobe=ev.index_nprobe)
            meters[kind] = RecallMeter(indexes[kind], ev.index_k)
        index_report.update(entities=int(vectors.shape[0]), dim=int(vectors.shape[1]),
                            build_seconds=round(time.perf_counter() - start, 4))
        if ev.index == "hnsw":
            index_report.update(hnsw_m=ev.index_hnsw_m, ef_search=ev.index_ef_search)
        if ev.index == "ivf":
            index_report.update(nlist=min(kg.num_entities, ev.index_nlist or default_nlist(kg.num_entities)),
                                nprobe=ev.index_nprobe)
    else:
        print("evaluate: faiss is not installed; data/index holds index.json only and no recall is reported")

    group = GroupPrecision.of_kg(kg)  # synthetic world only: share of the top 10 in the answer's pool

    def on_batch(q, out, known, scores):
        for meter in meters.values():  # the index serves the model's own query vectors: direct scores
            meter(q, out, known)
        if group is not None:
            group(q, scores, known)

    # Head queries scored as triples (elmm.head_scoring); per_relation chooses on the valid split.
    if ev.head_scoring == "per_relation" and ev.split == "valid":
        print("evaluate: warning: evaluate.head_scoring=per_relation chooses each relation's mode on the valid "
              "split, which is the split evaluated here: its head metrics are optimistic", file=sys.stderr)
    rescore, head_report = head_rescorer(model, ws, ev.head_scoring, queries, queries_from_triples(kg.triples["valid"]),
                                         filters, ev.batch_size, p.train.precision)
    res = evaluate_ranking(model, ws, queries, filters, ev.batch_size, precision=p.train.precision,
                           desc="evaluate", on_batch=on_batch if meters or group is not None else None, rescore=rescore)
    m = res.metrics
    r = res.ranks
    write_rank_table(ranks_path(ev.split), r["relation"], r["direction"], queries.anchors, queries.targets,
                     r["realistic"], r["optimistic"], r["pessimistic"])

    if meters:
        flat = meters["flat"].result()
        chosen = meters[ev.index].result()
        # recall_at_k: the configured index against the exact filtered top-k of the model's scores
        # (for flat, a check that the folded bias reproduces the scores: 1.0 up to exact ties).
        index_report.update(recall_at_k=chosen["recall_at_k"], ms_per_query=chosen["ms_per_query"],
                            flat_recall_at_k=flat["recall_at_k"], flat_ms_per_query=flat["ms_per_query"])
        # data/index is a cached output: index.json leaves out the wall-clock figures (they stay in
        # metrics/evaluate.json), so the same model writes the same bytes on every run.
        info = {k: v for k, v in index_report.items() if k not in INDEX_TIMINGS}
        save_indexes(INDEX_DIR, indexes, {**info, "files": [index_file(k) for k in indexes],
                                          "bias_folded": True, "head": model.config.head})
    else:
        write_index_info(INDEX_DIR, {**index_report, "files": []})

    n = max(1, res.queries)
    report = {
        **{k: m[k] for k in ("mr", "mrr", "hits_at_1", "hits_at_3", "hits_at_10")},
        "mrr_optimistic": m["mrr_optimistic"], "mrr_pessimistic": m["mrr_pessimistic"],
        "mrr_gap": round(m["mrr_optimistic"] - m["mrr_pessimistic"], 6), "amr": m["amr"],
        "candidates": kg.num_entities, "filtered_candidates_mean": m["candidates"], "queries": res.queries,
        "split": ev.split,
        "ranks": {"kind": "realistic", "tie_atol": TIE_ATOL, "tie_rtol": TIE_RTOL,
                  "filter": "train+valid+test"},
        "head_scoring": head_report,
        "head": m["head"], "tail": m["tail"], "anchor_rank": m["anchor_rank"], "per_relation": m["per_relation"],
        "efficiency": {
            "queries_per_second": round(res.queries_per_second, 2),
            "ms_per_query": round(1000 * res.seconds / n, 4),
            "forward_ms_per_query": round(1000 * res.forward_seconds / n, 4),
            "batch_size": ev.batch_size,
            "image_tokens_per_query": res.image_tokens,
            # what would enter the decoder without the MVTC: every token of every image slot
            "image_tokens_without_mvtc": ws.tokens.num_images * ws.tokens.num_tokens,
            "pruned_layers": len(model.config.pruned_layers),
            "precision": p.train.precision,
            "device": str(dev),
        },
        "index": index_report,
    }
    if group is not None:
        report["group_precision"] = group.result()
    # Every result beside its floor, KGE and ceiling; a score above its ceiling is a leak.
    violations = []
    if Path(BASELINES).is_file():
        baselines = read_json(BASELINES)
        if baselines.get("split") == ev.split and baselines.get("queries") == res.queries:
            report["against_baselines"] = read_against_baselines(m, baselines)
            ceiling = (baselines.get("ceiling") or {}).get("per_relation")
            if ceiling:
                violations = check_against_ceilings(m["per_relation"], ceiling)
    write_json("metrics/evaluate.json", report)
    print(f"evaluate: {ev.split} MRR {m['mrr']:.4f}  MR {m['mr']:.1f}  Hits@1 {m['hits_at_1']:.4f}  "
          f"Hits@3 {m['hits_at_3']:.4f}  Hits@10 {m['hits_at_10']:.4f}  ({res.queries} queries, "
          f"{res.queries_per_second:.1f}/s); per-query ranks -> {ranks_path(ev.split)}")
    a = m["anchor_rank"]
    if a["count"]:
        print(f"evaluate: the query's own anchor: mean rank {a['mean_rank']:.1f}, ranked first in {a['first']:.1%}")
    for name, r in m["per_relation"].items():
        sides = "  ".join(f"{side} {r[side]['mrr']:.4f}" for side in ("tail", "head") if side in r)
        print(f"evaluate:   {name:24s} MRR {r['mrr']:.4f} ({sides})  Hits@10 {r['hits_at_10']:.4f}  "
              f"({r['count']} queries)")
    if "against_baselines" in report:
        print(format_against_baselines(report["against_baselines"]))
    if group is not None:
        g = report["group_precision"]
        for name, sides in g["per_relation"].items():
            print(f"evaluate:   {name:24s} in-group precision@{g['k']}: " + "  ".join(
                f"{side} {e['precision']:.3f} (chance {e['chance']:.3f})" for side, e in sides.items()))
    if violations:
        for v in violations:
            print(f"evaluate: LEAK? {v.relation} {v.side}: MRR {v.score:.4f} is more than 3 SE above its Bayes "
                  f"ceiling {v.ceiling:.4f} (SE {v.se:.4f})", file=sys.stderr)
        sys.exit("error: scores above their Bayes ceiling (metrics/baselines.json): an answer leaks into the input")
    if meters:
        print(f"evaluate: index {ev.index} recall@{ev.index_k} {index_report['recall_at_k']:.4f} "
              f"(flat {index_report['flat_recall_at_k']:.4f}) -> {INDEX_DIR}")


if __name__ == "__main__":
    main(sys.argv[1:])
