"""Tests for elmm.pruning.layers: pruned decoder layers, similarity analysis, bottom-up calibration.

The decoder is driven directly with `inputs_embeds` (real token embeddings, right padding), so the
tests depend only on the backbone's decoder, not on the rest of the ELMM model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from elmm.pruning import layers as pruning_layers
from elmm.pruning.compensation import CompensationAccumulator
from elmm.pruning.layers import (
    PrunedDecoderLayer,
    attention_free_top,
    calibrate_bottom_up,
    hidden_at,
    measure_similarity,
    prune_layers,
    rank_layers,
    split_layer,
)

EXACT = {"atol": 0.0, "rtol": 0.0}


# ---------------------------------------------------------------------------------------- helpers
def make_batch(backbone, lengths: list[int], width: int, seed: int) -> dict:
    """Random token ids embedded by the backbone, right-padded to `width`; "decoder_mask" True = real."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, backbone.model.config.text_config.vocab_size, (len(lengths), width), generator=g)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        embeds = backbone.embed_tokens(ids)
    return {"embeds": embeds, "decoder_mask": mask}


def decode(backbone, batch: dict) -> torch.Tensor:
    return backbone.decoder(inputs_embeds=batch["embeds"], attention_mask=batch["decoder_mask"].long()).last_hidden_state


def runner(backbone):
    """The `run` callable measure_similarity / calibrate_bottom_up expect: forward, return the mask."""
    def run(batch: dict) -> torch.Tensor:
        decode(backbone, batch)
        return batch["decoder_mask"]
    return run


class Capture:
    """Forward pre-hooks that record the first positional/keyword input of modules, per call."""

    def __init__(self, modules: dict):
        self.values: dict = {}
        self.handles = [m.register_forward_pre_hook(self._hook(k), with_kwargs=True) for k, m in modules.items()]

    def _hook(self, key):
        def pre(module, args, kwargs):
            self.values[key] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return pre

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def capture(backbone, batch: dict, modules: dict) -> dict:
    cap = Capture(modules)
    try:
        with torch.no_grad():
            decode(backbone, batch)
    finally:
        cap.remove()
    return cap.values


@pytest.fixture
def batches(micro_backbone) -> list[dict]:
    return [make_batch(micro_backbone, [12, 9, 12, 5], 12, seed=10),
            make_batch(micro_backbone, [10, 10, 7], 10, seed=11)]


# ---------------------------------------------------------------------------------------- pruned layers
def test_k0_pruning_is_identity(load_micro_backbone, micro_backbone, batches) -> None:
    """Pruning no layers (K=0) leaves the model exactly equal to the original."""
    bb = load_micro_backbone()
    before = [layer for layer in bb.layers]
    prune_layers(bb.layers, {})
    assert all(a is b for a, b in zip(bb.layers, before))
    with torch.no_grad():
        for batch in batches:
            assert_close(decode(bb, batch), decode(micro_backbone, batch), **EXACT)


def counted(fn, calls: list):
    """`fn` (`_attention`) recording, per call, (whether the decoder passed no mask, whether the
    queries are every position)."""
    def wrapper(attn, q, k, v, kwargs, positions=None):
        calls.append((kwargs.get("attention_mask") is None, positions is None))
        return fn(attn, q, k, v, kwargs, positions)
    return wrapper


