"""Reading the MKGformer release layout (FB15k-237-IMG, WN18-IMG) with line-level validation.

Text files (tab-separated, UTF-8; blank lines ignored):

- `train.tsv`, `dev.tsv` (or `valid.tsv`), `test.tsv`: head, relation, tail
- `entities.txt`: one entity id per line: the KG's entities, in index order (the candidate set)
- `entity2text.txt`: id, text (FB15k: the name; WN18: "name, gloss"), may list more entities
- `entity2textlong.txt` (optional): id, description
- `relations.txt`: one relation id per line; `relation2text.txt`: id, name

Images: `FB15k-images/m.01rng/*` for `/m/01rng`; `wn18-images/n02174461/*` for `02174461`.
Every problem is reported as `file:line: message`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from elmm.kg.format import SPLITS

REQUIRED = ("train.tsv", "test.tsv", "entity2text.txt", "relation2text.txt")
SPLIT_FILES = {"train": ("train.tsv",), "valid": ("dev.tsv", "valid.tsv"), "test": ("test.tsv",)}
IMAGE_DIRS = {"fb15k-237-img": ("fb15k-images",), "wn18-img": ("wn18-images",),
              "custom": ("fb15k-images", "wn18-images", "images")}
MAX_EXAMPLES = 20  # problems listed by name in meta.json / the log; the counts are always complete


class LayoutError(ValueError):
    """The MKGformer files are missing, malformed or inconsistent (message: file:line: ...)."""


@dataclass
class ParsedKG:
    entities: pd.DataFrame  # id, name, description
    relations: pd.DataFrame  # id, name, modality ("")
    triples: dict[str, np.ndarray]
    dropped_unknown: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)
    entities_without_text: int = 0
    warnings: list[str] = field(default_factory=list)


def is_mkgformer_dir(path: Path) -> bool:
    return all((path / f).is_file() for f in REQUIRED) and any((path / f).is_file() for f in SPLIT_FILES["valid"])


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def find_dirs(roots: list[Path], match, *, depth: int = 2, skip: tuple[str, ...] = ()) -> list[Path]:
    """Directories under `roots` (themselves included, down to `depth` levels) for which match(dir) holds.

    Directories named in `skip` (case-insensitive) are not entered: image folders hold thousands
    of entries and never contain the text layout.
    """
    found: list[Path] = []
    level = [r for r in roots]
    for _ in range(depth + 1):
        nxt: list[Path] = []
        for d in level:
            if match(d):
                found.append(d)
            elif d.name.lower() not in skip:
                nxt.extend(_subdirs(d))
        level = nxt
    return found


def find_image_dir(roots: list[Path], source: str) -> Path | None:
    """The image folder for `source` (e.g. FB15k-images) under `roots`; None if there is none."""
    names = IMAGE_DIRS[source]
    found = find_dirs(roots, lambda d: d.name.lower() in names, depth=3)
    # Prefer the first name in the list (e.g. FB15k-images over a generic "images" folder).
    for name in names:
        hits = [d for d in found if d.name.lower() == name]
        if len(hits) > 1:
            raise LayoutError(f"several image folders named {name!r}: {', '.join(map(str, hits))}")
        if hits:
            return hits[0]
    return None


def image_folder_names(entity_id: str) -> list[str]:
    """Candidate folder names for an entity's images, in MKGformer's naming ("/m/01rng" -> "m.01rng")."""
    names = []
    if entity_id.startswith("/"):
        names.append(entity_id[1:].replace("/", "."))
    if entity_id.isdigit():
        names.append(f"n{entity_id}")
    names.append(entity_id.replace("/", "."))
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------- line readers


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines; decoding errors name the line."""
    if not path.is_file():
        raise LayoutError(f"{path}: missing file")
    out = []
    with open(path, "rb") as f:
        for no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LayoutError(f"{path}:{no}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            text = text.rstrip("\r\n")
            if text.strip():
                out.append((no, text))
    return out


def _columns(path: Path, n: int, what: str) -> list[tuple[int, list[str]]]:
    """Rows of exactly `n` tab-separated, non-empty columns (the last may contain tabs when n == 2)."""
    rows = []
    for no, text in _lines(path):
        cols = text.split("\t", n - 1) if n == 2 else text.split("\t")
        if len(cols) != n:
            raise LayoutError(f"{path}:{no}: expected {n} tab-separated column{'s' if n > 1 else ''} ({what}), "
                              f"got {len(cols)}: {text[:120]!r}")
        cols = [c.strip() for c in cols]
        if not cols[0] or (n == 3 and not all(cols)):
            raise LayoutError(f"{path}:{no}: empty column ({what}): {text[:120]!r}")
        rows.append((no, cols))
    return rows


def _mapping(path: Path, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    first: dict[str, int] = {}
    for no, (key, value) in _columns(path, 2, what):
        if key in out:
            raise LayoutError(f"{path}:{no}: duplicate id {key!r} (first at line {first[key]})")
        out[key], first[key] = value, no
    return out


def _id_list(path: Path, what: str) -> list[str]:
    ids: list[str] = []
    first: dict[str, int] = {}
    for no, (key,) in _columns(path, 1, what):
        if key in first:
            raise LayoutError(f"{path}:{no}: duplicate {what} {key!r} (first at line {first[key]})")
        first[key] = no
        ids.append(key)
    if not ids:
        raise LayoutError(f"{path}: no {what}s")
    return ids


# ----------------------------------------------------------------------------- the reader


def read_mkgformer(text_dir: str | os.PathLike, *, source: str, drop_unknown: bool = False) -> ParsedKG:
    """Parse and validate the text files of the layout in `text_dir` (see the module docstring).

    The entity set is entities.txt when present, else every entity of entity2text.txt; relations
    likewise. Triples naming an unknown entity/relation raise LayoutError, or are dropped and
    counted with `drop_unknown`. Duplicate triples (within a split, or already in an earlier split)
    are dropped and counted. An empty split raises.
    """
    d = Path(text_dir)
    warnings: list[str] = []
    texts = _mapping(d / "entity2text.txt", "entity id, text")
    long_file = d / "entity2textlong.txt"
    long = _mapping(long_file, "entity id, description") if long_file.is_file() else {}
    rel_texts = _mapping(d / "relation2text.txt", "relation id, text")
    entity_file = d / "entities.txt"
    entity_ids = _id_list(entity_file, "entity id") if entity_file.is_file() else list(texts)
    entity_from = entity_file.name if entity_file.is_file() else "entity2text.txt"
    relation_file = d / "relations.txt"
    relation_ids = _id_list(relation_file, "relation id") if relation_file.is_file() else list(rel_texts)
    relation_from = relation_file.name if relation_file.is_file() else "relation2text.txt"
    if not entity_ids:
        raise LayoutError(f"{d / entity_from}: no entities")
    if not relation_ids:
        raise LayoutError(f"{d / relation_from}: no relations")

    names, descriptions, without_text = [], [], 0
    for eid in entity_ids:
        text = texts.get(eid, "")
        name, desc = text, long.get(eid, "")
        if source == "wn18-img" and ", " in text:
            # WN18's entity2text is "name, gloss": the gloss is the description.
            name, gloss = text.split(", ", 1)
            desc = desc or gloss
        if not name:
            without_text += 1
            name = eid  # every entity needs a name for the prompt; its id is the best we have
        names.append(name)
        descriptions.append(desc)
    if without_text:
        warnings.append(f"{without_text} entities of {entity_from} have no text in entity2text.txt: named by their id")
    entities = pd.DataFrame({"id": entity_ids, "name": names, "description": descriptions})
    relations = pd.DataFrame({
        "id": relation_ids,
        "name": [rel_texts.get(r) or r for r in relation_ids],
        "modality": [""] * len(relation_ids),  # real data: which evidence a relation needs is unknown
    })  # fmt: skip

    e_index = {e: i for i, e in enumerate(entity_ids)}
    r_index = {r: i for i, r in enumerate(relation_ids)}
    seen: dict[tuple[int, int, int], str] = {}  # triple -> "file:line" of its first occurrence
    triples: dict[str, np.ndarray] = {}
    dropped: dict[str, int] = {}
    dups: dict[str, int] = {}
    for split in SPLITS:
        path = next((d / f for f in SPLIT_FILES[split] if (d / f).is_file()), d / SPLIT_FILES[split][0])
        rows: list[tuple[int, int, int]] = []
        dropped[split] = dups[split] = 0
        for no, (h, r, t) in _columns(path, 3, "head, relation, tail"):
            unknown = None
            if h not in e_index or t not in e_index:
                unknown = ("entity", h if h not in e_index else t, entity_from)
            elif r not in r_index:
                unknown = ("relation", r, relation_from)
            if unknown:
                kind, value, listed = unknown
                msg = f"{path}:{no}: unknown {kind} {value!r} (not in {listed})"
                if not drop_unknown:
                    raise LayoutError(msg + "; set data.drop_unknown: true to drop such triples")
                if dropped[split] < 3:
                    warnings.append(msg + ": dropped")
                dropped[split] += 1
                continue
            key = (e_index[h], r_index[r], e_index[t])
            if key in seen:
                if dups[split] < 3:
                    warnings.append(f"{path}:{no}: duplicate triple {(h, r, t)} (first at {seen[key]}): dropped")
                dups[split] += 1
                continue
            seen[key] = f"{path.name}:{no}"
            rows.append(key)
        if not rows:
            why = ""
            if dropped[split] + dups[split]:
                why = f" after dropping {dropped[split]} unknown and {dups[split]} duplicate triples"
            raise LayoutError(f"{path}: empty split {split!r}: no triples{why}")
        triples[split] = np.asarray(rows, dtype=np.int64)
        if dropped[split]:
            warnings.append(f"{path}: dropped {dropped[split]} triples with an unknown entity/relation")
        if dups[split]:
            warnings.append(f"{path}: dropped {dups[split]} duplicate triples")
    return ParsedKG(entities, relations, triples, dropped, dups, without_text, warnings)


def entity_images(image_dir: Path | None, entity_ids: list[str]) -> list[list[Path]]:
    """Per entity, its image files (sorted by name; hidden files and subfolders ignored). Missing is empty."""
    if image_dir is None:
        return [[] for _ in entity_ids]
    # One listing of the folder, then dictionary lookups: entity ids never become paths themselves.
    folders = {p.name: p for p in _subdirs(image_dir)}
    out = []
    for eid in entity_ids:
        folder = next((folders[n] for n in image_folder_names(eid) if n in folders), None)
        if folder is None:
            out.append([])
            continue
        out.append(sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")),
                          key=lambda p: p.name))
    return out
