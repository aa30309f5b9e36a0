"""Turn finished DVC experiments into the paper's tables and figures.

    python -m elmm.experiments queue                   # queue the paper's ablations (Table 3) + a K sweep
    dvc queue start -j 1                               # run them (one at a time on a small machine)
    python -m elmm.experiments table                   # markdown table of every experiment (ablations)
    python -m elmm.experiments sweep --param prune.k   # CSV of metrics against a param, for `dvc plots`

Both read `dvc exp show --json` (so they work on whatever `dvc exp run` produced) and never
recompute a metric.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from .io import write_csv_rows

METRICS = ("mrr", "mr", "hits_at_1", "hits_at_3", "hits_at_10")

# The paper's Table 3 as param overrides (README: "Ablations").
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


def load_experiments(show_json: str | None = None, all_commits: bool = False) -> list[dict]:
    """Rows {name, params, metrics} for the baseline and every experiment with evaluate metrics."""
    if show_json is None:
        cmd = ["dvc", "exp", "show", "--json"] + (["-A"] if all_commits else [])
        show_json = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = []
    for base in json.loads(show_json):
        if base.get("rev") == "workspace":
            continue
        if base.get("data") and (row := _row(base.get("name") or base["rev"][:7], base["data"])):
            rows.append(row)
        for exp in base.get("experiments") or []:
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


def markdown_table(rows: list[dict], relations: bool = True) -> str:
    changed = _changed_params(rows)
    rel_names = list(rows[0]["metrics"].get("per_relation", {})) if rows and relations else []
    head = ["experiment", "changed params"] + list(METRICS) + [f"MRR {r}" for r in rel_names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m = r["metrics"]
        cells = [r["name"], ", ".join(f"{k}={v}" for k, v in changed[r["name"]].items()) or "(baseline)"]
        cells += [f"{m[k]:.4f}" if k != "mr" else f"{m[k]:.1f}" for k in METRICS]
        cells += [f"{m['per_relation'][n]['mrr']:.4f}" if n in m.get("per_relation", {}) else "-" for n in rel_names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_rows(rows: list[dict], param: str) -> list[dict]:
    """One row per distinct value of `param`, sorted by that value, from the baseline and the
    experiments that change nothing but `param` (an ablation at the same value is not a sweep point)."""
    changed = _changed_params(rows)
    by_value = {}
    for r in rows:
        value = _get(r["params"], param)
        if value is not None and set(changed[r["name"]]) <= {param} and value not in by_value:
            by_value[value] = {param.split(".")[-1]: value, **{k: r["metrics"][k] for k in METRICS}}
    return [by_value[v] for v in sorted(by_value)]


def queue_commands(sweep: str | None) -> list[list[str]]:
    cmds = [["dvc", "exp", "run", "--queue", "-n", name] + [a for o in overrides for a in ("-S", o)]
            for name, overrides in ABLATIONS.items()]
    if sweep:
        cmds.append(["dvc", "exp", "run", "--queue", "-S", sweep])
    return cmds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    q = sub.add_parser("queue", help="queue every ablation (and a sweep) with dvc exp run --queue")
    q.add_argument("--sweep", default="prune.k=range(0,9,2)", help="a -S sweep to queue too ('' for none)")
    q.add_argument("--dry-run", action="store_true", help="print the commands only")
    t = sub.add_parser("table", help="markdown table of all experiments")
    t.add_argument("--no-relations", action="store_true", help="omit the per-relation MRR columns")
    s = sub.add_parser("sweep", help="CSV of the metrics against one param")
    s.add_argument("--param", default="prune.k")
    s.add_argument("--out", default="metrics/plots/prune_sweep.csv")
    for p in (t, s):
        p.add_argument("-A", "--all-commits", action="store_true", help="include experiments of all commits")
    args = ap.parse_args(argv)
    if args.command == "queue":
        for cmd in queue_commands(args.sweep or None):
            print(" ".join(cmd if "range(" not in cmd[-1] else cmd[:-1] + [f"'{cmd[-1]}'"]))
            if not args.dry_run:
                subprocess.run(cmd, check=True)
        return
    rows = load_experiments(all_commits=args.all_commits)
    if not rows:
        sys.exit("no experiments with metrics/evaluate.json found (run `dvc exp run` first)")
    if args.command == "table":
        print(markdown_table(rows, relations=not args.no_relations))
    else:
        points = sweep_rows(rows, args.param)
        if not points:
            sys.exit(f"no experiment sets {args.param}")
        write_csv_rows(Path(args.out), points)
        print(f"wrote {len(points)} points to {args.out}")


if __name__ == "__main__":
    main()
