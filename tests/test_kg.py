"""Canonical KG format (write/load/validation) and the synthetic world generator."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from elmm.kg.format import SPLITS, ImageWriter, load_kg, write_kg
from elmm.kg.synthetic import CONCEPTS, RELATIONS, generate_synthetic

# ----------------------------------------------------------------------------- format


def tiny_kg() -> dict:
    """Four entities, two relations; entity 0 has two images, entity 2 one, the others none."""
    entities = pd.DataFrame(
        {
            "id": ["e0", "e1", "e2", "e3"],
            "name": ["Alpha", "Beta", "Gamma", "Delta"],
            "description": ["first", "second", "", "fourth"],
            "num_images": [2, 0, 1, 0],
        }
    )
    relations = pd.DataFrame({"id": ["r0", "r1"], "name": ["likes", "near"], "modality": ["text", ""]})
    triples = {
        "train": np.array([[0, 0, 1], [1, 1, 2], [2, 0, 3], [3, 1, 0]]),
        "valid": np.array([[0, 1, 2]]),
        "test": np.array([[1, 0, 3], [2, 1, 0]]),
    }
    return dict(entities=entities, relations=relations, triples=triples, meta={"source": "test"})


IMAGES = {(0, 0): b"\xff\xd8\xff zero-zero", (0, 1): b"\x89PNG\r\n\x1a\n zero-one", (2, 0): b"\xff\xd8\xff two"}


def write_tiny(root: Path, part_bytes: int = 1 << 20) -> None:
    writer = ImageWriter(root, part_bytes=part_bytes, row_group=2)
    for (e, s), data in IMAGES.items():
        writer.add(e, s, data)
    write_kg(root, images=writer.close(), **tiny_kg())


@pytest.fixture
def kg_dir(tmp_path: Path) -> Path:
    write_tiny(tmp_path / "kg")
    return tmp_path / "kg"


def test_round_trip(kg_dir: Path) -> None:
    kg = load_kg(kg_dir)
    src = tiny_kg()
    assert kg.num_entities == 4 and kg.num_relations == 2
    assert kg.entities["id"].tolist() == ["e0", "e1", "e2", "e3"]
    assert kg.entities["description"].tolist() == ["first", "second", "", "fourth"]
    assert kg.relations["modality"].tolist() == ["text", ""]
    for split in SPLITS:
        assert kg.triples[split].dtype == np.int64
        np.testing.assert_array_equal(kg.triples[split], src["triples"][split])
    assert len(kg.all_triples()) == 7
    assert kg.image_bytes(0) == [IMAGES[0, 0], IMAGES[0, 1]]
    assert kg.image_bytes(1) == [] and kg.image_bytes(3) == []
    assert kg.image_bytes(2) == [IMAGES[2, 0]]
    assert kg.images["format"].tolist() == ["jpeg", "png", "jpeg"]
    assert kg.meta["format_version"] == 2 and kg.meta["source"] == "test"
    assert kg.meta["image_parts"] == ["images-00000.parquet"]
    assert kg.meta["num_triples"] == {"train": 4, "valid": 1, "test": 2}
    schema = pq.read_schema(kg_dir / "images.parquet")
    assert schema.field("slot").type == pa.int16() and schema.field("entity").type == pa.int32()
    assert pq.read_schema(kg_dir / "train.parquet").field("head").type == pa.int32()


def test_images_split_into_parts_and_read_back(tmp_path: Path) -> None:
    """Small parts: every image gets its own part, and each reads back with its checksum."""
    write_tiny(tmp_path / "kg", part_bytes=1)
    kg = load_kg(tmp_path / "kg")
    assert kg.meta["image_parts"] == [f"images-{k:05d}.parquet" for k in range(3)]
    assert kg.images["part"].tolist() == [0, 1, 2] and kg.images["row"].tolist() == [0, 0, 0]
    assert [kg.image_bytes(e) for e in range(4)] == [[IMAGES[0, 0], IMAGES[0, 1]], [], [IMAGES[2, 0]], []]


def test_image_writer_refuses_rows_out_of_order(tmp_path: Path) -> None:
    writer = ImageWriter(tmp_path)
    writer.add(1, 0, b"x")
    with pytest.raises(ValueError, match=r"\(entity, slot\) order"):
        writer.add(0, 0, b"y")
    with pytest.raises(ValueError, match=r"dense slots"):
        writer.add(1, 2, b"y")


def test_damaged_image_part_is_named(kg_dir: Path) -> None:
    """A part whose bytes no longer match the index's sha256 is an error naming the file."""
    table = pq.read_table(kg_dir / "images-00000.parquet").to_pandas()
    table.loc[1, "data"] = b"\x89PNG tampered"
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), kg_dir / "images-00000.parquet",
                   row_group_size=2)
    kg = load_kg(kg_dir)
    assert kg.image_bytes(2) == [IMAGES[2, 0]]
    with pytest.raises(ValueError, match=r"images-00000\.parquet row 1: sha256 differs"):
        kg.image_bytes(0)


