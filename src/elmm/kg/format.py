"""The canonical on-disk knowledge-graph format that every data source is converted into.

A KG directory holds:

- `entities.parquet`  id, name, description (string), num_images (int32); row order = entity index
- `relations.parquet` id, name, modality (string: "image" | "text" | "structure" | "")
- `train/valid/test.parquet` head, relation, tail (int32 indices)
- `images.parquet`    the image index: entity (int32), slot (int16), format, sha256, size, and
  where the bytes are (part, row); sorted by (entity, slot)
- `images-NNNNN.parquet` the image bytes, ~256 MB per part (entity, slot, sha256, data), so DVC
  hashes a handful of files instead of one per image (format 2; format 1 kept one file per image
  and is refused with a message, though still accepted as a `data.name: custom` input)
- `meta.json`         format_version, source, counts, plus source-specific keys

Tables are written with explicit Arrow schemas and no pandas metadata, so the same input gives
byte-identical files (DVC then sees no spurious change). `meta.json` is written last: a
directory with a `meta.json` is complete.

Why one module of ~500 lines: the schemas, the validation, the writer and the reader of one format
change together; split, a format change would touch four files that must agree.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from elmm.io import atomic_path, read_json, write_json

FORMAT_VERSION = 2
IMAGE_PART_BYTES = 256 * 2**20  # bytes of image data per images-NNNNN.parquet
IMAGE_ROW_GROUP = 256  # images per Parquet row group: the unit a reader decodes
SPLITS = ("train", "valid", "test")
MODALITIES = ("image", "text", "structure", "")

ENTITY_SCHEMA = pa.schema(
    [("id", pa.string()), ("name", pa.string()), ("description", pa.string()), ("num_images", pa.int32())]
)
RELATION_SCHEMA = pa.schema([("id", pa.string()), ("name", pa.string()), ("modality", pa.string())])
TRIPLE_SCHEMA = pa.schema([("head", pa.int32()), ("relation", pa.int32()), ("tail", pa.int32())])
IMAGE_SCHEMA = pa.schema([("entity", pa.int32()), ("slot", pa.int16()), ("format", pa.string()), ("sha256", pa.string()),
                          ("size", pa.int32()), ("part", pa.int16()), ("row", pa.int32())])
V1_IMAGE_SCHEMA = pa.schema([("entity", pa.int32()), ("slot", pa.int16()), ("path", pa.string())])
IMAGE_DATA_SCHEMA = pa.schema([("entity", pa.int32()), ("slot", pa.int16()), ("sha256", pa.string()),
                               ("data", pa.binary())])


def image_part_name(k: int) -> str:
    return f"images-{k:05d}.parquet"


@dataclass
class KnowledgeGraph:
    """A loaded, validated KG. Indices in `triples` and `images` refer to table row order."""

    root: Path
    entities: pd.DataFrame
    relations: pd.DataFrame
    triples: dict[str, np.ndarray]  # split -> int64 [n, 3] (head, relation, tail)
    images: pd.DataFrame
    meta: dict

    @property
    def num_entities(self) -> int:
        return len(self.entities)

    @property
    def num_relations(self) -> int:
        return len(self.relations)

    @functools.cached_property
    def _image_entity(self) -> np.ndarray:
        # images.parquet is sorted by (entity, slot), so an entity's rows are one contiguous run.
        return self.images["entity"].to_numpy(dtype=np.int64)

    def image_rows(self, entity: int) -> range:
        """Rows of `images` (and of `ImageReader`) holding `entity`'s images, in slot order."""
        lo, hi = np.searchsorted(self._image_entity, [entity, entity + 1])
        return range(int(lo), int(hi))

    def image_bytes(self, entity: int) -> list[bytes]:
        """`entity`'s stored image files in slot order (may include undecodable ones)."""
        reader = ImageReader(self.root, self.images)
        return [reader.read(i) for i in self.image_rows(entity)]

    def all_triples(self) -> np.ndarray:
        """train, valid and test stacked, in that order."""
        return np.concatenate([self.triples[s] for s in SPLITS], axis=0)


# ----------------------------------------------------------------------------- parquet I/O


