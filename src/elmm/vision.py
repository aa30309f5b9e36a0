"""Vision encoding: every entity image through the vision tower once, stored as Parquet token shards.

Shard layout (`data/encoded/shard-00000.parquet`, ...): one row per readable image, rows in
(entity, slot) order, columns
  entity  int32, slot int16,
  cls     fixed_size_list<float16>[Dv]          the CLS token of `feature_layer`,
  patches fixed_size_list<float16>[M * Dv]      the patch tokens, row-major [M, Dv].
Fixed-size lists of float16 read back as one contiguous buffer, so `to_numpy` is a reshape.
Shard k holds images [k * shard_rows, (k + 1) * shard_rows) of the KG's image list; a shard is
written under a temporary name and renamed when complete, so a rerun skips finished shards and
the result does not depend on interruptions. Unreadable images are skipped and counted in the
shard's metadata.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm import tqdm

from .io import atomic_path, write_json

MANIFEST = "manifest.json"
MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs instead of exhausting memory


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.parquet"


class _ImageDataset(torch.utils.data.Dataset):
    """Decodes and preprocesses in DataLoader workers; a bad file yields None instead of raising."""

    def __init__(self, rows: list[tuple[int, int, str]], image_processor):
        self.rows = rows
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        entity, slot, path = self.rows[i]
        try:
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise ValueError(f"{im.width}x{im.height} pixels exceeds the limit")
                im = im.convert("RGB")
            pixels = self.image_processor(images=im, return_tensors="np")["pixel_values"][0]
            return entity, slot, torch.from_numpy(np.ascontiguousarray(pixels)), None
        except Exception as e:  # any decode problem: skip this image, keep the stage running
            return entity, slot, None, f"{Path(path).parent.name}/{Path(path).name} (entity {entity}): {type(e).__name__}"


def _collate(items):
    return items


@dataclass
class EncodeResult:
    shards: int
    images: int
    encoded: int
    skipped: list[str]
    seconds: float
    images_encoded_now: int


def encode_kg_images(kg, backbone, out_dir: str | Path, *, feature_layer: int, batch_size: int, shard_rows: int,
                     metadata: dict, num_workers: int = 1, shard: tuple[int, int] = (0, 1),
                     device: str = "cpu", dtype: torch.dtype = torch.float32) -> EncodeResult:
    """Encode the images of `kg` into shards under `out_dir`; shards already present are kept.

    `shard=(i, n)` encodes only shards with index % n == i, so n processes (on any nodes) split the
    work; `finalize_encoding` then checks that every shard exists and writes the manifest.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [(int(e), int(s), str(kg.root / p)) for e, s, p in kg.images[["entity", "slot", "path"]].itertuples(index=False)]
    num_shards = max(1, math.ceil(len(rows) / shard_rows))
    mine = [k for k in range(num_shards) if k % shard[1] == shard[0]]
    for k in mine:  # a shard from other params or data (persisted output) is stale: drop it
        path = out_dir / shard_name(k)
        if path.exists() and _shard_meta(path).get("params_hash") != metadata.get("params_hash"):
            path.unlink()
    todo = [k for k in mine if not (out_dir / shard_name(k)).exists()]
    width = backbone.vision_hidden_size
    meta = {**metadata, "feature_layer": feature_layer, "width": width, "dtype": "float16"}

    skipped: list[str] = []
    encoded_now = 0
    start = time.perf_counter()
    bar = tqdm(total=sum(len(rows[k * shard_rows:(k + 1) * shard_rows]) for k in todo), desc="encode", unit="img")
    for k in todo:
        part = rows[k * shard_rows:(k + 1) * shard_rows]
        loader = torch.utils.data.DataLoader(
            _ImageDataset(part, backbone.image_processor), batch_size=batch_size, num_workers=num_workers,
            collate_fn=_collate, persistent_workers=False,
        )
        ents, slots, cls_parts, patch_parts, bad = [], [], [], [], []
        for items in loader:
            good = [it for it in items if it[2] is not None]
            bad += [it[3] for it in items if it[2] is None]
            if good:
                pixels = torch.stack([it[2] for it in good]).to(device=device, dtype=dtype)
                cls, patches = backbone.vision_features(pixels, feature_layer)
                ents += [it[0] for it in good]
                slots += [it[1] for it in good]
                cls_parts.append(cls.to(torch.float16).cpu().numpy())
                patch_parts.append(patches.to(torch.float16).cpu().numpy())
            bar.update(len(items))
        _write_shard(out_dir / shard_name(k), ents, slots, cls_parts, patch_parts, width, {**meta, "skipped": bad})
        skipped += bad
        encoded_now += len(ents)
    bar.close()
    seconds = time.perf_counter() - start
    return EncodeResult(num_shards, len(rows), encoded_now, skipped, seconds, encoded_now)


