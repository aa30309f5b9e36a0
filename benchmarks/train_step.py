"""Where a training step's time goes: the real `train_model` loop on the pipeline's own data.

    python benchmarks/train_step.py                     # in a repository whose train stage's inputs exist
    python benchmarks/train_step.py --steps 60 --repo /tmp/elmm-scale-x/scale-3000

Run in (or `--repo` pointing to) a DVC repository where `dvc repro calibrate` has run: it reads
params.yaml, data/kg, data/encoded, data/backbone and data/pruning exactly as stages/train.py does,
builds the same model (LoRA included) and runs `elmm.training.train_model` without validation:

1. `--steps` optimizer steps timed with the profiler off (after `--warmup` steps): training
   queries/s over the whole call, and `steady_queries_per_s` over the steps alone (what an epoch
   of thousands of steps runs at), the figure issue 16's target is about;
2. `--profile-steps` steps under `torch.profiler`: the wall time of each phase `train_model`
   labels (negatives and filter mask, make_batch, forward, loss, backward, optimizer) and the top
   operators by self CPU time.

The code measured is the `elmm` that Python imports (the installed checkout). To compare it with
another version, `--against <that checkout's src>` (e.g. from `git archive COMMIT src`) runs both in
this one process, in alternating blocks of `--steps` steps: on the development container two
processes of the same code differed by up to 1.5x, far more than the changes measured. Prints one
JSON object.

    git archive 84ca5a5 src | tar -x -C /tmp/base
    python benchmarks/train_step.py --repo <repository> --against /tmp/base/src --rounds 10 --steps 30

`--losses` runs `train.loss: bce` (eq. 15, the target and its sampled negatives scored) against
`softmax` (every entity scored) on the same model in the same way, alternating blocks:

    python benchmarks/train_step.py --repo <repository> --losses --rounds 6 --steps 30

`--variants` does the same for param sets: each is params.yaml with the values given changed (as
`dvc exp run -S` changes them), its model built beside the others in this process; queries/s are
counted at each variant's own batch size, e.g. what a setting costs before spending runs on it:

    python benchmarks/train_step.py --rounds 4 --steps 25 --variants base 'b32:train.batch_size=32'

Under torchrun (`torchrun --standalone --nproc_per_node 2 benchmarks/train_step.py ...`) the loop
runs data-parallel as the train stage does (`train.batch_size` is the global batch, each rank a
slice of it, DDP over gloo on CPU); rank 0 prints, and the profile is skipped.
The step's phases that are not the model (negatives, filter masks, make_batch) are what a faster
data path can cut; forward, loss, backward and optimizer are the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PHASE_PREFIX = "step: "


def build(repo: Path, pkg: str = "elmm", overrides: dict | None = None):
    """(model, workspace, train queries, train filter, params) as stages/train.py builds them, with
    the package `pkg` (`elmm`, or the copy `--against` imports) and params.yaml's values changed by
    `overrides` (dotted key -> value, as `dvc exp run -S` takes them)."""
    def mod(name):
        return importlib.import_module(f"{pkg}.{name}")

    os.chdir(repo)
    config, queries_mod, model_io = mod("config"), mod("kg.queries"), mod("model_io")
    p = config.load_params("params.yaml")
    if overrides:
        p = mod("experiments").with_overrides(p, overrides)
    config.validate(p)
    ws = mod("workspace").open_workspace(p)
    model = model_io.build_model(ws, f"data/pruning/{mod('pruning.artifact').PRUNING_FILE}", seed=p.seed)
    model_io.add_lora(model, model_io.lora_config(p.train.lora.r, p.train.lora.alpha, p.train.lora.dropout))
    model_io.set_trainable(model)
    kg = ws.kg
    return (model, ws, queries_mod.queries_from_triples(kg.triples["train"]),
            queries_mod.FilterIndex(kg.triples["train"], kg.num_entities), p)


def import_as(src: Path, alias: str) -> None:
    """Import the `elmm` package under `src` as `alias`, beside the `elmm` already imported: a copy
    with its absolute `elmm` imports renamed (the package's own modules use relative ones)."""
    root = Path(tempfile.mkdtemp(prefix="elmm-against-"))
    shutil.copytree(src / "elmm", root / alias, ignore=shutil.ignore_patterns("__pycache__"))
    for f in (root / alias).rglob("*.py"):
        f.write_text(re.sub(r"\b(from|import) elmm\b", rf"\1 {alias}", f.read_text()))
    sys.path.insert(0, str(root))
    importlib.import_module(alias)


def run(model, ws, queries, filters, p, steps: int, dist=None, pkg: str = "elmm") -> tuple[float, list[float]]:
    """Seconds for `steps` optimizer steps of train_model (no validation, no checkpoints), and the
    seconds of each step after the first (between the ends of consecutive steps)."""
    train_model = importlib.import_module(f"{pkg}.training").train_model

    tp = dataclasses.replace(p.train, max_steps=steps, epochs=max(p.train.epochs, 1000), patience=0,
                             checkpoint_every=0)
    ends = []

    def log(name, value, step):
        if name == "train/loss":  # emitted once per step, right after it
            ends.append(time.perf_counter())

    start = time.perf_counter()
    train_model(model, ws, queries, filters, tp, seed=p.seed, log=log, progress=False, dist=dist)
    return time.perf_counter() - start, [b - a for a, b in zip(ends, ends[1:])]


def steady(step_seconds: list[float], batch: int) -> dict:
    """Throughput of the steps themselves: what an epoch of thousands of steps runs at, without the
    set-up train_model does once per call (optimizer, the epoch's order) that `seconds` includes."""
    if not step_seconds:
        return {}
    return {"steady_queries_per_s": round(len(step_seconds) * batch / sum(step_seconds), 1),
            "median_step_ms": round(1e3 * statistics.median(step_seconds), 2)}


def alternate(runs: dict, args, batch: dict[str, int]) -> dict[str, list[float]]:
    """Steady queries/s per round of each of `runs` (name -> a callable of `steps` that returns what
    `run` returns) at `batch[name]` queries a step: --warmup steps of each, then
    --rounds rounds of --steps steps of each in alternating order, all in this one process."""
    for go in runs.values():
        go(args.warmup)
    rates = {name: [] for name in runs}
    for r in range(args.rounds):
        for name in (runs if r % 2 == 0 else reversed(runs)):
            _, step_seconds = runs[name](args.steps)
            rates[name].append(steady(step_seconds, batch[name])["steady_queries_per_s"])
    return rates


def compare(args) -> dict:
    """This checkout against `args.against` in one process: a process's own speed varies (up to 1.5x
    between two processes of the same code on the development container), so the versions share one.
    Each round runs --steps steps of each, in alternating order; steady queries/s per round."""
    import_as(args.against.resolve(), "elmm_against")
    versions = {"this": "elmm", "against": "elmm_against"}
    built = {name: build(args.repo, pkg) for name, pkg in versions.items()}
    batch = built["this"][4].train.batch_size * built["this"][4].train.grad_accum
    rates = alternate({name: (lambda steps, name=name: run(*built[name], steps, pkg=versions[name]))
                       for name in versions}, args, dict.fromkeys(versions, batch))
    ratios = [a / b for a, b in zip(rates["this"], rates["against"])]
    return {
        "entities": built["this"][1].kg.num_entities, "batch_size": batch, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "against": str(args.against), "rounds": args.rounds, "steps": args.steps,
        "steady_queries_per_s": rates,
        "mean_queries_per_s": {name: round(statistics.mean(v), 1) for name, v in rates.items()},
        "ratio_of_means": round(statistics.mean(rates["this"]) / statistics.mean(rates["against"]), 3),
        "ratio_per_round": [round(x, 3) for x in ratios],
    }


def compare_losses(args) -> dict:
    """`train.loss` bce against softmax on one model in this one process, alternating blocks of
    --steps steps (the same reason as `compare`): steady queries/s per round and their ratio."""
    from elmm.config import validate

    model, ws, queries, filters, p = build(args.repo)
    variants = {loss: dataclasses.replace(p, train=dataclasses.replace(p.train, loss=loss)) for loss in ("bce", "softmax")}
    for v in variants.values():
        validate(v)  # e.g. softmax with hard negatives: refused, as train refuses it
    batch = p.train.batch_size * p.train.grad_accum
    rates = alternate({loss: (lambda steps, v=v: run(model, ws, queries, filters, v, steps))
                       for loss, v in variants.items()}, args, dict.fromkeys(variants, batch))
    return {
        "entities": ws.kg.num_entities, "batch_size": batch, "negatives": p.train.negatives,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "rounds": args.rounds, "steps": args.steps,
        "steady_queries_per_s": rates,
        "mean_queries_per_s": {loss: round(statistics.mean(v), 1) for loss, v in rates.items()},
        "softmax_over_bce": round(statistics.mean(rates["softmax"]) / statistics.mean(rates["bce"]), 3),
    }


def parse_variant(text: str) -> tuple[str, dict]:
    """'NAME:key=value,key=value' (values read as YAML: 64, 0.0, true) -> (NAME, overrides);
    'NAME' alone is params.yaml as it is."""
    import yaml

    name, _, rest = text.partition(":")
    if "=" in name:
        raise SystemExit(f"--variants {text!r}: give it a name first, NAME:key=value")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--variants {text!r}: {item!r} is not key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, overrides


def parse_variants(texts: list[str]) -> dict[str, dict]:
    """`parse_variant` of each, as NAME -> overrides; a repeated name is refused."""
    parsed = [parse_variant(v) for v in texts]
    variants = dict(parsed)
    if len(variants) != len(parsed):
        raise SystemExit("--variants: two variants have the same name")
    return variants


def compare_variants(args) -> dict:
    """Param sets (`--variants`) side by side in this one process, alternating blocks of --steps
    steps (the same reason as `compare`). Queries/s per round, counted at each variant's own batch
    size, and each variant's mean over the first one's."""
    variants = parse_variants(args.variants)
    built = {name: build(args.repo, overrides=o) for name, o in variants.items()}
    batch = {name: b[4].train.batch_size * b[4].train.grad_accum for name, b in built.items()}
    rates = alternate({name: (lambda steps, name=name: run(*built[name], steps)) for name in variants}, args, batch)
    means = {name: statistics.mean(v) for name, v in rates.items()}
    first = next(iter(means.values()))
    return {
        "entities": built[next(iter(built))][1].kg.num_entities, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "rounds": args.rounds, "steps": args.steps, "variants": variants, "batch_size": batch,
        "steady_queries_per_s": rates, "mean_queries_per_s": {k: round(v, 1) for k, v in means.items()},
        "over_first": {k: round(v / first, 3) for k, v in means.items()},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", type=Path, default=Path.cwd(), help="repository with the train stage's inputs")
    ap.add_argument("--steps", type=int, default=40, help="timed steps (profiler off)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--profile-steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=15, help="operators listed by self CPU time")
    ap.add_argument("--against", type=Path, metavar="SRC",
                    help="another checkout's src/ (e.g. `git archive COMMIT src`): both versions in this one "
                         "process, alternating blocks of --steps steps, instead of the profile")
    ap.add_argument("--rounds", type=int, default=6, help="alternating blocks per version (with --against / --losses)")
    ap.add_argument("--losses", action="store_true",
                    help="train.loss bce against softmax on the same model, alternating blocks, instead of the profile")
    ap.add_argument("--variants", nargs="+", metavar="NAME:KEY=VALUE,...",
                    help="param sets (params.yaml changed as `dvc exp run -S` would) side by side in this one process, "
                         "alternating blocks, instead of the profile; e.g. base 'b32:train.batch_size=32'")
    args = ap.parse_args(argv)
    if args.variants:
        print(json.dumps(compare_variants(args), indent=1))
        return
    if args.against:
        print(json.dumps(compare(args), indent=1))
        return
    if args.losses:
        print(json.dumps(compare_losses(args), indent=1))
        return

    from elmm.distributed import init_distributed, shutdown_distributed

    dist, _ = init_distributed(torch.device("cpu"))
    model, ws, queries, filters, p = build(args.repo)
    run(model, ws, queries, filters, p, args.warmup, dist)
    seconds, step_seconds = run(model, ws, queries, filters, p, args.steps, dist)
    batch = p.train.batch_size * p.train.grad_accum
    if dist.enabled:
        shutdown_distributed(dist)
        if dist.main:
            print(json.dumps({
                "entities": ws.kg.num_entities, "train_queries": len(queries), "batch_size": batch,
                "world_size": dist.world, "threads_per_rank": torch.get_num_threads(), "torch": torch.__version__,
                "steps": args.steps, "seconds": round(seconds, 3), "steps_per_s": round(args.steps / seconds, 2),
                "queries_per_s": round(args.steps * batch / seconds, 1), **steady(step_seconds, batch)}, indent=1))
        return

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled, _ = run(model, ws, queries, filters, p, args.profile_steps)
    events = prof.key_averages()
    phases = {e.key.removeprefix(PHASE_PREFIX): e.cpu_time_total / 1e6 for e in events if e.key.startswith(PHASE_PREFIX)}
    labelled = sum(phases.values())
    model_phases = ("forward", "loss", "backward", "optimizer")
    ops = sorted((e for e in events if not e.key.startswith(PHASE_PREFIX)), key=lambda e: e.self_cpu_time_total,
                 reverse=True)[: args.top]
    print(json.dumps({
        "entities": ws.kg.num_entities, "train_queries": len(queries), "batch_size": batch,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
        "steps": args.steps, "seconds": round(seconds, 3), "steps_per_s": round(args.steps / seconds, 2),
        "queries_per_s": round(args.steps * batch / seconds, 1), **steady(step_seconds, batch),
        "profile": {
            "steps": args.profile_steps, "seconds": round(profiled, 3),
            "phase_seconds_per_step": {k: round(v / args.profile_steps, 4) for k, v in phases.items()},
            "phase_share": {k: round(v / profiled, 3) for k, v in phases.items()},
            "not_the_model_share": round(sum(v for k, v in phases.items() if k not in model_phases) / profiled, 3),
            "unlabelled_share": round(1 - labelled / profiled, 3),
            "top_ops_self_cpu_ms_per_step": {e.key: round(e.self_cpu_time_total / 1e3 / args.profile_steps, 2)
                                             for e in ops},
        },
    }, indent=1))


if __name__ == "__main__":
    main()
