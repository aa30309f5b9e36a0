"""The synthetic multimodal world: a KG whose facts each need one kind of evidence.

Object entities have latent attributes, drawn independently and uniformly:

- image attributes, shown in the images only: the object's `colour` and `shape`, and the colour
  of a small `mark` in the image's top-left corner (a different region than the object, so a
  compressor that pools the wrong tokens loses it); two more attributes with no relation (the
  `backdrop` tint and the object's size) compete for the compressed tokens;
- text attributes, stated in the description only, at random positions among filler clauses:
  `category`, `region` and `material`;
- structure, shown nowhere but the graph: a `community` and a `team` (two independent partitions).

Relations (object -> concept for attributes; object -> object for structure):

| relation | modality | rule |
|---|---|---|
| has colour / has shape / has mark | image | the object's colour / shape / mark concept |
| belongs to category / comes from / made of | text | the object's category / region / material concept |
| knows | structure | 1 + Poisson(knows_degree - 1) random members of its own community |
| works with | structure | 1 + Poisson(works_with_degree - 1) random members of its team |
| rival of | structure | 1 + Poisson(rival_degree - 1) random members of the next community (c + 1 mod C) |

Out-degrees are random (no object's degree is known from its count of train edges), no relation
is symmetric by construction (a reverse edge occurs only by chance; its rate is reported), and no
relation depends on another modality's attribute, with one documented exception: a fraction
`colour_in_text` of objects also name their colour in the description ("painted red"), the one
attribute both modalities show (for cross-modal alignment).

A fraction `distractor_images` of each object's images shows another, random object (clutter,
as in web-crawled image sets). Concept entities ("colour red", "region coast") have text and no
images. The latent attributes go to `latent.parquet` for analysis and the Bayes ceilings, never
into meta.json or any model input. Everything is deterministic in `seed`; images are drawn from
per-entity streams, so one entity's pictures do not depend on another's.

Why one module of ~470 lines: the world's rules, its renderer and its writer are one spec; the
Bayes ceilings (elmm.baselines) read the rules from here, so they cannot drift from the generator.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image, ImageDraw
from tqdm import tqdm

from elmm.io import atomic_dir
from elmm.kg.format import SPLITS, ImageWriter, write_kg, write_parquet

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 240),
    "yellow": (240, 230, 30),
    "magenta": (230, 40, 230),
    "cyan": (30, 225, 230),
}
SHAPES = ("circle", "square", "triangle", "cross", "star")
MARKS: dict[str, tuple[int, int, int]] = {  # corner-mark colours, apart from the object colours
    "white": (245, 245, 245),
    "orange": (255, 140, 0),
    "purple": (120, 40, 190),
    "pink": (255, 160, 200),
}
BACKDROPS: dict[str, tuple[int, int, int]] = {  # background tints (no relation asks for them)
    "grey": (60, 60, 60),
    "navy": (20, 25, 70),
    "olive": (60, 60, 20),
    "maroon": (70, 20, 25),
}
CATEGORIES = ("musician", "river", "city", "painter", "mountain", "company", "novel", "athlete")
REGIONS = ("highlands", "lowlands", "coast", "desert", "forest", "tundra")
MATERIALS = ("wood", "stone", "glass", "iron", "clay")

# (id, human-readable name, modality) in relation-index order.
RELATIONS = (
    ("has_colour", "has colour", "image"),
    ("has_shape", "has shape", "image"),
    ("has_mark", "has mark", "image"),
    ("in_category", "belongs to category", "text"),
    ("from_region", "comes from", "text"),
    ("made_of", "made of", "text"),
    ("knows", "knows", "structure"),
    ("works_with", "works with", "structure"),
    ("rival_of", "rival of", "structure"),
)
# relation id -> the latent attribute it reads and the concept kind it points to
ATTRIBUTE_RELATIONS = {"has_colour": "colour", "has_shape": "shape", "has_mark": "mark",
                       "in_category": "category", "from_region": "region", "made_of": "material"}
CONCEPTS = {"colour": tuple(COLOURS), "shape": SHAPES, "mark": tuple(MARKS), "category": CATEGORIES,
            "region": REGIONS, "material": MATERIALS}
CONCEPT_TEXT = {"colour": "The colour {v}, as seen in pictures.", "shape": "The shape {v}, as seen in pictures.",
                "mark": "A corner mark of the colour {v}.", "category": "The category of things of the kind {v}.",
                "region": "The region called {v}.", "material": "The material {v}."}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "sh", "dr", "kr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "", "n", "l", "m", "r", "s", "k")
# Filler clauses: drawn independently of every attribute.
_SOURCES = ("old chronicles", "local archives", "travel journals", "a recent survey", "folk tales")
_ERAS = ("early", "middle", "late", "modern")
_VERBS = ("known", "remembered", "admired", "discussed", "recorded")

# Words that must never appear (even as substrings) in a name: a subword tokenizer would leak them.
_FORBIDDEN = tuple(COLOURS) + SHAPES + tuple(MARKS) + tuple(BACKDROPS) + CATEGORIES + REGIONS + MATERIALS


def _make_name(rng: random.Random) -> str:
    def word() -> str:
        n = rng.choice((2, 2, 3))
        return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n)) + rng.choice(_CODAS)

    return f"{word().capitalize()} {word().capitalize()}"


def unique_names(n: int, rng: random.Random, taken: set[str] = frozenset()) -> list[str]:
    """`n` distinct random names, none containing an attribute word or one of `taken` (lower case)."""
    names: list[str] = []
    seen = set(taken)
    while len(names) < n:
        name = _make_name(rng)
        low = name.lower()
        if low in seen or any(w in low for w in _FORBIDDEN):
            continue
        seen.add(low)
        names.append(name)
    return names


# The clause that states each fact in a description (elmm.fact_swap rewrites them).
FACT_CLAUSES = {"category": "is a {}", "region": "from the {}", "material": "made of {}", "colour": "painted {}"}


def describe(facts: dict[str, str], rng: random.Random) -> str:
    """A description: one clause per fact, plus two filler clauses, in random order."""
    clauses = [FACT_CLAUSES[k].format(v) for k, v in facts.items()]
    clauses += [f"seen in {rng.choice(_SOURCES)}", f"{rng.choice(_VERBS)} in the {rng.choice(_ERAS)} era"]
    rng.shuffle(clauses)
    return " ; ".join(clauses)


# ----------------------------------------------------------------------------- images

_SUPERSAMPLE = 4  # draw large and downsample, so edges are anti-aliased at 32 px


@dataclass(frozen=True)
class Look:
    """What one picture shows."""

    colour: str
    shape: str
    mark: str
    backdrop: str
    size: float  # object diameter as a fraction of the free area (0.45 .. 0.9)


def random_look(rng: np.random.Generator) -> Look:
    return Look(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), str(rng.choice(list(MARKS))),
                str(rng.choice(list(BACKDROPS))), float(rng.uniform(0.45, 0.9)))


def caption(look: Look) -> str:
    """The text a captioning model should produce for `look` (pretraining)."""
    size = "small" if look.size < 0.65 else "large"
    return f"a {size} {look.colour} {look.shape} with a {look.mark} mark on {look.backdrop}"


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


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, ...]:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)


def render(look: Look, size: int, rng: np.random.Generator) -> bytes:
    """One JPEG: the backdrop, a mark in the top-left quarter-of-a-quarter, and the object in the rest.

    The mark fills most of the top-left cell of a 4 x 4 grid (one patch of the tiny tower's 8 px
    patches at 32 px); the object stays out of that cell, at a random place, scale and rotation.
    """
    big = size * _SUPERSAMPLE
    cell = big / 4
    img = Image.new("RGB", (big, big), _jitter(BACKDROPS[look.backdrop], rng, 12))
    draw = ImageDraw.Draw(img)
    inset = cell * 0.15
    draw.rectangle((inset, inset, cell - inset, cell - inset), fill=_jitter(MARKS[look.mark], rng, 10))
    # The object lives in the region right of / below the mark cell.
    r = cell * 3 * look.size / 2
    while True:
        cx, cy = rng.uniform(r, big - r, size=2)
        if cx - r >= cell or cy - r >= cell:  # its bounding box misses the mark cell
            break
    fill = _jitter(COLOURS[look.colour], rng, 15)
    if look.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_shape_points(look.shape, cx, cy, r, float(rng.uniform(0, 2 * math.pi))), fill=fill)
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.normal(0.0, float(rng.uniform(2.0, 6.0)), size=arr.shape)
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


def _draw_edges(rng: np.random.Generator, pools: list[np.ndarray], owner: np.ndarray, mean_degree: float) -> list[tuple]:
    """Each object i picks 1 + Poisson(mean_degree - 1) distinct targets from pools[owner[i]] minus itself."""
    edges = []
    for i, group in enumerate(owner.tolist()):
        pool = pools[group][pools[group] != i]
        if not len(pool) or mean_degree <= 0:
            continue
        k = min(len(pool), 1 + int(rng.poisson(max(0.0, mean_degree - 1))))
        edges += [(i, int(j)) for j in rng.choice(pool, size=k, replace=False)]
    return edges


def structure_stats(triples: dict[str, np.ndarray], objects: int, relation_names: list[str]) -> dict:
    """Density and inverse-leak figures of a generated KG (metrics/data.json)."""
    train = triples["train"]
    per_object = np.bincount(train[:, [0, 2]].ravel(), minlength=objects)[:objects]
    known = {tuple(t) for t in train.tolist()}
    leak = {}
    for r, name in enumerate(relation_names):
        test = triples["test"][triples["test"][:, 1] == r]
        if len(test):
            leak[name] = round(float(np.mean([(t, r, h) in known for h, _, t in test.tolist()])), 4)
    return {"train_triples_per_object": {"mean": round(float(per_object.mean()), 2), "min": int(per_object.min())},
            "test_queries": int(2 * len(triples["test"])), "inverse_leak_rate": leak}


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
    distractor_images: float = 0.3,
    colour_in_text: float = 0.3,
    communities: int = 12,
    teams: int = 20,
    knows_degree: float = 5.0,
    works_with_degree: float = 4.0,
    rival_degree: float = 2.0,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    progress: bool = True,
) -> dict:
    """Write the synthetic world to `out_dir` (atomically) in the canonical format; return a summary."""
    params = dict(
        seed=seed, entities=entities, images_per_entity=images_per_entity, image_size=image_size,
        fewer_images=fewer_images, no_images=no_images, corrupt_images=corrupt_images,
        distractor_images=distractor_images, colour_in_text=colour_in_text, communities=communities, teams=teams,
        knows_degree=knows_degree, works_with_degree=works_with_degree, rival_degree=rival_degree,
        valid_fraction=valid_fraction, test_fraction=test_fraction,
    )  # fmt: skip
    if entities < 2 or images_per_entity < 1 or communities < 1 or teams < 1 or image_size < 8:
        raise ValueError(f"synthetic: impossible parameters {params}")
    rng = np.random.default_rng(seed)
    text_rng = random.Random(seed)
    n = entities

    latent = {kind: rng.integers(0, len(values), n) for kind, values in CONCEPTS.items()}
    latent["community"] = rng.integers(0, communities, n)
    latent["team"] = rng.integers(0, teams, n)
    named_colour = rng.random(n) < colour_in_text

    # Entities: objects first, then one concept per attribute value.
    names = unique_names(n, text_rng)
    rows = []
    for i in range(n):
        facts = {k: CONCEPTS[k][latent[k][i]] for k in ("category", "region", "material")}
        if named_colour[i]:
            facts["colour"] = CONCEPTS["colour"][latent["colour"][i]]
        rows.append((f"obj:{i:06d}", names[i], describe(facts, text_rng)))
    concept_index: dict[str, int] = {}
    for kind, values in CONCEPTS.items():
        for v in values:
            concept_index[f"{kind}:{v}"] = n + len(concept_index)
            rows.append((f"{kind}:{v}", f"{kind} {v}", CONCEPT_TEXT[kind].format(v=v)))
    num_entities = len(rows)

    # How many images each object keeps.
    n_none = round(no_images * n)
    n_fewer = round(fewer_images * n) if images_per_entity > 1 else 0
    if n_none + n_fewer > n:
        raise ValueError(f"synthetic: no_images + fewer_images covers more than all {n} entities")
    order = rng.permutation(n)
    counts = np.zeros(num_entities, dtype=np.int64)
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

    # Triples.
    rel_idx = {rid: i for i, (rid, _, _) in enumerate(RELATIONS)}
    triples: list[tuple[int, int, int]] = []
    for rid, kind in ATTRIBUTE_RELATIONS.items():
        for i in range(n):
            triples.append((i, rel_idx[rid], concept_index[f"{kind}:{CONCEPTS[kind][latent[kind][i]]}"]))
    members = [np.flatnonzero(latent["community"] == c) for c in range(communities)]
    team_members = [np.flatnonzero(latent["team"] == t) for t in range(teams)]
    rivals = (latent["community"] + 1) % communities
    for rid, pools, owner, degree in (("knows", members, latent["community"], knows_degree),
                                      ("works_with", team_members, latent["team"], works_with_degree),
                                      ("rival_of", members, rivals, rival_degree)):
        triples += [(h, rel_idx[rid], t) for h, t in _draw_edges(rng, pools, owner, degree)]
    all_triples = np.unique(np.asarray(triples, dtype=np.int64), axis=0)  # dedupe, canonical order
    splits = _split(all_triples, rng, valid_fraction, test_fraction)

    out_dir = Path(out_dir)
    corrupt_slots: list[str] = []
    distractors = 0
    with atomic_dir(out_dir) as tmp:
        writer = ImageWriter(tmp)
        for e in tqdm(range(n), desc="synthetic images", unit="entity", disable=not progress):
            erng = np.random.default_rng([seed, 1, e])  # this entity's own stream
            own = Look(*(CONCEPTS[k][latent[k][e]] for k in ("colour", "shape", "mark")),
                       backdrop=str(erng.choice(list(BACKDROPS))), size=float(erng.uniform(0.45, 0.9)))
            for s in range(int(counts[e])):
                if erng.random() < distractor_images:
                    look, distractors = random_look(erng), distractors + 1
                else:  # the object itself; backdrop and size vary between pictures
                    look = Look(own.colour, own.shape, own.mark, str(erng.choice(list(BACKDROPS))),
                                float(np.clip(own.size + erng.normal(0, 0.05), 0.45, 0.9)))
                data = render(look, image_size, erng)
                if corrupt.get(e) == s:
                    data = _garbage(erng)
                    corrupt_slots.append(f"{e}/{s}")
                writer.add(e, s, data)
        images_index = writer.close()

        n_concepts = num_entities - n
        pad = [""] * n_concepts
        write_parquet(
            tmp / "latent.parquet",
            {"entity": np.arange(num_entities, dtype=np.int32),
             **{k: [CONCEPTS[k][v] for v in latent[k]] + pad for k in CONCEPTS},
             "community": np.concatenate([latent["community"], np.full(n_concepts, -1)]).astype(np.int32),
             "team": np.concatenate([latent["team"], np.full(n_concepts, -1)]).astype(np.int32),
             "colour_in_text": np.concatenate([named_colour, np.zeros(n_concepts, bool)])},
            pa.schema([("entity", pa.int32()), *((k, pa.string()) for k in CONCEPTS), ("community", pa.int32()),
                       ("team", pa.int32()), ("colour_in_text", pa.bool_())]),
        )
        summary = {
            "entities": num_entities,
            "object_entities": n,
            "concept_entities": n_concepts,
            "relations": len(RELATIONS),
            "triples": {s: int(len(splits[s])) for s in SPLITS},
            "images": int(len(images_index)),
            "distractor_images": distractors,
            "objects_without_images": n_none,
            "objects_with_fewer_images": n_fewer,
            "corrupt_images": len(corrupt_slots),
            "corrupt_image_slots": corrupt_slots,
            **structure_stats(splits, n, [r[1] for r in RELATIONS]),
        }
        entities_df = pd.DataFrame(rows, columns=["id", "name", "description"]).assign(
            num_images=counts.astype(np.int32))
        relations_df = pd.DataFrame(list(RELATIONS), columns=["id", "name", "modality"])
        meta = {"source": "synthetic", "params": params,
                **{k: summary[k] for k in ("object_entities", "concept_entities", "images", "distractor_images",
                                           "corrupt_images", "corrupt_image_slots", "train_triples_per_object",
                                           "test_queries", "inverse_leak_rate")}}
        write_kg(tmp, entities_df, relations_df, splits, images_index, meta)  # meta.json last
    return summary
