"""The testbed's acceptance report, from finished DVC experiments (docs/testbed.md).

    python -m elmm.experiments queue --seeds 0 1 2 --only full no-attention   # the runs it needs
    dvc queue start -j 1
    python -m elmm.testbed report                                             # markdown to stdout

For the default model (the group that changes nothing but the seed) and every seed it ran with,
each test query's rank (metrics/ranks/model.csv) is paired with the same query's rank under the
frequency prior and the KGE (metrics/ranks/prior.csv, kge.csv: every experiment commit carries
them). Per relation and side the report gives the MRR of each, the paired difference to the prior
and to the KGE with its standard error (the sd of the per-query differences pooled over the seeds,
over sqrt(n)), and the Bayes ceiling with the largest excess over it in SE; the in-group
precision@10 of the structure relations beside the prior's, the KGE's and chance; the headroom of
each relation group (the overall MRR it would add at its ceilings); then the positive
control: Hits@1 per relation group of the default against the `no-attention` runs (K = L), with the
relative drop's paired bootstrap interval.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import numpy as np

from .experiments import (
    _changed_params,
    _fmt,
    _markdown,
    git_rank_reader,
    group_members,
    load_experiments,
    resampled_sums,
    seed_groups,
)
from .kg.synthetic import RELATIONS
from .rank_table import DIRECTIONS

MODALITY = {name: modality for _, name, modality in RELATIONS}  # the default world's relation groups
Reader = Callable[[dict, str], dict[str, np.ndarray]]


def git_reader(row: dict, path: str) -> dict[str, np.ndarray]:
    """The rank table `path` (model, prior or kge) at an experiment's commit."""
    return git_rank_reader(row, None if path == "model" else f"metrics/ranks/{path}.csv")


def group_of(rows: list[dict], changes: dict[str, object]) -> list[dict]:
    """The rows whose params differ from the first row's exactly by `changes` (and the seed)."""
    return [r for r, changed in zip(rows, _changed_params(rows))
            if {k: v for k, v in changed.items() if k != "seed"} == changes]


def _pooled(diffs: list[np.ndarray]) -> tuple[float, float, int]:
    """(mean, standard error, n) of per-query differences pooled over seeds."""
    d = np.concatenate(diffs) if diffs else np.zeros(0)
    if d.size < 2:
        return (float(d.mean()) if d.size else math.nan), math.nan, int(d.size)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size)), int(d.size)


def _select(table: dict[str, np.ndarray], relation: int | None, side: str | None) -> np.ndarray:
    keep = np.ones(len(table["rank"]), dtype=bool)
    if relation is not None:
        keep &= table["relation"] == relation
    if side is not None:
        keep &= table["direction"] == side
    return keep


def floor_table(defaults: list[dict], relation_names: list[str], read: Reader) -> list[dict]:
    """Per relation and side (and overall): model, prior, KGE and ceiling MRR (means over seeds),
    the paired differences to the prior and the KGE in SE, and the largest excess over the ceiling."""
    tables = [{k: read(r, k) for k in ("model", "prior", "kge")} for r in defaults]
    out = []
    keys = [(None, None)] + [(None, side) for side in DIRECTIONS] + [
        (i, side) for i in range(len(relation_names)) for side in DIRECTIONS]
    for rel, side in keys:
        row = {"relation": "overall" if rel is None else relation_names[rel], "side": side or "both"}
        rr = {k: [] for k in ("model", "prior", "kge")}
        diffs = {"prior": [], "kge": []}
        for t in tables:
            keep = _select(t["model"], rel, side)
            if not keep.any():
                continue
            model = 1.0 / t["model"]["rank"][keep]
            rr["model"].append(model)
            for ref in ("prior", "kge"):
                if len(t[ref]["rank"]) == len(t["model"]["rank"]):
                    other = 1.0 / t[ref]["rank"][keep]
                    rr[ref].append(other)
                    diffs[ref].append(model - other)
        if not rr["model"]:
            continue
        for k, values in rr.items():
            row[k] = float(np.concatenate(values).mean()) if values else None
        for ref in ("prior", "kge"):
            mean, se, _ = _pooled(diffs[ref])
            row[f"vs_{ref}"] = None if not diffs[ref] else mean
            row[f"z_{ref}"] = None if not diffs[ref] or not se or math.isnan(se) else mean / se
        ceilings, excess = [], []
        for r in defaults:
            m = r["metrics"]
            c = (r.get("baselines") or {}).get("ceiling") or {}
            if rel is None:  # overall, or overall on one side
                cblock, mblock = (c, m) if side is None else (c.get(side), m.get(side))
            else:
                cblock = c.get("per_relation", {}).get(relation_names[rel], {}).get(side)
                mblock = m.get("per_relation", {}).get(relation_names[rel], {}).get(side)
            if cblock and mblock and cblock.get("mrr") is not None:
                ceilings.append(cblock["mrr"])
                se = math.sqrt((mblock.get("mrr_se") or 0) ** 2 + (cblock.get("mrr_se") or 0) ** 2)
                gap = mblock["mrr"] - cblock["mrr"]
                excess.append(gap / se if se else (math.inf if gap > 0 else -math.inf))
        row["ceiling"] = float(np.mean(ceilings)) if ceilings else None
        row["ceiling_excess_se"] = max(excess) if excess else None
        row["n"] = int(sum(len(x) for x in rr["model"]))
        out.append(row)
    return out


