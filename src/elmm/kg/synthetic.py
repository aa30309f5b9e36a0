"""A small deterministic multimodal KG whose facts are each visible through exactly one view.

Object entities have latent attributes drawn independently and uniformly:

- colour, shape  -> shown only in the images (names/descriptions never mention them)
- category       -> stated only in the description
- community      -> shown nowhere but the `knows` edges of the graph

So `has_colour`/`has_shape`/`looks_like` need the image view, `in_category` needs the text
view and `knows` needs the structure; ablating a view should hurt exactly its relations.
Concept entities ("colour red", "shape circle", "category city") have text and no images.
The latent attributes go to `latent.parquet` for analysis, never into meta.json.
"""

from __future__ import annotations

import io
import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image, ImageDraw
from tqdm import tqdm

from elmm.io import atomic_dir
from elmm.kg.format import SPLITS, write_kg, write_parquet

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 240),
    "yellow": (240, 230, 30),
    "magenta": (230, 40, 230),
    "cyan": (30, 225, 230),
}
SHAPES = ("circle", "square", "triangle", "cross", "star")
CATEGORIES = ("musician", "river", "city", "painter", "mountain", "company", "novel", "athlete")

# (id, human-readable name, modality) in relation-index order.
RELATIONS = (
    ("has_colour", "has colour", "image"),
    ("has_shape", "has shape", "image"),
    ("looks_like", "looks like", "image"),
    ("in_category", "belongs to category", "text"),
    ("knows", "knows", "structure"),
)

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "sh", "dr", "kr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "", "n", "l", "m", "r", "s", "k")
# Filler vocabulary for descriptions: drawn independently of every attribute, so the category
# word is the only signal in an object's text. None of these is a colour/shape/category word.
_REGIONS = ("northern", "southern", "eastern", "western", "coastal", "central", "highland", "lowland")
_PLACES = ("region", "valley", "province", "district", "borderlands", "islands")
_VERBS = ("known", "remembered", "admired", "discussed", "recorded")
_SOURCES = ("old chronicles", "local archives", "travel journals", "a recent survey", "folk tales")
_ERAS = ("early", "middle", "late", "modern")

# Words that must never appear (even as substrings) in an object's name or description.
_FORBIDDEN = tuple(COLOURS) + SHAPES + CATEGORIES


def _make_name(rng: random.Random) -> str:
    def word() -> str:
        n = rng.choice((2, 2, 3))
        return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n)) + rng.choice(_CODAS)

    return f"{word().capitalize()} {word().capitalize()}"


def _unique_names(n: int, rng: random.Random) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        name = _make_name(rng)
        low = name.lower()
        # Substring test: a name like "Tured" would leak the token "red" to a subword tokenizer.
        if low in seen or any(w in low for w in _FORBIDDEN):
            continue
        seen.add(low)
        names.append(name)
    return names


def _describe(name: str, category: str, rng: random.Random) -> str:
    article = "an" if category[0] in "aeiou" else "a"
    text = f"{name} is {article} {category} {rng.choice(_VERBS)} in the {rng.choice(_REGIONS)} {rng.choice(_PLACES)}."
    if rng.random() < 0.5:
        text += f" It appears in {rng.choice(_SOURCES)} from the {rng.choice(_ERAS)} era."
    return text


# ----------------------------------------------------------------------------- images

