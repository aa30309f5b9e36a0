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
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

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
    """Raised by `hidden_at`'s hook once the residual stream below the read-only part is read."""


# Decoder layers whose forward is  h = x + self_attn(input_layernorm(x), **kwargs)[0];
# y = h + mlp(post_attention_layernorm(h))  with the kwargs the decoder passes the layer, read from
# transformers' source: the text decoders of LLaVA (Llama), Qwen2 and Qwen2-VL. Another family's
# layer is run whole.
PRE_NORM_LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer",
                             "Qwen2VLDecoderLayer", "Qwen2_5_VLDecoderLayer"})


def _pruned_top(layers: nn.ModuleList) -> int:
    """Index of the first of the pruned layers that end the decoder (len(layers) when none does)."""
    top = len(layers)
    while top > 0 and isinstance(layers[top - 1], PrunedDecoderLayer):
        top -= 1
    return top


def attention_free_top(layers: nn.ModuleList) -> int | None:
    """Index of the first of the pruned layers that end the decoder, or None when the last layer
    keeps its attention or a hook observes one of them (the pruning analyses need every position)."""
    start = _pruned_top(layers)
    if start == len(layers) or _observed(*layers[start:]):
        return None
    return start


def split_layer(layers: nn.ModuleList) -> int | None:
    """Index of the last layer that keeps its attention, when `hidden_at` may run its MLP on the read
    positions only: a pre-norm layer (`PRE_NORM_LAYERS`) with only pruned layers above it and no hook
    on it or above it. None otherwise."""
    top = _pruned_top(layers)
    if top == 0 or type(layers[top - 1]).__name__ not in PRE_NORM_LAYERS or _observed(*layers[top - 1:]):
        return None
    return top - 1


def _observed(*modules: nn.Module) -> bool:
    """Whether a forward hook watches any of `modules` or their submodules."""
    return any(m._forward_hooks or m._forward_pre_hooks for module in modules for m in module.modules())


def hidden_at(decoder: nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
    """The decoder's final hidden states (after its norm) at `positions` [B, n] only: [B, n, D].

    The values at read positions that are padding (`attention_mask` False) are unspecified: every
    reader masks them out.

    Only the positions read need the decoder's last steps. Above the last layer that keeps its
    attention, every layer maps each position on its own, so positions nobody reads cannot change
    the ones read; and in that last attention layer, the other positions are needed only as keys and
    values of its attention. So its MLP and every (pruned) layer above it run on the `n` read
    positions instead of the whole sequence (the same function; ELMM reads the image block and two
    text positions, about a quarter of the sequence). Below it, Llama's layers (`_unpadded_supported`)
    run on the real positions only: the residual stream, the projections and the MLPs skip the
    padding (about 14% of a training batch on the default world), which only the attention kernel
    sees, as masked keys. Other layer types below it run through the decoder's own forward. Where no
    layer can be split (see `split_layer`), the pruned top alone runs on the read positions. A
    forward hook on the decoder, on its norm or on a layer at or above the split gets the full pass
    instead; one on a layer below the split gets the decoder's own forward below the split.
    """
    layers = decoder.layers
    # whoever observes the decoder's own forward or its norm gets the full pass too
    if _observed(decoder.norm) or decoder._forward_hooks or decoder._forward_pre_hooks:
        split = start = None
    else:
        split = split_layer(layers)
        start = split if split is not None else attention_free_top(layers)
    index = positions[:, :, None].expand(-1, -1, embeds.shape[-1])
    if start is None:
        hidden = decoder(inputs_embeds=embeds, attention_mask=attention_mask.long()).last_hidden_state
        return hidden.gather(1, index)
    unpadded = split is not None and _unpadded_supported(layers[:split + 1])
    x, kwargs = embeds, {}
    if start > 0 or split is not None:  # the decoder's forward up to the input of the first layer run here
        x, kwargs = _decoder_input(decoder, 0 if unpadded else start, embeds, attention_mask)
    if unpadded and _kwargs_supported(kwargs):
        x = _unpadded_to_split(layers[:split + 1], x, kwargs, attention_mask, positions)
        start = split + 1
    elif split is not None:  # keys and values from every position, the rest on the read ones
        for layer in layers[:split] if unpadded else ():  # Llama's layers, with what the decoder passes them
            x = layer(x, **kwargs)
        layer = layers[split]
        x = (x + layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)[0]).gather(1, index)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        start += 1
    else:
        x = x.gather(1, index)
    for layer in layers[start:]:
        x = layer(x)
    return decoder.norm(x)


