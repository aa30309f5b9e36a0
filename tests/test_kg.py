"""Canonical KG format (write/load/validation) and the synthetic world generator."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from elmm.kg.format import SPLITS, load_kg, write_kg
from elmm.kg.synthetic import COLOURS, SHAPES, generate_synthetic

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
    # Deliberately unsorted: write_kg sorts by (entity, slot).
    images = pd.DataFrame(
        {"entity": [2, 0, 0], "slot": [0, 1, 0], "path": ["images/2/0.jpg", "images/0/1.jpg", "images/0/0.jpg"]}
    )
    return dict(entities=entities, relations=relations, triples=triples, images=images, meta={"source": "test"})


@pytest.fixture
def kg_dir(tmp_path: Path) -> Path:
    write_kg(tmp_path / "kg", **tiny_kg())
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
    assert kg.image_paths(0) == [kg.root / "images/0/0.jpg", kg.root / "images/0/1.jpg"]
    assert kg.image_paths(1) == [] and kg.image_paths(3) == []
    assert kg.image_paths(2) == [kg.root / "images/2/0.jpg"]
    assert kg.meta["format_version"] == 1 and kg.meta["source"] == "test"
    assert kg.meta["num_triples"] == {"train": 4, "valid": 1, "test": 2}
    schema = pq.read_schema(kg_dir / "images.parquet")
    assert schema.field("slot").type == pa.int16() and schema.field("entity").type == pa.int32()
    assert pq.read_schema(kg_dir / "train.parquet").field("head").type == pa.int32()


def test_write_is_deterministic(tmp_path: Path) -> None:
    write_kg(tmp_path / "a", **tiny_kg())
    write_kg(tmp_path / "b", **tiny_kg())
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
    with pytest.raises(ValueError, match=r"train\.parquet row 1: duplicate triple"):
        write_kg(tmp_path / "kg", **kg)
    assert not (tmp_path / "kg").exists()

    kg = tiny_kg()
    kg["entities"] = kg["entities"].assign(num_images=[1, 0, 1, 0])
    with pytest.raises(ValueError, match=r"entities\.parquet row 0: num_images"):
        write_kg(tmp_path / "kg", **kg)


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
    assert any(k.endswith(".jpg") for k in a) and "latent.parquet" in a
    for name in a:
        assert a[name] == b[name], name
    ea = pd.read_parquet(synth["a"] / "entities.parquet")
    eo = pd.read_parquet(synth["other"] / "entities.parquet")
    assert not ea.equals(eo)


def test_synthetic_content(synth: dict[str, Path]) -> None:
    kg = load_kg(synth["a"])
    latent = pd.read_parquet(synth["a"] / "latent.parquet")
    assert set(kg.relations["modality"]) == {"image", "text", "structure"}
    assert (latent["entity"].to_numpy() == np.arange(kg.num_entities)).all()

    objects = latent["community"].to_numpy() >= 0
    assert objects.sum() == 40
    banned = set(COLOURS) | set(SHAPES)
    for text in pd.concat([kg.entities["name"][objects], kg.entities["description"][objects]]):
        words = set(re.findall(r"[a-z]+", text.lower()))
        assert not words & banned, text
    # The category is in the description; the community is not.
    for text, cat in zip(kg.entities["description"][objects], latent["category"][objects]):
        assert cat in text

    concepts = np.flatnonzero(~objects)
    assert len(concepts) == len(COLOURS) + len(SHAPES) + 8
    assert (kg.entities["num_images"].to_numpy()[concepts] == 0).all()
    assert all(kg.image_paths(int(e)) == [] for e in concepts)

    corrupt = set(kg.meta["corrupt_image_paths"])
    assert len(corrupt) == kg.meta["corrupt_images"] == 3
    for rel in kg.images["path"]:
        try:
            with Image.open(kg.root / rel) as im:
                im.load()
            opened = True
        except Exception:
            opened = False
        assert opened == (rel not in corrupt), rel

    train = kg.triples["train"]
    train_entities = set(train[:, [0, 2]].ravel().tolist())
    for split in ("valid", "test"):
        assert len(kg.triples[split]) > 0
        assert set(kg.triples[split][:, [0, 2]].ravel().tolist()) <= train_entities
    all_t = kg.all_triples()
    assert len(np.unique(all_t, axis=0)) == len(all_t)  # no triple in two splits

    meta = json.loads((synth["a"] / "meta.json").read_text())
    assert meta["source"] == "synthetic" and meta["params"]["seed"] == 7
    assert "colour" not in json.dumps(meta)  # latent attributes stay out of meta
