"""The model built from pipeline artefacts, the trainable split, and the trained model on disk
(ELMM components in safetensors, the LoRA adapter in peft's layout)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from elmm.backbone import load_backbone
from elmm.batches import forward_batch, make_batch
from elmm.model import ELMM, ELMMConfig, elmm_loss
from elmm.model_io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    MaskDropout,
    add_lora,
    install_pruning,
    load_trained,
    lora_config,
    save_lora_config,
    save_trained,
    set_trainable,
)
from elmm.pruning.layers import PrunedDecoderLayer, prune_layers
from test_model import EXACT, _queries, perturb_


def _pruned_lora_model(ws, pruned: dict[int, torch.Tensor | None], r: int = 4):
    prune_layers(ws.backbone.layers, pruned)
    torch.manual_seed(0)
    config = ELMMConfig.from_params(ws.params, ws.kg.num_entities, list(pruned), "ridge", ws.kg.num_relations)
    model = ELMM(ws.backbone, config)
    added = add_lora(model, lora_config(r=r, alpha=2 * r, dropout=0.0))
    set_trainable(model)
    return model, added


def test_trainable_split_after_lora(make_workspace) -> None:
    """Trainable = LoRA + MVTC + completion + entity tokens (their relation rows, and the tie map
    when `entity_token_tied`) + compensation; all else frozen; LoRA on q/v of live layers."""
    ws = make_workspace()
    dim = ws.backbone.hidden_size
    model, added = _pruned_lora_model(ws, {1: torch.randn(dim, dim) * 0.01})
    assert added and set(model.lora.target_modules) == {"q_proj", "v_proj"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}

    def expected_trainable(name: str) -> bool:
        return (name.startswith(("text_view.", "image_view.", "completion."))
                or name in ("entity_tokens", "relation_scales", "entity_token_tie")
                or ".lora_A." in name or ".lora_B." in name
                or name == "llm.model.language_model.layers.1.compensation")

    assert trainable == {n for n, _ in model.named_parameters() if expected_trainable(n)}
    assert all(not expected_trainable(n) for n in frozen)
    assert "llm.model.language_model.layers.1.compensation" in trainable and "relation_scales" in trainable
    assert any(n.startswith("text_view.") for n in trainable) and any(n.startswith("completion.") for n in trainable)
    assert not any(n.startswith("llm.") and "lora_" not in n and not n.endswith(".compensation") for n in trainable)
    # The vision tower, projector, embeddings, norms, MLPs, lm_head are all frozen.
    for key in ("vision_tower", "multi_modal_projector", "embed_tokens", "lm_head", "mlp", "layernorm"):
        assert any(key in n for n in frozen), key
        assert not any(key in n for n in trainable), key

    lora_names = {n for n in trainable if "lora_" in n}
    layers_with_lora = {int(n.split("layers.")[1].split(".")[0]) for n in lora_names}
    assert layers_with_lora == {0, 2}
    for n in lora_names:
        assert ".self_attn.q_proj." in n or ".self_attn.v_proj." in n, n
    for i in (0, 2):
        for proj in ("q_proj", "v_proj"):
            assert hasattr(getattr(ws.backbone.layers[i].self_attn, proj), "lora_A")
        for proj in ("k_proj", "o_proj"):
            assert not hasattr(getattr(ws.backbone.layers[i].self_attn, proj), "lora_A")
    assert isinstance(ws.backbone.layers[1], PrunedDecoderLayer)
    assert not any("lora_" in n for n, _ in ws.backbone.layers[1].named_parameters())

    # Gradients reach every trainable tensor and no frozen one.
    q = _queries(ws, 4)
    model.train()
    out = forward_batch(model, make_batch(ws, q))
    elmm_loss(out.scores, q.targets, torch.randint(0, ws.kg.num_entities, (len(q), 3)),
              torch.ones(len(q), 3, dtype=torch.bool)).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            # lora_A's gradient is exactly 0 while lora_B is still 0, the relation rows' while the
            # entity tokens they multiply are (both zero at start)
            if ".lora_A." not in n and n != "relation_scales":
                assert p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_add_lora_skips_fully_pruned_model(make_workspace) -> None:
    """With every attention block pruned there is nothing to adapt: add_lora injects nothing."""
    ws = make_workspace()
    prune_layers(ws.backbone.layers, {i: None for i in range(ws.backbone.num_layers)})
    config = ELMMConfig.from_params(ws.params, ws.kg.num_entities, list(range(ws.backbone.num_layers)), "none",
                                    ws.kg.num_relations)
    model = ELMM(ws.backbone, config)
    assert not add_lora(model, lora_config(4, 8, 0.0)) and model.lora is None
    assert not any("lora_" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("model_params", [{}, {"mvtc": {"value": "low_rank", "value_rank": 3,
                                                           "text_query": "entity_relation"},
                                                  "entity_readout": "name_end", "entity_token": "relational"}],
                         ids=["default", "options"])
def test_save_load_trained_roundtrip(make_workspace, micro_env, tmp_path, model_params) -> None:
    """save_trained + load_trained into a fresh backbone reproduce the (perturbed) model's scores exactly
    (also with the non-default MVTC value form, text query, E_entity position and entity token, which
    config.json keeps)."""
    ws = make_workspace(micro_env.params_with(**model_params))
    dim = ws.backbone.hidden_size
    model, _ = _pruned_lora_model(ws, {1: torch.randn(dim, dim) * 0.05})
    torch.manual_seed(1)
    perturb_([p for p in model.parameters() if p.requires_grad])  # LoRA B, MVTC, completion, W_c
    model.eval()
    q = _queries(ws, 6)
    with torch.no_grad():
        expected = forward_batch(model, make_batch(ws, q)).scores
    save_trained(tmp_path / "model", model, {"note": "test"})

    fresh = dataclasses.replace(ws, backbone=load_backbone(micro_env.backbone_dir))
    loaded = load_trained(fresh, tmp_path / "model")
    assert loaded.config == model.config
    if model_params:
        assert (loaded.config.value, loaded.config.entity_readout) == ("low_rank", "name_end")
        assert loaded.config.entity_token == "relational" and loaded.entity_tokens.abs().sum() > 0  # perturbed, saved
        assert_close(loaded.relation_scales, model.relation_scales, **EXACT)
        assert (model.relation_scales != 1).any()
    assert isinstance(fresh.backbone.layers[1], PrunedDecoderLayer)
    assert_close(fresh.backbone.layers[1].compensation, ws.backbone.layers[1].compensation, **EXACT)
    with torch.no_grad():
        got = forward_batch(loaded, make_batch(fresh, q)).scores
    assert_close(got, expected, **EXACT)

    # Control: a freshly initialised model of the same shape scores differently, so the match is not trivial.
    other = dataclasses.replace(ws, backbone=load_backbone(micro_env.backbone_dir))
    prune_layers(other.backbone.layers, {1: torch.zeros(dim, dim)})
    torch.manual_seed(0)
    baseline = ELMM(other.backbone, model.config).eval()
    add_lora(baseline, lora_config(4, 8, 0.0))
    with torch.no_grad():
        assert not torch.allclose(forward_batch(baseline, make_batch(other, q)).scores, expected, atol=1e-3)


def test_adapter_is_in_peft_layout_and_loads_with_peft(make_workspace, micro_env, tmp_path) -> None:
    """A peft user loads data/model with PeftModel.from_pretrained onto the decoder (pruned layers
    installed): every LoRA tensor equals the saved one. peft only warns about missing keys, so the
    check compares the tensors themselves, after perturbing them away from any initial value."""
    from peft import PeftModel

    ws = make_workspace()
    dim = ws.backbone.hidden_size
    model, _ = _pruned_lora_model(ws, {1: torch.randn(dim, dim) * 0.05})
    torch.manual_seed(1)
    perturb_([p for n, p in model.named_parameters() if "lora_" in n])
    save_trained(tmp_path / "model", model, {})

    saved = load_file(str(tmp_path / "model" / ADAPTER_WEIGHTS))
    assert saved and all(k.startswith(PEFT_PREFIX) and ".lora_" in k for k in saved)
    config = json.loads((tmp_path / "model" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert "lora" not in json.loads((tmp_path / "model" / "config.json").read_text())  # one record only

    fresh = dataclasses.replace(ws, backbone=load_backbone(micro_env.backbone_dir))
    install_pruning(fresh, tmp_path / "model")
    assert isinstance(fresh.backbone.layers[1], PrunedDecoderLayer)
    peft_model = PeftModel.from_pretrained(fresh.backbone.decoder, str(tmp_path / "model"))
    loaded = {n.replace(".default.", "."): p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert set(loaded) == set(saved)
    for key, tensor in saved.items():
        assert torch.equal(loaded[key].detach(), tensor), key


def test_adapter_config_lists_target_modules_sorted(tmp_path) -> None:
    """PEFT writes its target_modules set in hash order (another order in another process);
    save_lora_config writes them sorted, so the same adapter has the same bytes on every run."""
    from peft import LoraConfig

    names = ["v_proj", "q_proj", "k_proj", "o_proj", "up_proj", "gate_proj", "down_proj"]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=names)
    assert isinstance(lora.target_modules, set)
    save_lora_config(lora, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert written == sorted(names)
    assert isinstance(lora.target_modules, set)  # the caller's config is left as it was


def test_old_model_layout_gets_a_clear_message(make_workspace, tmp_path) -> None:
    """A data/model from before the peft layout (adapter.safetensors) names what to do."""
    old = tmp_path / "model"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"elmm": {"num_entities": 3}, "lora": {"r": 4}}))
    (old / "adapter.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="older version .* rerun `dvc repro train`"):
        load_trained(make_workspace(), old)


def test_lora_dropout_is_mask_dropout_with_nn_dropouts_law(make_workspace) -> None:
    """add_lora's dropout: every element kept with probability 1 - p and scaled by 1 / (1 - p),
    independently (the keep rate of 4M draws and of pairs of neighbours within 5 SE), the identity
    in eval mode, the same mask for the same seed, and its gradient the mask itself."""
    ws = make_workspace()
    model = ELMM(ws.backbone, ELMMConfig.from_params(ws.params, ws.kg.num_entities, num_relations=ws.kg.num_relations))
    add_lora(model, lora_config(r=4, alpha=8, dropout=0.1))
    dropouts = [d for m in model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()]
    assert dropouts and all(type(d) is MaskDropout and d.p == 0.1 for d in dropouts)

    drop = MaskDropout(0.1)
    x = torch.full((4, 1000, 1000), 2.0, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    kept = y.detach() != 0
    assert_close(y.detach().unique(), torch.tensor([0.0, 2.0 / 0.9]))  # dropped, or kept and scaled
    n, rate = kept.numel(), kept.float().mean().item()
    assert abs(rate - 0.9) < 5 * (0.09 / n) ** 0.5
    both = (kept[..., 1:] & kept[..., :-1]).float().mean().item()  # independence of neighbours
    assert abs(both - 0.81) < 5 * (0.81 * 0.19 / kept[..., 1:].numel()) ** 0.5
    y.sum().backward()
    assert_close(x.grad, kept.float() / 0.9)
    torch.manual_seed(0)
    assert torch.equal(drop(x.detach()), y.detach())
    drop.eval()
    assert drop(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        MaskDropout(1.0)
