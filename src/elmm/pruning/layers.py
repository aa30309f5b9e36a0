"""Attention pruning on the real decoder layers: similarity analysis and bottom-up calibration.

A decoder layer computes  h = x + attn(LN1(x));  y = h + mlp(LN2(h)).
A pruned layer computes   h = x + x W_c  (or h = x with no compensation);  y = h + mlp(LN2(h)),
with no attention module at all: no Q/K/V projections, no KV cache, no attention kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .compensation import CompensationAccumulator, ErrorMeter


class PrunedDecoderLayer(nn.Module):
    """Drop-in replacement for an HF decoder layer whose attention sub-block is removed."""

    def __init__(self, layer: nn.Module, compensation: torch.Tensor | None, index: int):
        super().__init__()
        self.index = index
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.mlp = layer.mlp
        self.compensation = None if compensation is None else nn.Parameter(compensation.clone().float())

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = hidden_states
        if self.compensation is not None:
            h = h + h @ self.compensation.to(h.dtype)
        return h + self.mlp(self.post_attention_layernorm(h))


class _Below(Exception):
    """Raised by `hidden_at`'s hook once the residual stream below the attention-free top is read."""


def attention_free_top(layers: nn.ModuleList) -> int | None:
    """Index of the first of the pruned layers that end the decoder, or None when the last layer
    keeps its attention or a hook observes one of them (the pruning analyses need every position)."""
    start = len(layers)
    while start > 0 and isinstance(layers[start - 1], PrunedDecoderLayer):
        start -= 1
    if start == len(layers) or _observed(*layers[start:]):
        return None
    return start


def _observed(*modules: nn.Module) -> bool:
    """Whether a forward hook watches any of `modules` or their submodules."""
    return any(m._forward_hooks or m._forward_pre_hooks for module in modules for m in module.modules())