def write_parquet(path: str | Path, columns: dict[str, Any], schema: pa.Schema) -> None:
    """Write `columns` (name -> array-like) with a fixed schema, deterministically and atomically."""
    arrays = [pa.array(_as_list_or_array(columns[f.name]), type=f.type) for f in schema]
    table = pa.Table.from_arrays(arrays, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def _as_list_or_array(values: Any) -> Any:
    if isinstance(values, pd.Series):
        values = values.to_numpy()
    if isinstance(values, np.ndarray) and values.dtype.kind in "OUS":
        return values.tolist()  # pyarrow wants Python str for string columns
    return values


def _read_parquet(root: Path, name: str) -> pd.DataFrame:
    path = root / name
    if not path.is_file():
        raise ValueError(f"{path}: missing file")
    try:
        return pq.read_table(path).to_pandas()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None


# ----------------------------------------------------------------------------- validation


def _require_columns(df: pd.DataFrame, name: str, schema: pa.Schema) -> None:
    for field in schema:
        if field.name not in df.columns:
            raise ValueError(f"{name}: missing column {field.name!r} (has {list(df.columns)})")


def _require_int(values: np.ndarray, where: str) -> None:
    if values.dtype.kind not in "iu":
        raise ValueError(f"{where}: expected integers, got dtype {values.dtype}")


def _check_strings(df: pd.DataFrame, name: str, column: str, allow_empty: bool = True) -> None:
    ok = df[column].map(lambda v: isinstance(v, str) and (allow_empty or v != "")).to_numpy(dtype=bool)
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        kind = "a string" if allow_empty else "a non-empty string"
        raise ValueError(f"{name} row {row}: {column} must be {kind}, got {df[column].iloc[row]!r}")


def _check_unique(df: pd.DataFrame, name: str, column: str) -> None:
    dup = df[column].duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise ValueError(f"{name} row {row}: duplicate {column} {df[column].iloc[row]!r}")


def validate_kg(
    entities: pd.DataFrame,
    relations: pd.DataFrame,
    triples: dict[str, np.ndarray],
    images: pd.DataFrame,
    format_version: int = FORMAT_VERSION,
) -> None:
    """Raise ValueError naming the file (and row) of the first inconsistency found.

    `format_version` 1 checks a format-1 image table (entity, slot, path) as an input to convert.
    """
    _require_columns(entities, "entities.parquet", ENTITY_SCHEMA)
    _require_columns(relations, "relations.parquet", RELATION_SCHEMA)
    _require_columns(images, "images.parquet", IMAGE_SCHEMA if format_version != 1 else V1_IMAGE_SCHEMA)
    num_e, num_r = len(entities), len(relations)

    for col in ("id", "name", "description"):
        _check_strings(entities, "entities.parquet", col, allow_empty=col == "description")
    _check_unique(entities, "entities.parquet", "id")
    for col in ("id", "name", "modality"):
        _check_strings(relations, "relations.parquet", col, allow_empty=col == "modality")
    _check_unique(relations, "relations.parquet", "id")
    bad_mod = ~relations["modality"].isin(MODALITIES)
    if bad_mod.any():
        row = int(np.flatnonzero(bad_mod.to_numpy())[0])
        raise ValueError(
            f"relations.parquet row {row}: modality {relations['modality'].iloc[row]!r} not in {MODALITIES}"
        )

    for split in SPLITS:
        name = f"{split}.parquet"
        if split not in triples:
            raise ValueError(f"{name}: missing split {split!r}")
        arr = np.asarray(triples[split])
        if arr.ndim != 2 or arr.shape[1] != 3:
            raise ValueError(f"{name}: expected an [n, 3] array of (head, relation, tail), got shape {arr.shape}")
        if len(arr) == 0:
            raise ValueError(f"{name}: empty split")
        _require_int(arr, name)
        for col, limit in ((0, num_e), (1, num_r), (2, num_e)):
            bad = (arr[:, col] < 0) | (arr[:, col] >= limit)
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                column = TRIPLE_SCHEMA.names[col]
                raise ValueError(f"{name} row {row}: {column} {arr[row, col]} out of range [0, {limit})")
        _, first = np.unique(arr, axis=0, return_index=True)
        if len(first) != len(arr):
            dup = np.ones(len(arr), dtype=bool)
            dup[first] = False
            row = int(np.flatnonzero(dup)[0])
            earlier = int(np.flatnonzero((arr == arr[row]).all(axis=1))[0])
            raise ValueError(f"{name} row {row}: duplicate triple {tuple(arr[row].tolist())} (same as row {earlier})")

    ent = images["entity"].to_numpy()
    slot = images["slot"].to_numpy()
    _require_int(ent, "images.parquet column 'entity'")
    _require_int(slot, "images.parquet column 'slot'")
    bad = (ent < 0) | (ent >= num_e)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"images.parquet row {row}: entity {ent[row]} out of range [0, {num_e})")
    for col in ("format", "sha256") if format_version != 1 else ("path",):
        _check_strings(images, "images.parquet", col, allow_empty=False)
    if len(ent) > 1:
        order_bad = (ent[1:] < ent[:-1]) | ((ent[1:] == ent[:-1]) & (slot[1:] <= slot[:-1]))
        if order_bad.any():
            row = int(np.flatnonzero(order_bad)[0]) + 1
            raise ValueError(f"images.parquet row {row}: rows not sorted by (entity, slot) or duplicate slot")

    counts = np.bincount(ent.astype(np.int64), minlength=num_e) if len(ent) else np.zeros(num_e, np.int64)
    if len(slot) and ((slot < 0) | (slot >= counts[ent])).any():
        row = int(np.flatnonzero((slot < 0) | (slot >= counts[ent]))[0])
        raise ValueError(
            f"images.parquet row {row}: slot {slot[row]} not in 0..{counts[ent[row]] - 1} for entity {ent[row]}"
        )
    num_images = entities["num_images"].to_numpy()
    _require_int(num_images, "entities.parquet column 'num_images'")
    bad = num_images != counts
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"entities.parquet row {row}: num_images={num_images[row]} but images.parquet lists {counts[row]} images"
        )


