"""Reading the encoded image tokens: `ImageTokens`, a memory-mapped view of `data/encoded`.

The encode stage (`elmm.vision`) writes Parquet shards and, for each, an uncompressed Arrow IPC
sidecar. Parquet interleaves repetition/definition levels with a list column's values, so rows
cannot be memory-mapped in place; an Arrow IPC file stores each column as one contiguous buffer,
so `pa.memory_map` + `ipc.open_file` gives numpy views of the file with no copy. RAM holds only a
[num_entities, N] row index and the mask; `get` copies just the requested rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch

from .vision import FORMAT, MANIFEST


class _Rows:
    """One field ([..., *row_shape] float16 per (entity, slot)): either per-shard arrays that view
    memory-mapped sidecars, addressed through `index` [E, N] of global row ids (-1 = empty slot),
    or one dense in-memory tensor [E, N, *row_shape]."""

    def __init__(self, parts: list[np.ndarray], index: np.ndarray, row_shape: tuple[int, ...]):
        self.parts, self.index, self.row_shape = parts, index, row_shape
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.dense: torch.Tensor | None = None

    @classmethod
    def from_dense(cls, tensor: torch.Tensor) -> _Rows:
        rows = cls([], np.zeros((0, 0), np.int64), tuple(tensor.shape[2:]))
        rows.dense = tensor
        return rows

    def full(self, num_entities: int) -> torch.Tensor:
        """All entities: the dense tensor itself (so in-place edits stick) or a fresh copy."""
        return self.dense if self.dense is not None else self.gather(np.arange(num_entities))

    def gather(self, entities: np.ndarray) -> torch.Tensor:
        if self.dense is not None:
            return self.dense[torch.from_numpy(entities)]
        ids = self.index[entities]
        out = np.zeros(ids.shape + self.row_shape, np.float16)  # empty slots stay zero
        flat_ids, flat_out = ids.reshape(-1), out.reshape((-1, *self.row_shape))
        pos = np.flatnonzero(flat_ids >= 0)
        part = np.searchsorted(self.offsets, flat_ids[pos], side="right") - 1
        for p in np.unique(part):  # usually one shard, or a handful: one fancy-index read each
            sel = pos[part == p]
            flat_out[sel] = self.parts[p][flat_ids[sel] - self.offsets[p]]
        return torch.from_numpy(out)


class ImageTokens:
    """Reader for the encoded shards: image tokens, CLS tokens and slot mask per entity.

    Opens the shards' Arrow sidecars as memory maps (zero-copy numpy views; nothing is read until
    used) and keeps only a [num_entities, num_images] row index and the mask in RAM. `get` copies
    the requested entities' rows into fresh tensors. Slots are numbered densely per entity:
    skipped (corrupt) images leave no hole, so mask[e] is True for slots 0..k-1 of an entity
    with k readable images, and all False for an entity without any.

    `patches` / `cls` return the full dense tensors (materialised on access: small KGs, tests);
    assigning a tensor to either keeps it in memory and `get` reads from it from then on.
    """

    def __init__(self, directory: str | Path, num_entities: int, max_images: int | None = None):
        directory = Path(directory)
        manifest_path = directory / MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(f"{manifest_path}: missing; run `dvc repro encode`")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT or "sidecars" not in self.manifest:
            raise ValueError(f"{directory}: written by another version of the encoder; rerun `dvc repro encode`")
        width, tokens = int(self.manifest["width"]), int(self.manifest["tokens"])
        self._maps, patch_parts, cls_parts, ents, slots = [], [], [], [], []
        for name in self.manifest["sidecars"]:
            source = pa.memory_map(str(directory / name))  # kept open: the arrays below view it
            batches = ipc.open_file(source)
            meta = json.loads(batches.schema.metadata[b"elmm"])
            if meta.get("params_hash") != self.manifest.get("params_hash"):
                raise ValueError(f"{directory / name}: params hash differs from the manifest; rerun `dvc repro encode`")
            table = batches.read_all()
            if table.num_rows and table.column("entity").num_chunks != 1:
                raise ValueError(f"{directory / name}: expected one record batch")
            self._maps.append(source)
            ents.append(_column(table, "entity", np.int32))
            slots.append(_column(table, "slot", np.int16))
            cls_parts.append(_fixed_list(table, "cls", (width,)))
            patch_parts.append(_fixed_list(table, "patches", (tokens, width)))
        ent = np.concatenate(ents) if ents else np.zeros(0, np.int32)
        slot = np.concatenate(slots) if slots else np.zeros(0, np.int16)
        if len(ent) and (ent.min() < 0 or ent.max() >= num_entities):
            raise ValueError(f"{directory}: entity index {int(ent.max())} out of range for {num_entities} entities")
        counts = np.bincount(ent, minlength=num_entities)
        n = int(counts.max()) if len(ent) else 1
        n = max(1, min(n, max_images) if max_images else n)
        # Dense slot j of a row = its rank among its entity's rows in (entity, slot) order.
        order = np.lexsort((slot, ent))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank = np.arange(len(ent)) - starts[ent[order]]
        keep = rank < n
        index = np.full((num_entities, n), -1, np.int64)
        index[ent[order][keep], rank[keep]] = order[keep]
        self.num_images, self.num_tokens, self.width = n, tokens, width
        self.mask = torch.from_numpy(index >= 0)
        self._patches = _Rows(patch_parts, index, (tokens, width))
        self._cls = _Rows(cls_parts, index, (width,))

    def get(self, entities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(patches [B, N, M, Dv], cls [B, N, Dv], mask [B, N]) for a batch of entity indices."""
        e = torch.as_tensor(entities).cpu().numpy().astype(np.int64, copy=False)
        return self._patches.gather(e), self._cls.gather(e), self.mask[torch.from_numpy(e)]

    @property
    def patches(self) -> torch.Tensor:
        return self._patches.full(len(self.mask))

    @patches.setter
    def patches(self, value: torch.Tensor) -> None:
        self._patches = _Rows.from_dense(value)

    @property
    def cls(self) -> torch.Tensor:
        return self._cls.full(len(self.mask))

    @cls.setter
    def cls(self, value: torch.Tensor) -> None:
        self._cls = _Rows.from_dense(value)


def _column(table: pa.Table, name: str, dtype) -> np.ndarray:
    col = table.column(name)
    return col.chunk(0).to_numpy() if col.num_chunks else np.zeros(0, dtype)


def _fixed_list(table: pa.Table, name: str, row_shape: tuple[int, ...]) -> np.ndarray:
    """A fixed_size_list<float16> column as a read-only [R, *row_shape] view of its buffer (no copy)."""
    col = table.column(name)
    if not col.num_chunks or not len(col):
        return np.zeros((0, *row_shape), np.float16)
    return col.chunk(0).flatten().to_numpy(zero_copy_only=True).reshape((-1, *row_shape))
