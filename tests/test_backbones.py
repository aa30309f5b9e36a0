"""A second backbone family through the same interface: a tiny random Qwen2-VL.

Proves the adapter contract: stored tokens projected by `project_images` equal Qwen's own merger
output, and the ELMM model, pruning, LoRA and similarity analysis run on it unchanged.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from elmm.backbone import Qwen2VLBackbone, build_tiny_backbone, load_backbone
from elmm.config import TinyBackboneParams
from elmm.model import ELMM, ELMMConfig
from elmm.model_io import add_lora, lora_config, set_trainable
from elmm.prompt import PromptBuilder
from elmm.pruning.layers import hidden_at, measure_similarity, prune_layers, split_layer

TINY = TinyBackboneParams(vocab_size=300, hidden=32, layers=3, heads=2, intermediate=64, vision_hidden=16,
                          vision_layers=1, vision_heads=2, image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen") / "backbone"
    build_tiny_backbone(path, TINY, ["entity: relation: inverse of", "a painter of the world"], 0, family="qwen2_vl")
    return path


def _images(n: int):
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((20 + 7 * i, 30, 3)) * 255).astype("uint8")) for i in range(n)]


def test_qwen_adapter_loads_through_from_pretrained(qwen_dir):
    b = load_backbone(qwen_dir)
    assert isinstance(b, Qwen2VLBackbone)
    assert b.model.config.model_type == "qwen2_vl" and b.num_layers == 3 and b.hidden_size == 32
    assert b.grid.tolist() == [[1, 4, 4]]  # 32 px / 8 px patches


def test_stored_tokens_projected_equal_qwen_merger_output(qwen_dir):
    b = load_backbone(qwen_dir)
    pixels = torch.stack([b.preprocess(im) for im in _images(3)])  # images of different sizes -> one grid
    cls, patches = b.vision_features(pixels, -1)
    assert patches.shape == (3, 16, 16) and cls.shape == (3, 16)
    torch.testing.assert_close(cls, patches.mean(1))
    with torch.no_grad():
        ours = b.project_images(patches)  # [3, 4, 32]
        flat = pixels.reshape(-1, pixels.shape[-1])
        ref = b.vision_tower(flat, grid_thw=b.grid.repeat(3, 1)).pooler_output.reshape(3, 4, 32)
    torch.testing.assert_close(ours, ref)
    assert b.projected_tokens(16) == 4 and b.project_cls(cls).shape == (3, 32)


@pytest.mark.parametrize("mvtc", [True, False])
def test_elmm_prunes_and_trains_on_qwen(qwen_dir, mvtc):
    b = load_backbone(qwen_dir)
    pixels = torch.stack([b.preprocess(im) for im in _images(2)])
    cls, patches = b.vision_features(pixels, -1)
    prune_layers(b.layers, {2: torch.zeros(32, 32)})
    model = ELMM(b, ELMMConfig(num_entities=10, heads=2, mvtc_enabled=mvtc, pruned_layers=[2], compensation="ridge"))
    assert add_lora(model, lora_config(4, 8, 0.0))
    set_trainable(model)
    lora = [n for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(".layers.2." not in n for n in lora)  # the pruned layer has no attention to adapt
    prompts = PromptBuilder(b.tokenizer, ["Ada", "Bo"], ["a painter", "a world"], ["knows"], 8)
    text = prompts.build(torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([0, 1]))
    slots = torch.tensor([[True, True], [False, False]])  # the second entity has no images
    out = model(patches[None].repeat(2, 1, 1, 1).half(), cls[None].repeat(2, 1, 1).half(), slots, text)
    assert out.scores.shape == (2, 10) and torch.isfinite(out.scores).all()
    assert out.image_tokens == (4 if mvtc else 2 * 4)  # 2 views x 2 heads, or 2 images x 4 merged tokens
    out.scores.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "completion" in n)


def test_similarity_hooks_work_on_qwen_layers(qwen_dir):
    b = load_backbone(qwen_dir)
    model = ELMM(b, ELMMConfig(num_entities=5, heads=2))
    prompts = PromptBuilder(b.tokenizer, ["Ada"], ["a painter"], ["knows"], 8)
    text = prompts.build(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))
    pixels = torch.stack([b.preprocess(im) for im in _images(1)])
    cls, patches = b.vision_features(pixels, -1)
    batch = {"patches": patches[None].half(), "cls": cls[None].half(), "slot_mask": torch.tensor([[True]]), "text": text}

    def run(bt):
        model(bt["patches"], bt["cls"], bt["slot_mask"], bt["text"])
        return model.decoder_mask(model.image_mask(bt["slot_mask"], 16), bt["text"].mask)

    sims = measure_similarity(b.layers, run, [batch])
    assert set(sims) == {"residual", "attention"}
    assert all(len(v) == 3 and all(-1 <= s <= 1 for s in v) for v in sims.values())


@pytest.mark.parametrize("pruned", [[], [2], [1, 2]])
def test_hidden_at_splits_qwen_layers_like_the_full_pass(qwen_dir, pruned):
    """Qwen2-VL's decoder layers are split as Llama's are (the last attention layer's MLP on the read
    positions only): the same hidden states and gradients as the whole decoder's forward."""
    b = load_backbone(qwen_dir)
    g = torch.Generator().manual_seed(0)
    prune_layers(b.layers, {i: 0.1 * torch.randn(32, 32, generator=g) for i in pruned})
    assert split_layer(b.layers) == 2 - len(pruned)
    b.decoder.double()
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = mask[2, 4:] = False  # right padding, as ELMM's batches have
    positions = torch.tensor([[0, 3, 5], [1, 5, 2], [3, 0, 1]])
    results = []
    for full in (False, True):
        handle = b.decoder.register_forward_hook(lambda *a: None) if full else None
        embeds = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        embeds.requires_grad_(True)
        out = hidden_at(b.decoder, embeds, mask, positions)
        out.square().sum().backward()
        results.append((out.detach(), embeds.grad))
        if handle is not None:
            handle.remove()
    (fast, fast_grad), (whole, whole_grad) = results
    torch.testing.assert_close(fast, whole, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast_grad, whole_grad, rtol=1e-10, atol=1e-12)