# ----------------------------------------------------------------------------- write / load


def write_kg(
    root: str | Path,
    entities: pd.DataFrame,
    relations: pd.DataFrame,
    triples: dict[str, np.ndarray],
    images: pd.DataFrame,
    meta: dict,
) -> None:
    """Validate and write the tables of a KG in the canonical format (each file atomically,
    meta.json last) into `root`, where an `ImageWriter` already wrote the image parts.

    `images` is the index `ImageWriter.close()` returned. If `entities` has no `num_images` column
    it is derived from `images`. `meta` must contain "source"; counts, format_version and the
    image parts are filled in.
    """
    root = Path(root)
    if "source" not in meta:
        raise ValueError("meta.json: missing key 'source'")
    if "num_images" not in entities.columns and "entity" in images.columns:
        counts = np.bincount(images["entity"].to_numpy(dtype=np.int64), minlength=len(entities))
        entities = entities.assign(num_images=counts[: len(entities)])
    triples = {s: np.asarray(t) for s, t in triples.items()}
    validate_kg(entities, relations, triples, images)

    root.mkdir(parents=True, exist_ok=True)
    write_parquet(root / "entities.parquet", {c: entities[c] for c in ENTITY_SCHEMA.names}, ENTITY_SCHEMA)
    write_parquet(root / "relations.parquet", {c: relations[c] for c in RELATION_SCHEMA.names}, RELATION_SCHEMA)
    for split in SPLITS:
        t = triples[split].astype(np.int32)
        write_parquet(root / f"{split}.parquet", {"head": t[:, 0], "relation": t[:, 1], "tail": t[:, 2]}, TRIPLE_SCHEMA)
    write_parquet(root / "images.parquet", {c: images[c] for c in IMAGE_SCHEMA.names}, IMAGE_SCHEMA)
    parts = int(images["part"].max()) + 1 if len(images) else 0
    _check_parts(root, images, parts)
    full_meta = {
        "format_version": FORMAT_VERSION,
        "source": meta["source"],
        "num_entities": len(entities),
        "num_relations": len(relations),
        "num_triples": {s: int(len(triples[s])) for s in SPLITS},
        "image_parts": [image_part_name(k) for k in range(parts)],
    }
    full_meta.update({k: v for k, v in meta.items() if k not in full_meta})
    write_json(root / "meta.json", full_meta)


