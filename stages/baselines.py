"""Stage `baselines`: the floors and ceilings every result is read against (docs/baselines.md).

On the test split, per relation and side: the frequency prior (floor), the Bayes ceilings (synthetic
world only) and the structure-only KGE (PyKEEN RotatE trained on train, early-stopped on valid;
`baselines.kge: none` skips it), each with the standard error of its MRR, in metrics/baselines.json;
the per-query ranks of the prior and the KGE in metrics/ranks/prior.csv and metrics/ranks/kge.csv
(the format of the model's metrics/ranks/model.csv, for paired comparisons); on the synthetic world
also their in-group precision@10 on the structure relations (`group_precision`, elmm.baselines).
"""

import sys
import time

from _common import params, parse_args, setup
from elmm.baselines import (
    GroupPrecision,
    frequency_prior_scorer,
    kg_ceilings,
    metrics_table,
    rank_queries,
    rank_values,
    write_ranks_csv,
)
from elmm.evaluation import TIE_ATOL, TIE_RTOL
from elmm.io import write_json
from elmm.kg.format import load_kg
from elmm.kg.queries import FilterIndex, queries_from_triples

KG_DIR = "data/kg"
SPLIT = "test"


def main(argv: list[str] | None = None) -> None:
    parse_args("baselines", __doc__, argv)
    p = params()
    setup(p.seed)
    start = time.perf_counter()
    kg = load_kg(KG_DIR)
    names = kg.relations["name"].tolist()
    queries = queries_from_triples(kg.triples[SPLIT])
    filters = FilterIndex(kg.all_triples(), kg.num_entities)
    seconds = {}

    t = time.perf_counter()
    group = GroupPrecision.of_kg(kg)  # synthetic world only: share of the top 10 in the answer's pool
    prior_ranks = rank_queries(frequency_prior_scorer(kg.triples["train"], kg.num_entities, kg.num_relations),
                               queries, filters, on_batch=group)
    prior = metrics_table(rank_values(prior_ranks), queries, names, prior_ranks)
    if group is not None:
        prior["group_precision"] = group.result()
    write_ranks_csv("metrics/ranks/prior.csv", queries, prior_ranks)
    seconds["prior"] = time.perf_counter() - t

    t = time.perf_counter()
    ceiling, note = kg_ceilings(kg, SPLIT)
    ceiling = {"note": note, **ceiling} if ceiling is not None else {"available": False, "note": note}
    seconds["ceiling"] = time.perf_counter() - t

    t = time.perf_counter()
    if p.baselines.kge == "none":
        kge = {"available": False, "note": "baselines.kge: none"}
        write_ranks_csv("metrics/ranks/kge.csv", queries, None)
    else:
        from elmm.kge import KGEConfig, KGEUnavailable, kge_scorer, train_kge

        try:
            trained = train_kge(kg.triples["train"], kg.triples["valid"], kg.num_entities, kg.num_relations,
                                KGEConfig.from_params(p.baselines), p.seed)
        except KGEUnavailable as e:
            raise SystemExit(f"error: {e}") from None
        group = GroupPrecision.of_kg(kg)
        kge_ranks = rank_queries(kge_scorer(trained.model), queries, filters, on_batch=group)
        kge = {"training": trained.report(), **metrics_table(rank_values(kge_ranks), queries, names, kge_ranks)}
        if group is not None:
            kge["group_precision"] = group.result()
        write_ranks_csv("metrics/ranks/kge.csv", queries, kge_ranks)
    seconds["kge"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - start

    report = {
        "split": SPLIT, "queries": len(queries), "candidates": kg.num_entities,
        "ranks": {"kind": "realistic", "tie_atol": TIE_ATOL, "tie_rtol": TIE_RTOL, "filter": "train+valid+test",
                  "ceiling": "expected ranks under uniform tie-breaking"},
        "prior": prior, "ceiling": ceiling, "kge": kge,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    write_json("metrics/baselines.json", report)

    def mrr(table, relation, side):
        entry = table.get("per_relation", {}).get(relation, {}).get(side) if table else None
        return f"{entry['mrr']:.3f}" if entry and entry.get("mrr") is not None else "  -  "

    print(f"baselines: {SPLIT} MRR  prior {prior['mrr']:.4f}  ceiling "
          f"{ceiling['mrr'] if 'mrr' in ceiling else '-'}  kge {kge.get('mrr', '-')}  ({len(queries)} queries, "
          f"{seconds['total']:.1f} s)")
    for name in names:
        print(f"baselines:   {name:22s} " + "  ".join(
            f"{side}: prior {mrr(prior, name, side)} ceiling {mrr(ceiling, name, side)} kge {mrr(kge, name, side)}"
            for side in ("tail", "head")))


if __name__ == "__main__":
    main(sys.argv[1:])
