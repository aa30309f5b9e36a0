"""Vision encoding: every entity image through the vision tower once, stored as token shards.

Output (`data/encoded/`)
  shard-00000.parquet, ...  the stage's output format: one row per readable image, rows in
      (entity, slot) order, columns
        entity  int32, slot int16,
        cls     fixed_size_list<float16>[Dv]        the CLS token of `feature_layer`,
        patches fixed_size_list<float16>[M * Dv]    the patch tokens, row-major [M, Dv]
      (M after `pool`). The schema metadata key `elmm` holds JSON: encoder, feature_layer, tokens,
      tokens_unpooled, pool, width, dtype, compute (device/dtype the tower ran in), params_hash,
      format, num_shards, shard_rows, and per shard its index and the files it skipped.
  shard-00000.arrow, ...    the same table as an uncompressed Arrow IPC file (the read sidecar).
  manifest.json             written by `finalize_encoding` once every shard exists.

Why a sidecar. Parquet stores a fixed-size list as a LIST column with repetition/definition levels
interleaved into its data pages, so even uncompressed it cannot be memory-mapped as one array:
reading any row decodes (copies) its whole column chunk. An Arrow IPC file stores each column as
one contiguous, aligned buffer, so `pa.memory_map` + `ipc.open_file` gives numpy views of the file
with no copy and no allocation (checked by a test): [R, M, Dv] float16 per shard, paged in by the OS
on access. `ImageTokens.get` (elmm.image_tokens) fancy-indexes the ~B x N requested rows out of those views, so a batch
costs its own bytes and the reader's RAM does not grow with the dataset. Each Parquet shard is
converted once, by the worker that wrote it (or by `finalize_encoding` when a worker died in
between); the reader itself never writes, because DVC outputs may be read-only cache links. The
price is twice the disk (docs/pipeline.md, "Image encoding"); Parquet stays the interchange format any tool
reads, the sidecar is a derived, byte-deterministic cache of it.

Sharding and resumption. Shard k holds images [k * shard_rows, (k + 1) * shard_rows) of the KG's
image list; batches never cross shards, so a shard's bytes depend only on its images and the
params, never on which worker wrote it or when. A worker with `shard=(i, n)` encodes shards with
k % n == i. Each file is written under a temporary name and renamed when complete, so a killed run
leaves whole shards plus temporaries that the next run deletes; shards from other params (hash) or
another compute device/dtype are stale and re-encoded. `finalize_encoding` checks that every shard
exists and agrees, and writes the manifest.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .io import atomic_path, write_json
from .kg.format import ImageReader

MANIFEST = "manifest.json"
FORMAT = 2  # bump when the shard layout changes: older shards then count as stale
MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs instead of exhausting memory
SHARD_BYTES = 256 * 2**20  # target shard size when shard_rows is None (DVC slows down with many files)
#: Bytes per Parquet row group: the writer holds a whole row group's encoded pages, so one row group
#: per 256 MB shard took 1.4 GB of memory to write (and the sidecar is built one row group at a time).
ROW_GROUP_BYTES = 16 * 2**20
PER_SHARD_KEYS = ("shard", "skipped")  # metadata that legitimately differs between shards
_SHARD_RE = re.compile(r"shard-(\d{5})\.(parquet|arrow)$")


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.parquet"


def sidecar_name(k: int) -> str:
    return f"shard-{k:05d}.arrow"


# ---- worker assignment ---------------------------------------------------------------------------
def worker_assignment(spec: str | None, env: Mapping[str, str] = os.environ) -> tuple[int, int, bool]:
    """(index, count, torchrun) of this worker.

    `spec` "i/N" (from `--shard`) wins; otherwise torchrun's RANK / WORLD_SIZE are used (then the
    workers can synchronise); otherwise one worker does everything.
    """
    if spec is not None:
        try:
            i, n = (int(v) for v in spec.split("/"))
        except ValueError:
            raise ValueError(f"--shard {spec!r}: expected i/N, e.g. 0/4") from None
        torchrun = False
    elif int(env.get("WORLD_SIZE", "1")) > 1:
        i, n = int(env["RANK"]), int(env["WORLD_SIZE"])
        torchrun = True
    else:
        return 0, 1, False
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard {i}/{n}: need 0 <= i < N")
    return i, n, torchrun


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(cores: int | None = None) -> int:
    """DataLoader workers for `cores` cores: one is left for the process running the tower."""
    return max(0, min(8, (cores or available_cores()) - 1))


# ---- pooling -------------------------------------------------------------------------------------
def pooled_tokens(tokens: int, pool: int) -> int:
    """Patch tokens per image after `pool` x `pool` average pooling of the (square) patch grid."""
    if pool <= 1:
        return tokens
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"encode.pool={pool}: the tower's {tokens} patch tokens are not a square grid")
    if grid % pool:
        raise ValueError(f"encode.pool={pool} does not divide the {grid}x{grid} patch grid "
                         f"(divisors: {[d for d in range(1, grid + 1) if grid % d == 0]})")
    return (grid // pool) ** 2


def pool_patches(patches: torch.Tensor, pool: int) -> torch.Tensor:
    """[B, M, Dv] -> [B, M / pool^2, Dv]: average over pool x pool blocks of the row-major grid."""
    if pool <= 1:
        return patches
    b, m, d = patches.shape
    grid = math.isqrt(m)
    pooled_tokens(m, pool)  # validates
    x = patches.transpose(1, 2).reshape(b, d, grid, grid).float()  # float32: fp16 sums lose bits
    return F.avg_pool2d(x, pool).flatten(2).transpose(1, 2).to(patches.dtype)


def _probe(backbone, feature_layer: int, device: torch.device, dtype: torch.dtype) -> tuple[int, int]:
    """(patch tokens, width) of one image, from a blank picture through the tower: every shard,
    even one holding only corrupt images, then has the same schema, whatever the family."""
    pixels = _preprocess_fn(backbone)(Image.new("RGB", (64, 64)))[None].to(device, dtype)
    with torch.inference_mode():
        cls, patches = backbone.vision_features(pixels, feature_layer)
    return patches.shape[1], patches.shape[2]


# ---- encoding ------------------------------------------------------------------------------------
class _ImageDataset(torch.utils.data.Dataset):
    """Reads, decodes and preprocesses in DataLoader workers; a bad file yields None instead of raising.

    Each worker opens the KG's image parts itself (`ImageReader`, lazily) and reads them one row
    group at a time; batches are contiguous rows, so a group is decoded about once per worker.
    """

    def __init__(self, kg, rows: list[tuple[int, int]], preprocess):
        self.root, self.images = kg.root, kg.images
        self.rows = rows
        self.preprocess = preprocess
        self.reader = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        entity, slot = self.rows[i]
        if self.reader is None:  # in the worker process: its own file handles
            self.reader = ImageReader(self.root, self.images)
        data = self.reader.read(i)  # a damaged part (sha256 mismatch) stops the stage, naming the file
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise ValueError(f"{im.width}x{im.height} pixels exceeds the limit")
                im = im.convert("RGB")
            return entity, slot, self.preprocess(im).contiguous(), None
        except Exception as e:  # any decode problem: skip this image, keep the stage running
            return entity, slot, None, f"entity {entity} slot {slot}: {type(e).__name__}"


def _preprocess_fn(backbone):
    """The backbone's own `preprocess` (one PIL image -> tensor), or its HF image processor."""
    if hasattr(backbone, "preprocess"):
        return backbone.preprocess
    processor = backbone.image_processor
    return lambda im: torch.from_numpy(processor(images=im, return_tensors="np")["pixel_values"][0])


