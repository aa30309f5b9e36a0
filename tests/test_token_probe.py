"""elmm.token_probe: the probe reads what pooled tokens carry, and nothing they do not."""

import numpy as np
import pandas as pd
import pytest
import torch

from elmm.token_probe import fit_probe, probe_tokens


def test_fit_probe_separable_and_independent():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (600,), generator=g)
    separable = torch.nn.functional.one_hot(y, 5).float() + 0.1 * torch.randn(600, 5, generator=g)
    assert fit_probe(separable[:400], y[:400], separable[400:], y[400:]) == 1.0
    noise = torch.randn(600, 8, generator=g)  # carries nothing about y: chance is 0.2
    assert fit_probe(noise[:400], y[:400], noise[400:], y[400:]) < 0.35


def _world(n=200, images=4, tokens=4, width=6, seed=0):
    """`colour` in every patch token's content; `shape` only in which token holds a bump, so the
    mean over patches is the same for every shape; the CLS token carries shape and not colour (so
    the two readings cannot be swapped unnoticed). Entities 0-4 have no images; every other one has
    its last slot empty, filled with junk that must be ignored."""
    rng = np.random.default_rng(seed)
    colour, shape = rng.integers(0, 3, n), rng.integers(0, tokens, n)
    patches = torch.from_numpy(rng.normal(0, 0.1, (n, images, tokens, width))).float()
    patches[..., 0] += torch.from_numpy(colour).float()[:, None, None]
    patches[torch.arange(n), :, torch.from_numpy(shape), 1] += 3.0
    cls = torch.from_numpy(rng.normal(0, 0.1, (n, images, width))).float()
    cls[torch.arange(n), :, torch.from_numpy(shape)] += 1.0
    mask = torch.ones(n, images, dtype=torch.bool)
    mask[:5] = False
    mask[:, -1] = False
    patches[:, -1] = torch.from_numpy(rng.normal(0, 50, (n, tokens, width))).float()  # junk in the empty slot
    cls[:, -1] = torch.from_numpy(rng.normal(0, 50, (n, width))).float()
    labels = pd.DataFrame({"colour": colour, "shape": shape})
    return patches, cls, mask, labels


def test_probe_tokens_pooling_keeps_content_not_layout():
    out = probe_tokens(*_world())
    assert out["entities"] == 195 and out["train_entities"] == 136 and out["pictures"] == 195 * 3
    assert out["colour"]["patch_mean"] == 1.0 and out["shape"]["cls"] == 1.0
    # the layout-only attribute: every shape has the same pooled patch mean, so that reading is at chance
    assert out["shape"]["patch_mean"] < 0.45 and out["colour"]["cls"] < 0.6
    assert out["shape"]["classes"] == 4 and out["colour"]["classes"] == 3
    assert "projected_mean" not in out["colour"]


def test_probe_tokens_best_constant_and_projection():
    patches, cls, mask, labels = _world()
    out = probe_tokens(patches, cls, mask, labels, project=lambda x: 2 * x + 1)
    test = np.setdiff1d(np.arange(195), np.random.default_rng(0).permutation(195)[:136]) + 5  # rows of labels
    for attr in ("colour", "shape"):
        assert out[attr]["best_constant"] == round(labels[attr].iloc[test].value_counts().max() / len(test), 4)
    assert out["colour"]["projected_mean"] == 1.0 and out["shape"]["projected_mean"] < 0.45


def test_probe_tokens_deterministic_and_needs_entities():
    assert probe_tokens(*_world(), seed=3) == probe_tokens(*_world(), seed=3)
    with pytest.raises(ValueError, match="7 entities with images and labels; need at least 10"):
        probe_tokens(*_world(n=12))
