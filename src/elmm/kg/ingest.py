"""Real data sources: acquire archives/directories and normalise them into the canonical KG format.

`ingest` resolves each `data.url` (download to the cache, or use a local archive/directory in
place), extracts archives safely into a scratch folder inside the cache, finds the MKGformer
layout (or, for `custom`, a canonical KG directory), validates it, checks every image, and writes
the KG directory atomically: it appears only when everything succeeded.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from elmm.io import atomic_dir
from elmm.kg.archive import safe_extract
from elmm.kg.download import fetch, is_remote, local_path, verify_sha256
from elmm.kg.format import SPLITS, ImageReader, ImageWriter, load_kg_tables, write_kg
from elmm.kg.images import DEFAULT_MAX_PIXELS, check_images
from elmm.kg.mkgformer import (
    IMAGE_DIRS,
    MAX_EXAMPLES,
    LayoutError,
    entity_images,
    find_dirs,
    find_image_dir,
    is_mkgformer_dir,
    read_mkgformer,
)

SOURCES = ("fb15k-237-img", "wn18-img", "custom")


@dataclass
class _Root:
    path: Path
    owned: bool  # extracted by us into scratch space: files may be moved out instead of copied
    label: str  # how messages name it: the archive's file name, or the directory


def _relabel(text: str, roots: list[_Root]) -> str:
    """Name files inside an extracted archive as "archive.tar.gz:FB15k-237/train.tsv", not by the
    scratch path, which is deleted by the time the user reads the message."""
    for r in roots:
        if r.owned:
            text = text.replace(f"{r.path}/", f"{r.label}:").replace(str(r.path), r.label)
    return text


def _is_canonical_dir(path: Path) -> bool:
    return (path / "meta.json").is_file() and (path / "entities.parquet").is_file()


def _resolve_inputs(urls: list[str], sha256s: list[str], cache_dir: Path, scratch: Path, progress: bool,
                    fetch_kwargs: dict) -> tuple[list[_Root], list[dict]]:
    roots, inputs = [], []
    for i, url in enumerate(urls):
        expected = sha256s[i] if i < len(sha256s) else ""
        if is_remote(url):
            path = fetch(url, cache_dir, expected or None, progress=progress, **fetch_kwargs)
        else:
            path = local_path(url)
            if not path.exists():
                raise ValueError(f"data.url[{i}]: {path} does not exist")
        if path.is_dir():
            if expected:
                raise ValueError(f"data.sha256[{i}]: {url} is a directory; a checksum applies to an archive only "
                                 "(use an empty string for this entry)")
            roots.append(_Root(path.resolve(), owned=False, label=str(path)))
            inputs.append({"name": path.name, "kind": "directory"})
            continue
        digest = verify_sha256(path, expected or None, url)
        print(f"download: extracting {path.name}", flush=True)
        roots.append(_Root(safe_extract(path, scratch / str(i)).resolve(), owned=True, label=path.name))
        # The file name and content hash, not the URL: moving the archive must not change the KG.
        inputs.append({"name": path.name, "kind": "archive", "sha256": digest})
    return roots, inputs


def _root_of(path: Path, roots: list[_Root]) -> _Root:
    return next(r for r in roots if path.is_relative_to(r.path))


def _write_images(tmp: Path, per_entity: list[list], labels: list[list[str]], max_pixels: int,
                  progress: bool) -> tuple[pd.DataFrame, list[str]]:
    """Check every image, then stream the readable ones into tmp's image parts (slots stay dense).

    `per_entity[e]` lists entity e's images as paths or functions returning the bytes, `labels`
    how messages name them. Returns the image index and the skipped images with their reasons.
    """
    flat = [(e, src, label) for e, (srcs, names) in enumerate(zip(per_entity, labels)) for src, label in zip(srcs, names)]
    checks = check_images([src for _, src, _ in flat], max_pixels, progress=progress)
    skipped: list[str] = []
    next_slot: dict[int, int] = {}
    writer = ImageWriter(tmp)
    for (e, src, label), chk in zip(flat, checks):
        if not chk.ok:
            skipped.append(f"{label}: {chk.reason}")
            continue
        slot = next_slot.get(e, 0)
        next_slot[e] = slot + 1
        writer.add(e, slot, src.read_bytes() if isinstance(src, Path) else src())
    return writer.close(), skipped


def _canonical_images(src_dir: Path, kg_meta: dict, images: pd.DataFrame, num_entities: int) -> tuple[list, list]:
    """Per entity, its images in a canonical KG used as input: format 2 (bytes in Parquet parts) or
    format 1 (one file per image, `path` column), the format earlier versions wrote."""
    per_entity: list[list] = [[] for _ in range(num_entities)]
    labels: list[list[str]] = [[] for _ in range(num_entities)]
    if kg_meta.get("format_version") == 1:
        for e, rel in zip(images["entity"].tolist(), images["path"].tolist()):
            path = (src_dir / rel).resolve()
            if not path.is_relative_to(src_dir.resolve()):
                raise ValueError(f"{src_dir / 'images.parquet'}: path {rel!r} leaves the KG directory")
            per_entity[e].append(path)
            labels[e].append(rel)
    else:
        reader = ImageReader(src_dir, images)
        for i, (e, slot) in enumerate(zip(images["entity"].tolist(), images["slot"].tolist())):
            per_entity[e].append(functools.partial(reader.read, i))
            labels[e].append(f"entity {e} slot {slot}")
    return per_entity, labels


def _from_canonical(src_dir: Path, tmp: Path, roots: list[_Root], max_pixels: int, progress: bool):
    kg = load_kg_tables(src_dir)  # validates the tables; its duplicates/unknowns are errors there
    per_entity, labels = _canonical_images(src_dir, kg.meta, kg.images, kg.num_entities)
    images, skipped = _write_images(tmp, per_entity, labels, max_pixels, progress)
    entities = kg.entities[["id", "name", "description"]].reset_index(drop=True)
    relations = kg.relations[["id", "name", "modality"]].reset_index(drop=True)
    zeros = {s: 0 for s in SPLITS}
    extra = {"layout": "canonical", "origin_source": kg.meta.get("source", "")}
    return entities, relations, kg.triples, images, skipped, zeros, zeros, 0, [], extra


def _from_mkgformer(text_dir: Path, source: str, tmp: Path, roots: list[_Root], drop_unknown: bool,
                    max_pixels: int, progress: bool):
    parsed = read_mkgformer(text_dir, source=source, drop_unknown=drop_unknown)
    image_dir = find_image_dir([r.path for r in roots], source)
    warnings = list(parsed.warnings)
    if image_dir is None:
        names = " or ".join(IMAGE_DIRS[source])
        warnings.append(f"no image folder ({names}) found: every entity has 0 images")
    per_entity = entity_images(image_dir, parsed.entities["id"].tolist())
    labels = [[p.relative_to(_root_of(p, roots).path).as_posix() for p in paths] for paths in per_entity]
    images, skipped = _write_images(tmp, per_entity, labels, max_pixels, progress)
    extra = {"layout": "mkgformer", "image_folder": image_dir.name if image_dir else None}
    return (parsed.entities, parsed.relations, parsed.triples, images, skipped, parsed.dropped_unknown,
            parsed.duplicates, parsed.entities_without_text, warnings, extra)


def ingest(
    name: str,
    urls: list[str],
    sha256s: list[str],
    kg_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    *,
    drop_unknown: bool = False,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    fetch_kwargs: dict | None = None,
) -> dict:
    """Acquire `urls` and write the KG to `kg_dir` in the canonical format; returns a summary.

    `name` is fb15k-237-img, wn18-img (MKGformer layout) or custom (MKGformer layout or a canonical
    KG directory). Raises ValueError (LayoutError, UnsafeArchiveError, ...) or DownloadError; on
    any error `kg_dir` is left as it was.
    """
    if name not in SOURCES:
        raise ValueError(f"data.name: {name!r} is not one of {', '.join(SOURCES)}")
    if not urls:
        raise ValueError(f"data.url: data.name={name} needs at least one archive or directory")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache_dir))
    roots: list[_Root] = []
    try:
        roots, inputs = _resolve_inputs(urls, sha256s, cache_dir, scratch, progress, fetch_kwargs or {})
        skip = tuple(n for names in IMAGE_DIRS.values() for n in names)
        canonical = find_dirs([r.path for r in roots], _is_canonical_dir, skip=skip) if name == "custom" else []
        layouts = [] if canonical else find_dirs([r.path for r in roots], is_mkgformer_dir, skip=skip)
        found = canonical or layouts
        if not found:
            wanted = "the MKGformer layout (train.tsv, dev.tsv, test.tsv, entity2text.txt, relation2text.txt, ...)"
            if name == "custom":
                wanted += " or a canonical KG directory (meta.json, entities.parquet, ...)"
            raise LayoutError(f"{', '.join(urls)}: no {wanted} found at the top or up to two folder levels down")
        if len(found) > 1:
            raise LayoutError(f"{', '.join(urls)}: several datasets found ({', '.join(map(str, found))}); give one")

        with atomic_dir(kg_dir) as tmp:
            if canonical:
                result = _from_canonical(found[0], tmp, roots, max_image_pixels, progress)
            else:
                result = _from_mkgformer(found[0], name, tmp, roots, drop_unknown, max_image_pixels, progress)
            entities, relations, triples, images, skipped, dropped, dups, without_text, warnings, extra = result
            meta = {
                "source": name,
                **extra,
                "inputs": inputs,
                "drop_unknown": drop_unknown,
                "max_image_pixels": max_image_pixels,
                "dropped_unknown_triples": dropped,
                "duplicate_triples": dups,
                "entities_without_text": without_text,
                "skipped_images": len(skipped),
                "skipped_image_examples": skipped[:MAX_EXAMPLES],
            }
            write_kg(tmp, entities, relations, {s: np.asarray(t) for s, t in triples.items()}, images, meta)
    except LayoutError as e:
        raise LayoutError(_relabel(str(e), roots)) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"warnings": [_relabel(w, roots) for w in warnings], "skipped_images": skipped, "meta": meta}