def _collate(items):
    """Stack in the worker, so the main process only moves one tensor per batch."""
    good = [it for it in items if it[2] is not None]
    pixels = torch.stack([it[2] for it in good]) if good else None
    return [it[0] for it in good], [it[1] for it in good], pixels, [it[3] for it in items if it[2] is None], len(items)


@dataclass
class EncodeResult:
    shards: int  # shards of the whole dataset
    images: int  # images listed in the KG
    encoded: int  # images encoded by this call (0 when every shard of this worker existed)
    skipped: list[str]  # unreadable images met by this call
    seconds: float  # wall time of this call's encoding (loader start-up, tower, writing)
    images_encoded_now: int  # = encoded (kept for callers of the first version)
    shards_written: list[int] = field(default_factory=list)
    shards_reused: list[int] = field(default_factory=list)
    shard_rows: int = 0


def encode_kg_images(kg, backbone, out_dir: str | Path, *, feature_layer: int, batch_size: int,
                     shard_rows: int | None, metadata: dict, num_workers: int = 1, shard: tuple[int, int] = (0, 1),
                     device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, pool: int = 1,
                     progress: bool = True) -> EncodeResult:
    """Encode this worker's shards of `kg`'s images into `out_dir`; finished shards are kept.

    `shard=(i, n)`: only shards with index % n == i, so n processes (on any nodes) split the work;
    `finalize_encoding` then checks that every shard exists and writes the manifest. `metadata`
    must hold `params_hash`; shards with another hash or compute device/dtype are re-encoded.
    `shard_rows=None` sizes shards to about SHARD_BYTES.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    raw_tokens, width = _probe(backbone, feature_layer, device, dtype)
    tokens = pooled_tokens(raw_tokens, pool)  # fails before any work if pool does not fit the grid
    if pool > 1 and hasattr(backbone, "projected_tokens") and backbone.projected_tokens(raw_tokens) != raw_tokens:
        raise ValueError(f"encode.pool={pool}: {type(backbone).__name__}'s projector merges neighbouring patch "
                         "tokens itself and needs them unpooled; set encode.pool: 1")
    if shard_rows is None:
        shard_rows = max(1, SHARD_BYTES // (2 * width * (tokens + 1) + 6))
    rows = list(zip(kg.images["entity"].tolist(), kg.images["slot"].tolist()))
    num_shards = max(1, math.ceil(len(rows) / shard_rows))
    index, count = shard
    meta = {"encoder": backbone.name, **metadata, "format": FORMAT, "feature_layer": feature_layer, "width": width,
            "tokens": tokens, "tokens_unpooled": raw_tokens, "pool": max(1, pool), "dtype": "float16",
            "compute": f"{device.type}/{str(dtype).removeprefix('torch.')}", "num_shards": num_shards,
            "shard_rows": shard_rows}
    mine = [k for k in range(num_shards) if k % count == index]
    _drop_stale(out_dir, mine, meta)
    todo = [k for k in mine if not (out_dir / shard_name(k)).exists()]
    reused = [k for k in mine if k not in todo]
    for k in reused:  # a worker died between the Parquet file and its sidecar
        if not (out_dir / sidecar_name(k)).exists():
            write_sidecar(out_dir / shard_name(k), out_dir / sidecar_name(k))

    batches, owner = [], []
    for k in todo:
        lo, hi = k * shard_rows, min(len(rows), (k + 1) * shard_rows)
        for b in range(lo, hi, batch_size):
            batches.append(list(range(b, min(b + batch_size, hi))))
            owner.append(k)
    left = Counter(owner)
    buffers: dict[int, dict[str, list]] = {k: {"ents": [], "slots": [], "cls": [], "patches": [], "bad": []} for k in todo}
    start = time.perf_counter()
    for k in todo:
        if not left[k]:  # no images in this shard's range (an empty KG)
            _write_shard(out_dir, k, buffers.pop(k), width, tokens, meta)
    encoded_now, skipped = 0, []
    if batches:
        # One loader for all of this worker's shards: its processes start once, and prefetch
        # keeps decoding while the tower runs.
        loader = torch.utils.data.DataLoader(
            _ImageDataset(kg, rows, _preprocess_fn(backbone)), batch_sampler=batches, num_workers=num_workers,
            collate_fn=_collate, pin_memory=device.type == "cuda",
        )
        bar = tqdm(total=sum(len(b) for b in batches), desc="encode", unit="img", disable=not progress)
        with torch.inference_mode():
            for k, (ents, slots, pixels, bad, n_items) in zip(owner, loader):
                buf = buffers[k]
                buf["bad"] += bad
                if pixels is not None:
                    cls, patches = backbone.vision_features(pixels.to(device, dtype, non_blocking=True), feature_layer)
                    if patches.shape[1:] != (raw_tokens, width):
                        raise RuntimeError(f"vision tower returned patches {tuple(patches.shape[1:])}, expected "
                                           f"({raw_tokens}, {width}): images must all preprocess to one size")
                    cls, patches = cls.to(torch.float16), pool_patches(patches, pool).to(torch.float16)
                    if not (torch.isfinite(cls).all() and torch.isfinite(patches).all()):
                        raise RuntimeError("vision tower output overflows float16; use encode.precision: fp32")
                    buf["ents"] += ents
                    buf["slots"] += slots
                    buf["cls"].append(cls.cpu().numpy())
                    buf["patches"].append(patches.cpu().numpy())
                bar.update(n_items)
                left[k] -= 1
                if left[k] == 0:
                    encoded_now += len(buf["ents"])
                    skipped += buf["bad"]
                    _write_shard(out_dir, k, buffers.pop(k), width, tokens, meta)
        bar.close()
    seconds = time.perf_counter() - start
    return EncodeResult(num_shards, len(rows), encoded_now, skipped, seconds, encoded_now, todo, reused, shard_rows)


def _write_shard(out_dir: Path, k: int, buf: dict, width: int, tokens: int, meta: dict) -> None:
    """Write shard k (Parquet, then its sidecar), each atomically."""
    cls = np.concatenate(buf.pop("cls")) if buf["cls"] else np.zeros((0, width), np.float16)
    patches = np.concatenate(buf.pop("patches")) if buf["patches"] else np.zeros((0, tokens, width), np.float16)
    meta = {**meta, "shard": k, "skipped": buf["bad"]}
    schema = pa.schema(
        [("entity", pa.int32()), ("slot", pa.int16()),
         ("cls", pa.list_(pa.float16(), width)), ("patches", pa.list_(pa.float16(), tokens * width))],
        metadata={"elmm": json.dumps(meta, sort_keys=True)},
    )
    table = pa.table(
        {
            "entity": pa.array(np.asarray(buf["ents"], np.int32)),
            "slot": pa.array(np.asarray(buf["slots"], np.int16)),
            "cls": pa.FixedSizeListArray.from_arrays(pa.array(cls.reshape(-1)), width),
            "patches": pa.FixedSizeListArray.from_arrays(pa.array(patches.reshape(-1)), tokens * width),
        },
        schema=schema,
    )
    with atomic_path(out_dir / shard_name(k)) as tmp:
        # Uncompressed: float16 activations barely compress, and plain pages read back fastest.
        pq.write_table(table, tmp, compression="none", use_dictionary=False, write_statistics=False,
                       row_group_size=max(1, ROW_GROUP_BYTES // (2 * width * (tokens + 1) + 6)))
    del table, cls, patches
    write_sidecar(out_dir / shard_name(k), out_dir / sidecar_name(k))


def write_sidecar(parquet: Path, sidecar: Path) -> None:
    """Convert a finished Parquet shard into its memory-mappable Arrow IPC file (one record batch).

    Always made from the file on disk, never from memory, so the sidecar is a pure function of the
    Parquet bytes whether it is written right away or after a crash.
    """
    table = _read_contiguous(parquet)
    with atomic_path(sidecar) as tmp:
        with pa.OSFile(str(tmp), "wb") as f, ipc.new_file(f, table.schema) as writer:
            writer.write_table(table, max_chunksize=max(1, table.num_rows))


def _read_contiguous(parquet: Path) -> pa.Table:
    """The shard's table with one contiguous buffer per column, filled one row group at a time.

    `read_table().combine_chunks()` held the row groups and their concatenation at once (twice
    the shard); this holds the shard and one row group. Columns are primitive or fixed-size lists
    of primitives (what `_write_shard` writes), without nulls.
    """
    source = pq.ParquetFile(parquet)
    schema = source.schema_arrow
    rows = source.metadata.num_rows

    def leaf(t: pa.DataType) -> tuple[pa.DataType, int]:
        return (t.value_type, t.list_size) if pa.types.is_fixed_size_list(t) else (t, 1)

    flat = {f.name: np.empty(rows * leaf(f.type)[1], leaf(f.type)[0].to_pandas_dtype()) for f in schema}
    at = 0
    for g in range(source.num_row_groups):
        group = source.read_row_group(g)
        for f in schema:
            n, lo = leaf(f.type)[1], at
            for chunk in group.column(f.name).chunks:
                values = chunk.flatten() if pa.types.is_fixed_size_list(f.type) else chunk
                flat[f.name][lo * n:(lo + len(chunk)) * n] = values.to_numpy(zero_copy_only=False)
                lo += len(chunk)
        at += group.num_rows
        del group
    arrays = []
    for f in schema:
        t, n = leaf(f.type)
        values = pa.array(flat.pop(f.name), type=t)
        arrays.append(pa.FixedSizeListArray.from_arrays(values, n) if pa.types.is_fixed_size_list(f.type) else values)
    return pa.Table.from_arrays(arrays, schema=schema)


def _parquet_meta(path: Path) -> dict:
    try:
        return json.loads(pq.ParquetFile(path).schema_arrow.metadata[b"elmm"])
    except Exception:  # unreadable or foreign file: treat as stale
        return {}


def _sidecar_meta(path: Path) -> dict:
    try:
        with pa.memory_map(str(path)) as source:
            return json.loads(ipc.open_file(source).schema.metadata[b"elmm"])
    except Exception:  # truncated or foreign file: treat as stale
        return {}


def _common(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in PER_SHARD_KEYS}


def _drop_stale(out_dir: Path, mine: list[int], meta: dict) -> None:
    """Remove this worker's leftovers: temporaries of a killed run, shards from other params
    (the output directory persists across runs), sidecars whose Parquet shard is gone or differs."""
    for k in mine:
        for tmp in out_dir.glob(f".shard-{k:05d}.*.tmp"):
            tmp.unlink(missing_ok=True)
        parquet, sidecar = out_dir / shard_name(k), out_dir / sidecar_name(k)
        if parquet.exists() and _common(_parquet_meta(parquet)) != _common(meta):
            parquet.unlink()
        if sidecar.exists() and (not parquet.exists() or _sidecar_meta(sidecar) != _parquet_meta(parquet)):
            sidecar.unlink()


def finalize_encoding(out_dir: str | Path, expected_shards: int | None = None) -> dict:
    """After all workers: check that every shard exists and agrees, complete missing sidecars,
    remove leftovers of other runs, and write the manifest (returned).

    `expected_shards` defaults to the count recorded in the shards themselves.
    """
    out_dir = Path(out_dir)
    if expected_shards is None:
        found = sorted(out_dir.glob("shard-*.parquet"))
        if not found:
            raise RuntimeError(f"{out_dir}: no shards; run the encode workers first")
        expected_shards = int(_parquet_meta(found[0]).get("num_shards", 0)) or len(found)
    missing = [shard_name(k) for k in range(expected_shards) if not (out_dir / shard_name(k)).exists()]
    if missing:
        raise RuntimeError(f"{out_dir}: {len(missing)} of {expected_shards} shard(s) missing "
                           f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
                           "run the encode workers (`--shard i/N`) until every shard exists")
    skipped, rows, meta = [], 0, None
    for k in range(expected_shards):
        parquet, sidecar = out_dir / shard_name(k), out_dir / sidecar_name(k)
        m = _parquet_meta(parquet)
        if not sidecar.exists() or _sidecar_meta(sidecar) != m:
            write_sidecar(parquet, sidecar)
        if meta is None:
            meta = _common(m)
        elif _common(m) != meta:
            diff = sorted(key for key in set(meta) | set(_common(m)) if meta.get(key) != m.get(key))
            raise RuntimeError(f"{parquet}: metadata differs from shard 0 in {diff} (stale shard from other params "
                               "or another device/precision?); delete it and rerun its worker")
        skipped += m.get("skipped", [])
        rows += pq.ParquetFile(parquet).metadata.num_rows
    for path in out_dir.iterdir():  # all workers are done: what is not ours now is a leftover
        hit = _SHARD_RE.fullmatch(path.name)
        if (hit and int(hit.group(1)) >= expected_shards) or (path.name.startswith(".shard-") and path.name.endswith(".tmp")):
            path.unlink()
    manifest = {**meta, "shards": [shard_name(k) for k in range(expected_shards)],
                "sidecars": [sidecar_name(k) for k in range(expected_shards)], "rows": rows, "skipped": skipped}
    write_json(out_dir / MANIFEST, manifest)
    return manifest
