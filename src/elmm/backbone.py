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
# model.backbone values built locally (random weights) -> the family built
TINY_BACKBONES = {"tiny": "llava", "tiny-qwen2-vl": "qwen2_vl"}
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

    # ---- the five methods a backbone family implements --------------------------------------
    def preprocess(self, image) -> torch.Tensor:
        """One RGB PIL image -> the tensor `vision_features` takes (same shape for every image)."""
        raise NotImplementedError

    def vision_features(self, pixel_values: torch.Tensor, feature_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the vision tower on a batch of `preprocess` outputs; return (CLS [B, Dv], patch tokens
        [B, M, Dv]) of `feature_layer`. These are what the encode stage stores."""
        raise NotImplementedError

    def project_images(self, patches: torch.Tensor) -> torch.Tensor:
        """Stored patch tokens [..., M, Dv] -> decoder-width image tokens [..., M', D] (frozen projector)."""
        raise NotImplementedError

    def project_cls(self, cls: torch.Tensor) -> torch.Tensor:
        """Stored CLS tokens [..., Dv] -> [..., D], the visual view's query material."""
        raise NotImplementedError

    def projected_tokens(self, num_patches: int) -> int:
        """M' for M stored patch tokens per image."""
        return num_patches

    @property
    def start_token_id(self) -> int:
        """The token that opens every prompt (BOS; tokenizers without one use their pad token)."""
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.pad_token_id


class LlavaBackbone(Backbone):
    @classmethod
    def from_model(cls, name: str, model: nn.Module, tokenizer, image_processor) -> LlavaBackbone:
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

    def preprocess(self, image) -> torch.Tensor:
        return torch.from_numpy(self.image_processor(images=image, return_tensors="np")["pixel_values"][0])

    def vision_features(self, pixel_values: torch.Tensor, feature_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.vision_tower(pixel_values, output_hidden_states=True)
        hidden = out.hidden_states[feature_layer]  # [B, 1 + M, Dv]; CLIP puts CLS first
        return hidden[:, 0], hidden[:, 1:]

    def project_images(self, patches: torch.Tensor) -> torch.Tensor:
        return self.projector(patches)  # LLaVA's MLP projector acts token by token

    def project_cls(self, cls: torch.Tensor) -> torch.Tensor:
        return self.projector(cls)


class Qwen2VLBackbone(Backbone):
    """Qwen2-VL (`model_type` qwen2_vl): a ViT whose patch merger (the projector) maps each 2x2 window of
    patch tokens to one decoder token, and a Qwen2 decoder (q_proj/v_proj like Llama).

    Choices: images are resized to one fixed square, so every image has the same patch grid; the
    stored tokens are the vision blocks' output before the merger; Qwen's ViT has no CLS token, so
    the mean of an image's patch tokens stands in for it (the merger maps it, repeated over a 2x2
    window, to decoder width); the decoder gets plain 1-D positions (its M-RoPE with equal
    sections), since the compressed image tokens form no spatial grid.
    """

    grid: torch.Tensor  # [1, 3] (t, h, w) patch grid of every image

    @classmethod
    def from_model(cls, name: str, model: nn.Module, tokenizer, image_processor) -> Qwen2VLBackbone:
        inner = model.model
        cfg = model.config
        self = cls(
            name=name, model=model, vision_tower=inner.visual, projector=inner.visual.merger,
            decoder=inner.language_model, lm_head=model.lm_head, tokenizer=tokenizer,
            image_processor=image_processor, hidden_size=cfg.text_config.hidden_size,
            vision_hidden_size=cfg.vision_config.embed_dim, num_layers=cfg.text_config.num_hidden_layers,
        )
        from PIL import Image

        probe = image_processor(images=Image.new("RGB", (64, 64)), return_tensors="pt")
        self.grid = probe["image_grid_thw"]
        self.merge = cfg.vision_config.spatial_merge_size ** 2
        # Qwen keeps aspect ratios; a square of the processor's pixel budget gives one grid for all.
        self.side = int(self.grid[0, 1]) * cfg.vision_config.patch_size
        return self

    def preprocess(self, image) -> torch.Tensor:
        out = self.image_processor(images=image.resize((self.side, self.side)), return_tensors="pt")
        if not torch.equal(out["image_grid_thw"], self.grid):
            raise ValueError("the image processor must resize every image to one size (set min_pixels = max_pixels)")
        return out["pixel_values"]  # [P, C * T * patch * patch]

    def vision_features(self, pixel_values: torch.Tensor, feature_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, p, _ = pixel_values.shape
        flat = pixel_values.reshape(b * p, -1).to(self.vision_tower.get_dtype())
        out = self.vision_tower(flat, grid_thw=self.grid.repeat(b, 1).to(flat.device), output_hidden_states=True)
        hidden = out.hidden_states[feature_layer] if feature_layer != -1 else out.last_hidden_state
        patches = hidden.reshape(b, p, -1)
        return patches.mean(dim=1), patches

    def project_images(self, patches: torch.Tensor) -> torch.Tensor:
        *lead, m, dv = patches.shape
        merged = self.projector.ln_q(patches).reshape(*lead, m // self.merge, self.merge * dv)
        return self.projector.mlp(merged)

    def project_cls(self, cls: torch.Tensor) -> torch.Tensor:
        window = self.projector.ln_q(cls).repeat_interleave(self.merge, dim=-1)
        return self.projector.mlp(window)

    def projected_tokens(self, num_patches: int) -> int:
        return num_patches // self.merge


FAMILIES = {"llava": ("LlavaForConditionalGeneration", LlavaBackbone),
            "qwen2_vl": ("Qwen2VLForConditionalGeneration", Qwen2VLBackbone)}


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


def tiny_qwen2_vl_config(tiny: TinyBackboneParams, vocab_size: int, pad_id: int, image_id: int):
    """A Qwen2-VL config of the tiny sizes (the decoder's M-RoPE sections sum to head_dim / 2)."""
    from transformers import Qwen2VLConfig

    half = tiny.hidden // tiny.heads // 2
    sections = [half - 2 * (half // 3), half // 3, half // 3]
    return Qwen2VLConfig(
        vision_config={"depth": tiny.vision_layers, "embed_dim": tiny.vision_hidden, "hidden_size": tiny.hidden,
                       "num_heads": tiny.vision_heads, "patch_size": tiny.patch_size, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "in_channels": 3, "mlp_ratio": 4},
        text_config={"vocab_size": vocab_size, "hidden_size": tiny.hidden, "intermediate_size": tiny.intermediate,
                     "num_hidden_layers": tiny.layers, "num_attention_heads": tiny.heads,
                     "num_key_value_heads": tiny.heads, "max_position_embeddings": 4096, "pad_token_id": pad_id,
                     "bos_token_id": 1, "eos_token_id": 2,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections}},
        image_token_id=image_id, bos_token_id=1, eos_token_id=2,
    )


def make_tiny_backbone(tiny: TinyBackboneParams, texts: list[str], seed: int, family: str = "llava") -> Backbone:
    """A tiny model of `family` with random weights (seeded) and a tokenizer trained on `texts`, in memory.

    family "llava" (the default pipeline) or "qwen2_vl" (shows the second adapter end to end).
    """
    import transformers

    tokenizer = train_tokenizer(texts, tiny.vocab_size)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if family == "llava":
        config = tiny_llava_config(tiny, len(tokenizer), tokenizer.pad_token_id, image_id)
        image_processor = transformers.CLIPImageProcessor(
            size={"shortest_edge": tiny.image_size},
            crop_size={"height": tiny.image_size, "width": tiny.image_size},
        )
    elif family == "qwen2_vl":
        config = tiny_qwen2_vl_config(tiny, len(tokenizer), tokenizer.pad_token_id, image_id)
        pixels = tiny.image_size * tiny.image_size  # one fixed size: every image gets the same patch grid
        image_processor = transformers.Qwen2VLImageProcessor(
            min_pixels=pixels, max_pixels=pixels, patch_size=tiny.patch_size, merge_size=2, temporal_patch_size=2)
    else:
        raise ValueError(f"unknown tiny backbone family {family!r} (llava, qwen2_vl)")
    torch.manual_seed(seed)
    class_name, adapter = FAMILIES[family]
    model = getattr(transformers, class_name)(config).eval()
    model.requires_grad_(False)
    return adapter.from_model(f"tiny-{family}", model, tokenizer, image_processor)


def save_backbone(out_dir: str | Path, backbone: Backbone, info: dict) -> None:
    """`save_pretrained` the model, tokenizer and image processor (safetensors), atomically."""
    with atomic_dir(out_dir) as tmp:
        backbone.model.save_pretrained(tmp)  # safetensors
        backbone.tokenizer.save_pretrained(tmp)
        backbone.image_processor.save_pretrained(tmp)
        write_json(tmp / "elmm_backbone.json", info)


def build_tiny_backbone(out_dir: str | Path, tiny: TinyBackboneParams, texts: list[str], seed: int,
                        family: str = "llava") -> None:
    """Make a tiny model of `family` (random weights, local tokenizer); save it with `save_pretrained`."""
    backbone = make_tiny_backbone(tiny, texts, seed, family)
    save_backbone(out_dir, backbone, {"kind": f"tiny-{family}", "seed": seed, "params": tiny.__dict__,
                                      "pretrained": False})


def random_init_copy(backbone: Backbone, seed: int) -> Backbone:
    """The same architecture as `backbone` with freshly initialised weights (`seed`), in the same dtype.

    A control for analyses that depend on what the weights learned (the similarity curves): built
    from the loaded model's config with `_from_config` (the model's own initialisation), on the CPU,
    sharing the tokenizer and image processor. The global torch RNG is left as it was.
    """
    import copy

    model = backbone.model
    config = copy.deepcopy(model.config)  # _from_config writes the dtype into the config it gets
    dtype = next(model.parameters()).dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(model)._from_config(config, dtype=dtype)
    fresh.eval()
    fresh.requires_grad_(False)
    return type(backbone).from_model(f"{backbone.name} (random init, seed {seed})", fresh, backbone.tokenizer,
                                     backbone.image_processor)


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
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

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
    if config.model_type not in FAMILIES:
        raise BackboneError(
            f"backbone {name!r} has model_type {config.model_type!r}; adapted families: {', '.join(FAMILIES)} "
            "(docs/backbones.md says how to add one)"
        )
    import transformers

    class_name, adapter = FAMILIES[config.model_type]
    model = getattr(transformers, class_name).from_pretrained(name, dtype=dtype or torch.float32)
    model.to(device).eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(name)
    image_processor = AutoImageProcessor.from_pretrained(name)
    return adapter.from_model(name, model, tokenizer, image_processor)
