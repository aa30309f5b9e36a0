"""Parameters per ELMM component, from shapes alone: how big is each part at LLaVA-1.5-7B's size?

    python -m elmm.param_count                          # the tiny default (params.yaml's shape)
    python -m elmm.param_count --shape llava-1.5-7b     # decoder 4096 x 32 layers, 32 MVTC heads per view,
                                                        # 14,541 entities, LoRA r=8 on q/v, K=16 pruned
    python -m elmm.param_count --shape llava-1.5-7b --value low_rank --value-rank 16

`parameter_report` needs no weights: the backbone is built on the `meta` device (shapes only) and
the MVTC, scoring head, LoRA and compensation sizes are computed from their definitions in
elmm.model, elmm.model_io and elmm.pruning. `model_parameters` counts a real ELMM model the same
way (the train stage logs it); a test checks that the two agree component by component.

Components: `mvtc_text` / `mvtc_image` (query_norm, token_norm, query, key, value), `completion`
(proj, entities) or `entity_embedding` (head lm_head), `lora`, `compensation` (trainable), and
`backbone_frozen` (by the backbone's top-level modules, without the attention of pruned layers).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch

from .backbone import FAMILIES, tiny_llava_config
from .config import Params
from .model import RELATIONAL_TOKENS, ELMMConfig
from .model_io import LORA_TARGETS

TRAINABLE = ("mvtc_text", "mvtc_image", "completion", "entity_embedding", "lora", "compensation", "entity_tokens")
# The tiny default's vocabulary and image token (the tokenizer trained on the synthetic KG's text).
TINY_VOCAB, TINY_IMAGE_TOKEN = 1024, 4


def tiny_entities(p: Params) -> int:
    """The default world's entity count: its objects and one concept per attribute value."""
    from .kg.synthetic import CONCEPTS

    return p.data.synthetic.entities + sum(len(values) for values in CONCEPTS.values())