_SUPERSAMPLE = 4  # draw large and downsample, so edges are anti-aliased at 32 px


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of `shape` inscribed in radius r around (cx, cy), rotated by angle."""
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == "star":
        pts = [
            (rad * math.cos(a), rad * math.sin(a))
            for k in range(10)
            for rad, a in [((1.0 if k % 2 == 0 else 0.42), -math.pi / 2 + k * math.pi / 5)]
        ]
    elif shape == "cross":
        w = 0.3  # half arm width
        pts = [(w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1),
               (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w), (-w, -1)]  # fmt: skip
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _render(colour: str, shape: str, size: int, rng: np.random.Generator) -> bytes:
    """One JPEG of the shape filled with the colour, with random placement, scale, rotation, noise."""
    big = size * _SUPERSAMPLE
    bg = int(rng.integers(10, 100))  # dark/grey: every fill colour stays clearly brighter
    img = Image.new("RGB", (big, big), (bg, bg, bg))
    draw = ImageDraw.Draw(img)
    r = big * float(rng.uniform(0.4, 0.8)) / 2
    cx, cy = rng.uniform(r, big - r, size=2)
    fill = tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in COLOURS[colour])
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r, float(rng.uniform(0, 2 * math.pi))), fill=fill)
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.normal(0.0, float(rng.uniform(2.0, 8.0)), size=arr.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _opens(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:
        return False


def _garbage(rng: np.random.Generator) -> bytes:
    """A truncated JPEG header followed by random bytes, checked to be unreadable by PIL."""
    while True:
        junk = rng.integers(0, 256, size=int(rng.integers(64, 512)), dtype=np.uint8).tobytes()
        data = b"\xff\xd8\xff\xe0\x00\x10JF" + junk
        if not _opens(data):
            return data


# ----------------------------------------------------------------------------- split


def _split(
    triples: np.ndarray, rng: np.random.Generator, valid_fraction: float, test_fraction: float
) -> dict[str, np.ndarray]:
    """Shuffle and split; then move valid/test triples with an entity or relation unseen in train."""
    triples = triples[rng.permutation(len(triples))]
    n = len(triples)
    n_valid = max(1, round(valid_fraction * n))
    n_test = max(1, round(test_fraction * n))
    if n_valid + n_test >= n:
        raise ValueError(f"only {n} triples: too few for valid={n_valid} and test={n_test}")
    valid, test, train = triples[:n_valid], triples[n_valid : n_valid + n_test], triples[n_valid + n_test :]

    seen_e = set(train[:, 0].tolist()) | set(train[:, 2].tolist())
    seen_r = set(train[:, 1].tolist())
    moved: list[np.ndarray] = []
    kept: dict[str, np.ndarray] = {}
    for name, part in (("valid", valid), ("test", test)):
        keep = np.ones(len(part), dtype=bool)
        for i, (h, r, t) in enumerate(part.tolist()):
            if h not in seen_e or t not in seen_e or r not in seen_r:
                # A ranking query about an entity the model never saw in training is unanswerable
                # from structure; moving it to train also makes its entities known for later rows.
                keep[i] = False
                seen_e.update((h, t))
                seen_r.add(r)
        moved.append(part[~keep])
        kept[name] = part[keep]
    train = np.concatenate([train, *moved])

    for name in ("valid", "test"):
        if len(kept[name]) == 0:
            # Take a train triple whose head, relation and tail all occur in other train triples.
            ent_count = np.bincount(train[:, [0, 2]].ravel())
            rel_count = np.bincount(train[:, 1])
            ok = (ent_count[train[:, 0]] > 1) & (ent_count[train[:, 2]] > 1) & (rel_count[train[:, 1]] > 1)
            ok &= train[:, 0] != train[:, 2]
            if not ok.any():
                raise ValueError(f"cannot make a non-empty {name} split with all entities seen in train")
            i = int(np.flatnonzero(ok)[0])
            kept[name] = train[i : i + 1]
            train = np.delete(train, i, axis=0)
    return {"train": train, "valid": kept["valid"], "test": kept["test"]}


# ----------------------------------------------------------------------------- generator


def generate_synthetic(
    out_dir: str | Path,
    *,
    seed: int,
    entities: int = 300,
    images_per_entity: int = 10,
    image_size: int = 32,
    fewer_images: float = 0.1,
    no_images: float = 0.03,
    corrupt_images: int = 3,
    communities: int = 12,
    knows_per_entity: int = 3,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    progress: bool = True,
) -> dict:
    """Write the synthetic world to `out_dir` in the canonical format; return a summary of counts."""
    params = dict(
        seed=seed, entities=entities, images_per_entity=images_per_entity, image_size=image_size,
        fewer_images=fewer_images, no_images=no_images, corrupt_images=corrupt_images,
        communities=communities, knows_per_entity=knows_per_entity,
        valid_fraction=valid_fraction, test_fraction=test_fraction,
    )  # fmt: skip
    if entities < 2 or images_per_entity < 1 or communities < 1 or image_size < 8:
        raise ValueError(f"synthetic: impossible parameters {params}")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    text_rng = random.Random(seed)
    n = entities

    # Latent attributes, independent and uniform.
    colour = rng.integers(0, len(COLOURS), n)
    shape = rng.integers(0, len(SHAPES), n)
    category = rng.integers(0, len(CATEGORIES), n)
    community = rng.integers(0, communities, n)
    colour_names = list(COLOURS)

    # Entities: objects first, then one concept per colour, shape and category.
    names = _unique_names(n, text_rng)
    rows = [
        (f"obj:{i:06d}", names[i], _describe(names[i], CATEGORIES[category[i]], text_rng)) for i in range(n)
    ]
    concept_index: dict[str, int] = {}
    for kind, values, desc in (
        ("colour", colour_names, "The colour {v}, as seen in pictures."),
        ("shape", SHAPES, "The shape {v}, as seen in pictures."),
        ("category", CATEGORIES, "The category of things that are of the kind {v}."),
    ):
        for v in values:
            concept_index[f"{kind}:{v}"] = n + len(concept_index)
            rows.append((f"{kind}:{v}", f"{kind} {v}", desc.format(v=v)))
    num_entities = len(rows)

    # How many images each object keeps.
    n_none = round(no_images * n)
    n_fewer = round(fewer_images * n) if images_per_entity > 1 else 0
    if n_none + n_fewer > n:
        raise ValueError(f"synthetic: no_images + fewer_images covers more than all {n} entities")
    order = rng.permutation(n)
    counts = np.full(num_entities, 0, dtype=np.int64)
    counts[:n] = images_per_entity
    counts[order[:n_none]] = 0
    if n_fewer:
        counts[order[n_none : n_none + n_fewer]] = rng.integers(1, images_per_entity, n_fewer)

    # Corrupt one image each of `corrupt_images` distinct entities that keep >= 2 images, so every
    # affected entity still has a readable picture.
    eligible = np.flatnonzero(counts[:n] >= 2)
    if corrupt_images > len(eligible):
        raise ValueError(f"synthetic: corrupt_images={corrupt_images} but only {len(eligible)} entities have 2+ images")
    corrupt_ent = np.sort(rng.choice(eligible, size=corrupt_images, replace=False))
    corrupt = {int(e): int(rng.integers(0, counts[e])) for e in corrupt_ent}

    # Images: each entity has its own generator so one entity's pictures do not depend on others.
    img_rows: list[tuple[int, int, str]] = []
    corrupt_paths: list[str] = []
    images_dir = out_dir / "images"
    with atomic_dir(images_dir) as tmp_images:  # replaces any stale images of an earlier run
        for e in tqdm(range(n), desc="synthetic images", unit="entity", disable=not progress):
            if counts[e] == 0:
                continue
            erng = np.random.default_rng([seed, 1, e])
            (tmp_images / f"{e:06d}").mkdir()
            for s in range(int(counts[e])):
                rel = f"images/{e:06d}/{s:02d}.jpg"
                data = _render(colour_names[colour[e]], SHAPES[shape[e]], image_size, erng)
                if corrupt.get(e) == s:
                    data = _garbage(erng)
                    corrupt_paths.append(rel)
                (tmp_images / f"{e:06d}" / f"{s:02d}.jpg").write_bytes(data)
                img_rows.append((e, s, rel))

    # Triples.
    triples: list[tuple[int, int, int]] = []
    rel_idx = {rid: i for i, (rid, _, _) in enumerate(RELATIONS)}
    groups: dict[tuple[int, int], list[int]] = {}
    members: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault((int(colour[i]), int(shape[i])), []).append(i)
        members.setdefault(int(community[i]), []).append(i)
    for i in range(n):
        triples.append((i, rel_idx["has_colour"], concept_index[f"colour:{colour_names[colour[i]]}"]))
        triples.append((i, rel_idx["has_shape"], concept_index[f"shape:{SHAPES[shape[i]]}"]))
        triples.append((i, rel_idx["in_category"], concept_index[f"category:{CATEGORIES[category[i]]}"]))
        same_look = [j for j in groups[(int(colour[i]), int(shape[i]))] if j != i]
        for j in rng.choice(same_look, size=min(2, len(same_look)), replace=False) if same_look else []:
            triples.append((i, rel_idx["looks_like"], int(j)))
        peers = [j for j in members[int(community[i])] if j != i]
        for j in rng.choice(peers, size=min(knows_per_entity, len(peers)), replace=False) if peers else []:
            triples.append((i, rel_idx["knows"], int(j)))
    all_triples = np.unique(np.asarray(triples, dtype=np.int64), axis=0)  # dedupe, canonical order
    splits = _split(all_triples, rng, valid_fraction, test_fraction)

    entities_df = pd.DataFrame(rows, columns=["id", "name", "description"]).assign(num_images=counts.astype(np.int32))
    relations_df = pd.DataFrame(list(RELATIONS), columns=["id", "name", "modality"])
    images_df = pd.DataFrame(img_rows, columns=["entity", "slot", "path"])
    summary = {
        "entities": num_entities,
        "object_entities": n,
        "concept_entities": num_entities - n,
        "relations": len(RELATIONS),
        "triples": {s: int(len(splits[s])) for s in SPLITS},
        "images": len(img_rows),
        "objects_without_images": n_none,
        "objects_with_fewer_images": n_fewer,
        "corrupt_images": len(corrupt_paths),
        "corrupt_image_paths": corrupt_paths,
    }
    n_concepts = num_entities - n
    write_parquet(
        out_dir / "latent.parquet",
        {
            "entity": np.arange(num_entities, dtype=np.int32),
            "colour": [colour_names[c] for c in colour] + [""] * n_concepts,
            "shape": [SHAPES[s] for s in shape] + [""] * n_concepts,
            "category": [CATEGORIES[c] for c in category] + [""] * n_concepts,
            "community": np.concatenate([community, np.full(n_concepts, -1)]).astype(np.int32),
        },
        pa.schema([
            ("entity", pa.int32()), ("colour", pa.string()), ("shape", pa.string()),
            ("category", pa.string()), ("community", pa.int32()),
        ]),  # fmt: skip
    )
    meta = {
        "source": "synthetic",
        "params": params,
        **{
            k: summary[k]
            for k in ("object_entities", "concept_entities", "images", "corrupt_images", "corrupt_image_paths")
        },
    }
    write_kg(out_dir, entities_df, relations_df, splits, images_df, meta)  # meta.json last
    return summary