def _write_shard(path: Path, ents, slots, cls_parts, patch_parts, width: int, meta: dict) -> None:
    n = len(ents)
    cls = np.concatenate(cls_parts) if cls_parts else np.zeros((0, width), np.float16)
    patches = np.concatenate(patch_parts) if patch_parts else np.zeros((0, 1, width), np.float16)
    tokens = patches.shape[1]
    meta = {**meta, "tokens": int(tokens)}
    schema = pa.schema(
        [("entity", pa.int32()), ("slot", pa.int16()),
         ("cls", pa.list_(pa.float16(), width)), ("patches", pa.list_(pa.float16(), tokens * width))],
        metadata={"elmm": json.dumps(meta, sort_keys=True)},
    )
    table = pa.table(
        {
            "entity": pa.array(np.asarray(ents, np.int32)),
            "slot": pa.array(np.asarray(slots, np.int16)),
            "cls": pa.FixedSizeListArray.from_arrays(pa.array(cls.reshape(-1)), width),
            "patches": pa.FixedSizeListArray.from_arrays(pa.array(patches.reshape(-1)), tokens * width),
        },
        schema=schema,
    )
    assert table.num_rows == n
    with atomic_path(path) as tmp:
        # Uncompressed: float16 activations barely compress, and plain pages read back fastest.
        pq.write_table(table, tmp, compression="none", use_dictionary=False, write_statistics=False)


def _shard_meta(path: Path) -> dict:
    try:
        return json.loads(pq.ParquetFile(path).schema_arrow.metadata[b"elmm"])
    except Exception:  # unreadable or foreign file: treat as stale
        return {}


def finalize_encoding(out_dir: str | Path, expected_shards: int) -> dict:
    """Check that every shard exists (after all workers), gather their metadata into the manifest."""
    out_dir = Path(out_dir)
    missing = [shard_name(k) for k in range(expected_shards) if not (out_dir / shard_name(k)).exists()]
    if missing:
        raise RuntimeError(f"{out_dir}: {len(missing)} shard(s) missing, e.g. {missing[0]}; rerun the encode workers")
    shards, skipped, rows, meta = [], [], 0, None
    for k in range(expected_shards):
        pf = pq.ParquetFile(out_dir / shard_name(k))
        m = _shard_meta(out_dir / shard_name(k))
        skipped += m.pop("skipped")
        if meta is None:
            meta = m
        elif {key: v for key, v in m.items() if key != "tokens"} != {key: v for key, v in meta.items() if key != "tokens"}:
            raise RuntimeError(f"{out_dir / shard_name(k)}: metadata differs from shard 0 (stale shard from other params?)")
        rows += pf.metadata.num_rows
        shards.append(shard_name(k))
    manifest = {**meta, "shards": shards, "rows": rows, "skipped": skipped}
    write_json(out_dir / MANIFEST, manifest)
    return manifest


class ImageTokens:
    """Reader for the encoded shards: image tokens, CLS tokens and slot mask per entity.

    Holds the tokens as one float16 tensor per field, indexed by entity; `get` gathers a batch.
    """

    def __init__(self, directory: str | Path, num_entities: int, max_images: int | None = None):
        directory = Path(directory)
        manifest_path = directory / MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(f"{manifest_path}: missing; run `dvc repro encode`")
        self.manifest = json.loads(manifest_path.read_text())
        width = self.manifest["width"]
        tables = [pq.read_table(directory / s) for s in self.manifest["shards"]]
        table = pa.concat_tables(tables) if tables else None
        tokens = max((t.schema.field("patches").type.list_size // width for t in tables if t.num_rows), default=1)
        ent = table.column("entity").to_numpy() if table is not None else np.zeros(0, np.int32)
        # Slots are re-numbered densely: skipped (corrupt) images leave no hole.
        counts = np.bincount(ent, minlength=num_entities) if len(ent) else np.zeros(num_entities, np.int64)
        if len(counts) > num_entities:
            raise ValueError(f"{directory}: entity index {len(counts) - 1} out of range for {num_entities} entities")
        n = int(counts.max()) if len(ent) else 1
        n = max(1, min(n, max_images) if max_images else n)
        self.num_images, self.num_tokens, self.width = n, tokens, width
        self.patches = torch.zeros(num_entities, n, tokens, width, dtype=torch.float16)
        self.cls = torch.zeros(num_entities, n, width, dtype=torch.float16)
        self.mask = torch.zeros(num_entities, n, dtype=torch.bool)
        if table is not None and table.num_rows:
            cls = _fixed_list_numpy(table.column("cls"), width)
            patches = _fixed_list_numpy(table.column("patches"), tokens * width).reshape(-1, tokens, width)
            order = np.lexsort((table.column("slot").to_numpy(), ent))
            fill = np.zeros(num_entities, np.int64)
            for row in order:
                e = ent[row]
                j = fill[e]
                if j < n:
                    self.patches[e, j] = torch.from_numpy(patches[row])
                    self.cls[e, j] = torch.from_numpy(cls[row])
                    self.mask[e, j] = True
                fill[e] += 1

    def get(self, entities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(patches [B, N, M, Dv], cls [B, N, Dv], mask [B, N]) for a batch of entity indices."""
        return self.patches[entities], self.cls[entities], self.mask[entities]


def _fixed_list_numpy(column: pa.ChunkedArray, size: int) -> np.ndarray:
    chunks = [c.flatten().to_numpy(zero_copy_only=False).reshape(-1, size) for c in column.chunks]
    return np.concatenate(chunks) if chunks else np.zeros((0, size), np.float16)
