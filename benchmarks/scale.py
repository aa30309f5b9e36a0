"""How each stage's cost grows with the KG: wall time, peak RSS and DVC's own overhead per stage.

    python benchmarks/scale.py                          # worlds of 300, 3,000 and 14,541 entities
    python benchmarks/scale.py --entities 300 3000 --set train.max_steps=100

For each size the script copies the repository's tracked files (the working tree's versions) into
a fresh git + DVC repository in a temp dir, sets `data.synthetic.entities` (and any `--set`
overrides), then runs every stage alone with `dvc repro -s <stage>` under `/usr/bin/time`. It
prints one JSON object per stage and size:

- `wall_s`: the whole `dvc repro -s` command; `stage_s`: the stage script alone (DVC's `cmd` run
  under its own `/usr/bin/time`); `dvc_overhead_s`: the difference (hashing deps and outputs,
  caching, lock file);
- `dvc_status_s`: a `dvc status` of the finished stage (what every later stage pays to check it);
- `peak_rss_mb`: the stage script's peak resident memory;
- throughput where the stage has one: images/s (download, encode), train queries/s, test
  queries/s (evaluate), each over the stage's whole wall time (model loading included).

Training is shortened by default (`train.max_steps=200`, no early stopping), and so are pretraining
(`pretrain.steps=100`) and the RotatE baseline (`baselines.max_epochs=5`): their per-step cost does
not depend on the KG's size, and the benchmark is about what does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("download", "baselines", "pretrain", "encode", "similarity", "calibrate", "train", "evaluate")
DEFAULT_SETS = ("pretrain.steps=100", "baselines.max_epochs=5", "train.max_steps=200", "train.patience=0",
                "train.checkpoint_every=0")
TIMED = "/usr/bin/time -f 'STAGE_TIME %e %M' "  # wall seconds, peak RSS in KiB


def _set(params: dict, dotted: str) -> None:
    key, _, value = dotted.partition("=")
    *path, last = key.split(".")
    node = params
    for part in path:
        node = node.setdefault(part, {})
    node[last] = yaml.safe_load(value)


def make_repo(where: Path, entities: int, sets: list[str]) -> Path:
    repo = where / f"scale-{entities}"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if name.startswith(("metrics/", "dvc.lock")) or not (ROOT / name).is_file():
            continue  # start from nothing computed
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for dotted in [f"data.synthetic.entities={entities}", *sets]:
        _set(params, dotted)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # Time the stage script itself: prefix every stage's cmd with /usr/bin/time.
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    for stage in dvc_yaml["stages"].values():
        stage["cmd"] = TIMED + stage["cmd"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "scale"]):
        subprocess.run(cmd, cwd=repo, check=True)
    return repo


def _rate(name: str, repo: Path, wall: float) -> dict:
    def read(path: str) -> dict:
        p = repo / path
        return json.loads(p.read_text()) if p.exists() else {}

    if name in ("download", "encode"):
        images = read("metrics/data.json").get("images", 0)
        return {"images": images, "images_per_s": round(images / wall, 1)}
    if name == "train":
        steps = read("metrics/train/metrics.json").get("steps", 0)
        batch = yaml.safe_load((repo / "params.yaml").read_text())["train"]["batch_size"]
        return {"train_queries": steps * batch, "train_queries_per_s": round(steps * batch / wall, 1)}
    if name == "evaluate":
        queries = read("metrics/evaluate.json").get("queries", 0)
        return {"test_queries": queries, "test_queries_per_s": round(queries / wall, 1)}
    return {}


def run_stage(repo: Path, name: str, env: dict) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(["dvc", "repro", "-s", name], cwd=repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"scale: stage {name} failed in {repo}")
    found = re.findall(r"STAGE_TIME ([\d.]+) (\d+)", proc.stdout + proc.stderr)
    stage_s, rss_kib = (float(found[-1][0]), int(found[-1][1])) if found else (float("nan"), 0)
    start = time.perf_counter()
    subprocess.run(["dvc", "status", name], cwd=repo, env=env, check=True, capture_output=True)
    status = time.perf_counter() - start
    return {"stage": name, "wall_s": round(wall, 1), "stage_s": stage_s, "dvc_overhead_s": round(wall - stage_s, 1),
            "dvc_status_s": round(status, 1), "peak_rss_mb": round(rss_kib / 1024), **_rate(name, repo, stage_s)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entities", type=int, nargs="+", default=[300, 3000, 14541])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help=f"params.yaml override (repeatable; defaults: {' '.join(DEFAULT_SETS)})")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--keep", action="store_true", help="keep the temp repositories")
    ap.add_argument("--repo", type=Path, help="go on in a repository an earlier --keep run left (its params stand; "
                                              "--entities and --set are ignored), e.g. to run later --stages")
    args = ap.parse_args(argv)
    sets = [*DEFAULT_SETS, *args.set]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    if args.repo:
        entities = yaml.safe_load((args.repo / "params.yaml").read_text())["data"]["synthetic"]["entities"]
        for name in args.stages:
            print(json.dumps({"entities": entities, **run_stage(args.repo.resolve(), name, env)}), flush=True)
        return
    where = Path(tempfile.mkdtemp(prefix="elmm-scale-"))
    print(f"scale: repositories under {where}", file=sys.stderr)
    try:
        for entities in args.entities:
            repo = make_repo(where, entities, sets)
            for name in args.stages:
                print(json.dumps({"entities": entities, **run_stage(repo, name, env)}), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    main()