def hidden_at(decoder: nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
    """The decoder's final hidden states (after its norm) at `positions` [B, n] only: [B, n, D].

    A pruned layer maps each position on its own (no attention), so once every layer above some
    point is pruned, positions nobody reads cannot change the ones read: those top layers run on
    the `n` read positions instead of the whole sequence (the same function; ELMM reads the image
    block and two text positions, so at K = L/2 pruned from the top this is a third of the work of
    those layers). The layers below run on the whole sequence through the decoder's own forward.
    A forward hook on the top layers, the decoder or its norm gets the full pass instead.
    """
    layers = decoder.layers
    # whoever observes the decoder's own forward or its norm gets the full pass too
    start = None if _observed(decoder.norm) or decoder._forward_hooks or decoder._forward_pre_hooks \
        else attention_free_top(layers)
    index = positions[:, :, None].expand(-1, -1, embeds.shape[-1])
    if start is None:
        hidden = decoder(inputs_embeds=embeds, attention_mask=attention_mask.long()).last_hidden_state
        return hidden.gather(1, index)
    x = embeds
    if start > 0:  # the decoder's forward up to the input of layer `start`
        store = {}

        def stop(module, args, kwargs):
            store["x"] = _layer_input(args, kwargs)
            raise _Below

        handle = layers[start].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            decoder(inputs_embeds=embeds, attention_mask=attention_mask.long())
        except _Below:
            pass
        finally:
            handle.remove()
        x = store["x"]
    x = x.gather(1, index)
    for layer in layers[start:]:
        x = layer(x)
    return decoder.norm(x)


def prune_layers(layers: nn.ModuleList, weights: dict[int, torch.Tensor | None]) -> None:
    """Replace each layer index in `weights` by a PrunedDecoderLayer with that W_c (or none)."""
    for index, w in weights.items():
        if isinstance(layers[index], PrunedDecoderLayer):
            raise ValueError(f"decoder layer {index} is already pruned")
        layers[index] = PrunedDecoderLayer(layers[index], w, index)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the needed activations are captured."""


def _layer_input(args, kwargs) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


SIMILARITY_READINGS = ("residual", "attention")


@torch.no_grad()
def measure_similarity(layers: nn.ModuleList, run: Callable[[dict], torch.Tensor],
                       batches: Iterable[dict]) -> dict[str, list[float]]:
    """Per layer, the mean per-token cosine similarity of the attention sub-block's input and output,
    read two ways (the paper's Fig. 3 does not say which):

    - `residual`: cos(x, x + attn(LN1(x))), on the residual stream (the input of the layer and of its
      MLP norm): how much the sub-block changes the hidden state;
    - `attention`: cos(LN1(x), attn(LN1(x))), the attention module's own input and output.

    `run(batch)` runs the model's forward on one batch and returns the decoder's attention mask
    [B, T] (True = real token). Hooks read the residual stream entering each layer and the
    attention module's input and output, so the model's numerics are untouched. Computed in
    float32, padding excluded, averaged over all real tokens of all batches. Returns
    {reading: [one value per layer]}.
    """
    sums = {name: torch.zeros(len(layers), dtype=torch.float64) for name in SIMILARITY_READINGS}
    count = 0
    captured: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(layers):
        def pre(module, args, kwargs, i=i):
            captured[("x", i)] = _layer_input(args, kwargs)

        def attn_pre(module, args, kwargs, i=i):
            captured[("n", i)] = _layer_input(args, kwargs)

        def post(module, args, kwargs, output, i=i):
            captured[("a", i)] = output[0] if isinstance(output, tuple) else output

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.self_attn.register_forward_pre_hook(attn_pre, with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(post, with_kwargs=True))
    cosine = torch.nn.functional.cosine_similarity
    try:
        for batch in batches:
            captured.clear()
            mask = run(batch).bool()
            for i in range(len(layers)):
                x = captured[("x", i)].float()
                a = captured[("a", i)].float()
                sums["residual"][i] += cosine(x, x + a, dim=-1)[mask].double().sum().cpu()
                sums["attention"][i] += cosine(captured[("n", i)].float(), a, dim=-1)[mask].double().sum().cpu()
            count += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    return {name: (s / max(count, 1)).tolist() for name, s in sums.items()}


def rank_layers(similarity: list[float]) -> list[int]:
    """Layer indices from most to least similar: the first K are the ones to prune."""
    return sorted(range(len(similarity)), key=lambda i: (-similarity[i], i))


@contextlib.contextmanager
def _capture_layer(layer: nn.Module, want_attention: bool):
    """Capture the input x of `layer` (and its attention output), then stop the forward pass."""
    store: dict[str, torch.Tensor] = {}
    handles = []

    def pre(module, args, kwargs):
        store["x"] = _layer_input(args, kwargs)
        if not want_attention:
            raise _Stop

    handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    if want_attention:
        def post(module, args, kwargs, output):
            store["a"] = output[0] if isinstance(output, tuple) else output
            raise _Stop

        handles.append(layer.self_attn.register_forward_hook(post, with_kwargs=True))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _run_until(run, batch) -> torch.Tensor:
    """Run the forward pass until a capture hook stops it; the batch's decoder mask."""
    try:
        run(batch)
    except _Stop:
        pass
    return batch["decoder_mask"]


@dataclass
class LayerCalibration:
    layer: int
    weight: torch.Tensor | None  # the W_c installed (None: plain residual)
    errors: dict  # {method: {split: {target: ErrorMeter.result()}}}


@torch.no_grad()
def calibrate_bottom_up(layers: nn.ModuleList, selected: list[int], run: Callable[[dict], torch.Tensor],
                        fit_batches: list[dict], heldout_batches: list[dict], *, method: str, target: str,
                        damp: float, init: str, progress: Callable[[str], None] = print) -> list[LayerCalibration]:
    """Prune `selected` layers in ascending order, fitting each W_c with lower layers already pruned.

    For layer l and each batch: x = the residual stream entering layer l in the current (partly
    pruned) model; local target eps = attn_l(LN(x)), the original attention on the current input;
    global target eps = h_l - x, with h_l the unpruned model's hidden state after layer l's
    attention sub-block. W_c is fitted to the `target` eps with `method`; the errors of every
    method against both targets are reported on fit and held-out tokens. With init="zero" the
    installed W_c is zero (trained later), but the closed-form errors are still reported.
    Every batch dict must hold "decoder_mask" [B, T] (True = real token), filled in by `run`.
    """
    original = {i: layers[i] for i in range(len(layers))}
    results = []
    for index in sorted(selected):
        captures = {"fit": [], "heldout": []}
        for split, batches in (("fit", fit_batches), ("heldout", heldout_batches)):
            for batch in batches:
                # Unpruned model: hidden state after layer index's attention sub-block.
                pruned_now = {i: layers[i] for i in range(len(layers)) if layers[i] is not original[i]}
                for i in pruned_now:
                    layers[i] = original[i]
                with _capture_layer(layers[index], want_attention=True) as ref:
                    mask = _run_until(run, batch)
                for i, layer in pruned_now.items():
                    layers[i] = layer
                h_ori = (ref["x"] + ref["a"]).float()
                with _capture_layer(layers[index], want_attention=True) as cur:
                    _run_until(run, batch)
                x = cur["x"].float()
                m = mask.bool().to(x.device)
                captures[split].append((x[m].cpu(), {"local": cur["a"].float()[m].cpu(), "global": (h_ori - x)[m].cpu()}))
        acc = CompensationAccumulator(x.shape[-1])
        for xs, eps in captures["fit"]:
            acc.update(xs, eps[target])
        solutions = {name: acc.solve(name, damp) for name in ("ridge", "paper", "none")}
        errors = {}
        for name, w in solutions.items():
            errors[name] = {}
            for split in ("fit", "heldout"):
                errors[name][split] = {}
                for tgt in ("local", "global"):
                    meter = ErrorMeter()
                    for xs, eps in captures[split]:
                        meter.update(xs, eps[tgt], None if name == "none" else w)
                    errors[name][split][tgt] = meter.result()
        if method == "none":
            installed = None
        else:
            installed = torch.zeros_like(solutions[method]) if init == "zero" else solutions[method]
        prune_layers(layers, {index: installed})
        after = errors[method]["heldout"][target]
        progress(f"calibrate: layer {index} pruned ({method}, target {target}); held-out error "
                 f"{after['before']:.4g} -> {after['after']:.4g}")
        results.append(LayerCalibration(index, installed, errors))
    return results
