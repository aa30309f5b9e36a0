"""What the model stages share: their inputs loaded once, queries, batches, and the ELMM model
built from the pipeline's artefacts (pruning from `calibrate`, trained weights from `train`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .backbone import Backbone, load_backbone
from .config import Params
from .io import atomic_dir, atomic_path
from .kg.format import KnowledgeGraph, load_kg
from .model import ELMM, ELMMConfig
from .pruning.layers import prune_layers
from .prompt import HEAD, TAIL, PromptBuilder
from .vision import ImageTokens

PRUNING_FILE = "compensation.safetensors"


@dataclass
class Workspace:
    params: Params
    kg: KnowledgeGraph
    backbone: Backbone
    tokens: ImageTokens
    prompts: PromptBuilder


def open_workspace(params: Params, kg_dir="data/kg", backbone_dir="data/backbone", encoded_dir="data/encoded") -> Workspace:
    kg = load_kg(kg_dir)
    backbone = load_backbone(backbone_dir)
    tokens = ImageTokens(encoded_dir, kg.num_entities)
    prompts = PromptBuilder(backbone.tokenizer, kg.entities["name"].tolist(), kg.entities["description"].tolist(),
                            kg.relations["name"].tolist(), params.model.max_text_tokens)
    return Workspace(params, kg, backbone, tokens, prompts)


@dataclass
class Queries:
    """Queries in both directions: (anchor, relation, direction) with the answer `target`."""

    anchors: torch.Tensor
    relations: torch.Tensor
    directions: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.anchors)

    def subset(self, index) -> "Queries":
        return Queries(self.anchors[index], self.relations[index], self.directions[index], self.targets[index])


def queries_from_triples(triples: np.ndarray) -> Queries:
    """Each triple (h, r, t) gives a tail query (h, r, ?) -> t and a head query (?, r, t) -> h."""
    t = torch.as_tensor(np.asarray(triples), dtype=torch.long)
    h, r, tl = t[:, 0], t[:, 1], t[:, 2]
    n = len(t)
    return Queries(
        anchors=torch.cat([h, tl]),
        relations=torch.cat([r, r]),
        directions=torch.cat([torch.full((n,), TAIL), torch.full((n,), HEAD)]),
        targets=torch.cat([tl, h]),
    )


def make_batch(ws: Workspace, q: Queries) -> dict:
    """Model inputs for a batch of queries; the answer entity is never read (no leakage)."""
    patches, cls, mask = ws.tokens.get(q.anchors)
    return {"patches": patches, "cls": cls, "slot_mask": mask, "text": ws.prompts.build(q.anchors, q.relations, q.directions)}


def calibration_batches(ws: Workspace, model: ELMM, samples: int, batch_size: int, seed: int) -> list[dict]:
    """`samples` training queries (both directions), drawn with `seed`, as batches that also carry
    the decoder's attention mask ("decoder_mask") for pruning statistics."""
    queries = queries_from_triples(ws.kg.triples["train"])
    pick = torch.randperm(len(queries), generator=torch.Generator().manual_seed(seed))[:samples]
    pick, _ = pick.sort()
    batches = []
    for lo in range(0, len(pick), batch_size):
        b = make_batch(ws, queries.subset(pick[lo:lo + batch_size]))
        b["decoder_mask"] = model.decoder_mask(model.image_mask(b["slot_mask"], ws.tokens.num_tokens), b["text"].mask)
        batches.append(b)
    return batches


def forward_batch(model: ELMM, batch: dict):
    return model(batch["patches"], batch["cls"], batch["slot_mask"], batch["text"])


