"""Backbones: the multimodal LLM that ELMM adapts, behind one small interface.

`Backbone` is what the rest of the project sees: a vision tower (run once, by the encode stage), a
frozen projector from vision width to decoder width, the token embeddings, the decoder layers as
the real Hugging Face modules (so pruning and peft act on them), the final norm and the LM head.

`LlavaBackbone` adapts `LlavaForConditionalGeneration` (llava-hf/llava-1.5-*, and the tiny local
model). Another family (e.g. Qwen2-VL) is added by writing one more subclass that fills the same
attributes; nothing else in the project names a model family.

The tiny default is a real LLaVA: `build_tiny_backbone` makes a config with random weights and a
tokenizer trained on the KG text, saves them with `save_pretrained`, and every stage loads them
back with `from_pretrained`, the code path a hub checkpoint name takes too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import TinyBackboneParams
from .io import atomic_dir, write_json

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
SOURCE_FILE = "source.json"  # a backbone dir holding only this points at a hub name or another dir


class BackboneError(RuntimeError):
    """The backbone cannot be loaded; the message says why and what to do."""


@dataclass
class Backbone:
    """What ELMM needs from a multimodal LLM. Subclasses fill the fields from a concrete model."""

    name: str
    model: nn.Module  # the whole HF model (owner of all parameters)
    vision_tower: nn.Module
    projector: nn.Module
    decoder: nn.Module  # has .layers (ModuleList of HF decoder layers), .embed_tokens, .norm, .rotary_emb
    lm_head: nn.Module
    tokenizer: object
    image_processor: object
    hidden_size: int
    vision_hidden_size: int
    num_layers: int

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(ids)

    @torch.inference_mode()
    def vision_features(self, pixel_values: torch.Tensor, feature_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the vision tower; return (CLS [B, Dv], patch tokens [B, M, Dv]) of `feature_layer`."""
        raise NotImplementedError


class LlavaBackbone(Backbone):
    @classmethod
    def from_model(cls, name: str, model: nn.Module, tokenizer, image_processor) -> "LlavaBackbone":
        inner = model.model  # LlavaModel: vision_tower, multi_modal_projector, language_model
        cfg = model.config
        return cls(
            name=name,
            model=model,
            vision_tower=inner.vision_tower,
            projector=inner.multi_modal_projector,
            decoder=inner.language_model,
            lm_head=model.lm_head,
            tokenizer=tokenizer,
            image_processor=image_processor,
            hidden_size=cfg.text_config.hidden_size,
            vision_hidden_size=cfg.vision_config.hidden_size,
            num_layers=cfg.text_config.num_hidden_layers,
        )

    @torch.inference_mode()
    def vision_features(self, pixel_values: torch.Tensor, feature_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.vision_tower(pixel_values, output_hidden_states=True)
        hidden = out.hidden_states[feature_layer]  # [B, 1 + M, Dv]; CLIP puts CLS first
        return hidden[:, 0], hidden[:, 1:]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on the KG's own text (no download needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )


def tiny_llava_config(tiny: TinyBackboneParams, vocab_size: int, pad_id: int, image_id: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=tiny.vision_hidden,
        intermediate_size=tiny.vision_hidden * 4,
        num_hidden_layers=tiny.vision_layers,
        num_attention_heads=tiny.vision_heads,
        image_size=tiny.image_size,
        patch_size=tiny.patch_size,
        projection_dim=tiny.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=tiny.hidden,
        intermediate_size=tiny.intermediate,
        num_hidden_layers=tiny.layers,
        num_attention_heads=tiny.heads,
        num_key_value_heads=tiny.heads,
        max_position_embeddings=4096,
        pad_token_id=pad_id,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def build_tiny_backbone(out_dir: str | Path, tiny: TinyBackboneParams, texts: list[str], seed: int) -> None:
    """Make the tiny LLaVA (random weights, local tokenizer) and save it with `save_pretrained`."""
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration

    tokenizer = train_tokenizer(texts, tiny.vocab_size)
    config = tiny_llava_config(tiny, len(tokenizer), tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": tiny.image_size},
        crop_size={"height": tiny.image_size, "width": tiny.image_size},
    )
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
        write_json(tmp / "elmm_backbone.json", {"kind": "tiny", "seed": seed, "params": tiny.__dict__})


def write_backbone_pointer(out_dir: str | Path, name: str) -> None:
    """For a hub name or an external dir: the stage output records where the weights come from."""
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / SOURCE_FILE, {"name": name})


def resolve_source(path: str | Path) -> str:
    path = Path(path)
    pointer = path / SOURCE_FILE
    if pointer.is_file():
        return json.loads(pointer.read_text())["name"]
    return str(path)


def load_backbone(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Backbone:
    """Load a LLaVA-style backbone from a local dir, a pointer dir, or a hub name.

    Never passes trust_remote_code: only architectures that transformers itself implements load.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    name = resolve_source(path)
    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise BackboneError(
            f"cannot load backbone {name!r}: it is not a local directory and could not be fetched from the "
            f"Hugging Face hub{' (HF_HUB_OFFLINE=1)' if offline else ' (no network?)'}. Download it first where "
            f"there is network (`huggingface-cli download {name}`) and copy the HF cache (HF_HOME) here, or set "
            f"model.backbone to a local directory holding the checkpoint. Original error: {e}"
        ) from None
    if config.model_type != "llava":
        raise BackboneError(
            f"backbone {name!r} has model_type {config.model_type!r}; this version adapts LLaVA checkpoints "
            "(see docs/backbones.md for adding another family)"
        )
    model = LlavaForConditionalGeneration.from_pretrained(name, dtype=dtype or torch.float32)
    model.to(device).eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(name)
    image_processor = AutoImageProcessor.from_pretrained(name)
    return LlavaBackbone.from_model(name, model, tokenizer, image_processor)