def test_hidden_at_without_padding_matches_the_full_pass(load_micro_backbone, batches, monkeypatch) -> None:
    """A batch without padding: the decoder passes no mask (causal attention), and the read
    positions' own causal rows must give the same hidden states and gradients."""
    bb = load_micro_backbone()
    bb.decoder.double()
    calls = []
    monkeypatch.setattr(pruning_layers, "_attention", counted(pruning_layers._attention, calls))
    batch = batches[0]
    b, t = batch["decoder_mask"].shape
    mask = torch.ones(b, t, dtype=torch.bool)
    positions = torch.tensor([[0, t - 1, 3]] * b)
    results = []
    for full in (False, True):
        handle = bb.decoder.register_forward_hook(lambda *a: None) if full else None
        embeds = batch["embeds"].double().requires_grad_(True)
        out = hidden_at(bb.decoder, embeds, mask, positions)
        out.square().sum().backward()
        results.append((out.detach(), embeds.grad))
        if handle is not None:
            handle.remove()
    # no mask: the layers below the split run causal, the split layer builds its read rows
    assert calls == [(True, True)] * (len(bb.layers) - 1) + [(True, False)]
    assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-12)
    assert_close(results[0][1], results[1][1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("pruned", "top", "split"),
                         [([], None, 2), ([1], None, 2), ([1, 2], 1, 0), ([2], 2, 1), ([0, 1, 2], 0, None),
                          ([0], None, 2)])
def test_hidden_at_runs_the_attention_free_top_on_the_read_positions_only(load_micro_backbone, batches, monkeypatch,
                                                                           pruned, top, split) -> None:
    """The hidden states at the real positions read, and their gradients, are those of the full
    decoder pass, whether the layers below the split run on the real positions only, and the last
    attention layer's MLP and the pruned layers above it on the read ones, or everything runs on
    every position. Read positions that are padding are left out: their values are unspecified."""
    bb = load_micro_backbone()
    g = torch.Generator().manual_seed(3)
    dim = bb.hidden_size
    prune_layers(bb.layers, {i: 0.1 * torch.randn(dim, dim, generator=g) for i in pruned})
    assert attention_free_top(bb.layers) == top
    assert split_layer(bb.layers) == split
    bb.decoder.double()  # float64: the two passes agree to rounding far below the tolerance
    calls = []
    monkeypatch.setattr(pruning_layers, "_attention", counted(pruning_layers._attention, calls))
    for batch in batches:
        b, t = batch["decoder_mask"].shape
        positions = torch.stack([torch.randperm(t, generator=g)[:3] for _ in range(b)])
        real = batch["decoder_mask"].gather(1, positions)
        results = []
        calls.clear()
        for observed in (False, True):
            # a hook on the last layer makes hidden_at take the full pass (as the pruning analyses do)
            handle = bb.layers[-1].register_forward_hook(lambda *a: None) if observed else None
            assert (attention_free_top(bb.layers) is None) == (observed or top is None)
            assert (split_layer(bb.layers) is None) == (observed or split is None)
            embeds = batch["embeds"].double().requires_grad_(True)
            out = hidden_at(bb.decoder, embeds, batch["decoder_mask"], positions)
            (out.square().sum(-1) * real).sum().backward()
            results.append((out.detach()[real], embeds.grad))
            if handle is not None:
                handle.remove()
        (fast, fast_grad), (full, full_grad) = results
        # Llama's attention: every position's queries below the split, the read ones in it, with
        # the padded batch's mask
        below = [] if split is None else [i for i in range(split) if i not in pruned]
        assert calls == [(False, True)] * len(below) + ([(False, False)] if split is not None else [])
        assert out.shape == (b, 3, dim)
        assert_close(fast, full, rtol=1e-10, atol=1e-12)
        assert_close(fast_grad, full_grad, rtol=1e-10, atol=1e-12)
        whole = bb.decoder(inputs_embeds=batch["embeds"].double(), attention_mask=batch["decoder_mask"].long())
        whole = whole.last_hidden_state.detach().gather(1, positions[:, :, None].expand(-1, -1, dim))
        assert_close(full, whole[real], **EXACT)


def test_hidden_at_lets_a_hook_below_the_split_see_the_padded_layer(load_micro_backbone, batches) -> None:
    """The pruning analyses hook layers below the split (calibration captures a layer's input and its
    attention's output): with a hook there, those layers run through the decoder's own forward, so
    the hook sees the [B, T, D] stream it expects, and the values read are those of the full pass."""
    bb = load_micro_backbone()
    assert split_layer(bb.layers) == 2
    batch = batches[0]
    b, t = batch["decoder_mask"].shape
    positions = torch.tensor([[0, 1, 2]] * b)
    seen = []
    handle = bb.layers[0].self_attn.register_forward_hook(lambda m, a, out: seen.append(out[0].shape))
    try:
        with torch.no_grad():
            out = hidden_at(bb.decoder, batch["embeds"], batch["decoder_mask"], positions)
    finally:
        handle.remove()
    assert seen == [(b, t, bb.hidden_size)]
    with torch.no_grad():
        whole = decode(bb, batch).gather(1, positions[:, :, None].expand(-1, -1, bb.hidden_size))
    assert_close(out, whole, rtol=1e-5, atol=1e-6)


def test_hidden_at_falls_back_when_the_decoder_passes_other_arguments(load_micro_backbone, batches,
                                                                     monkeypatch) -> None:
    """If the Llama decoder ever passes its layers arguments `_attention` does not read (another
    transformers version), the layers below the split run whole with those arguments: the real
    positions read still get the full pass's values."""
    bb = load_micro_backbone()
    bb.decoder.double()
    monkeypatch.setattr(pruning_layers, "_kwargs_supported", lambda kwargs: False)
    batch = batches[0]
    b, t = batch["decoder_mask"].shape
    positions = torch.tensor([[0, 1, 4]] * b)
    real = batch["decoder_mask"].gather(1, positions)
    with torch.no_grad():
        out = hidden_at(bb.decoder, batch["embeds"].double(), batch["decoder_mask"], positions)
        whole = bb.decoder(inputs_embeds=batch["embeds"].double(), attention_mask=batch["decoder_mask"].long())
    whole = whole.last_hidden_state.gather(1, positions[:, :, None].expand(-1, -1, bb.hidden_size))
    assert_close(out[real], whole[real], rtol=1e-10, atol=1e-12)


def test_prune_without_compensation_equals_zeroed_attention(load_micro_backbone, batches) -> None:
    """prune_layers with W=None == the unpruned model with those attention outputs set to zero."""
    pruned, ref = load_micro_backbone(), load_micro_backbone()
    chosen = [0, 2]
    prune_layers(pruned.layers, {i: None for i in chosen})

    def zero_out(module, args, kwargs, out):
        return (torch.zeros_like(out[0]),) + tuple(out[1:])

    handles = [ref.layers[i].self_attn.register_forward_hook(zero_out, with_kwargs=True) for i in chosen]
    try:
        with torch.no_grad():
            for batch in batches:
                got, expected = decode(pruned, batch), decode(ref, batch)
                assert_close(got, expected, rtol=1e-6, atol=1e-6)
    finally:
        for h in handles:
            h.remove()
    # Control: without the zeroing hooks the unpruned model differs, so the check is not vacuous.
    with torch.no_grad():
        assert (decode(ref, batches[0]) - decode(pruned, batches[0])).abs().max() > 1e-3


def test_pruned_layers_run_no_attention(load_micro_backbone, batches) -> None:
    """Pruned layers hold no attention module; a forward pass calls attention num_layers - K times."""
    bb = load_micro_backbone()
    attn = {i: layer.self_attn for i, layer in enumerate(bb.layers)}
    calls = {i: 0 for i in attn}

    def counter(i):
        def pre(module, args, kwargs):
            calls[i] += 1
        return pre

    handles = [m.register_forward_pre_hook(counter(i), with_kwargs=True) for i, m in attn.items()]
    chosen = {0: None, 2: torch.zeros(bb.hidden_size, bb.hidden_size)}
    prune_layers(bb.layers, chosen)
    try:
        with torch.no_grad():
            decode(bb, batches[0])
    finally:
        for h in handles:
            h.remove()
    assert calls == {0: 0, 1: 1, 2: 0}
    assert sum(calls.values()) == bb.num_layers - len(chosen)
    live = {id(m) for m in bb.model.modules()}
    assert id(attn[0]) not in live and id(attn[2]) not in live and id(attn[1]) in live
    for i in chosen:
        layer = bb.layers[i]
        assert isinstance(layer, PrunedDecoderLayer) and layer.index == i
        assert not hasattr(layer, "self_attn")
        assert not hasattr(layer, "input_layernorm")
        assert not any("self_attn" in name or "proj" in name and "mlp" not in name
                       for name, _ in layer.named_modules())
    with pytest.raises(ValueError, match="already pruned"):
        prune_layers(bb.layers, {0: None})


def test_pruned_layer_with_compensation_formula(load_micro_backbone, micro_backbone, batches) -> None:
    """A PrunedDecoderLayer computes h = x + xW, y = h + mlp(post_attention_layernorm(h))."""
    bb = load_micro_backbone()
    torch.manual_seed(0)
    d = bb.hidden_size
    w = torch.randn(d, d) * 0.1
    layer = PrunedDecoderLayer(bb.layers[1], w, 1)
    assert isinstance(layer.compensation, nn.Parameter)
    assert_close(layer.compensation.detach(), w, **EXACT)
    assert layer.compensation.data_ptr() != w.data_ptr()  # a copy, not a view of the caller's tensor
    x = torch.randn(2, 5, d)
    with torch.no_grad():
        h = x + x @ w
        expected = h + bb.layers[1].mlp(bb.layers[1].post_attention_layernorm(h))
        assert_close(layer(x, attention_mask=None), expected, rtol=1e-6, atol=1e-6)
        no_w = PrunedDecoderLayer(bb.layers[1], None, 1)
        assert no_w.compensation is None
        assert_close(no_w(x), x + bb.layers[1].mlp(bb.layers[1].post_attention_layernorm(x)), **EXACT)

    # In the whole model: equal to the unpruned model whose layer-1 attention output is replaced by xW.
    prune_layers(bb.layers, {1: w})
    ref = micro_backbone
    store = {}

    def keep_x(module, args, kwargs):
        store["x"] = args[0] if args else kwargs["hidden_states"]

    def replace(module, args, kwargs, out):
        return (store["x"] @ w,) + tuple(out[1:])

    handles = [ref.layers[1].register_forward_pre_hook(keep_x, with_kwargs=True),
               ref.layers[1].self_attn.register_forward_hook(replace, with_kwargs=True)]
    try:
        with torch.no_grad():
            assert_close(decode(bb, batches[0]), decode(ref, batches[0]), rtol=1e-5, atol=1e-5)
    finally:
        for hd in handles:
            hd.remove()


# ---------------------------------------------------------------------------------------- similarity
def test_measure_similarity_matches_hand_computation(micro_backbone, batches) -> None:
    """Per-layer mean cosine over real tokens of all batches, padding excluded, read two ways:
    residual = cos(x, x + attn(LN1(x))), attention = cos(LN1(x), attn(LN1(x)))."""
    bb = micro_backbone
    all_sims = measure_similarity(bb.layers, runner(bb), batches)
    assert set(all_sims) == {"residual", "attention"}
    sims = all_sims["residual"]
    assert len(sims) == len(all_sims["attention"]) == bb.num_layers
    assert all(-1.0 <= s <= 1.0 for v in all_sims.values() for s in v)

    # Independent capture: x = input of input_layernorm, x + attn = input of post_attention_layernorm;
    # LN1(x) recomputed from x with the layer's own norm.
    sums = {k: torch.zeros(bb.num_layers, dtype=torch.float64) for k in all_sims}
    count = 0

    def cos(a, b):
        return (a * b).sum(-1).div(a.norm(dim=-1) * b.norm(dim=-1)).sum()

    for batch in batches:
        mods = {}
        for i, layer in enumerate(bb.layers):
            mods[("x", i)] = layer.input_layernorm
            mods[("h", i)] = layer.post_attention_layernorm
        vals = capture(bb, batch, mods)
        m = batch["decoder_mask"]
        for i in range(bb.num_layers):
            x, h = vals[("x", i)].double(), vals[("h", i)].double()
            with torch.no_grad():
                normed = bb.layers[i].input_layernorm(vals[("x", i)]).double()
            sums["residual"][i] += cos(x[m], h[m])
            sums["attention"][i] += cos(normed[m], (h - x)[m])
        count += int(m.sum())
    assert count == 12 + 9 + 12 + 5 + 10 + 10 + 7  # token-weighted over all batches
    for k in all_sims:
        assert all_sims[k] == pytest.approx((sums[k] / count).tolist(), rel=1e-5, abs=1e-5), k
    assert all_sims["attention"] != pytest.approx(sims, abs=1e-3)  # two different readings

    # Padding really is excluded: garbage in padded positions does not change the result.
    noisy = []
    for batch in batches:
        b = dict(batch)
        e = batch["embeds"].clone()
        e[~batch["decoder_mask"]] = torch.randn(int((~batch["decoder_mask"]).sum()), bb.hidden_size) * 50
        b["embeds"] = e
        noisy.append(b)
    noisy_sims = measure_similarity(bb.layers, runner(bb), noisy)
    for k in all_sims:
        assert noisy_sims[k] == pytest.approx(all_sims[k], rel=1e-5, abs=1e-6)


def test_rank_layers_most_similar_first_ties_by_index() -> None:
    """rank_layers orders from most to least similar; equal similarities keep index order."""
    assert rank_layers([0.5, 0.9, 0.1, 0.9, -0.2]) == [1, 3, 0, 2, 4]
    assert rank_layers([]) == []


# ---------------------------------------------------------------------------------------- calibration
def test_calibrate_bottom_up_uses_pruned_lower_layers(load_micro_backbone, micro_backbone, batches) -> None:
    """The upper layer's W_c is a ridge fit on x from the model whose lower layer is already pruned
    and compensated (global target: unpruned h_l minus that x), not on the unpruned model's x."""
    bb, ref = load_micro_backbone(), micro_backbone
    d, damp = bb.hidden_size, 0.01
    original = list(bb.layers)
    results = calibrate_bottom_up(bb.layers, [2, 0], runner(bb), batches, [], method="ridge", target="global",
                                  damp=damp, init="closed_form", progress=lambda s: None)
    assert [r.layer for r in results] == [0, 2]
    assert isinstance(bb.layers[0], PrunedDecoderLayer) and isinstance(bb.layers[2], PrunedDecoderLayer)
    assert bb.layers[1] is original[1]
    for r in results:
        assert_close(bb.layers[r.layer].compensation.detach(), r.weight, **EXACT)

    fits = {}
    for name, x_source in (("pruned", bb), ("unpruned", ref)):
        accs = {0: CompensationAccumulator(d), 2: CompensationAccumulator(d)}
        for batch in batches:
            m = batch["decoder_mask"]
            xs = capture(x_source, batch, {0: x_source.layers[0], 2: x_source.layers[2]})
            h = capture(ref, batch, {0: ref.layers[0].post_attention_layernorm,
                                     2: ref.layers[2].post_attention_layernorm})
            for layer in (0, 2):
                accs[layer].update(xs[layer], h[layer] - xs[layer], m)
            if name == "pruned":
                x_ref = capture(ref, batch, {2: ref.layers[2]})[2]
                # The upper layer sees a different input once the lower layer is pruned.
                assert (xs[2][m] - x_ref[m]).abs().max() > 1e-3
                assert_close(xs[0], batch["embeds"], **EXACT)
        fits[name] = {layer: acc.solve("ridge", damp) for layer, acc in accs.items()}

    installed = {layer: bb.layers[layer].compensation.detach() for layer in (0, 2)}
    assert_close(installed[0], fits["pruned"][0], rtol=1e-4, atol=1e-5)
    assert_close(installed[2], fits["pruned"][2], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(installed[2], fits["unpruned"][2], rtol=1e-3, atol=1e-4)
    # Layer 0 sees the embeddings in both models, so both fits agree there.
    assert_close(fits["unpruned"][0], fits["pruned"][0], rtol=1e-4, atol=1e-5)

    e = results[1].errors
    assert set(e) == {"ridge", "paper", "none"}
    assert e["ridge"]["fit"]["global"]["after"] < e["ridge"]["fit"]["global"]["before"]
    assert e["none"]["fit"]["global"]["relative"] == pytest.approx(1.0)
    assert e["ridge"]["fit"]["global"]["tokens"] == int(sum(b["decoder_mask"].sum() for b in batches))


class LinearAttention(nn.Module):
    """An 'attention' whose output is exactly hidden_states @ A."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = a

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states @ self.a, None


def test_linear_attention_is_compensated_exactly(load_micro_backbone, batches, micro_backbone) -> None:
    """If attn(LN(x)) is exactly x @ A (LN = identity), the local-target ridge fit recovers A: error ~0."""
    bb = load_micro_backbone()
    torch.manual_seed(0)
    a = torch.randn(bb.hidden_size, bb.hidden_size) * 0.1
    bb.layers[1].input_layernorm = nn.Identity()
    bb.layers[1].self_attn = LinearAttention(a)
    held = [make_batch(micro_backbone, [8, 11, 11], 11, seed=12)]
    (res,) = calibrate_bottom_up(bb.layers, [1], runner(bb), batches, held, method="ridge", target="local",
                                 damp=1e-9, init="closed_form", progress=lambda s: None)
    err = res.errors["ridge"]
    for split in ("fit", "heldout"):
        assert err[split]["local"]["before"] > 1e-2
        assert err[split]["local"]["relative"] < 1e-4, err[split]["local"]
    assert res.errors["none"]["fit"]["local"]["relative"] == pytest.approx(1.0)
    assert_close(res.weight, a, rtol=1e-3, atol=1e-4)
    assert_close(bb.layers[1].compensation.detach(), a, rtol=1e-3, atol=1e-4)


def test_calibrate_init_zero_and_method_none(load_micro_backbone, batches) -> None:
    """init="zero" installs W_c = 0 (errors still reported for the closed form); method="none"
    installs no compensation at all."""
    bb = load_micro_backbone()
    (res,) = calibrate_bottom_up(bb.layers, [1], runner(bb), batches, [], method="ridge", target="global",
                                 damp=0.01, init="zero", progress=lambda s: None)
    layer = bb.layers[1]
    assert isinstance(layer, PrunedDecoderLayer) and layer.compensation is not None
    assert layer.compensation.shape == (bb.hidden_size, bb.hidden_size)
    assert torch.count_nonzero(layer.compensation) == 0
    assert res.weight is not None and torch.count_nonzero(res.weight) == 0
    assert res.errors["ridge"]["fit"]["global"]["relative"] < 1.0  # the closed-form fit is still evaluated

    bb2 = load_micro_backbone()
    (res2,) = calibrate_bottom_up(bb2.layers, [1], runner(bb2), batches, [], method="none", target="global",
                                  damp=0.01, init="closed_form", progress=lambda s: None)
    assert isinstance(bb2.layers[1], PrunedDecoderLayer)
    assert bb2.layers[1].compensation is None and res2.weight is None
    assert not any("compensation" in n for n, _ in bb2.model.named_parameters())


def test_similarity_stage_writes_both_readings_and_a_random_init_control(make_project, run_stage) -> None:
    """The stage ranks by prune.similarity, and writes both readings for the backbone and the
    random-init control to the metrics, the plot CSV and the file calibrate reads."""
    import json

    project = make_project({"prune": {"k": 1, "samples": 8, "batch_size": 4, "similarity": "attention"}})
    run_stage("similarity", project)
    sim = json.loads((project / "metrics/similarity.json").read_text())
    assert json.loads((project / "data/pruning/similarity.json").read_text()) == sim
    assert sim["ranked_by"] == "attention" and sim["samples"] == 8
    assert sim["ranking"] == rank_layers(sim["backbone"]["attention"])
    for curves in (sim["backbone"], sim["random_init"]):
        assert set(curves) >= {"residual", "attention"} and all(len(v) == 3 for k, v in curves.items() if k != "seed")
    assert sim["random_init"]["residual"] != sim["backbone"]["residual"]
    rows = (project / "metrics/plots/similarity.csv").read_text().splitlines()
    assert rows[0] == "layer,residual,attention,residual_random_init,attention_random_init"
    assert rows[2].split(",") == ["1", *(str(sim[w][k][1]) for w in ("backbone", "random_init")
                                         for k in ("residual", "attention"))]


# ------------------------------------------------------------------------------ the artefact file
def test_pruning_artefact_round_trips_and_is_byte_stable(tmp_path) -> None:
    """Same tensors, same bytes: safetensors writes a metadata map in hash order, so an artefact with
    several metadata keys got another checksum on each write and DVC saw a changed output."""
    import hashlib

    from safetensors.torch import save_file

    from elmm.pruning.artifact import load_pruning, save_pruning

    w = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    path = tmp_path / "p.safetensors"
    digests = set()
    for _ in range(8):
        save_pruning(path, [3, 1], {1: w, 3: None}, "ridge", "closed_form")
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1
    layers, weights, method = load_pruning(path)
    assert (layers, method, weights[3]) == ([1, 3], "ridge", None)
    assert_close(weights[1], w, **EXACT)

    # The earlier layout (one metadata key per field) still loads; anything else is named.
    old = tmp_path / "old.safetensors"
    save_file({"layer.2": w}, str(old), metadata={"layers": "[2]", "compensation": "paper", "init": "zero"})
    layers, weights, method = load_pruning(old)
    assert (layers, method) == ([2], "paper")
    assert_close(weights[2], w, **EXACT)
    bad = tmp_path / "bad.safetensors"
    save_file({"x": w}, str(bad))
    with pytest.raises(ValueError, match="bad.safetensors: not a pruning artefact"):
        load_pruning(bad)