def headroom_table(floor_rows: list[dict]) -> list[dict]:
    """Per relation group: the overall MRR the model would gain if every relation and side of the group
    reached its Bayes ceiling, sum(n_side * (ceiling - model)) / n_overall, from `floor_table`'s rows;
    and, beside it, what it would gain by matching the KGE on every side where the KGE scores higher,
    sum(n_side * max(0, kge - model)) / n_overall.

    The first bounds what any change confined to a group can add to overall MRR: a mechanism that
    only acts on the structure relations cannot move overall MRR by more than the structure row. The
    second is what a change would add that gave the model the structure-only baseline's skill."""
    overall = next((r for r in floor_rows if r["relation"] == "overall" and r["side"] == "both"), None)
    if overall is None or not overall["n"]:
        return []
    out = []
    for group in ("image", "text", "structure"):
        sides = [r for r in floor_rows if r["relation"] != "overall" and MODALITY.get(r["relation"]) == group
                 and r["ceiling"] is not None]
        if not sides:
            continue
        n = sum(r["n"] for r in sides)
        to_kge = [r["n"] * max(0.0, r["kge"] - r["model"]) for r in sides if r["kge"] is not None]
        out.append({"group": group, "share_of_queries": n / overall["n"],
                    "headroom": sum(r["n"] * (r["ceiling"] - r["model"]) for r in sides) / overall["n"],
                    "headroom_to_kge": sum(to_kge) / overall["n"] if to_kge else None,
                    "model": sum(r["n"] * r["model"] for r in sides) / n,
                    "ceiling": sum(r["n"] * r["ceiling"] for r in sides) / n})
    return out


