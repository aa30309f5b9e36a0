"""The real pipeline, end to end, on a micro config in a temporary git + DVC repository.

Runs `dvc repro`, checks dvc.lock and the metrics files, that a second `dvc repro` runs nothing,
that changing a param reruns exactly the stages that read it, and that `dvc exp run -S` records
an experiment `dvc exp show` lists.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import deep_update

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["download", "baselines", "pretrain", "encode", "similarity", "calibrate", "train", "evaluate"]

MICRO = {
    "data": {"synthetic": {"entities": 24, "images_per_entity": 3, "image_size": 16, "corrupt_images": 1,
                           "communities": 3, "teams": 3}},
    "model": {"tiny": {"vocab_size": 300, "hidden": 32, "layers": 4, "heads": 2, "intermediate": 64,
                       "vision_hidden": 16, "vision_layers": 1, "vision_heads": 2, "image_size": 16, "patch_size": 8},
              "mvtc": {"heads": 2}},
    "pretrain": {"steps": 6, "batch_size": 4, "warmup_steps": 2, "pictures": 16, "heldout_pictures": 4},
    "encode": {"batch_size": 16, "shard_rows": 32},
    "prune": {"k": 2, "samples": 24, "batch_size": 8},
    "train": {"lr": 3e-4, "epochs": 1, "batch_size": 16, "negatives": 4, "warmup_steps": 1},
    "evaluate": {"batch_size": 32},
    # RotatE where PyKEEN is installed (the `kge` extra), tiny and quick
    "baselines": {"kge": "rotate" if importlib.util.find_spec("pykeen") else "none", "dim": 8, "max_epochs": 2,
                  "eval_every": 1, "negatives": 4},
}


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([a-z]+)'", output)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline")
    for name in ("dvc.yaml", "stages", "src", "pyproject.toml"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, path / name)
    for cache in path.rglob("__pycache__"):
        shutil.rmtree(cache)
    params = deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), MICRO)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    home = tmp_path_factory.mktemp("home")
    env = {
        **os.environ,
        "HOME": str(home),
        "DVC_GLOBAL_CONFIG_DIR": str(home / "dvc-global"),
        "DVC_SITE_CACHE_DIR": str(home / "dvc-site"),
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
        # no PYTHONPATH: the stages must import the copied library by themselves (stages/_common.py)
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
    }
    dvc = [sys.executable, "-m", "dvc"]
    run(["git", "init", "-q", "-b", "main"], path, env)
    run(dvc + ["init", "-q"], path, env)
    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-qm", "micro pipeline"], path, env)
    first = run(dvc + ["repro"], path, env)
    return path, env, dvc, first


def test_stages_import_the_library_of_their_own_checkout(tmp_path):
    """A copy of the repository (what `dvc exp run --queue` runs in) uses its own src/, even with
    the package installed in editable mode from elsewhere."""
    (tmp_path / "stages").mkdir()
    shutil.copy(ROOT / "stages" / "_common.py", tmp_path / "stages")
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    probe = "import _common, elmm.config; print(elmm.config.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path / "stages", capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, check=True).stdout
    assert Path(out.strip()).resolve() == (tmp_path / "src" / "elmm" / "config.py").resolve()


@pytest.mark.integration
def test_repro_runs_every_stage_and_locks_them(repo):
    path, env, dvc, first = repo
    assert stages_run(first) == STAGES
    lock = yaml.safe_load((path / "dvc.lock").read_text())
    assert sorted(lock["stages"]) == sorted(STAGES)
    for name in STAGES:
        entry = lock["stages"][name]
        assert entry["deps"], name
        assert "params" in entry, f"{name} declares no params"
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["lr"] == pytest.approx(3e-4)


@pytest.mark.integration
def test_metrics_files_have_the_documented_keys(repo):
    path, *_ = repo
    ev = json.loads((path / "metrics/evaluate.json").read_text())
    for key in ("mr", "mrr", "hits_at_1", "hits_at_3", "hits_at_10", "head", "tail", "per_relation", "candidates",
                "amr", "mrr_optimistic", "mrr_pessimistic", "efficiency"):
        assert key in ev, key
    assert 0 < ev["mrr"] <= 1 and 1 <= ev["mr"] <= ev["candidates"]
    assert ev["efficiency"]["image_tokens_per_query"] == 4  # 2 views x 2 heads
    data = json.loads((path / "metrics/data.json").read_text())
    assert data["entities"] == ev["candidates"]
    assert set(data["entities_by_images"]) == {"0", "1-9", "10+"}
    enc = json.loads((path / "metrics/encode.json").read_text())
    assert enc["skipped"] == 1 and enc["encoded"] == enc["images"] - 1  # the deliberately corrupt image
    pre = json.loads((path / "metrics/pretrain.json").read_text())
    assert pre["pretrained_here"] and pre["steps"] == 6
    for weights in ("pretrained", "random_init"):
        assert set(pre[weights]["caption_accuracy"]) == {"size", "colour", "shape", "mark", "backdrop"}
        assert len(pre[weights]["rise_without_layer_attention"]) == 4
    sim = json.loads((path / "metrics/similarity.json").read_text())
    assert sorted(sim["ranking"]) == [0, 1, 2, 3] and sim["ranked_by"] == "residual"
    for curves in (sim["backbone"], sim["random_init"]):
        assert len(curves["residual"]) == len(curves["attention"]) == 4
    assert sim["ranking"] == sorted(range(4), key=lambda i: (-sim["backbone"]["residual"][i], i))
    assert sim["random_init"]["residual"] != sim["backbone"]["residual"]
    header = (path / "metrics/plots/similarity.csv").read_text().splitlines()[0]
    assert header == "layer,residual,attention,residual_random_init,attention_random_init"
    cal = json.loads((path / "metrics/calibrate.json").read_text())
    assert cal["layers"] == sorted(sim["ranking"][:2])
    assert {"ridge", "paper"} <= set(cal["total"])
    train = json.loads((path / "metrics/train/metrics.json").read_text())
    assert "train" in train and "valid" in train
    base = json.loads((path / "metrics/baselines.json").read_text())
    assert base["queries"] == ev["queries"] and {"prior", "ceiling", "kge", "seconds"} <= set(base)
    for name, sides in base["prior"]["per_relation"].items():
        assert base["ceiling"]["per_relation"][name].keys() == sides.keys()
    assert (path / "metrics/ranks/prior.csv").read_text().startswith("query,relation,direction,anchor,target,rank,")


@pytest.mark.integration
def test_second_repro_is_up_to_date_and_params_rerun_exact_stages(repo):
    path, env, dvc, _ = repo
    assert stages_run(run(dvc + ["repro"], path, env)) == []
    params_file = path / "params.yaml"
    original = params_file.read_text()
    try:
        params = yaml.safe_load(original)
        params["train"]["lr"] = 1e-3
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        assert stages_run(run(dvc + ["repro"], path, env)) == ["train", "evaluate"]
        params["train"]["lr"] = 3e-4
        params["prune"]["k"] = 1
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        assert stages_run(run(dvc + ["repro"], path, env)) == ["calibrate", "train", "evaluate"]
    finally:
        params_file.write_text(original)
    # Back to the original params: DVC's run cache restores those outputs without running anything.
    assert stages_run(run(dvc + ["repro"], path, env)) == []
    assert stages_run(run(dvc + ["repro", "--dry"], path, env)) == []


@pytest.mark.integration
def test_exp_run_with_override_is_listed_by_exp_show(repo):
    path, env, dvc, _ = repo
    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-qm", "baseline results"], path, env)
    out = run(dvc + ["exp", "run", "-S", "train.lr=2e-3"], path, env)  # a value not in the run cache
    assert stages_run(out) == ["train", "evaluate"]
    show = run(dvc + ["exp", "show", "--json"], path, env)
    text = json.dumps(json.loads(show))
    assert '"lr": 0.002' in text and "hits_at_10" in text
    # Every experiment commit carries its per-query ranks, readable with `git show`.
    from elmm.experiments import load_experiments

    rows = {r["params"]["train"]["lr"]: r for r in load_experiments(show[show.index("["):])}
    exp_ranks = run(["git", "show", f"{rows[0.002]['rev']}:metrics/ranks/model.csv"], path, env)
    base_ranks = run(["git", "show", f"{rows[3e-4]['rev']}:metrics/ranks/model.csv"], path, env)
    header = "query,relation,direction,anchor,target,rank,optimistic,pessimistic"
    assert exp_ranks.splitlines()[0] == base_ranks.splitlines()[0] == header
    assert [r.split(",")[:5] for r in exp_ranks.splitlines()] == [r.split(",")[:5] for r in base_ranks.splitlines()]
    # ... which the paired comparison reads (same seed: the same test queries).
    table = run([sys.executable, "-m", "elmm.experiments", "table", "--by-seed", "--baseline", rows[3e-4]["name"],
                 "--resamples", "200", "--no-relations"], path, {**env, "PYTHONPATH": str(path / "src")})
    line = next(ln for ln in table.splitlines() if "train.lr=0.002" in ln)
    assert re.search(r"\| [+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\] \|", line), table


@pytest.mark.integration
def test_bad_param_fails_naming_the_key(repo):
    path, env, *_ = repo
    params_file = path / "params.yaml"
    original = params_file.read_text()
    try:
        params = yaml.safe_load(original)
        params["prune"]["k"] = 9  # more than the 4 decoder layers
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        proc = subprocess.run([sys.executable, "stages/calibrate.py"], cwd=path, env=env, capture_output=True, text=True)
        assert proc.returncode != 0
        assert "error: params.yaml: prune.k: 9 is larger than the backbone's 4 decoder layers" in proc.stderr
    finally:
        params_file.write_text(original)


@pytest.mark.integration
def test_similarity_and_calibrate_ignore_the_knowledge_path(repo):
    """dvc.yaml gives `similarity` and `calibrate` no model.knowledge params: with the path on they
    must measure and fit exactly what they do with it off (both build the model without it, the
    random-init control included). Run directly, so DVC's run cache cannot stand in for them."""
    path, env, *_ = repo
    params_file = path / "params.yaml"
    original = params_file.read_text()
    outs = ["data/pruning/similarity.json", "metrics/similarity.json", "metrics/calibrate.json"]
    before = {o: (path / o).read_bytes() for o in outs}
    try:
        params = yaml.safe_load(original)
        params["model"]["knowledge"]["enabled"] = True
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        for stage in ("similarity", "calibrate"):
            run([sys.executable, f"stages/{stage}.py"], path, env)
    finally:
        params_file.write_text(original)
    for o in outs:
        assert (path / o).read_bytes() == before[o], o
