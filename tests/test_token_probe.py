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
    mean over patches is the same for every shape."""
    rng = np.random.default_rng(seed)
    colour, shape = rng.integers(0, 3, n), rng.integers(0, tokens, n)
    patches = torch.from_numpy(rng.normal(0, 0.1, (n, images, tokens, width))).float()
    patches[..., 0] += torch.from_numpy(colour).float()[:, None, None]
    patches[torch.arange(n), :, torch.from_numpy(shape), 1] += 3.0
    cls = patches.mean(2)
    mask = torch.ones(n, images, dtype=torch.bool)
    mask[:5] = False  # entities without images are left out
    labels = pd.DataFrame({"colour": colour, "shape": shape})
    return patches, cls, mask, labels


def test_probe_tokens_pooling_keeps_content_not_layout():
    out = probe_tokens(*_world())
    assert out["entities"] == 195 and out["train_entities"] == 136 and out["pictures"] == 195 * 4
    assert out["colour"]["patch_mean"] == 1.0 and out["colour"]["cls"] == 1.0
    # the layout-only attribute: every shape has the same pooled mean, so the probe is at chance
    assert out["shape"]["patch_mean"] < 0.45 and out["shape"]["cls"] < 0.45
    assert out["shape"]["classes"] == 4 and out["colour"]["classes"] == 3


def test_probe_tokens_deterministic_and_needs_entities():
    assert probe_tokens(*_world(), seed=3) == probe_tokens(*_world(), seed=3)
    with pytest.raises(ValueError, match="7 entities with images and labels; need at least 10"):
        probe_tokens(*_world(n=12))
