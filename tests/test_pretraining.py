"""Pretraining the tiny backbone: leak guards, the attention diagnostics, the save/load round trip."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from conftest import MICRO
from elmm.backbone import load_backbone, make_tiny_backbone, save_backbone
from elmm.config import PretrainParams
from elmm.kg.format import load_kg
from elmm.pretraining import (
    Encoder,
    attention_zeroed,
    caption_pictures,
    evaluate_pretraining,
    evenly_spaced,
    heldout_loss,
    lm_loss,
    pretrain,
    reading_exercises,
    reading_loss,
    text_corpus,
    tokenizer_texts,
)

TINY_RUN = PretrainParams(steps=6, batch_size=4, warmup_steps=2, pictures=16, heldout_pictures=4, heldout_text=0.2,
                          triples_after=0.5)


@pytest.fixture(scope="module")
def kg(micro_env):
    return load_kg(micro_env.kg_dir)


def _fresh(kg, seed: int = 0):
    return make_tiny_backbone(MICRO, tokenizer_texts(kg), seed)


def _pretrained_state(kg) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    backbone = _fresh(kg)
    corpus = text_corpus(kg, TINY_RUN.heldout_text)
    pretrain(backbone, corpus, caption_pictures(TINY_RUN.pictures, MICRO.image_size, 0, 0), TINY_RUN,
             feature_layer=-2, seed=0, progress=False)
    return {k: v.clone() for k, v in backbone.model.state_dict().items()}


def test_corpus_holds_train_triples_only(kg) -> None:
    """A canary valid triple between two uniquely named entities never reaches the corpus."""
    entities = kg.entities.copy()
    entities.loc[0, "name"], entities.loc[1, "name"] = "Zzcanary Alpha", "Zzcanary Beta"
    valid = np.concatenate([kg.triples["valid"], [[0, 0, 1]]])
    canary = dataclasses.replace(kg, entities=entities, triples={**kg.triples, "valid": valid})
    corpus = text_corpus(canary, heldout_fraction=0.1)
    lines = corpus.descriptions + corpus.triples + corpus.heldout
    assert any("Zzcanary Alpha" in x for x in lines)  # its description is read, as any entity's
    assert not [x for x in lines if "Zzcanary Alpha" in x and "Zzcanary Beta" in x]
    train = {(int(h), int(r), int(t)) for h, r, t in kg.triples["train"]}
    assert len(corpus.triples) + sum("answer:" in x for x in corpus.heldout) == 2 * len(train)


def test_evaluated_heldout_lines_are_an_even_sample_of_both_kinds(kg) -> None:
    corpus = text_corpus(kg, heldout_fraction=0.5)
    assert evenly_spaced(corpus.heldout, len(corpus.heldout)) == corpus.heldout  # a cap that fits changes nothing
    sample = evenly_spaced(corpus.heldout, 10)
    assert len(sample) == 10 == len(set(sample)) and set(sample) <= set(corpus.heldout)
    assert [corpus.heldout.index(x) for x in sample] == sorted(corpus.heldout.index(x) for x in sample)
    # descriptions come first and triples last in the held-out lines: the sample keeps both
    assert "answer:" in sample[-1] and "answer:" not in sample[0]
    assert evenly_spaced(list(range(7)), 3) == [0, 2, 4]


def test_weights_do_not_depend_on_valid_and_test(kg) -> None:
    """Pretraining on a KG whose valid/test splits are replaced by other triples gives identical weights."""
    rng = np.random.default_rng(5)
    other = {s: np.stack([rng.integers(0, kg.num_entities, len(kg.triples[s])),
                          rng.integers(0, kg.num_relations, len(kg.triples[s])),
                          rng.integers(0, kg.num_entities, len(kg.triples[s]))], 1) for s in ("valid", "test")}
    swapped = dataclasses.replace(kg, triples={**kg.triples, **other})
    a, b = _pretrained_state(kg), _pretrained_state(swapped)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], _fresh(kg).model.state_dict()["lm_head.weight"])  # it trained


def test_caption_pictures_are_not_the_kgs_images(kg) -> None:
    pictures = caption_pictures(64, MICRO.image_size, 0, 0) + caption_pictures(16, MICRO.image_size, 0, 1)
    ours = {hashlib.sha256(data).hexdigest() for _, data in pictures}
    assert len(ours) == 80
    assert not ours & set(kg.images["sha256"])


def test_lm_loss_is_the_next_token_loss_after_the_picture(kg) -> None:
    """lm_loss against the same loss written out with the HF decoder and lm_head, position by position."""
    backbone = _fresh(kg)
    enc = Encoder(backbone)
    batch = enc.captions(caption_pictures(2, MICRO.image_size, 0, 0))
    with torch.no_grad():
        got = lm_loss(backbone, batch, -2)
        _, patches = backbone.vision_features(batch.pixels, -2)
        image = backbone.project_images(patches)
        total, count = 0.0, 0
        for i in range(2):
            n = int(batch.mask[i].sum())
            ids = batch.ids[i, :n]
            embeds = torch.cat([backbone.embed_tokens(ids[:1]), image[i], backbone.embed_tokens(ids[1:])])[None]
            hidden = backbone.decoder(inputs_embeds=embeds).last_hidden_state[0]
            p = image.shape[1]
            for j in range(1, n):  # token j is predicted at position p + j - 1
                total += float(F.cross_entropy(backbone.lm_head(hidden[p + j - 1])[None], ids[j:j + 1]))
                count += 1
    assert_close(got, torch.tensor(total / count), rtol=1e-5, atol=1e-5)


def test_reading_loss_modes(kg) -> None:
    """pretrain.reading_loss: `line` is lm_loss (every token); `answer` the mean next-token loss of
    the tokens after the exercise's prefix (the value and the closing " ."), each written out by
    hand; `both` the sum of the two."""
    backbone = _fresh(kg)
    enc = Encoder(backbone)
    items = reading_exercises(3, seed=0, stream=0, taken=set())
    batch = enc.exercises(items)
    with torch.no_grad():
        got = {mode: reading_loss(backbone, batch, mode) for mode in ("line", "answer", "both")}
        total, count = 0.0, 0
        for x in items:
            ids = torch.tensor([enc.bos, *enc.ids(x.line)])
            start = 1 + len(enc.ids(x.prefix))
            assert enc.tokenizer.decode(ids[start:]).strip() == f"{x.value} ."
            hidden = backbone.decoder(inputs_embeds=backbone.embed_tokens(ids)[None]).last_hidden_state[0]
            for j in range(start, len(ids)):
                total += float(F.cross_entropy(backbone.lm_head(hidden[j - 1])[None], ids[j:j + 1]))
                count += 1
        assert count == int(batch.answer.sum()) < int(batch.mask.sum()) - 3  # the answer is a small part of each line
        assert_close(got["line"], lm_loss(backbone, batch, -2), rtol=0, atol=0)
    assert_close(got["answer"], torch.tensor(total / count), rtol=1e-5, atol=1e-5)
    assert_close(got["both"], got["line"] + got["answer"], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got["answer"], got["line"])


def test_attention_diagnostics_are_computed(kg) -> None:
    """The loss 'without attention' equals the loss of a copy whose attention outputs are zero
    because its o_proj weights are zero: the numbers come from the model, not from anywhere else."""
    backbone = _fresh(kg)
    corpus = text_corpus(kg, 0.3)
    pictures = caption_pictures(4, MICRO.image_size, 0, 1)
    report = evaluate_pretraining(backbone, pictures, corpus.heldout, -2)
    with torch.no_grad():
        for layer in backbone.layers:
            layer.self_attn.o_proj.weight.zero_()
            if layer.self_attn.o_proj.bias is not None:
                layer.self_attn.o_proj.bias.zero_()
    assert heldout_loss(backbone, pictures, corpus.heldout, -2) == report["loss_without_attention"]
    assert report["loss_without_attention"] != report["heldout_loss"]
    assert len(report["rise_without_layer_attention"]) == MICRO.layers
    with attention_zeroed(backbone.layers, []):  # nothing zeroed: the plain loss
        assert heldout_loss(backbone, pictures, corpus.heldout, -2) == report["loss_without_attention"]


def test_backbone_round_trips_through_save_pretrained(kg, tmp_path) -> None:
    backbone = _fresh(kg, seed=3)
    with torch.no_grad():
        for p in backbone.model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # not the seed's init: the weights really are read back
    save_backbone(tmp_path / "bb", backbone, {"kind": "test"})
    loaded = load_backbone(tmp_path / "bb")
    a, b = backbone.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    batch = Encoder(backbone).captions(caption_pictures(3, MICRO.image_size, 0, 0))
    assert torch.equal(Encoder(loaded).captions(caption_pictures(3, MICRO.image_size, 0, 0)).ids, batch.ids)
    with torch.no_grad():
        assert_close(lm_loss(loaded, batch, -2), lm_loss(backbone, batch, -2), rtol=0, atol=0)
