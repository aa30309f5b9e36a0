"""Shared fixtures: a micro LLaVA backbone, a tiny synthetic KG and its encoded image tokens.

Everything is built once per session in a temporary directory (a few seconds on CPU). Loading the
backbone is cheap, so tests that mutate it (pruning, LoRA injection) load their own copy through
the `load_micro_backbone` / `make_workspace` factories; the session-scoped `micro_backbone` and
`micro_workspace` must be treated as read-only.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from unittest import mock

import pytest
import torch

from elmm.backbone import build_tiny_backbone, load_backbone
from elmm.config import TinyBackboneParams, from_dict
from elmm.kg.format import load_kg
from elmm.kg.synthetic import generate_synthetic
from elmm.vision import encode_kg_images, finalize_encoding
from elmm.workspace import open_workspace

MICRO = TinyBackboneParams(vocab_size=300, hidden=32, layers=3, heads=2, intermediate=64, vision_hidden=16,
                           vision_layers=1, vision_heads=2, image_size=16, patch_size=8)


@dataclasses.dataclass(frozen=True)
class MicroEnv:
    kg_dir: Path
    backbone_dir: Path
    encoded_dir: Path
    params: object  # elmm.config.Params

    def params_with(self, train: dict | None = None, **model) -> object:
        """A copy of the params with `model.<key>` overridden (mvtc is a dict of MVTCParams keys), and
        `train.<key>` with the keys of `train`."""
        raw = _raw_params()
        raw["train"] = dict(train or {})
        for key, value in model.items():
            if isinstance(value, dict):
                raw["model"].setdefault(key, {}).update(value)
            else:
                raw["model"][key] = value
        return from_dict(raw)


def _raw_params() -> dict:
    return {
        "seed": 0,
        "data": {"synthetic": {"entities": 20, "images_per_entity": 3, "image_size": 16}},
        "model": {
            "tiny": dataclasses.asdict(MICRO),
            "mvtc": {"enabled": True, "text_view": True, "image_view": True, "heads": 2},
            "head": "completion",
            "max_text_tokens": 8,
            "max_image_tokens": 256,
        },
    }


@pytest.fixture(scope="session")
def micro_env(tmp_path_factory) -> MicroEnv:
    root = tmp_path_factory.mktemp("micro")
    kg_dir, backbone_dir, encoded_dir = root / "kg", root / "backbone", root / "encoded"
    generate_synthetic(kg_dir, seed=0, entities=20, images_per_entity=3, image_size=16, progress=False)
    kg = load_kg(kg_dir)
    texts = (kg.entities["name"].tolist() + kg.entities["description"].tolist() + kg.relations["name"].tolist()
             + ["entity: , relation: inverse of answer:"])
    build_tiny_backbone(backbone_dir, MICRO, texts, seed=0)
    backbone = load_backbone(backbone_dir)
    result = encode_kg_images(kg, backbone, encoded_dir, feature_layer=-2, batch_size=16, shard_rows=4096,
                              metadata={"params_hash": "tests"}, num_workers=0)
    finalize_encoding(encoded_dir, result.shards)
    return MicroEnv(kg_dir, backbone_dir, encoded_dir, from_dict(_raw_params()))


@pytest.fixture(scope="session")
def load_micro_backbone(micro_env):
    """Factory: a fresh, independent copy of the micro backbone (safe to prune / inject LoRA into)."""
    return lambda: load_backbone(micro_env.backbone_dir)


@pytest.fixture(scope="session")
def micro_backbone(load_micro_backbone):
    """A shared micro backbone. Read-only: never prune it or inject adapters into it."""
    return load_micro_backbone()


@pytest.fixture(scope="session")
def make_workspace(micro_env):
    """Factory: a fresh Workspace (own backbone copy) over the tiny synthetic KG."""
    def make(params=None):
        return open_workspace(params or micro_env.params, micro_env.kg_dir, micro_env.backbone_dir,
                              micro_env.encoded_dir)
    return make


@pytest.fixture(scope="session")
def micro_workspace(make_workspace):
    """A shared Workspace. Read-only: its backbone must not be pruned or adapted."""
    return make_workspace()


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield


# ---- a micro pipeline project for the stage tests (test_training.py, test_predict.py) --------------
ROOT = Path(__file__).resolve().parents[1]


def deep_update(base: dict, new: dict) -> dict:
    """Merge `new` into `base` recursively (param overrides for the micro configs)."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


@pytest.fixture(scope="session")
def make_project(micro_env, tmp_path_factory):
    """Factory: a directory laid out like the repository after `dvc repro calibrate` (params.yaml
    with `overrides`, data/kg, data/backbone, data/encoded linked to the micro env, decoder layer 1
    pruned with a fixed W_c), in which the train/evaluate stage scripts run (see `run_stage`)."""
    import yaml

    from elmm.config import to_dict
    from elmm.pruning.artifact import PRUNING_FILE, save_pruning

    def make(overrides: dict | None = None) -> Path:
        root = tmp_path_factory.mktemp("project")
        raw = deep_update(to_dict(micro_env.params), overrides or {})
        (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        (root / "data" / "pruning").mkdir(parents=True)
        for name, target in (("kg", micro_env.kg_dir), ("backbone", micro_env.backbone_dir),
                             ("encoded", micro_env.encoded_dir)):
            (root / "data" / name).symlink_to(target, target_is_directory=True)
        w = torch.randn(MICRO.hidden, MICRO.hidden, generator=torch.Generator().manual_seed(1)) * 0.01
        save_pruning(root / "data" / "pruning" / PRUNING_FILE, [1], {1: w}, "ridge", "closed_form")
        return root

    return make


@pytest.fixture(scope="session")
def run_stage():
    """Factory: `run(name, project, **kwargs)` runs stages/<name>.py's main(**kwargs) in-process, cwd = project."""
    import contextlib
    import importlib.util
    import sys

    stages = ROOT / "stages"
    if str(stages) not in sys.path:
        sys.path.insert(0, str(stages))  # the stage scripts import their sibling _common

    def run(name: str, project: Path, **kwargs):
        spec = importlib.util.spec_from_file_location(f"elmm_stage_{name}", stages / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        # No heap trimmer in-process: each stage run would leave its polling thread behind in the test
        # process, trimming under tests that measure the heap (test_memory). `dvc repro` tests run it.
        with contextlib.chdir(project), mock.patch.dict(os.environ, {"ELMM_HEAP_TRIM": "0"}):
            return module.main(**kwargs)

    return run