def load_kg_tables(root: str | Path, formats: tuple[int, ...] = (1, FORMAT_VERSION)) -> KnowledgeGraph:
    """Load and validate a KG directory's tables (of a format in `formats`); ValueError names the file.

    Format 1 (one file per image) is accepted here only as an input to convert (`elmm.kg.ingest`).
    """
    root = Path(root).resolve()
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise ValueError(f"{meta_path}: missing file")
    meta = read_json(meta_path)
    version = meta.get("format_version")
    if version == 1 and 1 not in formats:
        raise ValueError(f"{meta_path}: format_version 1 (one file per image) is no longer read; images now live "
                         "in a few Parquet files. Rebuild it with `dvc repro download` (or `dvc repro -f -s download`); "
                         "to convert your own KG, point data.url at it with data.name: custom")
    if version not in formats:
        raise ValueError(f"{meta_path}: format_version {version!r}, expected {FORMAT_VERSION}")

    entities = _read_parquet(root, "entities.parquet")
    relations = _read_parquet(root, "relations.parquet")
    images = _read_parquet(root, "images.parquet")
    triples: dict[str, np.ndarray] = {}
    for split in SPLITS:
        df = _read_parquet(root, f"{split}.parquet")
        _require_columns(df, f"{split}.parquet", TRIPLE_SCHEMA)
        arr = df[TRIPLE_SCHEMA.names].to_numpy()
        _require_int(arr, f"{split}.parquet")
        triples[split] = arr.astype(np.int64)
    validate_kg(entities, relations, triples, images, format_version=version)
    if version == FORMAT_VERSION:
        _check_parts(root, images, len(meta.get("image_parts", [])))

    expected = {"num_entities": len(entities), "num_relations": len(relations)}
    for key, value in expected.items():
        if meta.get(key) != value:
            raise ValueError(f"{meta_path}: {key}={meta.get(key)!r} but the tables have {value}")
    counts = {s: len(triples[s]) for s in SPLITS}
    if meta.get("num_triples") != counts:
        raise ValueError(f"{meta_path}: num_triples={meta.get('num_triples')!r} but the tables have {counts}")
    return KnowledgeGraph(root=root, entities=entities, relations=relations, triples=triples, images=images, meta=meta)


def load_kg(root: str | Path) -> KnowledgeGraph:
    """Load and validate a canonical KG directory (the current format); ValueError names the file."""
    return load_kg_tables(root, formats=(FORMAT_VERSION,))


def _check_parts(root: Path, images: pd.DataFrame, parts: int) -> None:
    """Every image part exists and holds exactly the rows the index places in it (footer only)."""
    rows = np.bincount(images["part"].to_numpy(dtype=np.int64), minlength=parts) if len(images) else np.zeros(parts)
    if len(rows) > parts:
        raise ValueError(f"{root / 'images.parquet'}: part {len(rows) - 1} referenced but meta.json lists {parts} part(s)")
    for k in range(parts):
        path = root / image_part_name(k)
        try:
            n = pq.ParquetFile(path).metadata.num_rows
        except FileNotFoundError:
            raise ValueError(f"{path}: missing file") from None
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise ValueError(f"{path}: not a readable parquet file ({e})") from None
        if n != rows[k]:
            raise ValueError(f"{path}: {n} rows but images.parquet places {int(rows[k])} there")


# ----------------------------------------------------------------------------- image bytes


