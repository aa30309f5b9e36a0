"""Turn finished DVC experiments into the paper's tables and figures.

    python -m elmm.experiments queue                   # queue the paper's ablations (Table 3) + a K sweep
    python -m elmm.experiments queue --seeds 0 1 2     # ... each replicated over three seeds
    dvc queue start -j 1                               # run them (one at a time on a small machine)
    python -m elmm.experiments table                   # markdown table of every experiment (ablations)
    python -m elmm.experiments table --by-seed --side tail   # mean +- sd over seeds, tail queries
    python -m elmm.experiments table --by-seed --baseline full   # + paired difference to `full`, 95% bootstrap CI
    python -m elmm.experiments queue --only full --sweep 'train.lr=1e-4,2e-4,3e-4,5e-4,8e-4,1e-3'   # the lr grid
    python -m elmm.experiments sweep --param prune.k   # CSV of metrics against a param, for `dvc plots`
    (table/sweep: experiments of HEAD; --rev <commit> for those queued from another commit, repeated
    for several, -A for all)

All read `dvc exp show --json` (so they work on whatever `dvc exp run` produced) and never
recompute a metric. A replicate changes the top-level `seed`, which regenerates the synthetic
world, the tiny backbone and the training order: it measures the spread over all three.

Paired comparisons (`table --by-seed --baseline NAME`): two experiments with the same seed rank
the same test queries, so their per-query ranks (metrics/ranks/model.csv, which every experiment
commit carries; read with `git show <rev>:...`) pair query by query. The per-query differences in
reciprocal rank and Hits@1 are pooled over the seeds both groups ran, and `bootstrap_interval`
resamples queries with replacement within each seed (10,000 times, fixed RNG seed) for a 95%
percentile interval of the difference in MRR and in Hits@1.

Why one module of ~480 lines: queueing, tables, sweeps and the bootstrap all read one thing
(`dvc exp show --json`) with one notion of an experiment's name and seed; it is a CLI, not a library.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .io import write_csv_rows
from .rank_table import KEY_COLUMNS, parse_rank_table, ranks_path

METRICS = ("mrr", "mr", "hits_at_1", "hits_at_3", "hits_at_10")

KNOWLEDGE_ON = "model.knowledge.enabled=true"
# The paper's Table 3 and the other experiments it reports, as param overrides (docs/results.md,
# "Ablations"). `{half_layers}` stands for half the backbone's decoder layers (L/2), filled in at
# queue time. `no-init` is the paper's "zero-initialised W_c" row.
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
    "no-self-denoise": ["train.self_denoise=false"],
    # the options issue 14 asks to measure against today's defaults (docs/model.md)
    "paper-text-query": ["model.mvtc.text_query=entity_relation"],
    "name-readout": ["model.entity_readout=name_end"],
    "shared-value": ["model.mvtc.value=shared"],
    "low-rank-value": ["model.mvtc.value=low_rank"],
    # the anchor's entity token (docs/model.md), on by default since it was measured: without it (the
    # default before, as `entity-token-lr10` was queued against), and at the shared learning rate
    # (queued as `entity-token` when the default was off)
    "no-entity-token": ["model.entity_token=none", "train.entity_lr_scale=1"],
    "entity-token-lr1": ["train.entity_lr_scale=1"],
    # where the vector enters: at the answer cue (E_relation's token, the default since it was
    # measured) the layers' MLPs see it beside the relation attention brings; at the name (the
    # default before) it reaches that token only through attention
    "entity-token-name": ["model.entity_token_at=name"],
    "entity-token-answer": ["model.entity_token_at=answer"],
    "entity-token-both": ["model.entity_token_at=both"],
    "entity-lr30": ["train.entity_lr_scale=30"],
    # the vector scaled by a learned diagonal per relation and direction (DistMult's), so relations that
    # group the same entities differently (knows: communities, works with: teams) can each read their part
    "entity-token-relational": ["model.entity_token=relational"],
    "entity-token-free": ["model.entity_token=free"],  # one vector for every relation (the default before complex)
    # a complex diagonal (ComplEx's): a scaled rotation per plane can also map a group onto another
    # (rival of: the next community), which a real diagonal cannot
    "entity-token-complex": ["model.entity_token=complex"],
    # the anchor's vector also reads its own answer-side row: one representation trained from both roles
    "entity-token-complex-tied": ["model.entity_token=complex", "model.entity_token_tied=true"],
    # the training loss: eq. 15's BCE over sampled negatives against the target's cross-entropy over
    # every entity (1vsAll, the strongest KGE training type in Ruffinelli et al. 2020), with and
    # without the knowledge path
    "loss-bce": ["train.loss=bce"],
    "loss-softmax": ["train.loss=softmax"],
    "loss-softmax-knowledge": ["train.loss=softmax", KNOWLEDGE_ON],
    # the backbone's pretraining: reading exercises scored on the whole line (the default before), or
    # on the line and the answer, with more of them (the default since it was measured)
    "reading-line": ["pretrain.reading_loss=line", "pretrain.reading_share=0.5", "pretrain.steps=400"],
    "reading-both": ["pretrain.reading_loss=both", "pretrain.reading_share=0.8", "pretrain.steps=600"],
    # the anchor's vector left out of half the training queries, so the answers must also come from
    # the pictures and the description (the vector can memorise every training fact)
    "entity-token-dropout": ["model.entity_token_dropout=0.5"],
    # E_relation read after the tokens every training answer of the relation starts with (" answer:
    # region"), where the pretrained backbone reads the value from the description (docs/model.md)
    "answer-prefix": ["model.answer_prefix=true"],
    "no-answer-prefix": ["model.answer_prefix=false"],
    # regularising the per-entity tables (the default memorises the structure relations: train MRR
    # 0.8, test 0.06-0.18): AdamW's decoupled weight decay, or a soft target under the softmax loss
    "weight-decay": ["train.weight_decay=0.3"],
    "no-weight-decay": ["train.weight_decay=0"],
    "label-smoothing": ["train.label_smoothing=0.1"],
    # the parts of the default since 99db1b6: the anchor's vector untied; the training step before
    # it (batch 32 at lr 3e-4, LoRA dropout 0.05); and the whole default before it (commit 77c6364)
    "no-tied": ["model.entity_token_tied=false"],
    "batch-32": ["train.batch_size=32", "train.lr=0.0003", "train.lora.dropout=0.05"],
    "previous-default": ["model.knowledge.enabled=false", "model.entity_token_tied=false", "train.batch_size=32",
                         "train.lr=0.0003", "train.lora.dropout=0.05"],
    # the testbed's positive control: every attention sub-block removed (K = L)
    "no-attention": ["prune.k={layers}"],
    # the compensation methods at K = L/2 (the paper's main setting, K = 16 of 32)
    "half-ridge": ["prune.k={half_layers}", "prune.compensation=ridge", "prune.init=closed_form"],
    "half-paper": ["prune.k={half_layers}", "prune.compensation=paper", "prune.init=closed_form"],
    "half-none": ["prune.k={half_layers}", "prune.compensation=none"],
    "half-zero-init": ["prune.k={half_layers}", "prune.compensation=ridge", "prune.init=zero"],
    # MR-MKG's knowledge path (docs/knowledge.md). Each variant sets enabled=true itself, so it means
    # the same run whether the committed default has the path on or off.
    "no-knowledge": ["model.knowledge.enabled=false"],
    "no-alignment": [KNOWLEDGE_ON, "model.knowledge.align_lambda=0"],
    "gat": [KNOWLEDGE_ON, "model.knowledge.conv=gat"],
    "gcn": [KNOWLEDGE_ON, "model.knowledge.conv=gcn"],
    # candidates scored also against their own RGAT neighbourhood, not only their free completion rows
    # (under softmax every entity's neighbourhood is encoded at every step; under bce the loss columns')
    "graph-candidates": [KNOWLEDGE_ON, "model.knowledge.candidates=graph"],
    # node init also reads each node's answer-side row (W_C, zero at start): the tokens carry what the
    # neighbours have been learnt to answer, not only who they are
    "node-rows": [KNOWLEDGE_ON, "model.knowledge.node_rows=true"],
    # both: each candidate's neighbourhood term is then built from its neighbours' rows (a GNN over
    # learnt entity vectors, as CompGCN's), not only from their fixed features
    "graph-node-rows": [KNOWLEDGE_ON, "model.knowledge.candidates=graph", "model.knowledge.node_rows=true"],
    # training subgraphs keep the query edge's reverse (t, r, h): the leak choice issue 15 asks to measure
    "keep-reverse": [KNOWLEDGE_ON, "model.knowledge.reverse_edge=keep"],
    # the number of retrieved triples N (MR-MKG: accuracy falls beyond 20-30); seeds n <= N
    **{f"triples-{n}": [KNOWLEDGE_ON, f"model.knowledge.max_triples={n}", f"model.knowledge.seed_triples={min(5, n)}"]
       for n in (5, 10, 20, 40)},
}
# The paper's learning-rate grid (Fig. 4 right): queue --only full --sweep LR_SWEEP
LR_SWEEP = "train.lr=1e-4,2e-4,3e-4,5e-4,8e-4,1e-3"
EVALUATE = "metrics/evaluate.json"


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def set_dotted(tree: dict, dotted: str, value) -> None:
    """Set `dotted` ("train.lora.r") in a nested params dict, as `dvc exp run -S` does; sections it
    lacks are created, so `elmm.config.from_dict` is what rejects a key the schema does not have."""
    *path, leaf = dotted.split(".")
    for part in path:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise SystemExit(f"{dotted}: {part} is a value, not a section")
    tree[leaf] = value


def with_overrides(p, overrides: dict):
    """`p` (elmm.config.Params) with dotted keys set as `dvc exp run -S` sets them (dotted key -> value);
    `from_dict` names a key the schema lacks. Not validated: the caller validates as its stage would."""
    from .config import from_dict, to_dict

    raw = to_dict(p)
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    return from_dict(raw)


def _row(name: str, data: dict) -> dict | None:
    if data.get("rev") == "workspace" or data.get("timestamp") is None:
        return None  # queued or still running: its files are not its own results yet
    metrics = data.get("metrics", {}).get(EVALUATE, {}).get("data")
    params = data.get("params", {}).get("params.yaml", {}).get("data")
    if not metrics or not params:
        return None
    return {"name": name, "rev": data.get("rev"), "params": with_defaults(params), "metrics": metrics}


#: Params whose current default is not the behaviour before they existed, with that behaviour's
#: value: a run made before the param was added is read with it (`with_defaults`).
BEFORE_ADDED = {"model.entity_token": "none", "train.entity_lr_scale": 1.0, "model.entity_token_at": "name",
                "train.loss": "bce", "pretrain.reading_loss": "line", "model.entity_token_tied": False,
                "evaluate.head_scoring": "direct", "model.answer_prefix": False}


def _defaults_before_added() -> dict:
    from .config import Params, to_dict

    defaults = to_dict(Params())
    for dotted, value in BEFORE_ADDED.items():
        set_dotted(defaults, dotted, value)
    return defaults


def with_defaults(params: dict, defaults: dict | None = None) -> dict:
    """`params` with every key it lacks filled in: from `BEFORE_ADDED`, else elmm.config's default. A
    param added after a run was made thus reads as the value that behaves as the code did before it
    existed (a new option's default keeps the old behaviour when it is added; `BEFORE_ADDED` records
    the ones whose default changed since), so the run groups and merges with the same run of a later
    commit."""
    if defaults is None:
        defaults = _defaults_before_added()
    out = dict(params)
    for k, v in defaults.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = with_defaults(out[k], v)
    return out


def load_experiments(show_json: str | None = None, all_commits: bool = False,
                     rev: str | Sequence[str] | None = None, say=None) -> list[dict]:
    """Rows {name, params, metrics} for the baseline and every experiment with evaluate metrics
    (experiments of HEAD, of commit `rev` or of each of several commits, or of every commit).

    With several commits (a queue filled across a commit whose change leaves the runs alone), a
    run with the params of one already read is counted once (`merge_runs`)."""
    if show_json is not None:
        return _rows_from_show(show_json)
    revs = [rev] if rev is None or isinstance(rev, str) else list(rev)
    shows = [subprocess.run(["dvc", "exp", "show", "--json"] + (["-A"] if all_commits else [])
                            + (["--rev", r] if r else []), check=True, capture_output=True, text=True).stdout
             for r in revs]
    return merge_runs([_rows_from_show(show) for show in shows], say=say)


def _numbers_as_floats(tree):
    """`tree` with every int as a float: `-S train.entity_lr_scale=10` writes 10 where params.yaml
    has 10.0, the same value, which must not make two runs."""
    if isinstance(tree, dict):
        return {k: _numbers_as_floats(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_numbers_as_floats(v) for v in tree]
    return float(tree) if isinstance(tree, int) and not isinstance(tree, bool) else tree


def merge_runs(row_lists: Sequence[list[dict]], say=None) -> list[dict]:
    """The rows of several commits' experiments in order, each params set once (the first read)."""
    if len(row_lists) == 1:
        return list(row_lists[0])
    seen: dict[str, dict] = {}
    rows = []
    for row in (r for rows_ in row_lists for r in rows_):
        key = json.dumps(_numbers_as_floats(row["params"]), sort_keys=True)
        if key in seen:
            if say:
                say(f"{row['name']} ({row['rev'][:7]}): the params of {seen[key]['name']} "
                    f"({seen[key]['rev'][:7]}), counted once")
            continue
        seen[key] = row
        rows.append(row)
    return rows


