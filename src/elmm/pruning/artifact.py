"""The pruning artefact (`calibrate` -> `train`): which layers lost their attention, and each W_c.

One safetensors file: tensors `layer.<i>` (the W_c of pruned layer i; absent for a plain
residual) and one metadata entry `elmm_pruning`, a JSON object with `layers` (list),
`compensation` (ridge | paper | none) and `init`.

The metadata is one key holding sorted JSON because safetensors writes its metadata map in hash
order, which changes from process to process: with several keys the same tensors gave a file with
another checksum on every run, and DVC saw a changed output each time. Files written before this
change (three separate keys) still load.
"""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..io import atomic_path

PRUNING_FILE = "compensation.safetensors"
META_KEY = "elmm_pruning"


def save_pruning(path, layers: list[int], weights: dict[int, torch.Tensor | None], compensation: str, init: str) -> None:
    tensors = {f"layer.{i}": w.contiguous() for i, w in weights.items() if w is not None}
    meta = {"layers": sorted(layers), "compensation": compensation, "init": init}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def load_pruning(path) -> tuple[list[int], dict[int, torch.Tensor | None], str]:
    """(pruned layer indices, {layer: W_c or None}, compensation method)."""
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    try:
        if META_KEY in raw:
            meta = json.loads(raw[META_KEY])
            layers, compensation = meta["layers"], meta["compensation"]
        else:  # the earlier layout: one metadata key per field
            layers, compensation = json.loads(raw["layers"]), raw["compensation"]
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a pruning artefact written by `calibrate` (metadata {raw!r})") from e
    weights = {i: tensors.get(f"layer.{i}") for i in layers}
    return layers, weights, compensation