def llava_15_7b_config():
    """llava-hf/llava-1.5-7b-hf's architecture: CLIP ViT-L/14-336 (width 1024), MLP projector, Llama 7B."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, projector_hidden_act="gelu",
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def _component(name: str) -> tuple[str, str] | None:
    """(component, part) of an ELMM parameter name (None for a name of no component)."""
    parts = name.split(".")
    if parts[0] in ("text_view", "image_view"):
        sub = {"q": "query", "k": "key", "v": "value", "value_u": "value", "value_v": "value"}.get(parts[1], parts[1])
        return f"mvtc_{parts[0][:-5]}", sub
    if parts[0] == "completion":
        return "completion", parts[1]
    if parts[0] == "entity_embedding":
        return "entity_embedding", "entities"
    if parts[0] in ("entity_tokens", "relation_scales", "entity_token_tie"):
        return "entity_tokens", parts[0]
    if parts[0] == "llm":
        if "lora_" in name:
            return "lora", "lora"
        if name.endswith(".compensation"):
            return "compensation", "compensation"
        return "backbone_frozen", parts[2] if parts[1] == "model" else parts[1]
    return None


def _totals(counts: dict[str, dict[str, int]]) -> dict:
    """Components with their parts and `total`, and the trainable / frozen / overall sums."""
    components = {c: {**parts, "total": sum(parts.values())} for c, parts in counts.items()}
    trainable = sum(v["total"] for c, v in components.items() if c in TRAINABLE)
    frozen = components.get("backbone_frozen", {}).get("total", 0)
    return {"components": components, "trainable": trainable, "frozen": frozen, "total": trainable + frozen}


def model_parameters(model) -> dict:
    """`sum(p.numel())` of a real ELMM model (elmm.model.ELMM), per component and part."""
    counts: dict[str, dict[str, int]] = {}
    for name, p in model.named_parameters():
        where = _component(name)
        if where is not None:
            component, part = where
            counts.setdefault(component, {}).setdefault(part, 0)
            counts[component][part] += p.numel()
    return _totals(counts)


def _mvtc_view(dim: int, heads: int, value: str, rank: int) -> dict[str, int]:
    head_dim = max(1, dim // heads)
    values = {"per_head": heads * dim * dim, "shared": dim * dim, "low_rank": 2 * heads * dim * rank}
    return {"query_norm": 2 * dim, "token_norm": dim, "query": dim * heads * head_dim, "key": dim * heads * head_dim,
            "value": values[value]}


def parameter_report(hf_config, config: ELMMConfig, lora_r: int | None) -> dict:
    """Parameters per component of ELMM on the backbone architecture `hf_config` (a transformers config
    of an adapted family), from shapes alone. `config` gives the MVTC, scoring head, entities, pruned
    layers and compensation; `lora_r` the LoRA rank (None: no adapter)."""
    import transformers

    if hf_config.model_type not in FAMILIES:
        raise ValueError(f"model_type {hf_config.model_type!r}: adapted families are {', '.join(FAMILIES)}")
    with torch.device("meta"):
        backbone = getattr(transformers, FAMILIES[hf_config.model_type][0])(copy.deepcopy(hf_config))
    dim = hf_config.text_config.hidden_size
    layers = backbone.model.language_model.layers
    pruned = set(config.pruned_layers)
    counts: dict[str, dict[str, int]] = {}

    frozen: dict[str, int] = {}
    for name, p in backbone.named_parameters():
        parts = name.split(".")
        if (parts[:3] == ["model", "language_model", "layers"] and int(parts[3]) in pruned
                and parts[4] in ("self_attn", "input_layernorm")):
            continue  # a pruned layer has no attention sub-block
        key = parts[1] if parts[0] == "model" else parts[0]
        frozen[key] = frozen.get(key, 0) + p.numel()
    counts["backbone_frozen"] = frozen

    if config.mvtc_enabled:
        for view, on in (("text", config.text_view), ("image", config.image_view)):
            if on:
                counts[f"mvtc_{view}"] = _mvtc_view(dim, config.heads, config.value, config.value_rank)
    if config.head == "completion":
        counts["completion"] = {"proj": 3 * dim * 3 * dim + 3 * dim,
                                "entities": 3 * dim * config.num_entities + config.num_entities}
    else:
        counts["entity_embedding"] = {"entities": dim * config.num_entities + config.num_entities}
    if config.entity_token != "none":
        counts["entity_tokens"] = {"entity_tokens": config.num_entities * dim}
        if config.entity_token in RELATIONAL_TOKENS:
            counts["entity_tokens"]["relation_scales"] = 2 * config.num_relations * dim
        if config.entity_token_tied:
            counts["entity_tokens"]["entity_token_tie"] = dim * (3 * dim if config.head == "completion" else dim)
    if lora_r is not None and len(pruned) < len(layers):
        lora = 0
        for i, layer in enumerate(layers):
            if i not in pruned:
                for name, module in layer.named_modules():
                    if name.split(".")[-1] in LORA_TARGETS:
                        lora += lora_r * (module.in_features + module.out_features)  # lora_A [r, in], lora_B [out, r]
        counts["lora"] = {"lora": lora}
    if config.compensation != "none" and pruned:
        counts["compensation"] = {"compensation": len(pruned) * dim * dim}
    report = _totals(counts)
    report["mvtc_value_per_view"] = {v: _mvtc_view(dim, config.heads, v, config.value_rank)["value"]
                                     for v in ("per_head", "shared", "low_rank")}
    return report


def shape(name: str, value: str | None = None, value_rank: int | None = None,
          entities: int | None = None) -> tuple[object, ELMMConfig, int]:
    """(HF config, ELMMConfig, LoRA r) of a named shape: `tiny` (params.yaml's defaults) or `llava-1.5-7b`."""
    p = Params()
    if name == "tiny":
        hf = tiny_llava_config(p.model.tiny, TINY_VOCAB, 0, TINY_IMAGE_TOKEN)
        from .kg.synthetic import RELATIONS

        heads, k, num_entities, num_relations = p.model.mvtc.heads, p.prune.k, tiny_entities(p), len(RELATIONS)
    elif name == "llava-1.5-7b":
        hf = llava_15_7b_config()
        heads, k, num_entities, num_relations = 32, 16, 14541, 237
    else:
        raise ValueError(f"unknown shape {name!r} (tiny, llava-1.5-7b)")
    layers = hf.text_config.num_hidden_layers
    config = ELMMConfig(num_entities=entities or num_entities, heads=heads, head=p.model.head,
                        pruned_layers=list(range(layers - k, layers)), compensation=p.prune.compensation,
                        value=value or p.model.mvtc.value, value_rank=value_rank or p.model.mvtc.value_rank,
                        entity_token=p.model.entity_token, entity_token_tied=p.model.entity_token_tied,
                        num_relations=num_relations if p.model.entity_token in RELATIONAL_TOKENS else 0)
    return hf, config, p.train.lora.r


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m elmm.param_count", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=("tiny", "llava-1.5-7b"), default="tiny")
    ap.add_argument("--value", choices=("per_head", "shared", "low_rank"), help="model.mvtc.value (default: params default)")
    ap.add_argument("--value-rank", type=int, help="model.mvtc.value_rank")
    ap.add_argument("--entities", type=int, help="number of entities (default: the shape's)")
    args = ap.parse_args(argv)
    hf, config, lora_r = shape(args.shape, args.value, args.value_rank, args.entities)
    report = {"shape": args.shape, "hidden": hf.text_config.hidden_size, "decoder_layers": hf.text_config.num_hidden_layers,
              "mvtc_heads": config.heads, "value": config.value, "value_rank": config.value_rank,
              "entities": config.num_entities, "lora_r": lora_r, "pruned_layers": len(config.pruned_layers),
              **parameter_report(hf, config, lora_r)}
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