def image_format(data: bytes) -> str:
    """The file format from the first bytes ("jpeg", "png", ...; "unknown" if not recognised)."""
    signatures = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF8", "gif"), (b"BM", "bmp"),
                  (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"))
    for magic, name in signatures:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "unknown"


class ImageWriter:
    """Streams image files into `images-NNNNN.parquet` parts of about `part_bytes` each.

    Rows must come in (entity, slot) order with slots 0, 1, ... per entity. Memory holds one row
    group (`IMAGE_ROW_GROUP` images) at a time, whatever the dataset size. `close()` returns the
    index that `write_kg` stores as images.parquet.
    """

    def __init__(self, root: str | Path, part_bytes: int = IMAGE_PART_BYTES, row_group: int = IMAGE_ROW_GROUP):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.part_bytes, self.row_group = part_bytes, row_group
        self._writer: pq.ParquetWriter | None = None
        self._part, self._part_size, self._part_rows = -1, 0, 0
        self._pending: list[tuple[int, int, str, bytes]] = []
        self._index: list[tuple[int, int, str, str, int, int, int]] = []
        self._last: tuple[int, int] = (-1, -1)

    def add(self, entity: int, slot: int, data: bytes) -> None:
        expected = self._last[1] + 1 if entity == self._last[0] else 0
        if entity < self._last[0] or slot != expected:
            raise ValueError(f"images must come in (entity, slot) order with dense slots: got ({entity}, {slot}) "
                             f"after {self._last}")
        self._last = (entity, slot)
        if self._writer is None or self._part_size >= self.part_bytes:
            self._flush()
            self._open_next()
        digest = hashlib.sha256(data).hexdigest()
        self._pending.append((entity, slot, digest, data))
        self._index.append((entity, slot, image_format(data), digest, len(data), self._part, self._part_rows))
        self._part_size += len(data)
        self._part_rows += 1
        if len(self._pending) >= self.row_group:
            self._flush()

    def _open_next(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._part += 1
        self._part_size = self._part_rows = 0
        self._writer = pq.ParquetWriter(self.root / image_part_name(self._part), IMAGE_DATA_SCHEMA,
                                        compression="none", use_dictionary=False, write_statistics=False)

    def _flush(self) -> None:
        if not self._pending:
            return
        cols = list(zip(*self._pending))
        table = pa.Table.from_arrays([pa.array(cols[0], pa.int32()), pa.array(cols[1], pa.int16()),
                                      pa.array(cols[2], pa.string()), pa.array(cols[3], pa.binary())],
                                     schema=IMAGE_DATA_SCHEMA)
        self._writer.write_table(table, row_group_size=len(self._pending))
        self._pending = []

    def close(self) -> pd.DataFrame:
        """Finish the last part; the index (columns of IMAGE_SCHEMA)."""
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        rows = self._index
        return pd.DataFrame({
            "entity": np.array([r[0] for r in rows], dtype=np.int32),
            "slot": np.array([r[1] for r in rows], dtype=np.int16),
            "format": pd.Series([r[2] for r in rows], dtype=object),
            "sha256": pd.Series([r[3] for r in rows], dtype=object),
            "size": np.array([r[4] for r in rows], dtype=np.int32),
            "part": np.array([r[5] for r in rows], dtype=np.int16),
            "row": np.array([r[6] for r in rows], dtype=np.int32),
        })  # fmt: skip


class ImageReader:
    """Reads image files by their row in images.parquet, one Parquet row group at a time.

    The last row group read is kept, so reading rows in order decodes each group once. Each
    file's sha256 is checked against the index: a changed or damaged part is an error naming it.
    Safe to use from DataLoader workers (each opens its own files lazily).
    """

    def __init__(self, root: str | Path, images: pd.DataFrame):
        self.root = Path(root)
        self.part = images["part"].to_numpy(dtype=np.int64)
        self.row = images["row"].to_numpy(dtype=np.int64)
        self.sha256 = images["sha256"].tolist()
        self._files: dict[int, pq.ParquetFile] = {}
        self._bounds: dict[int, np.ndarray] = {}
        self._cache: tuple[int, int, list] | None = None  # (part, row group, data column)

    def _file(self, part: int) -> pq.ParquetFile:
        if part not in self._files:
            f = pq.ParquetFile(self.root / image_part_name(part))
            self._files[part] = f
            sizes = [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)]
            self._bounds[part] = np.cumsum([0, *sizes])
        return self._files[part]

    def read(self, index: int) -> bytes:
        """The bytes of image row `index` of images.parquet."""
        part, row = int(self.part[index]), int(self.row[index])
        f = self._file(part)
        group = int(np.searchsorted(self._bounds[part], row, side="right") - 1)
        if self._cache is None or self._cache[:2] != (part, group):
            self._cache = (part, group, f.read_row_group(group, columns=["data"]).column("data").to_pylist())
        data = self._cache[2][row - int(self._bounds[part][group])]
        if hashlib.sha256(data).hexdigest() != self.sha256[index]:
            raise ValueError(f"{self.root / image_part_name(part)} row {row}: sha256 differs from images.parquet "
                             "(damaged or replaced file); rebuild it with `dvc repro -f -s download`")
        return data


def coverage(kg: KnowledgeGraph) -> dict:
    """The data report (metrics/data.json): sizes, image coverage, and the ranking candidate set."""
    counts = kg.entities["num_images"].to_numpy()
    report = {
        "source": kg.meta.get("source", ""),
        "entities": int(kg.num_entities),
        "relations": int(kg.num_relations),
        "triples": {split: int(len(kg.triples[split])) for split in SPLITS},
        "images": int(counts.sum()),
        "entities_by_images": {
            "0": int((counts == 0).sum()),
            "1-9": int(((counts >= 1) & (counts <= 9)).sum()),
            "10+": int((counts >= 10).sum()),
        },
        # Ranking scores every entity of the KG (the filtered setting removes known answers).
        "candidates": int(kg.num_entities),
        "corrupt_images_known": int(kg.meta.get("corrupt_images", 0)),
    }
    # Real sources (src/elmm/kg/ingest.py) record what validation removed; the synthetic world has none.
    if "skipped_images" in kg.meta:
        report["dropped_unknown_triples"] = kg.meta.get("dropped_unknown_triples", {})
        report["duplicate_triples"] = kg.meta.get("duplicate_triples", {})
        report["skipped_images"] = int(kg.meta["skipped_images"])
        report["entities_without_text"] = int(kg.meta.get("entities_without_text", 0))
    return report