def test_format_1_directory_gets_a_clear_message(kg_dir: Path) -> None:
    meta = json.loads((kg_dir / "meta.json").read_text())
    (kg_dir / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(ValueError, match=r"format_version 1 \(one file per image\).*dvc repro download"):
        load_kg(kg_dir)


def test_missing_image_part_is_named(kg_dir: Path) -> None:
    (kg_dir / "images-00000.parquet").unlink()
    with pytest.raises(ValueError, match=r"images-00000\.parquet: missing file"):
        load_kg(kg_dir)


def test_write_is_deterministic(tmp_path: Path) -> None:
    write_tiny(tmp_path / "a")
    write_tiny(tmp_path / "b")
    for f in sorted((tmp_path / "a").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name


def _rewrite(path: Path, edit) -> None:
    """Replace a parquet table on disk by edit(DataFrame)."""
    df = edit(pq.read_table(path).to_pandas())
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)


@pytest.mark.parametrize(
    "file, edit, message",
    [
        ("valid.parquet", None, r"valid\.parquet: missing file"),
        ("entities.parquet", lambda df: df.drop(columns=["name"]), r"entities\.parquet: missing column 'name'"),
        ("relations.parquet", lambda df: df.drop(columns=["modality"]), r"relations\.parquet: missing column"),
        ("train.parquet", lambda df: df.assign(tail=[1, 2, 3, 99]), r"train\.parquet row 3: tail 99 out of range"),
        ("test.parquet", lambda df: df.assign(relation=[0, 5]), r"test\.parquet row 1: relation 5 out of range"),
        ("test.parquet", lambda df: df.iloc[:0], r"test\.parquet: empty split"),
        ("valid.parquet", lambda df: pd.concat([df, df]), r"valid\.parquet row 1: duplicate triple"),
        ("images.parquet", lambda df: df.assign(entity=[0, 0, 7]), r"images\.parquet row 2: entity 7 out of range"),
        ("images.parquet", lambda df: df.assign(part=[0, 0, 3]), r"part 3 referenced but meta\.json lists 1"),
        (
            "entities.parquet",
            lambda df: df.assign(num_images=[2, 1, 1, 0]),
            r"entities\.parquet row 1: num_images=1 but images\.parquet lists 0",
        ),
    ],
)
def test_load_validation(kg_dir: Path, file: str, edit, message: str) -> None:
    if edit is None:
        (kg_dir / file).unlink()
    else:
        _rewrite(kg_dir / file, edit)
    with pytest.raises(ValueError, match=message):
        load_kg(kg_dir)


def test_write_validates_before_writing(tmp_path: Path) -> None:
    kg = tiny_kg()
    kg["triples"]["train"] = np.array([[0, 0, 1], [0, 0, 1]])
    images = ImageWriter(tmp_path / "kg").close()
    with pytest.raises(ValueError, match=r"train\.parquet row 1: duplicate triple"):
        write_kg(tmp_path / "kg", images=images, **kg)
    assert not (tmp_path / "kg" / "train.parquet").exists()

    kg = tiny_kg()
    kg["entities"] = kg["entities"].assign(num_images=[1, 0, 1, 0])
    writer = ImageWriter(tmp_path / "kg2")
    for (e, s), data in IMAGES.items():
        writer.add(e, s, data)
    with pytest.raises(ValueError, match=r"entities\.parquet row 0: num_images"):
        write_kg(tmp_path / "kg2", images=writer.close(), **kg)


# ----------------------------------------------------------------------------- synthetic

SMALL = dict(entities=40, images_per_entity=3, image_size=24, progress=False)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("synthetic")
    dirs = {"a": base / "a", "b": base / "b" / "nested", "other": base / "other"}
    generate_synthetic(dirs["a"], seed=7, **SMALL)
    generate_synthetic(dirs["b"], seed=7, **SMALL)
    generate_synthetic(dirs["other"], seed=8, **SMALL)
    return dirs


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_deterministic(synth: dict[str, Path]) -> None:
    a, b = _files(synth["a"]), _files(synth["b"])
    assert sorted(a) == sorted(b)
    assert "images-00000.parquet" in a and "latent.parquet" in a
    for name in a:
        assert a[name] == b[name], name
    ea = pd.read_parquet(synth["a"] / "entities.parquet")
    eo = pd.read_parquet(synth["other"] / "entities.parquet")
    assert not ea.equals(eo)


def test_synthetic_content(synth: dict[str, Path]) -> None:
    kg = load_kg(synth["a"])
    latent = pd.read_parquet(synth["a"] / "latent.parquet")
    modalities = kg.relations["modality"].tolist()
    assert {m: modalities.count(m) for m in set(modalities)} == {"image": 3, "text": 3, "structure": 3}
    assert (latent["entity"].to_numpy() == np.arange(kg.num_entities)).all()

    objects = latent["community"].to_numpy() >= 0
    assert objects.sum() == 40
    banned = {w for values in CONCEPTS.values() for w in values}
    for name in kg.entities["name"][objects]:
        assert not set(re.findall(r"[a-z]+", name.lower())) & banned, name
    # Text facts are in the description, at varying positions; images' attributes are not,
    # except the colour of the objects flagged colour_in_text.
    first_clause = set()
    for i in np.flatnonzero(objects):
        text, row = kg.entities["description"][i], latent.iloc[i]
        assert f"is a {row['category']}" in text and f"from the {row['region']}" in text
        assert f"made of {row['material']}" in text
        assert (f"painted {row['colour']}" in text) == bool(row["colour_in_text"])
        words = set(re.findall(r"[a-z]+", text))
        assert not words & (set(CONCEPTS["shape"]) | set(CONCEPTS["mark"])), text
        first_clause.add(text.split(" ; ")[0].split()[0])
    assert {"is", "from", "made"} <= first_clause  # facts do not sit at a fixed position

    concepts = np.flatnonzero(~objects)
    assert len(concepts) == sum(len(v) for v in CONCEPTS.values())
    assert (kg.entities["num_images"].to_numpy()[concepts] == 0).all()
    assert all(kg.image_bytes(int(e)) == [] for e in concepts)

    corrupt = set(kg.meta["corrupt_image_slots"])
    assert len(corrupt) == kg.meta["corrupt_images"] == 3
    for e, slot in zip(kg.images["entity"].tolist(), kg.images["slot"].tolist()):
        try:
            with Image.open(io.BytesIO(kg.image_bytes(e)[slot])) as im:
                im.load()
            opened = True
        except Exception:
            opened = False
        assert opened == (f"{e}/{slot}" not in corrupt), (e, slot)

    # Random out-degrees: the number of train edges tells nothing exact.
    knows = kg.relations["id"].tolist().index("knows")
    degrees = np.bincount(kg.all_triples()[kg.all_triples()[:, 1] == knows][:, 0], minlength=40)[:40]
    assert len(set(degrees.tolist())) > 2
    assert set(kg.meta["inverse_leak_rate"]) == {r[1] for r in RELATIONS}

    train = kg.triples["train"]
    train_entities = set(train[:, [0, 2]].ravel().tolist())
    for split in ("valid", "test"):
        assert len(kg.triples[split]) > 0
        assert set(kg.triples[split][:, [0, 2]].ravel().tolist()) <= train_entities
    all_t = kg.all_triples()
    assert len(np.unique(all_t, axis=0)) == len(all_t)  # no triple in two splits

    meta = json.loads((synth["a"] / "meta.json").read_text())
    assert meta["source"] == "synthetic" and meta["params"]["seed"] == 7
    text = json.dumps(meta)
    assert not [v for values in CONCEPTS.values() for v in values if v in text]  # latent attributes stay out


def test_default_world_meets_the_density_targets(tmp_path: Path) -> None:
    """The embedded default (params.yaml's data.synthetic): >= 20 train triples per object on
    average, >= 3 relations per modality, >= 600 test queries (the testbed's spec)."""
    summary = generate_synthetic(tmp_path / "kg", seed=0, progress=False)
    assert summary["train_triples_per_object"]["mean"] >= 20
    assert summary["test_queries"] >= 600
    assert summary["relations"] == 9