def _decoder_input(decoder: nn.Module, at: int, embeds: torch.Tensor,
                   attention_mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The input of layer `at` in the decoder's own forward, and the other arguments it passes it."""
    store = {}

    def stop(module, args, kwargs):
        store["x"] = _layer_input(args, kwargs)
        store["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Below

    handle = decoder.layers[at].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        decoder(inputs_embeds=embeds, attention_mask=attention_mask.long())
    except _Below:
        pass
    finally:
        handle.remove()
    return store["x"], store["kwargs"]


def _unpadded_supported(layers: nn.ModuleList | list) -> bool:
    """Whether `_unpadded_to_split` computes what these layers do: pruned layers, and Llama layers
    whose attention `_attention` reproduces (rotary, no sliding window, SDPA or eager, no attention
    dropout at work), with no hook on any of them."""
    def llama(layer):
        attn = getattr(layer, "self_attn", None)
        return (type(layer).__name__ == "LlamaDecoderLayer" and type(attn).__name__ == "LlamaAttention"
                and attn.config._attn_implementation in ("sdpa", "eager")
                and not (attn.training and attn.attention_dropout > 0))
    # a hook below the split observes the decoder's own layout ([B, T, D], the layer's forward)
    return not _observed(*layers) and all(isinstance(layer, PrunedDecoderLayer) or llama(layer) for layer in layers)


def _kwargs_supported(kwargs: dict) -> bool:
    """Whether the arguments the Llama decoder passed its first layer are those `_attention` reads:
    rotary (cos, sin) and a dense [B, 1, T, T] mask, or none (causal, no padding)."""
    mask = kwargs.get("attention_mask")
    return (isinstance(kwargs.get("position_embeddings"), tuple)
            and (mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 4)))


def _unpadded_to_split(layers: list, x: torch.Tensor, kwargs: dict, real: torch.Tensor,
                       positions: torch.Tensor) -> torch.Tensor:
    """The residual stream after `layers` (the last one being the split layer) at `positions` [B, n]:
    [B, n, D]. Each layer below the split runs on the real positions (`real` [B, T] True) packed as
    [N, D]; the attention kernel alone sees the padded [B, T] layout. The split layer's attention,
    output projection and MLP run for the read positions only (those that are padding start from 0)."""
    b, t, d = x.shape
    at = real.reshape(-1).nonzero().squeeze(1)  # packed -> padded index
    x = x.reshape(b * t, d).index_select(0, at)

    def padded(y: torch.Tensor) -> torch.Tensor:  # [N, F] -> [B, T, F], zeros at the padding
        return y.new_zeros(b * t, y.shape[-1]).index_copy(0, at, y).view(b, t, -1)

    *below, top = layers
    for layer in below:
        if isinstance(layer, PrunedDecoderLayer):
            x = layer(x)
            continue
        attn, h = layer.self_attn, layer.input_layernorm(x)
        out = _attention(attn, padded(attn.q_proj(h)), padded(attn.k_proj(h)), padded(attn.v_proj(h)), kwargs)
        x = x + attn.o_proj(out.reshape(b * t, -1).index_select(0, at))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    attn, h = top.self_attn, top.input_layernorm(x)
    read = positions[:, :, None].expand(-1, -1, d)
    q = attn.q_proj(padded(h).gather(1, read))
    out = _attention(attn, q, padded(attn.k_proj(h)), padded(attn.v_proj(h)), kwargs, positions)
    x = padded(x).gather(1, read) + attn.o_proj(out)
    return x + top.mlp(top.post_attention_layernorm(x))


def _attention(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kwargs: dict,
               positions: torch.Tensor | None = None) -> torch.Tensor:
    """Llama's attention before its output projection, [B, n, H d], from the projections in the
    padded layout: keys and values [B, T, .] at every position, queries [B, n, .] at `positions`
    [B, n] (None: n = T, every position). `kwargs` are those the decoder passes its layers."""
    b, t, _ = k.shape
    n, d = q.shape[1], attn.head_dim
    q, k, v = q.view(b, n, -1, d).transpose(1, 2), k.view(b, t, -1, d).transpose(1, 2), v.view(b, t, -1, d).transpose(1, 2)
    cos, sin = (c.expand(b, -1, -1) for c in kwargs["position_embeddings"])  # [B or 1, T, d]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    if positions is not None:
        at = positions[:, :, None].expand(-1, -1, cos.shape[-1])
        cos, sin = cos.gather(1, at), sin.gather(1, at)
    q = q * cos[:, None] + rotate_half(q) * sin[:, None]
    mask, causal = kwargs.get("attention_mask"), False
    if mask is None:  # the decoder's causal mask, with no padding to hide
        if positions is None:
            causal = True
        else:
            mask = positions[:, None, :, None] >= torch.arange(t, device=k.device)
    elif positions is not None:  # the rows of the read positions
        mask = mask.expand(b, -1, -1, -1)
        mask = mask.gather(2, positions[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
    k, v = repeat_kv(k, attn.num_key_value_groups), repeat_kv(v, attn.num_key_value_groups)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=attn.scaling)
    return out.transpose(1, 2).reshape(b, n, -1)


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