def _rows_from_show(show_json: str) -> list[dict]:
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


def _changed_params(rows: list[dict]) -> list[dict[str, object]]:
    """Per row (in order, not by name: runs of two commits may share a name), the params that
    differ from the first (baseline) row, as dotted keys."""
    def flat(tree, prefix=""):
        out = {}
        for k, v in tree.items():
            key = f"{prefix}{k}"
            out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
        return out

    base = flat(rows[0]["params"]) if rows else {}
    return [{k: v for k, v in flat(r["params"]).items() if base.get(k) != v} for r in rows]


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
    rel_names, cols = _columns(rows, relations, side)
    body = []
    for r, changes in zip(rows, _changed_params(rows)):
        cells = [r["name"], ", ".join(f"{k}={v}" for k, v in changes.items()) or "(baseline)"]
        cells += [_fmt(k, v) for k, v in zip(METRICS + tuple(rel_names), _values(r["metrics"], rel_names, side))]
        body.append(cells)
    return _markdown(["experiment", "changed params"] + cols, body)


def seed_groups(rows: list[dict], seed_key: str = "seed") -> list[tuple[str, str, list[dict]]]:
    """Rows grouped by their changed params other than the seed: (name, changes, members), in
    first-seen order. The group's name is its first member's without a `-s<seed>` suffix (the
    baseline's for the full model); a name an earlier group has (a run of another commit, other
    params) gets `@<its commit>`."""
    groups: dict[str, tuple[str, list[dict]]] = {}
    for r, changes in zip(rows, _changed_params(rows)):
        key = ", ".join(f"{k}={v}" for k, v in changes.items() if k != seed_key)
        if key not in groups:
            name = re.sub(r"-s\d+$", "", r["name"])
            if any(name == taken for taken, _ in groups.values()):
                name = f"{name}@{(r.get('rev') or '')[:7]}"
            groups[key] = (name, [])
        groups[key][1].append(r)
    return [(name, key, members) for key, (name, members) in groups.items()]


