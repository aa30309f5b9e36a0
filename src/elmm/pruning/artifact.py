"""The pruning artefact (`calibrate` -> `train`): which layers lost their attention, and each W_c.

One safetensors file: tensors `layer.<i>` (the W_c of pruned layer i; absent for a plain
residual), metadata `layers` (JSON list), `compensation` (ridge | paper | none) and `init`.
"""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..io import atomic_path

PRUNING_FILE = "compensation.safetensors"


def save_pruning(path, layers: list[int], weights: dict[int, torch.Tensor | None], compensation: str, init: str) -> None:
    tensors = {f"layer.{i}": w.contiguous() for i, w in weights.items() if w is not None}
    meta = {"layers": json.dumps(sorted(layers)), "compensation": compensation, "init": init}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_pruning(path) -> tuple[list[int], dict[int, torch.Tensor | None], str]:
    """(pruned layer indices, {layer: W_c or None}, compensation method)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    layers = json.loads(meta["layers"])
    weights = {i: tensors.get(f"layer.{i}") for i in layers}
    return layers, weights, meta["compensation"]