# ---- pruning artefact (calibrate -> train) ------------------------------------------------------
def save_pruning(path, layers: list[int], weights: dict[int, torch.Tensor | None], compensation: str, init: str) -> None:
    tensors = {f"layer.{i}": w.contiguous() for i, w in weights.items() if w is not None}
    meta = {"layers": json.dumps(sorted(layers)), "compensation": compensation, "init": init}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_pruning(path) -> tuple[list[int], dict[int, torch.Tensor | None], str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    layers = json.loads(meta["layers"])
    weights = {i: tensors.get(f"layer.{i}") for i in layers}
    return layers, weights, meta["compensation"]


# ---- the trainable model -----------------------------------------------------------------------
def build_model(ws: Workspace, pruning_path=None, seed: int | None = None, head: str | None = None) -> ELMM:
    """The backbone with pruned layers installed, plus freshly initialised ELMM components.

    `head` overrides model.head: the pruning stages fix it, since the scoring head never changes
    what the decoder sees (so those stages do not depend on model.head).
    """
    layers, weights, compensation = ([], {}, "none") if pruning_path is None else load_pruning(pruning_path)
    prune_layers(ws.backbone.layers, weights)
    if seed is not None:
        torch.manual_seed(seed)
    config = ELMMConfig.from_params(ws.params, ws.kg.num_entities, layers, compensation)
    if head is not None:
        config.head = head
    return ELMM(ws.backbone, config)


def add_lora(model: ELMM, r: int, alpha: int, dropout: float) -> dict | None:
    """peft LoRA on q_proj/v_proj of the layers that still have attention; returns its config."""
    from peft import LoraConfig, inject_adapter_in_model

    if len(model.config.pruned_layers) == model.backbone.num_layers:
        return None  # every attention block is pruned: nothing for LoRA to adapt
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["q_proj", "v_proj"])
    inject_adapter_in_model(cfg, model.backbone.decoder)
    return {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": ["q_proj", "v_proj"]}


def set_trainable(model: ELMM) -> tuple[int, int]:
    """Trainable: LoRA, MVTC, completion layer, compensation matrices. Frozen: the rest."""
    total = trainable = 0
    for name, p in model.named_parameters():
        train = not name.startswith("llm.") or "lora_" in name or name.endswith(".compensation")
        p.requires_grad_(train)
        total += p.numel()
        trainable += p.numel() if train else 0
    return trainable, total


def save_trained(out_dir, model: ELMM, lora: dict | None, extra: dict) -> None:
    from peft import get_peft_model_state_dict

    with atomic_dir(out_dir) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.elmm_state_dict().items()}, str(tmp / "elmm.safetensors"))
        if lora is not None:
            adapter = get_peft_model_state_dict(model.backbone.decoder)
            save_file({k: v.detach().contiguous() for k, v in adapter.items()}, str(tmp / "adapter.safetensors"))
        (tmp / "config.json").write_text(json.dumps({"elmm": model.config.to_dict(), "lora": lora, **extra}, indent=2) + "\n")


def load_trained(ws: Workspace, model_dir) -> ELMM:
    """Rebuild the trained model: pruned layers, LoRA adapter, ELMM components, exactly as saved."""
    from peft import set_peft_model_state_dict

    model_dir = Path(model_dir)
    saved = json.loads((model_dir / "config.json").read_text())
    config = ELMMConfig(**saved["elmm"])
    state = load_file(str(model_dir / "elmm.safetensors"))
    weights = {i: state.pop(f"compensation.{i}", None) for i in config.pruned_layers}
    prune_layers(ws.backbone.layers, weights)
    model = ELMM(ws.backbone, config)
    lora = saved.get("lora")
    if lora is not None:
        add_lora(model, lora["r"], lora["alpha"], lora["dropout"])
        result = set_peft_model_state_dict(model.backbone.decoder, load_file(str(model_dir / "adapter.safetensors")))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{model_dir}/adapter.safetensors: unexpected keys {result.unexpected_keys[:3]}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{model_dir}/elmm.safetensors: unexpected tensors {unexpected[:3]}")
    missing_elmm = [k for k in missing if not k.startswith("llm.")]
    if missing_elmm:
        raise ValueError(f"{model_dir}/elmm.safetensors: missing tensors {missing_elmm[:3]}")
    model.eval()
    return model
