"""Where a training step's time goes: the real `train_model` loop on the pipeline's own data.

    python benchmarks/train_step.py                     # in a repository whose train stage's inputs exist
    python benchmarks/train_step.py --steps 60 --repo /tmp/elmm-scale-x/scale-3000

Run in (or `--repo` pointing to) a DVC repository where `dvc repro calibrate` has run: it reads
params.yaml, data/kg, data/encoded, data/backbone and data/pruning exactly as stages/train.py does,
builds the same model (LoRA included) and runs `elmm.training.train_model` without validation:

1. `--steps` optimizer steps timed with the profiler off (after `--warmup` steps): training
   queries/s, the figure issue 16's target is about;
2. `--profile-steps` steps under `torch.profiler`: the wall time of each phase `train_model`
   labels (negatives and filter mask, make_batch, forward, loss, backward, optimizer) and the top
   operators by self CPU time.

The code measured is the `elmm` that Python imports (the installed checkout); to compare two
versions side by side, run each with `PYTHONPATH=<its checkout>/src`. Prints one JSON object.

Under torchrun (`torchrun --standalone --nproc_per_node 2 benchmarks/train_step.py ...`) the loop
runs data-parallel as the train stage does (`train.batch_size` is the global batch, each rank a
slice of it, DDP over gloo on CPU); rank 0 prints, and the profile is skipped.
The step's phases that are not the model (negatives, filter masks, make_batch) are what a faster
data path can cut; forward, loss, backward and optimizer are the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch

PHASE_PREFIX = "step: "


def build(repo: Path):
    """(model, workspace, train queries, train filter, params) as stages/train.py builds them."""
    from elmm.config import load_params, validate
    from elmm.kg.queries import FilterIndex, queries_from_triples
    from elmm.model_io import add_lora, build_model, lora_config, set_trainable
    from elmm.pruning.artifact import PRUNING_FILE
    from elmm.workspace import open_workspace

    os.chdir(repo)
    p = load_params("params.yaml")
    validate(p)
    ws = open_workspace(p)
    model = build_model(ws, f"data/pruning/{PRUNING_FILE}", seed=p.seed)
    add_lora(model, lora_config(p.train.lora.r, p.train.lora.alpha, p.train.lora.dropout))
    set_trainable(model)
    kg = ws.kg
    return model, ws, queries_from_triples(kg.triples["train"]), FilterIndex(kg.triples["train"], kg.num_entities), p


def run(model, ws, queries, filters, p, steps: int, dist=None) -> float:
    """Seconds for `steps` optimizer steps of train_model (no validation, no checkpoints)."""
    from elmm.training import train_model

    tp = dataclasses.replace(p.train, max_steps=steps, epochs=max(p.train.epochs, 1000), patience=0,
                             checkpoint_every=0)
    start = time.perf_counter()
    train_model(model, ws, queries, filters, tp, seed=p.seed, progress=False, dist=dist)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", type=Path, default=Path.cwd(), help="repository with the train stage's inputs")
    ap.add_argument("--steps", type=int, default=40, help="timed steps (profiler off)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--profile-steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=15, help="operators listed by self CPU time")
    args = ap.parse_args(argv)

    from elmm.distributed import init_distributed, shutdown_distributed

    dist, _ = init_distributed(torch.device("cpu"))
    model, ws, queries, filters, p = build(args.repo)
    run(model, ws, queries, filters, p, args.warmup, dist)
    seconds = run(model, ws, queries, filters, p, args.steps, dist)
    batch = p.train.batch_size * p.train.grad_accum
    if dist.enabled:
        shutdown_distributed(dist)
        if dist.main:
            print(json.dumps({
                "entities": ws.kg.num_entities, "train_queries": len(queries), "batch_size": batch,
                "world_size": dist.world, "threads_per_rank": torch.get_num_threads(), "torch": torch.__version__,
                "steps": args.steps, "seconds": round(seconds, 3), "steps_per_s": round(args.steps / seconds, 2),
                "queries_per_s": round(args.steps * batch / seconds, 1)}, indent=1))
        return

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled = run(model, ws, queries, filters, p, args.profile_steps)
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
        "queries_per_s": round(args.steps * batch / seconds, 1),
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