def relative_drop_interval(default_hits: list[np.ndarray], control_hits: list[np.ndarray], resamples: int = 10_000,
                           seed: int = 0, level: float = 0.95, block: int = 100) -> tuple[float, float]:
    """Percentile bootstrap interval of the relative drop 1 - mean(control) / mean(default) of two
    runs' per-query hits on the same queries (one array pair per seed).

    The criterion is a ratio ("Hits@1 falls by at least 25%"), and a group's Hits@1 rests on few hits,
    so the drop needs its own interval: the two runs' hits are resampled together
    (`experiments.resampled_sums`, the stream of `bootstrap_interval`), pooled over the seeds, and
    each resample gives one ratio. Resamples without a default hit give no ratio and are left out.
    """
    hit_d, hit_c = resampled_sums(list(zip(default_hits, control_hits)), resamples, seed, block)
    with np.errstate(invalid="ignore", divide="ignore"):
        drops = np.where(hit_d > 0, 1.0 - hit_c / hit_d, np.nan)
    low, high = np.nanpercentile(drops, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(low), float(high)


def control_table(defaults: list[dict], controls: list[dict], relation_names: list[str], read: Reader,
                  resamples: int = 10_000) -> list[dict]:
    """Hits@1 of the default and of K = L per relation group (seeds both ran), with the relative drop
    and its 95% paired bootstrap interval, and the control's paired MRR difference to the prior (it
    must stay above the floor)."""
    by_seed = {r["params"].get("seed"): r for r in controls}
    pairs = [(d, by_seed[d["params"].get("seed")]) for d in defaults if d["params"].get("seed") in by_seed]
    out = []
    for group in ("image", "text", "structure", "all"):
        rels = [i for i, n in enumerate(relation_names) if group == "all" or MODALITY.get(n) == group]
        if not rels:
            continue
        hits = {"default": [], "control": []}
        floor = []
        for d, c in pairs:
            td, tc, tp = read(d, "model"), read(c, "model"), read(c, "prior")
            keep = np.isin(td["relation"], rels)
            hits["default"].append((td["rank"][keep] <= 1).astype(float))
            hits["control"].append((tc["rank"][keep] <= 1).astype(float))
            floor.append(1.0 / tc["rank"][keep] - 1.0 / tp["rank"][keep])
        if not pairs:
            continue
        h_d, h_c = (float(np.concatenate(v).mean()) for v in (hits["default"], hits["control"]))
        mean, se, n = _pooled(floor)
        interval = relative_drop_interval(hits["default"], hits["control"], resamples) if h_d else None
        out.append({"group": group, "hits_at_1": h_d, "hits_at_1_no_attention": h_c,
                    "relative_drop": (h_d - h_c) / h_d if h_d else None, "relative_drop_ci": interval,
                    "control_vs_prior": mean,
                    "control_z_prior": mean / se if se and not math.isnan(se) else None, "n": n,
                    "seeds": [d["params"].get("seed") for d, _ in pairs]})
    return out


def group_table(subject: list[dict]) -> list[dict]:
    """In-group precision@k per structure relation and side (means over the seeds that report it):
    the model's (`metrics/evaluate.json`), the prior's and the KGE's (`metrics/baselines.json`) and
    a uniform draw's (`chance`); seeds without the block (runs from before it existed) are skipped."""
    blocks = []
    for r in subject:
        base = r.get("baselines") or {}
        blocks.append({"model": r["metrics"].get("group_precision"),
                       "prior": (base.get("prior") or {}).get("group_precision"),
                       "kge": (base.get("kge") or {}).get("group_precision")})
    names = list(dict.fromkeys(n for b in blocks if b["model"] for n in b["model"]["per_relation"]))
    out = []
    for name in names:
        for side in DIRECTIONS:
            row: dict = {"relation": name, "side": side, "seeds": 0}
            values: dict[str, list[float]] = {"model": [], "prior": [], "kge": [], "chance": []}
            for b in blocks:
                m = ((b["model"] or {}).get("per_relation") or {}).get(name, {}).get(side)
                if not m:
                    continue
                row["seeds"] += 1
                values["model"].append(m["precision"])
                values["chance"].append(m["chance"])
                for ref in ("prior", "kge"):
                    e = ((b[ref] or {}).get("per_relation") or {}).get(name, {}).get(side)
                    if e:
                        values[ref].append(e["precision"])
            if row["seeds"]:
                row.update({k: float(np.mean(v)) if v else None for k, v in values.items()})
                row["k"] = next(b["model"]["k"] for b in blocks if b["model"])
                out.append(row)
    return out


def _f(x, digits: int = 4) -> str:
    return "-" if x is None else (f"{x:+.1f}" if digits == 1 else f"{x:.{digits}f}")


def _drop(c: dict) -> str:
    if c["relative_drop"] is None:
        return "-"
    low, high = c["relative_drop_ci"]
    return f"{100 * c['relative_drop']:.0f}% [{100 * low:.0f}%, {100 * high:.0f}%]"


def report(rows: list[dict], read: Reader = git_reader, control_k: int | None = None, group: str | None = None) -> str:
    """Markdown: the floor/KGE/ceiling table of the default (or of the experiment group `group`, as
    `experiments table --by-seed` names it), then the positive control against the default."""
    defaults = group_of(rows, {})
    if not defaults:
        raise SystemExit("no experiment of the default params (run `python -m elmm.experiments queue --only full`)")
    subject, title = defaults, "Default"
    if group is not None:
        subject, title = group_members(seed_groups(rows), group), group
    relation_names = list(subject[0]["metrics"].get("per_relation", {}))
    seeds = [d["params"].get("seed") for d in subject]
    lines = [f"{title}, seeds {seeds}: MRR per relation and side (mean over seeds), paired differences in SE",
             "(positive = the model is better), and the largest excess over the Bayes ceiling in SE.", ""]
    body = []
    floor_rows = floor_table(subject, relation_names, read)
    for r in floor_rows:
        body.append([r["relation"], r["side"], str(r["n"]), _fmt("mrr", r["model"]), _fmt("mrr", r["prior"]),
                     _f(r["z_prior"], 1), _fmt("mrr", r["kge"]), _f(r["z_kge"], 1), _fmt("mrr", r["ceiling"]),
                     _f(r["ceiling_excess_se"], 1)])
    lines.append(_markdown(["relation", "side", "queries", "model", "prior", "z vs prior", "KGE", "z vs KGE",
                            "ceiling", "max z over ceiling"], body))
    headroom = headroom_table(floor_rows)
    if headroom:
        lines += ["", "Headroom: the overall MRR each relation group would add if all its relations and sides "
                  "reached their Bayes ceilings (what any change confined to the group can gain at most), and if "
                  "they matched the KGE wherever it scores higher.", ""]
        lines.append(_markdown(["group", "share of queries", "model", "ceiling", "overall MRR to gain",
                                "at the KGE where it is higher"],
                               [[h["group"], f"{h['share_of_queries']:.2f}", _fmt("mrr", h["model"]),
                                 _fmt("mrr", h["ceiling"]), f"{h['headroom']:+.4f}",
                                 "-" if h["headroom_to_kge"] is None else f"{h['headroom_to_kge']:+.4f}"]
                                for h in headroom]))
    groups = group_table(subject)
    if groups:
        lines += ["", f"In-group precision@{groups[0]['k']} of the structure relations: the share of the filtered "
                  "top list in the pool the generator draws the answer from (mean over the seeds that report it).", ""]
        lines.append(_markdown(["relation", "side", "seeds", "model", "prior", "KGE", "chance"],
                               [[g["relation"], g["side"], str(g["seeds"]), _fmt("mrr", g["model"]), _fmt("mrr", g["prior"]),
                                 _fmt("mrr", g["kge"]), _fmt("mrr", g["chance"])] for g in groups]))
    layers = control_k if control_k is not None else max((r["params"]["prune"]["k"] for r in rows), default=None)
    controls = group_of(rows, {"prune.k": layers}) if layers is not None else []
    if controls:
        lines += ["", f"Positive control: all attention removed (prune.k = {layers}), Hits@1 by relation group.", ""]
        body = [[c["group"], str(c["seeds"]), _fmt("h", c["hits_at_1"]), _fmt("h", c["hits_at_1_no_attention"]),
                 _drop(c), _fmt("mrr", c["control_vs_prior"]),
                 _f(c["control_z_prior"], 1)] for c in control_table(defaults, controls, relation_names, read)]
        lines.append(_markdown(["group", "seeds", "Hits@1 default", "Hits@1 K = L", "drop (95% CI)", "K = L MRR - prior",
                                "z vs prior"], body))
    return "\n".join(lines)


def attach_baselines(rows: list[dict]) -> list[dict]:
    """Add each row's metrics/baselines.json (the ceilings), from its commit, under `baselines`."""
    import json
    import subprocess

    for r in rows:
        proc = subprocess.run(["git", "show", f"{r['rev']}:metrics/baselines.json"], capture_output=True, text=True)
        r["baselines"] = json.loads(proc.stdout) if proc.returncode == 0 else None
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="the acceptance tables, markdown")
    r.add_argument("--control-k", type=int, help="prune.k of the positive control (default: the largest run)")
    r.add_argument("-A", "--all-commits", action="store_true", help="experiments of every commit")
    r.add_argument("--rev", action="append", help="experiments derived from this commit instead of HEAD; repeat it "
                   "for several commits (a run whose params repeat an earlier one's is counted once)")
    r.add_argument("--group", help="report this experiment group (as `experiments table --by-seed` names it, e.g. "
                   "triples-10) against the floor, the KGE and the ceiling, instead of the default")
    args = ap.parse_args(argv)
    rows = attach_baselines(load_experiments(all_commits=args.all_commits, rev=args.rev))
    print(report(rows, control_k=args.control_k, group=args.group))


if __name__ == "__main__":
    main()
