"""Where the compressor looks (elmm.mvtc_attention): the statistics against hand-computed values,
and the pass over a model against the views' own forward."""

from __future__ import annotations

import pytest
import torch

from elmm.model import ELMM, ELMMConfig
from elmm.mvtc_attention import attention_by_relation, markdown, view_statistics


def test_view_statistics_by_hand() -> None:
    # one object, two relations, one head, 4 tokens = 2 pictures of 2 tokens (the first of each is "mark")
    w = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]], [[0.0, 0.5, 0.0, 0.5]]]])  # [E=1, R=2, H=1, T=4]
    stats = view_statistics(w, torch.ones(1, 4, dtype=torch.bool), tokens_per_image=2)
    # mark tokens 0 and 2: all of r0's weight, none of r1's
    assert stats["mark_mass"].tolist() == [[1.0, 0.0]]
    # the object's mean over relations is [0.5, 0.25, 0, 0.25]; TV = half the L1 distance
    assert stats["shift"].tolist() == [[0.5, 0.5]]
    # an even spread is 0.25 each: r0 is 0.5 * (0.75 + 3 * 0.25), r1 0.5 * 4 * 0.25
    assert stats["from_uniform"].tolist() == [[0.75, 0.5]]


def test_view_statistics_uniform_over_real_tokens_only() -> None:
    # token 3 is padding: a mean pool over tokens 0-2 is exactly "uniform"
    w = torch.tensor([[[[1 / 3, 1 / 3, 1 / 3, 0.0]]]])
    stats = view_statistics(w, torch.tensor([[True, True, True, False]]), tokens_per_image=3)
    assert stats["from_uniform"].item() == pytest.approx(0.0, abs=1e-7)
    assert stats["mark_mass"].item() == pytest.approx(1 / 3)  # tokens 0 and 3; 3 carries nothing
    assert stats["shift"].item() == 0.0  # one relation: nothing to shift from


def test_attention_by_relation_on_a_model(micro_workspace) -> None:
    ws = micro_workspace
    model = ELMM(ws.backbone, ELMMConfig(num_entities=ws.kg.num_entities, heads=2)).eval()
    report = attention_by_relation(model, ws, batch_size=7)  # batches that split objects' relations
    names = ws.kg.relations["name"].tolist()
    assert report["objects"] == int((ws.kg.entities["num_images"] > 0).sum())
    assert set(report["views"]) == {"text_view", "image_view"}
    for rel in names:
        image = report["views"]["image_view"][rel]
        assert image["shift"] == 0.0  # its query (the pictures' CLS tokens) never sees the relation
        for view in ("text_view", "image_view"):
            s = report["views"][view][rel]
            assert 0.0 <= s["mark_mass"] <= s["top_head_mark_mass"] <= 1.0
            assert 0.0 <= s["from_uniform"] <= 1.0
    # the text view's query pools the prompt, which names the relation: its weights do move
    assert max(report["views"]["text_view"][r]["shift"] for r in names) > 0.0
    assert "has colour" in markdown(report)


def test_attention_by_relation_needs_a_view(micro_workspace) -> None:
    ws = micro_workspace
    model = ELMM(ws.backbone, ELMMConfig(num_entities=ws.kg.num_entities, heads=2, mvtc_enabled=False))
    with pytest.raises(ValueError, match="no MVTC view"):
        attention_by_relation(model, ws)
