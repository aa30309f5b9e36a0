"""Turn finished DVC experiments into the paper's tables and figures.

    python -m elmm.experiments queue                   # queue the paper's ablations (Table 3) + a K sweep
    python -m elmm.experiments queue --seeds 0 1 2     # ... each replicated over three seeds
    dvc queue start -j 1                               # run them (one at a time on a small machine)
    python -m elmm.experiments table                   # markdown table of every experiment (ablations)
    python -m elmm.experiments table --by-seed --side tail   # mean +- sd over seeds, tail queries
    python -m elmm.experiments sweep --param prune.k   # CSV of metrics against a param, for `dvc plots`
    (table/sweep: experiments of HEAD; --rev <commit> for those queued from another commit, -A for all)

All read `dvc exp show --json` (so they work on whatever `dvc exp run` produced) and never
recompute a metric. A replicate changes the top-level `seed`, which regenerates the synthetic
world, the tiny backbone and the training order: it measures the spread over all three.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

from .io import write_csv_rows

METRICS = ("mrr", "mr", "hits_at_1", "hits_at_3", "hits_at_10")

KNOWLEDGE_ON = "model.knowledge.enabled=true"
# The paper's Table 3 as param overrides (docs/results.md, "Ablations"), then the knowledge path's.
ABLATIONS = {
    "untrained": ["train.max_steps=0"],
    "no-image-view": ["model.mvtc.image_view=false"],
    "no-text-view": ["model.mvtc.text_view=false"],
    "no-mvtc": ["model.mvtc.enabled=false"],
    "no-pruning": ["prune.k=0"],
    "no-linear": ["prune.compensation=none"],
    "paper-wc": ["prune.compensation=paper"],
    "no-init": ["prune.init=zero"],
    "lm-head": ["model.head=lm_head"],
    # MR-MKG's knowledge path (docs/knowledge.md). Each variant sets enabled=true itself, so it means
    # the same run whether the committed default has the path on or off.
    "no-knowledge": ["model.knowledge.enabled=false"],
    "no-alignment": [KNOWLEDGE_ON, "model.knowledge.align_lambda=0"],
    "gat": [KNOWLEDGE_ON, "model.knowledge.conv=gat"],
    "gcn": [KNOWLEDGE_ON, "model.knowledge.conv=gcn"],
    # the number of retrieved triples N (MR-MKG: accuracy falls beyond 20-30); seeds n <= N
    **{f"triples-{n}": [KNOWLEDGE_ON, f"model.knowledge.max_triples={n}", f"model.knowledge.seed_triples={min(5, n)}"]
       for n in (5, 10, 20, 40)},
}
EVALUATE = "metrics/evaluate.json"


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _row(name: str, data: dict) -> dict | None:
    if data.get("rev") == "workspace" or data.get("timestamp") is None:
        return None  # queued or still running: its files are not its own results yet
    metrics = data.get("metrics", {}).get(EVALUATE, {}).get("data")
    params = data.get("params", {}).get("params.yaml", {}).get("data")
    if not metrics or not params:
        return None
    return {"name": name, "params": params, "metrics": metrics}


def load_experiments(show_json: str | None = None, all_commits: bool = False, rev: str | None = None) -> list[dict]:
    """Rows {name, params, metrics} for the baseline and every experiment with evaluate metrics
    (experiments of HEAD, of commit `rev`, or of every commit)."""
    if show_json is None:
        cmd = ["dvc", "exp", "show", "--json"] + (["-A"] if all_commits else []) + (["--rev", rev] if rev else [])
        show_json = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = []
    for base in json.loads(show_json):
        if base.get("rev") == "workspace":
            continue
        if base.get("data") and (row := _row(base.get("name") or base["rev"][:7], base["data"])):
            rows.append(row)
        for exp in base.get("experiments") or []:
            # A queued or running task can already carry files (the baseline's committed metrics
            # in its copy): only a finished one holds its own results.
            if (exp.get("executor") or {}).get("state", "success") != "success":
                continue
            for rev in exp.get("revs") or []:
                if rev.get("data") and (row := _row(rev.get("name") or exp.get("name") or rev["rev"][:7], rev["data"])):
                    rows.append(row)
    return rows


def _changed_params(rows: list[dict]) -> dict[str, dict[str, object]]:
    """Per row, the params that differ from the first (baseline) row, as dotted keys."""
    def flat(tree, prefix=""):
        out = {}
        for k, v in tree.items():
            key = f"{prefix}{k}"
            out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
        return out

    base = flat(rows[0]["params"]) if rows else {}
    return {r["name"]: {k: v for k, v in flat(r["params"]).items() if base.get(k) != v} for r in rows}


def _relation_mrr(metrics: dict, relation: str, side: str) -> float | None:
    entry = metrics.get("per_relation", {}).get(relation)
    if entry is None:
        return None
    if side != "both":
        entry = entry.get(side)  # absent in results written before the side split existed
    return None if entry is None else entry.get("mrr")


def _columns(rows: list[dict], relations: bool, side: str) -> tuple[list[str], list[str]]:
    rel_names = list(rows[0]["metrics"].get("per_relation", {})) if rows and relations else []
    suffix = "" if side == "both" else f" ({side})"
    return rel_names, list(METRICS) + [f"MRR {r}{suffix}" for r in rel_names]


def _values(metrics: dict, rel_names: list[str], side: str) -> list[float | None]:
    return [metrics.get(k) for k in METRICS] + [_relation_mrr(metrics, n, side) for n in rel_names]


def _fmt(key: str, value: float | None) -> str:
    return "-" if value is None else (f"{value:.1f}" if key == "mr" else f"{value:.4f}")


def _markdown(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


def markdown_table(rows: list[dict], relations: bool = True, side: str = "both") -> str:
    """One line per experiment. `side`: per-relation MRR over both sides, or only tail/head queries."""
    changed = _changed_params(rows)
    rel_names, cols = _columns(rows, relations, side)
    body = []
    for r in rows:
        cells = [r["name"], ", ".join(f"{k}={v}" for k, v in changed[r["name"]].items()) or "(baseline)"]
        cells += [_fmt(k, v) for k, v in zip(METRICS + tuple(rel_names), _values(r["metrics"], rel_names, side))]
        body.append(cells)
    return _markdown(["experiment", "changed params"] + cols, body)


def seed_groups(rows: list[dict], seed_key: str = "seed") -> list[tuple[str, str, list[dict]]]:
    """Rows grouped by their changed params other than the seed: (name, changes, members), in
    first-seen order. The group's name is its first member's without a `-s<seed>` suffix (the
    baseline's for the full model)."""
    changed = _changed_params(rows)
    groups: dict[str, tuple[str, list[dict]]] = {}
    for r in rows:
        key = ", ".join(f"{k}={v}" for k, v in changed[r["name"]].items() if k != seed_key)
        groups.setdefault(key, (re.sub(r"-s\d+$", "", r["name"]), []))[1].append(r)
    return [(name, key, members) for key, (name, members) in groups.items()]


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def seed_table(rows: list[dict], relations: bool = True, side: str = "both") -> str:
    """One line per ablation: mean +- sample sd over the seeds it ran with (column `seeds`)."""
    rel_names, cols = _columns(rows, relations, side)
    body = []
    for name, key, members in seed_groups(rows):
        seeds = sorted({_get(m["params"], "seed") for m in members}, key=str)
        cells = [name, key or "(baseline)", ",".join(str(x) for x in seeds)]
        per_member = [_values(m["metrics"], rel_names, side) for m in members]
        for col, k in enumerate(METRICS + tuple(rel_names)):
            vals = [v[col] for v in per_member if v[col] is not None]
            if not vals:
                cells.append("-")
                continue
            mean, sd = _mean_sd(vals)
            cells.append(_fmt(k, mean) + (f" ± {_fmt(k, sd)}" if len(vals) > 1 else ""))
        body.append(cells)
    return _markdown(["experiment", "changed params", "seeds"] + cols, body)


def sweep_rows(rows: list[dict], param: str, seed_key: str = "seed") -> list[dict]:
    """One row per distinct value of `param`, sorted by that value, from the baseline and the
    experiments that change nothing but `param` and the seed (an ablation at the same value is not
    a sweep point). Replicates over seeds are averaged; `seeds` counts them and `<metric>_sd` is
    their sample standard deviation (0 for one seed)."""
    changed = _changed_params(rows)
    by_value: dict[object, list[dict]] = {}
    for r in rows:
        value = _get(r["params"], param)
        if value is not None and set(changed[r["name"]]) <= {param, seed_key}:
            by_value.setdefault(value, []).append(r["metrics"])
    points = []
    for value in sorted(by_value):
        point = {param.split(".")[-1]: value, "seeds": len(by_value[value])}
        for k in METRICS:
            mean, sd = _mean_sd([m[k] for m in by_value[value]])
            point[k], point[f"{k}_sd"] = round(mean, 6), round(sd, 6)
        points.append(point)
    return points


def queue_commands(sweep: str | None, seeds: list[int] | None = None, only: list[str] | None = None,
                   base_seed: int = 0) -> list[list[str]]:
    """`dvc exp run --queue` lines: every ablation (or those in `only`) and the sweep, once per
    seed; seeds other than `base_seed` also queue the unchanged model as `full-s<seed>`."""
    unknown = set(only or ()) - set(ABLATIONS) - {"full"}
    if unknown:
        raise SystemExit(f"unknown ablation(s) {sorted(unknown)}; known: full, {', '.join(ABLATIONS)}")
    cmds = []
    for seed in seeds or [base_seed]:
        extra = [] if seed == base_seed else [f"seed={seed}"]
        suffix = "" if seed == base_seed else f"-s{seed}"
        runs = ({"full": []} if seed != base_seed else {}) | ABLATIONS
        for name, overrides in runs.items():
            if only and name not in only:
                continue
            cmds.append(["dvc", "exp", "run", "--queue", "-n", name + suffix]
                        + [a for o in overrides + extra for a in ("-S", o)])
        if sweep:
            cmds.append(["dvc", "exp", "run", "--queue", "-S", sweep] + [a for o in extra for a in ("-S", o)])
    return cmds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    q = sub.add_parser("queue", help="queue every ablation (and a sweep) with dvc exp run --queue")
    q.add_argument("--sweep", default="prune.k=range(0,9,2)", help="a -S sweep to queue too ('' for none)")
    q.add_argument("--seeds", type=int, nargs="+", help="replicate everything over these values of `seed`")
    q.add_argument("--only", nargs="+", help=f"queue only these (full, {', '.join(ABLATIONS)})")
    q.add_argument("--dry-run", action="store_true", help="print the commands only")
    t = sub.add_parser("table", help="markdown table of all experiments")
    t.add_argument("--no-relations", action="store_true", help="omit the per-relation MRR columns")
    t.add_argument("--side", choices=("both", "tail", "head"), default="both",
                   help="per-relation MRR over both sides, or tail/head queries only")
    t.add_argument("--by-seed", action="store_true", help="one line per ablation: mean ± sd over seeds")
    s = sub.add_parser("sweep", help="CSV of the metrics against one param")
    s.add_argument("--param", default="prune.k")
    s.add_argument("--out", default="metrics/plots/prune_sweep.csv")
    for p in (t, s):
        p.add_argument("-A", "--all-commits", action="store_true", help="include experiments of all commits")
        p.add_argument("--rev", help="experiments derived from this commit instead of HEAD")
    args = ap.parse_args(argv)
    if args.command == "queue":
        from .config import load_params

        base_seed = load_params("params.yaml").seed if Path("params.yaml").exists() else 0
        for cmd in queue_commands(args.sweep or None, args.seeds, args.only, base_seed):
            print(" ".join(f"'{a}'" if "range(" in a else a for a in cmd))
            if not args.dry_run:
                subprocess.run(cmd, check=True)
        return
    rows = load_experiments(all_commits=args.all_commits, rev=args.rev)
    if not rows:
        sys.exit("no experiments with metrics/evaluate.json found (run `dvc exp run` first)")
    if args.command == "table":
        table = seed_table if args.by_seed else markdown_table
        print(table(rows, relations=not args.no_relations, side=args.side))
    else:
        points = sweep_rows(rows, args.param)
        if not points:
            sys.exit(f"no experiment sets {args.param}")
        write_csv_rows(Path(args.out), points)
        print(f"wrote {len(points)} points to {args.out}")


if __name__ == "__main__":
    main()
