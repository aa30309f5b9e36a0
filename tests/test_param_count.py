"""elmm.param_count: parameters per component from shapes alone equal those of a real model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from elmm.model import ELMM, ELMMConfig
from elmm.model_io import add_lora, lora_config, set_trainable
from elmm.param_count import model_parameters, parameter_report
from elmm.pruning.layers import prune_layers

ROOT = Path(__file__).resolve().parents[1]


def _numel(params) -> int:
    return sum(p.numel() for p in params)


@pytest.mark.parametrize(("value", "head", "compensation", "pruned", "entity_token"), [
    ("per_head", "completion", "ridge", [1], "none"),
    ("shared", "completion", "none", [0, 2], "free"),
    ("shared", "completion", "none", [1], "relational"),
    ("per_head", "lm_head", "none", [1], "complex"),
    ("low_rank", "lm_head", "ridge", [], "none"),
    ("per_head", "completion", "ridge", [0, 1, 2], "none"),  # every layer pruned: no LoRA
])
def test_report_from_shapes_equals_the_real_model(make_workspace, value, head, compensation, pruned,
                                                   entity_token) -> None:
    """For a micro model with LoRA, pruned layers and compensation: the shape-only report equals
    `sum(p.numel())` of each component's parameters, part by part, and in total."""
    ws = make_workspace()
    d = ws.backbone.hidden_size
    prune_layers(ws.backbone.layers, {i: None if compensation == "none" else torch.zeros(d, d) for i in pruned})
    config = ELMMConfig(num_entities=ws.kg.num_entities, heads=2, head=head, pruned_layers=pruned,
                        compensation=compensation, value=value, value_rank=3, entity_token=entity_token,
                        num_relations=ws.kg.num_relations if entity_token in ("relational", "complex") else 0)
    model = ELMM(ws.backbone, config)
    lora = add_lora(model, lora_config(4, 8, 0.0))
    trainable, total = set_trainable(model)
    report = parameter_report(ws.backbone.model.config, config, 4 if lora else None)

    named = dict(model.named_parameters())
    expected = {
        "lora": _numel(p for n, p in named.items() if "lora_" in n),
        "compensation": _numel(p for n, p in named.items() if n.endswith(".compensation")),
    }
    for view in ("text_view", "image_view"):
        module = getattr(model, view)
        expected[f"mvtc_{view[:-5]}"] = _numel(module.parameters())
        parts = report["components"][f"mvtc_{view[:-5]}"]
        assert parts["query"] == module.q.weight.numel() and parts["key"] == module.k.weight.numel()
        assert parts["query_norm"] == _numel(module.query_norm.parameters())
        assert parts["token_norm"] == _numel(module.token_norm.parameters())
        assert parts["value"] == _numel(p for n, p in module.named_parameters() if n in ("v", "value_u", "value_v"))
    if head == "completion":
        expected["completion"] = _numel(model.completion.parameters())
        assert report["components"]["completion"]["proj"] == _numel(model.completion.proj.parameters())
    else:
        expected["entity_embedding"] = _numel(model.entity_embedding.parameters())
    if entity_token != "none":
        expected["entity_tokens"] = model.entity_tokens.numel() + _numel(
            [model.relation_scales] if model.relation_scales is not None else [])
    expected["backbone_frozen"] = _numel(p for n, p in named.items() if n.startswith("llm.") and "lora_" not in n
                                        and not n.endswith(".compensation"))
    got = {c: v["total"] for c, v in report["components"].items()}
    assert got == {c: n for c, n in expected.items() if n}
    assert report["components"]["backbone_frozen"]["vision_tower"] == _numel(ws.backbone.vision_tower.parameters())
    assert (report["trainable"], report["total"]) == (trainable, total)
    # The counter of a real model (what the train stage logs) agrees part by part.
    assert model_parameters(model) == {k: report[k] for k in ("components", "trainable", "frozen", "total")}


def test_tiny_shape_matches_the_locked_run() -> None:
    """The tiny default's trainable count equals what the committed training run logged."""
    from elmm.param_count import shape

    logged = yaml.safe_load((ROOT / "metrics/train/params.yaml").read_text())["trainable_parameters"]
    assert parameter_report(*shape("tiny"))["trainable"] == logged
    assert json.loads((ROOT / "metrics/data.json").read_text())["entities"] == shape("tiny")[1].num_entities


def test_cli_prints_the_llava_shape_without_weights(tmp_path) -> None:
    """LLaVA-1.5-7B's shape: 7.06B backbone parameters (the released checkpoint's count), 32 x 4096^2 per
    MVTC view with per-head values, 2 x 32 x 4096 x 8 with low_rank r=8; nothing is written."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-m", "elmm.param_count", "--shape", "llava-1.5-7b", "--value", "low_rank"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=True, timeout=300).stdout
    r = json.loads(out)
    c = r["components"]
    pruned_attention = 16 * (4 * 4096 * 4096 + 4096)  # q, k, v, o projections and the input norm
    assert c["backbone_frozen"]["total"] + pruned_attention == 7_063_427_072
    assert r["mvtc_value_per_view"] == {"per_head": 32 * 4096**2, "shared": 4096**2, "low_rank": 2 * 32 * 4096 * 8}
    assert c["mvtc_text"]["value"] == 2 * 32 * 4096 * 8
    assert c["lora"]["total"] == 16 * 2 * 8 * (4096 + 4096)  # 16 layers keep attention; q_proj and v_proj
    assert c["compensation"]["total"] == 16 * 4096**2
    assert c["completion"]["entities"] == 3 * 4096 * 14541 + 14541
    assert list(tmp_path.iterdir()) == []
