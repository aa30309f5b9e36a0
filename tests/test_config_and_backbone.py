"""Params validation names the offending key; a hub backbone fails clearly offline; the tiny
backbone goes through save_pretrained / from_pretrained like any checkpoint."""

import pytest
import torch
import yaml

from elmm.backbone import BackboneError, load_backbone, write_backbone_pointer
from elmm.config import ParamsError, from_dict, load_params, validate


def test_default_params_file_is_valid():
    p = load_params("params.yaml")
    assert p.model.mvtc.enabled and p.prune.k == p.model.tiny.layers // 2  # paper: half the layers


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"prune": {"kk": 1}}, "prune.kk"),
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"train": {"lr": -1.0}}, "train.lr"),
        ({"model": {"head": "softmax"}}, "model.head"),
        ({"model": {"mvtc": {"heads": 0}}}, "model.mvtc.heads"),
        ({"prune": {"compensation": "exact"}}, "prune.compensation"),
        ({"train": {"max_steps": -3}}, "train.max_steps"),
        ({"train": {"self_denoise": "yes"}}, "train.self_denoise"),
        ({"data": {"name": "fb15k-237-img"}}, "data.url"),
        ({"model": {"mvtc": {"text_view": False, "image_view": False}}}, "model.mvtc"),
        ({"model": {"mvtc": {"text_query": "description"}}}, "model.mvtc.text_query"),
        ({"model": {"mvtc": {"value": "diagonal"}}}, "model.mvtc.value"),
        ({"model": {"mvtc": {"value_rank": 0}}}, "model.mvtc.value_rank"),
        ({"model": {"entity_readout": "first"}}, "model.entity_readout"),
        ({"prune": {"similarity": "mlp"}}, "prune.similarity"),
        ({"train": {"loss": "margin"}}, "train.loss"),
        ({"train": {"loss": "softmax", "hard_negatives": "faiss"}}, "train.hard_negatives"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_params_name_the_key(raw, key):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        from_dict(raw)


def test_k_is_checked_against_the_real_depth():
    p = from_dict({"prune": {"k": 9}})
    with pytest.raises(ParamsError, match=r"prune\.k: 9 is larger than the backbone's 8 decoder layers"):
        validate(p, num_layers=8)


def test_yaml_errors_name_file_and_line(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("seed: 0\ntrain:\n  lr: [1\n")
    with pytest.raises(ParamsError, match=r"params\.yaml:\d+: invalid YAML"):
        load_params(f)
    f.write_text(yaml.safe_dump({"train": {"lr": "3e-4"}}))
    assert load_params(f).train.lr == pytest.approx(3e-4)  # YAML reads 3e-4 as a string


def test_hub_backbone_fails_clearly_when_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_backbone_pointer(tmp_path / "bb", "llava-hf/llava-1.5-7b-hf")
    with pytest.raises(BackboneError, match=r"llava-hf/llava-1\.5-7b-hf.*HF_HUB_OFFLINE=1.*huggingface-cli download"):
        load_backbone(tmp_path / "bb")


def test_tiny_backbone_round_trips_through_save_pretrained(micro_env):
    micro_backbone_dir = micro_env.backbone_dir
    a = load_backbone(micro_backbone_dir)
    b = load_backbone(micro_backbone_dir)
    assert a.model.config.model_type == "llava" and a.num_layers == 3
    for (na, pa), (nb, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    ids = a.tokenizer(" entity: relation: inverse of", add_special_tokens=False)["input_ids"]
    assert ids and a.tokenizer.unk_token_id not in ids


def test_random_init_copy_is_the_same_architecture_with_fresh_seeded_weights(micro_env):
    """Same parameter names, shapes and dtypes; other values; the same seed gives the same weights;
    the loaded backbone and the global RNG are untouched."""
    from elmm.backbone import random_init_copy

    b = load_backbone(micro_env.backbone_dir)
    before = {k: v.clone() for k, v in b.model.state_dict().items()}
    rng = torch.get_rng_state()
    one, two, other = random_init_copy(b, 3), random_init_copy(b, 3), random_init_copy(b, 4)
    assert torch.equal(torch.get_rng_state(), rng)
    assert type(one) is type(b) and one.num_layers == b.num_layers and one.tokenizer is b.tokenizer
    fresh, orig = one.model.state_dict(), b.model.state_dict()
    assert [(k, v.shape, v.dtype) for k, v in fresh.items()] == [(k, v.shape, v.dtype) for k, v in orig.items()]
    for k, v in orig.items():
        assert torch.equal(v, before[k]), k
    weight = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(fresh[weight], orig[weight])
    assert torch.equal(fresh[weight], two.model.state_dict()[weight])
    assert not torch.equal(fresh[weight], other.model.state_dict()[weight])
    assert not one.model.training and not any(p.requires_grad for p in one.model.parameters())
