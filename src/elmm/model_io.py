"""The ELMM model built from the pipeline's artefacts, and the trained model on disk.

`data/model/` (written by `train`, read by `evaluate` and `elmm-predict`):

- `config.json`: the ELMMConfig (views, heads, scoring head, pruned layers, compensation) and
  the training summary;
- `elmm.safetensors`: what ELMM adds and trains: MVTC, completion layer (or entity embedding),
  compensation matrices W_c (`compensation.<layer>`), the knowledge path (`knowledge.*`) when on;
- `adapter_config.json` + `adapter_model.safetensors`: the LoRA adapter in peft's own layout
  (`LoraConfig.save_pretrained`, keys as `PeftModel.save_pretrained` writes them), so
  `PeftModel.from_pretrained(decoder, "data/model")` loads it onto the backbone's decoder once
  the pruned layers are installed (`install_pruning`). Absent when every layer is pruned.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .io import atomic_dir
from .knowledge.source import attach_knowledge
from .model import ELMM, ELMMConfig
from .pruning.artifact import load_pruning
from .pruning.layers import prune_layers
from .workspace import Workspace

LORA_TARGETS = ["q_proj", "v_proj"]  # the paper's: LoRA on the query and value projections
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the wrapped model's parameter names


def build_model(ws: Workspace, pruning_path=None, seed: int | None = None, head: str | None = None,
                knowledge: bool = True) -> ELMM:
    """The backbone with pruned layers installed, plus freshly initialised ELMM components.

    `head` overrides model.head: the pruning stages fix it, since the scoring head never changes
    what the decoder sees (so those stages do not depend on model.head). `knowledge=False` builds
    the model without the knowledge path whatever model.knowledge says (the pruning stages: the
    knowledge tokens are untrained there, like the MVTC, and those stages do not depend on it).
    """
    layers, weights, compensation = ([], {}, "none") if pruning_path is None else load_pruning(pruning_path)
    prune_layers(ws.backbone.layers, weights)
    if seed is not None:
        torch.manual_seed(seed)
    config = ELMMConfig.from_params(ws.params, ws.kg.num_entities, layers, compensation, ws.kg.num_relations)
    if head is not None:
        config.head = head
    if not knowledge:
        config.knowledge = {}
    return with_knowledge(ws, ELMM(ws.backbone, config))


def build_analysis_model(ws: Workspace, seed: int) -> ELMM:
    """The model the pruning stages (`similarity`, `calibrate`) run their calibration queries
    through: completion head, no knowledge path, whatever model.head and model.knowledge say, so
    those stages depend on neither (dvc.yaml gives them no such params)."""
    return build_model(ws, seed=seed, head="completion", knowledge=False)


def with_knowledge(ws: Workspace, model: ELMM) -> ELMM:
    """Attach the workspace's knowledge source (built for the model's settings) to `model`'s
    knowledge path, if it has one; `make_batch` then adds the subgraphs to every batch."""
    if model.knowledge is not None:
        model.knowledge.attach(attach_knowledge(ws, model.config.knowledge))
    return model


def lora_config(r: int, alpha: int, dropout: float):
    """The one LoRA config of the project (peft's LoraConfig on LORA_TARGETS)."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS)


def add_lora(model: ELMM, config) -> bool:
    """Inject the LoRA adapter `config` into the decoder's layers that still have attention.

    Returns False (and injects nothing) when every attention block is pruned.
    """
    from peft import inject_adapter_in_model

    if len(model.config.pruned_layers) == model.backbone.num_layers:
        return False
    inject_adapter_in_model(config, model.backbone.decoder)
    for module in model.backbone.decoder.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, d in dropouts.items():
                if type(d) is torch.nn.Dropout:
                    dropouts[name] = MaskDropout(d.p)
    model.lora = config
    return True


class MaskDropout(torch.nn.Module):
    """`nn.Dropout(p)` with its CPU mask drawn from 31-bit random integers: each element kept with
    probability 1 - p (to within 2^-31) and scaled by 1 / (1 - p), as `nn.Dropout` does, in half the
    time. On CPUs other than Intel's, torch draws `bernoulli_`'s mask one double at a time; LoRA's
    dropout masks were 9% of a training step at 14,541 entities (benchmarks/README.md). Elsewhere
    (CUDA) it is `F.dropout`. No parameters: the adapter's files are peft's, unchanged."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.threshold = round(p * 2**31)  # an int32's random_() is uniform on [0, 2^31)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return torch.nn.functional.dropout(x, self.p, self.training)
        draws = torch.empty(x.shape, dtype=torch.int32).random_()
        return x * (draws >= self.threshold).to(x.dtype).mul_(1 / (1 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def set_trainable(model: ELMM) -> tuple[int, int]:
    """Trainable: LoRA, MVTC, completion layer, knowledge path, compensation matrices. Frozen: the rest."""
    total = trainable = 0
    for name, p in model.named_parameters():
        train = not name.startswith("llm.") or "lora_" in name or name.endswith(".compensation")
        p.requires_grad_(train)
        total += p.numel()
        trainable += p.numel() if train else 0
    return trainable, total


def save_lora_config(lora, directory) -> None:
    """`adapter_config.json` with `target_modules` sorted: peft keeps them as a set and writes the
    set's order, which changes with Python's string hashing from one process to the next, so the
    same adapter got another checksum on every run."""
    lora = copy.copy(lora)
    if isinstance(lora.target_modules, set):
        lora.target_modules = sorted(lora.target_modules)  # assigned, not replaced: __post_init__ would make a set again
    lora.save_pretrained(str(directory))


def save_trained(out_dir, model: ELMM, extra: dict) -> None:
    """Write `data/model` (module docstring) atomically; `extra` goes into config.json."""
    from peft import get_peft_model_state_dict

    lora = getattr(model, "lora", None)
    with atomic_dir(out_dir) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.elmm_state_dict().items()}, str(tmp / "elmm.safetensors"))
        if lora is not None:
            adapter = get_peft_model_state_dict(model.backbone.decoder)
            save_file({PEFT_PREFIX + k: v.detach().contiguous() for k, v in adapter.items()}, str(tmp / ADAPTER_WEIGHTS),
                      metadata={"format": "pt"})
            save_lora_config(lora, tmp)
        config = {"elmm": model.config.to_dict(), "adapter": ADAPTER_CONFIG if lora is not None else None, **extra}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def install_pruning(ws: Workspace, model_dir) -> ELMMConfig:
    """Replace the pruned layers of `ws.backbone` as `model_dir` records them; returns its config."""
    model_dir = Path(model_dir)
    config = ELMMConfig(**json.loads((model_dir / "config.json").read_text())["elmm"])
    state = load_file(str(model_dir / "elmm.safetensors"))
    prune_layers(ws.backbone.layers, {i: state.get(f"compensation.{i}") for i in config.pruned_layers})
    return config


def load_trained(ws: Workspace, model_dir) -> ELMM:
    """Rebuild the trained model: pruned layers, LoRA adapter, ELMM components, exactly as saved."""
    from peft import LoraConfig, set_peft_model_state_dict

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}/config.json: missing; run `dvc repro train`")
    if (model_dir / "adapter.safetensors").exists() and not (model_dir / ADAPTER_CONFIG).exists():
        raise ValueError(f"{model_dir} was written by an older version (adapter.safetensors, not peft's "
                         f"{ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}); rerun `dvc repro train`")
    saved = json.loads((model_dir / "config.json").read_text())
    config = install_pruning(ws, model_dir)
    state = {k: v for k, v in load_file(str(model_dir / "elmm.safetensors")).items() if not k.startswith("compensation.")}
    model = with_knowledge(ws, ELMM(ws.backbone, config))
    if saved.get("adapter"):
        add_lora(model, LoraConfig.from_pretrained(str(model_dir)))
        weights = load_file(str(model_dir / ADAPTER_WEIGHTS))
        foreign = [k for k in weights if not k.startswith(PEFT_PREFIX)]
        if foreign:
            raise ValueError(f"{model_dir}/{ADAPTER_WEIGHTS}: keys without peft's {PEFT_PREFIX!r} prefix: {foreign[:3]}")
        result = set_peft_model_state_dict(model.backbone.decoder, {k[len(PEFT_PREFIX):]: v for k, v in weights.items()})
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{model_dir}/{ADAPTER_WEIGHTS}: unexpected keys {result.unexpected_keys[:3]}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{model_dir}/elmm.safetensors: unexpected tensors {unexpected[:3]}")
    missing_elmm = [k for k in missing if not k.startswith("llm.")]
    if missing_elmm:
        raise ValueError(f"{model_dir}/elmm.safetensors: missing tensors {missing_elmm[:3]}")
    model.eval()
    return model