def select_groups(groups: list[tuple[str, str, list[dict]]], only: Sequence[str] | None,
                  baseline: str | None = None) -> list[tuple[str, str, list[dict]]]:
    """The `seed_groups` groups named in `only` (all without it) and the baseline's, in their order;
    a clear error for a name that is no group."""
    if not only:
        return groups
    names = [n for n, _, _ in groups]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise SystemExit(f"no experiment group named {', '.join(map(repr, unknown))}; groups: {', '.join(names)}")
    keep = set(only) | {baseline}
    return [g for g in groups if g[0] in keep]


def group_members(groups: list[tuple[str, str, list[dict]]], name: str) -> list[dict]:
    """The members of the `seed_groups` group called `name`; a clear error naming the others."""
    for group, _, members in groups:
        if group == name:
            return members
    raise SystemExit(f"no experiment group named {name!r}; groups: {', '.join(n for n, _, _ in groups)}")


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_differences(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-query differences a - b of two rank tables (elmm.rank_table) over the same queries: in
    reciprocal rank (`mrr`) and in Hits@1 (`hits_at_1`, -1, 0 or 1), from the realistic ranks."""
    for col in KEY_COLUMNS:
        if len(a[col]) != len(b[col]) or not np.array_equal(a[col], b[col]):
            raise ValueError(f"the two rank tables differ in column {col!r}: not the same queries (same seed?)")
    return {"mrr": 1.0 / a["rank"] - 1.0 / b["rank"],
            "hits_at_1": (a["rank"] <= 1).astype(np.float64) - (b["rank"] <= 1).astype(np.float64)}


def resampled_sums(columns_by_seed: Sequence[Sequence[np.ndarray]], resamples: int = 10_000, seed: int = 0,
                   block: int = 100) -> np.ndarray:
    """[k, resamples]: for each of k paired per-query columns, its sum over one bootstrap resample.

    `columns_by_seed` holds, per seed, k arrays over that seed's queries (the same queries in each).
    One resample draws, within each seed, as many query indices with replacement, and every column
    is summed over the same draws, so a query's values stay together; the sums are pooled over the
    seeds. The RNG is `numpy.random.default_rng(seed)`; resamples are drawn `block` at a time, for
    each block seed by seed (`rng.integers(0, n, (rows, n))`), which fixes the stream. Seeds without
    queries are skipped.
    """
    seeds = [[np.asarray(c, dtype=np.float64).reshape(-1) for c in cols] for cols in columns_by_seed]
    for cols in seeds:
        if len({c.size for c in cols}) > 1:
            raise ValueError(f"paired columns differ in length ({[c.size for c in cols]}): not the same queries")
    seeds = [cols for cols in seeds if cols and cols[0].size]
    if not seeds:
        raise ValueError("no queries to resample")
    k = len(seeds[0])
    rng = np.random.default_rng(seed)
    sums = np.zeros((k, resamples))
    for lo in range(0, resamples, block):
        rows = min(block, resamples - lo)
        for cols in seeds:
            pick = rng.integers(0, cols[0].size, (rows, cols[0].size))
            for j, c in enumerate(cols):
                sums[j, lo:lo + rows] += c[pick].sum(axis=1)
    return sums


def bootstrap_interval(diffs_by_seed: Sequence[np.ndarray], resamples: int = 10_000, seed: int = 0,
                       level: float = 0.95, block: int = 100) -> tuple[float, float, float]:
    """(mean, low, high): the mean of the pooled per-query differences and its percentile bootstrap
    interval at `level`: the resampled means of `resampled_sums` (one column per seed), with the
    `(1 - level) / 2` and `(1 + level) / 2` percentiles (numpy's linear interpolation).
    """
    diffs = [np.asarray(d, dtype=np.float64).reshape(-1) for d in diffs_by_seed]
    diffs = [d for d in diffs if d.size]
    if not diffs:
        raise ValueError("no differences to resample")
    means = resampled_sums([[d] for d in diffs], resamples, seed, block)[0] / sum(d.size for d in diffs)
    low, high = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(np.concatenate(diffs).mean()), float(low), float(high)


RankReader = Callable[[dict], dict[str, np.ndarray]]


def git_rank_reader(row: dict, path: str | None = None) -> dict[str, np.ndarray]:
    """A rank table of an experiment row, from its commit: `git show <rev>:<path>`, by default the
    model's (metrics/ranks/model.csv); the baselines' prior.csv and kge.csv sit beside it."""
    path = path or ranks_path(row["metrics"].get("split", "test"))
    proc = subprocess.run(["git", "show", f"{row['rev']}:{path}"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{row['name']}: cannot read {path} at {row['rev']} ({proc.stderr.strip()}); "
                         "experiments run before the evaluate stage wrote per-query ranks cannot be paired")
    return parse_rank_table(proc.stdout, f"{row['rev']}:{path}")


def _seed_of(row: dict, seed_key: str = "seed"):
    return _get(row["params"], seed_key)


def paired_comparison(members: list[dict], baseline: list[dict], read: RankReader, resamples: int = 10_000,
                      rng_seed: int = 0) -> dict | None:
    """Difference of a group to the baseline group over the seeds both ran, per query and pooled:
    {"seeds": [...], "queries": n, "mrr": (mean, low, high), "hits_at_1": (mean, low, high)}, or
    None when they share no seed."""
    base_by_seed = {_seed_of(r): r for r in baseline}
    pairs = [(m, base_by_seed[_seed_of(m)]) for m in members if _seed_of(m) in base_by_seed]
    if not pairs:
        return None
    diffs = [paired_differences(read(m), read(b)) for m, b in pairs]
    result = {"seeds": sorted((_seed_of(m) for m, _ in pairs), key=str), "queries": sum(len(d["mrr"]) for d in diffs)}
    for key in ("mrr", "hits_at_1"):
        result[key] = bootstrap_interval([d[key] for d in diffs], resamples, rng_seed)
    return result


def _fmt_diff(mean: float, low: float, high: float) -> str:
    return f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]"


def seed_table(rows: list[dict], relations: bool = True, side: str = "both", baseline: str | None = None,
               read: RankReader = git_rank_reader, resamples: int = 10_000, rng_seed: int = 0,
               only: Sequence[str] | None = None, comparisons: dict[str, dict | None] | None = None) -> str:
    """One line per ablation: mean +- sample sd over the seeds it ran with (column `seeds`).

    With `baseline` (a group's name), each group's MRR and Hits@1 are followed by its paired
    difference to that group, pooled over the seeds both ran (`paired_comparison`), with the 95%
    bootstrap interval: `+0.0123 [-0.0040, +0.0290]` (this group minus the baseline). `only` keeps
    the groups of those names (and the baseline's). `comparisons` (from `compare_groups`) saves
    computing the paired differences again when the caller already has them.
    """
    rel_names, cols = _columns(rows, relations, side)
    groups = select_groups(seed_groups(rows), only, baseline)
    base_members = None
    if baseline is not None:
        base_members = group_members(groups, baseline)
        if comparisons is None:
            comparisons = compare_groups(groups, baseline, read, resamples, rng_seed, with_baseline=False)
        cols = [c for k in cols for c in ([k, f"Δ{k} vs {baseline} (95% CI)"] if k in ("mrr", "hits_at_1") else [k])]
    body = []
    for name, key, members in groups:
        seeds = sorted({_get(m["params"], "seed") for m in members}, key=str)
        cells = [name, key or "(baseline)", ",".join(str(x) for x in seeds)]
        per_member = [_values(m["metrics"], rel_names, side) for m in members]
        paired = comparisons.get(name) if base_members is not None and members is not base_members else None
        for col, k in enumerate(METRICS + tuple(rel_names)):
            vals = [v[col] for v in per_member if v[col] is not None]
            if not vals:
                cells.append("-")
            else:
                mean, sd = _mean_sd(vals)
                cells.append(_fmt(k, mean) + (f" ± {_fmt(k, sd)}" if len(vals) > 1 else ""))
            if base_members is not None and k in ("mrr", "hits_at_1"):
                if members is base_members:
                    cells.append("(baseline)")
                elif paired is None:
                    cells.append("- (no common seed)")
                else:
                    note = "" if paired["seeds"] == seeds else f" (seeds {','.join(map(str, paired['seeds']))})"
                    cells.append(_fmt_diff(*paired[k]) + note)
        body.append(cells)
    return _markdown(["experiment", "changed params", "seeds"] + cols, body)


def sweep_rows(rows: list[dict], param: str, seed_key: str = "seed", against=None,
               read: RankReader | None = None, resamples: int = 10_000, rng_seed: int = 0) -> list[dict]:
    """One row per distinct value of `param`, sorted by that value, from the baseline and the
    experiments that change nothing but `param` and the seed (an ablation at the same value is not
    a sweep point). Replicates over seeds are averaged; `seeds` counts them and `<metric>_sd` is
    their sample standard deviation (0 for one seed).

    With `against` (one of the param's values), every point also holds its paired difference to
    that point (`paired_comparison`, over the seeds both ran): `delta_mrr`, `delta_mrr_low`,
    `delta_mrr_high`, the same for `hits_at_1`, and `paired_seeds`.
    """
    by_value: dict[object, list[dict]] = {}
    for r, changes in zip(rows, _changed_params(rows)):
        value = _get(r["params"], param)
        if value is not None and set(changes) <= {param, seed_key}:
            by_value.setdefault(value, []).append(r)
    if against is not None and against not in by_value:
        raise SystemExit(f"--against {against!r}: no sweep point has {param} = {against!r} "
                         f"(points: {', '.join(map(str, sorted(by_value)))})")
    points = []
    for value in sorted(by_value):
        point = {param.split(".")[-1]: value} | summarize(by_value[value])
        if against is not None:
            point |= delta_columns(paired_comparison(by_value[value], by_value[against], read or git_rank_reader,
                                                     resamples, rng_seed))
        points.append(point)
    return points


def summarize(members: list[dict]) -> dict:
    """A group's CSV columns: `seeds` (how many runs), each metric's mean and `<metric>_sd` over them."""
    point = {"seeds": len(members)}
    for k in METRICS:
        mean, sd = _mean_sd([m["metrics"][k] for m in members])
        point[k], point[f"{k}_sd"] = round(mean, 6), round(sd, 6)
    return point


def delta_columns(paired: dict | None) -> dict:
    """A `paired_comparison` as CSV columns: `paired_seeds`, `delta_mrr` with `_low` / `_high`, the
    same for `hits_at_1` (empty when the groups share no seed)."""
    cols = {"paired_seeds": " ".join(map(str, paired["seeds"])) if paired else ""}
    for k in ("mrr", "hits_at_1"):
        for suffix, x in zip(("", "_low", "_high"), paired[k] if paired else (None,) * 3):
            cols[f"delta_{k}{suffix}"] = None if x is None else round(x, 6)
    return cols


def compare_groups(groups: list[tuple[str, str, list[dict]]], baseline: str, read: RankReader | None = None,
                   resamples: int = 10_000, rng_seed: int = 0, with_baseline: bool = True) -> dict[str, dict | None]:
    """Each group's `paired_comparison` to the `baseline` group, by name (the baseline with itself too,
    unless `with_baseline` is false). The bootstrap is the slow part of a table: compute it once."""
    base = group_members(groups, baseline)
    return {name: paired_comparison(members, base, read or git_rank_reader, resamples, rng_seed)
            for name, _, members in groups if with_baseline or members is not base}


def comparison_rows(rows: list[dict], baseline: str, read: RankReader | None = None, resamples: int = 10_000,
                    rng_seed: int = 0, only: Sequence[str] | None = None,
                    comparisons: dict[str, dict | None] | None = None) -> list[dict]:
    """`seed_table --baseline` as CSV rows for `dvc plots`: one per group (`experiment`, its
    `changed` params; `only` as in `seed_table`), with `summarize`'s and `delta_columns`' columns
    against the baseline group (which gets 0s). `comparisons` as in `seed_table`."""
    groups = select_groups(seed_groups(rows), only, baseline)
    if comparisons is None:
        comparisons = compare_groups(groups, baseline, read, resamples, rng_seed)
    return [{"experiment": name, "changed": (key or "(baseline)").replace(",", ";")}
            | summarize(members) | delta_columns(comparisons[name]) for name, key, members in groups]


def only_seeds(rows: list[dict], seeds: Sequence[int], seed_key: str = "seed") -> list[dict]:
    """The rows run with one of `seeds`. The first row stays first when kept: it is the baseline
    every row's changed params are read against."""
    return [r for r in rows if _get(r["params"], seed_key) in set(seeds)]


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def resolve_overrides(overrides: list[str], half_layers: int | None, layers: int | None = None) -> list[str]:
    """The `-S` overrides of an ablation with `{half_layers}` (L/2) and `{layers}` (L) filled in."""
    out = []
    for o in overrides:
        for key, value in (("{half_layers}", half_layers), ("{layers}", layers)):
            if key in o:
                if value is None:
                    raise SystemExit(f"{overrides}: needs the backbone's decoder depth (pass --layers L)")
                o = o.replace(key, str(value))
        out.append(o)
    return out


def _effective(base: dict, overrides: list[str]) -> dict:
    """The flat params an override list yields on top of `base` (values parsed as YAML, as DVC does)."""
    import yaml

    flat = _flat(base)
    for o in overrides:
        key, value = o.split("=", 1)
        flat[key] = yaml.safe_load(value)
    return flat


def queue_commands(sweep: str | None, seeds: list[int] | None = None, only: list[str] | None = None,
                   base_seed: int = 0, half_layers: int | None = None, base_params: dict | None = None,
                   say: Callable[[str], None] = lambda s: None, layers: int | None = None) -> list[list[str]]:
    """`dvc exp run --queue` lines: every ablation (or those in `only`) and the sweep, once per
    seed; seeds other than `base_seed` also queue the unchanged model as `full-s<seed>`.

    `half_layers` fills `{half_layers}` (L/2). With `base_params` (params.yaml as a dict), an
    ablation whose overrides give the baseline's params or those of an ablation queued before it is
    skipped (e.g. half-ridge when the baseline already prunes L/2 layers with ridge), and `say`
    tells which.
    """
    unknown = set(only or ()) - set(ABLATIONS) - {"full"}
    if unknown:
        raise SystemExit(f"unknown ablation(s) {sorted(unknown)}; known: full, {', '.join(ABLATIONS)}")
    chosen = {name: resolve_overrides(o, half_layers, layers) for name, o in ABLATIONS.items() if not only or name in only}
    if base_params is not None:
        seen = [("the baseline", _effective(base_params, []))]
        for name, overrides in list(chosen.items()):
            effective = _effective(base_params, overrides)
            same = next((other for other, params in seen if params == effective), None)
            if same is not None:
                say(f"skipping {name}: the same params as {same}")
                del chosen[name]
            else:
                seen.append((name, effective))
    cmds = []
    for seed in seeds or [base_seed]:
        extra = [] if seed == base_seed else [f"seed={seed}"]
        suffix = "" if seed == base_seed else f"-s{seed}"
        runs = ({"full": []} if seed != base_seed and (not only or "full" in only) else {}) | chosen
        for name, overrides in runs.items():
            cmds.append(["dvc", "exp", "run", "--queue", "-n", name + suffix]
                        + [a for o in overrides + extra for a in ("-S", o)])
        if sweep:
            cmds.append(["dvc", "exp", "run", "--queue", "-S", sweep] + [a for o in extra for a in ("-S", o)])
    return cmds


def decoder_layers(params) -> int:
    """The backbone's decoder depth L from the params (the tiny backbones' config, else the HF config)."""
    if params.model.backbone in ("tiny", "tiny-qwen2-vl"):
        return params.model.tiny.layers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(params.model.backbone)
    except OSError as e:
        raise SystemExit(f"cannot read the config of {params.model.backbone!r} ({e}); pass --layers L") from None
    return getattr(config, "text_config", config).num_hidden_layers


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    q = sub.add_parser("queue", help="queue every ablation (and a sweep) with dvc exp run --queue")
    q.add_argument("--sweep", default=None,
                   help="a -S sweep to queue too (default: prune.k=range(0,9,2), or none with --only; '' for none)")
    q.add_argument("--seeds", type=int, nargs="+", help="replicate everything over these values of `seed`")
    q.add_argument("--only", nargs="+", help=f"queue only these (full, {', '.join(ABLATIONS)})")
    q.add_argument("--dry-run", action="store_true", help="print the commands only")
    q.add_argument("--layers", type=int, help="the backbone's decoder layers L (for the K = L/2 runs; "
                                              "default: from the params / the backbone's config)")
    t = sub.add_parser("table", help="markdown table of all experiments")
    t.add_argument("--no-relations", action="store_true", help="omit the per-relation MRR columns")
    t.add_argument("--side", choices=("both", "tail", "head"), default="both",
                   help="per-relation MRR over both sides, or tail/head queries only")
    t.add_argument("--by-seed", action="store_true", help="one line per ablation: mean ± sd over seeds")
    t.add_argument("--baseline", metavar="NAME", help="with --by-seed: the paired difference of every group to "
                                                      "group NAME, with a 95%% bootstrap interval over test queries")
    t.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    t.add_argument("--only", nargs="+", metavar="NAME", help="only these groups (and the baseline's)")
    t.add_argument("--out", metavar="CSV", help="with --baseline: also write each group's means and paired "
                                                "differences to this CSV (a DVC plot, e.g. metrics/plots/ablations.csv)")
    s = sub.add_parser("sweep", help="CSV of the metrics against one param")
    s.add_argument("--param", default="prune.k")
    s.add_argument("--out", default="metrics/plots/prune_sweep.csv")
    s.add_argument("--against", metavar="VALUE", help="the paired difference of every point to the point at "
                   "this value of --param (e.g. 0 for prune.k), with a 95%% bootstrap interval over test queries")
    s.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    for p in (t, s):
        p.add_argument("-A", "--all-commits", action="store_true", help="include experiments of all commits")
        p.add_argument("--seeds", type=int, nargs="+", help="only the runs with these values of `seed` (e.g. to "
                       "plot a sweep run at one seed without mixing in the baseline's other seeds)")
        p.add_argument("--rev", action="append",
                       help="experiments derived from this commit instead of HEAD; repeat it for several "
                            "commits (a run whose params repeat an earlier one's is counted once)")
    args = ap.parse_args(argv)
    if args.command == "queue":
        import yaml

        from .config import load_params

        base_seed, depth, base = 0, args.layers, None
        if Path("params.yaml").exists():
            params = load_params("params.yaml")
            base_seed, base = params.seed, yaml.safe_load(Path("params.yaml").read_text())
            needs_depth = any(key in o for n, ov in ABLATIONS.items() if not args.only or n in args.only
                              for o in ov for key in ("{layers}", "{half_layers}"))
            if depth is None and needs_depth:
                depth = decoder_layers(params)
        sweep = args.sweep if args.sweep is not None else (None if args.only else "prune.k=range(0,9,2)")
        for cmd in queue_commands(sweep or None, args.seeds, args.only, base_seed,
                                  depth // 2 if depth else None, base, say=lambda s: print(s, file=sys.stderr),
                                  layers=depth):
            print(" ".join(f"'{a}'" if any(c in a for c in "(),") else a for a in cmd))
            if not args.dry_run:
                subprocess.run(cmd, check=True)
        return
    rows = load_experiments(all_commits=args.all_commits, rev=args.rev,
                            say=lambda m: print(m, file=sys.stderr))
    if args.seeds:
        rows = only_seeds(rows, args.seeds)
    if not rows:
        sys.exit("no experiments with metrics/evaluate.json found (run `dvc exp run` first)"
                 + (f" with seed in {args.seeds}" if args.seeds else ""))
    if args.command == "table":
        if args.baseline and not args.by_seed:
            sys.exit("--baseline needs --by-seed (the comparison pairs experiments by seed)")
        if args.only and not args.by_seed:
            sys.exit("--only needs --by-seed (it selects groups of seeds)")
        if args.out and not args.baseline:
            sys.exit("--out needs --baseline (it writes the paired differences)")
        if args.by_seed:
            comparisons = None  # with --out, one bootstrap serves the table and the CSV
            if args.out:
                comparisons = compare_groups(select_groups(seed_groups(rows), args.only, args.baseline), args.baseline,
                                             resamples=args.resamples)
            print(seed_table(rows, relations=not args.no_relations, side=args.side, baseline=args.baseline,
                             resamples=args.resamples, only=args.only, comparisons=comparisons))
            if args.out:
                points = comparison_rows(rows, args.baseline, resamples=args.resamples, only=args.only,
                                         comparisons=comparisons)
                write_csv_rows(Path(args.out), points)
                print(f"wrote {len(points)} groups to {args.out}", file=sys.stderr)
        else:
            print(markdown_table(rows, relations=not args.no_relations, side=args.side))
    else:
        import yaml

        against = yaml.safe_load(args.against) if args.against is not None else None  # typed as DVC parses params
        points = sweep_rows(rows, args.param, against=against, resamples=args.resamples)
        if not points:
            sys.exit(f"no experiment sets {args.param}")
        write_csv_rows(Path(args.out), points)
        print(f"wrote {len(points)} points to {args.out}")


if __name__ == "__main__":
    main()
