"""Image encoding: token shards, the memory-mapped reader, sharding across workers, resumption,
corrupt / missing images and pooling, on the micro backbone and tiny synthetic KG (conftest)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from elmm.image_tokens import ImageTokens
from elmm.kg.format import load_kg
from elmm.vision import (
    MANIFEST,
    encode_kg_images,
    finalize_encoding,
    pooled_tokens,
    shard_name,
    sidecar_name,
    worker_assignment,
)

SHARD_ROWS, BATCH = 8, 4  # several shards from the ~55 micro images, two batches each
META = {"params_hash": "h1"}


def _encode(micro_env, backbone, out: Path, *, shard=(0, 1), pool=1, meta=META, workers=0):
    kg = load_kg(micro_env.kg_dir)
    return encode_kg_images(kg, backbone, out, feature_layer=-2, batch_size=BATCH, shard_rows=SHARD_ROWS,
                            metadata=meta, num_workers=workers, shard=shard, pool=pool, progress=False)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def reference(micro_env, micro_backbone, tmp_path_factory) -> Path:
    """An uninterrupted single-worker encoding with several shards."""
    out = tmp_path_factory.mktemp("reference")
    res = _encode(micro_env, micro_backbone, out)
    assert res.shards >= 4 and res.encoded > 0
    finalize_encoding(out, res.shards)
    return out


def _naive(directory: Path, num_entities: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full load of the Parquet shards into dense tensors, slots numbered densely per entity."""
    manifest = ImageTokens(directory, num_entities).manifest
    table = pa.concat_tables([pq.read_table(directory / s) for s in manifest["shards"]])
    m, d = manifest["tokens"], manifest["width"]
    ent, slot = table.column("entity").to_numpy(), table.column("slot").to_numpy()
    n = max(1, int(np.bincount(ent, minlength=num_entities).max()))
    patches = torch.zeros(num_entities, n, m, d, dtype=torch.float16)
    cls = torch.zeros(num_entities, n, d, dtype=torch.float16)
    mask = torch.zeros(num_entities, n, dtype=torch.bool)
    fill = [0] * num_entities
    p_all = np.array(table.column("patches").combine_chunks().flatten()).reshape(-1, m, d)
    c_all = np.array(table.column("cls").combine_chunks().flatten()).reshape(-1, d)
    for row in sorted(range(len(ent)), key=lambda r: (ent[r], slot[r])):
        e, j = ent[row], fill[ent[row]]
        patches[e, j], cls[e, j], mask[e, j] = torch.from_numpy(p_all[row]), torch.from_numpy(c_all[row]), True
        fill[e] += 1
    return patches, cls, mask


def test_shards_match_direct_vision_tower_outputs(micro_env, micro_backbone) -> None:
    """Stored tokens equal the tower's own output for single images (float16 rounding only), and
    the shard metadata describes them."""
    kg = load_kg(micro_env.kg_dir)
    tokens = ImageTokens(micro_env.encoded_dir, kg.num_entities)
    bad = set(kg.meta["corrupt_image_slots"])
    checked = 0
    for entity in range(kg.num_entities):
        readable = [data for s, data in enumerate(kg.image_bytes(entity)) if f"{entity}/{s}" not in bad]
        if not readable or checked >= 6:
            continue
        patches, cls, mask = tokens.get(torch.tensor([entity]))
        assert int(mask.sum()) == len(readable)
        for j, data in enumerate(readable[:2]):
            with Image.open(io.BytesIO(data)) as im:
                pixels = micro_backbone.image_processor(images=im.convert("RGB"), return_tensors="pt")["pixel_values"]
            want_cls, want_patches = micro_backbone.vision_features(pixels, -2)
            torch.testing.assert_close(patches[0, j].float(), want_patches[0], atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(cls[0, j].float(), want_cls[0], atol=2e-3, rtol=2e-3)
            checked += 1
    assert checked >= 6
    meta = json.loads(pq.ParquetFile(micro_env.encoded_dir / shard_name(0)).schema_arrow.metadata[b"elmm"])
    cfg = micro_backbone.vision_tower.config
    assert meta["encoder"] == micro_backbone.name and meta["feature_layer"] == -2 and meta["params_hash"] == "tests"
    assert meta["tokens"] == (cfg.image_size // cfg.patch_size) ** 2 == tokens.num_tokens
    assert meta["width"] == cfg.hidden_size == tokens.width and meta["dtype"] == "float16" and meta["pool"] == 1


def test_sidecar_is_the_contiguous_table_of_a_shard_with_many_row_groups(tmp_path, monkeypatch) -> None:
    """The sidecar, filled one row group at a time, has the bytes of the whole table combined at once."""
    import pyarrow.ipc as ipc

    import elmm.vision as vision

    rng = np.random.default_rng(0)
    n, tokens, width = 37, 3, 4
    cls = rng.standard_normal((n, width)).astype(np.float16)
    patches = rng.standard_normal((n, tokens, width)).astype(np.float16)
    buf = {"ents": list(range(n)), "slots": [i % 5 for i in range(n)], "bad": ["x"], "cls": [cls[:20], cls[20:]],
           "patches": [patches[:20], patches[20:]]}
    monkeypatch.setattr(vision, "ROW_GROUP_BYTES", 5 * (2 * width * (tokens + 1) + 6))  # 5 rows a group
    vision._write_shard(tmp_path, 0, buf, width, tokens, {"format": 2})
    parquet, sidecar = tmp_path / shard_name(0), tmp_path / sidecar_name(0)
    assert pq.ParquetFile(parquet).num_row_groups == 8  # the last one short
    whole = pq.read_table(parquet).combine_chunks()
    expected = tmp_path / "expected.arrow"
    with pa.OSFile(str(expected), "wb") as f, ipc.new_file(f, whole.schema) as writer:
        writer.write_table(whole, max_chunksize=whole.num_rows)
    assert sidecar.read_bytes() == expected.read_bytes()
    with pa.memory_map(str(sidecar)) as source:
        table = ipc.open_file(source).read_all()
    assert table.column("patches").num_chunks == 1
    assert np.array_equal(table.column("patches").chunk(0).flatten().to_numpy().reshape(n, tokens, width), patches)
    assert np.array_equal(table.column("cls").chunk(0).flatten().to_numpy().reshape(n, width), cls)
    assert table.column("slot").to_pylist() == [i % 5 for i in range(n)]


def test_reader_memory_maps_and_matches_a_full_load(micro_env, reference) -> None:
    """`get` over several shards equals a naive full load; opening allocates no token memory."""
    kg = load_kg(micro_env.kg_dir)
    before = pa.total_allocated_bytes()
    tokens = ImageTokens(reference, kg.num_entities)
    assert pa.total_allocated_bytes() == before  # the arrays view the memory-mapped sidecars
    part = tokens._patches.parts[0]
    assert not part.flags.owndata and not part.flags.writeable
    patches, cls, mask = _naive(reference, kg.num_entities)
    assert (tokens.num_images, tokens.num_tokens, tokens.width) == tuple(patches.shape[1:3]) + (patches.shape[3],)
    no_images = int((~mask.any(1)).nonzero()[0])
    batch = torch.tensor([3, no_images, kg.num_entities - 1, 0, 3, 17, 5, 9])
    got = tokens.get(batch)
    for g, want in zip(got, (patches[batch], cls[batch], mask[batch])):
        assert g.dtype == want.dtype and torch.equal(g, want)
    assert torch.equal(tokens.patches, patches) and torch.equal(tokens.mask, mask)


def test_corrupt_images_are_skipped_and_entities_without_images_are_masked(micro_env, reference) -> None:
    kg = load_kg(micro_env.kg_dir)
    manifest = finalize_encoding(reference)
    corrupt = kg.meta["corrupt_image_slots"]
    assert len(corrupt) >= 1 and len(manifest["skipped"]) == len(corrupt)
    assert manifest["rows"] == len(kg.images) - len(corrupt)
    tokens = ImageTokens(reference, kg.num_entities)
    counts = kg.entities["num_images"].to_numpy()
    for where in corrupt:  # one fewer readable image, packed into the first slots
        e, slot = map(int, where.split("/"))
        assert f"entity {e} slot {slot}:" in " ".join(manifest["skipped"])
        assert tokens.mask[e].tolist() == [True] * (counts[e] - 1) + [False] * (tokens.num_images - counts[e] + 1)
    empty = np.flatnonzero(counts == 0)
    assert len(empty) > 0
    patches, cls, mask = tokens.get(torch.as_tensor(empty))
    assert not mask.any() and not patches.any() and not cls.any()


def test_two_workers_write_the_same_bytes_as_one(micro_env, micro_backbone, reference, tmp_path) -> None:
    res0 = _encode(micro_env, micro_backbone, tmp_path, shard=(0, 2))
    with pytest.raises(RuntimeError, match="missing"):  # the final check: worker 1 has not run yet
        finalize_encoding(tmp_path)
    res1 = _encode(micro_env, micro_backbone, tmp_path, shard=(1, 2))
    assert set(res0.shards_written).isdisjoint(res1.shards_written)
    finalize_encoding(tmp_path)
    assert _files(tmp_path) == _files(reference)


CHILD = """
import sys, time
from elmm.backbone import load_backbone
from elmm.kg.format import load_kg
from elmm.vision import encode_kg_images
kg_dir, backbone_dir, out = sys.argv[1:4]
backbone = load_backbone(backbone_dir)
tower = backbone.vision_features
def slow(*args, **kwargs):  # leaves time to kill the process after its first shard
    time.sleep(0.25)
    return tower(*args, **kwargs)
backbone.vision_features = slow
encode_kg_images(load_kg(kg_dir), backbone, out, feature_layer=-2, batch_size={batch}, shard_rows={rows},
                 metadata={meta}, num_workers=1, progress=False)
"""


def test_kill_and_resume_gives_the_same_bytes(micro_env, micro_backbone, reference, tmp_path) -> None:
    """SIGKILL after the first shard, rerun: identical bytes to an uninterrupted run."""
    out = tmp_path / "encoded"
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD.format(batch=BATCH, rows=SHARD_ROWS, meta=META)))
    proc = subprocess.Popen([sys.executable, str(script), str(micro_env.kg_dir), str(micro_env.backbone_dir), str(out)],
                            start_new_session=True)  # own group: the kill reaches its DataLoader worker too
    try:
        deadline = time.monotonic() + 120
        while not (out / shard_name(0)).exists():
            assert proc.poll() is None, "encoder exited before writing a shard"
            assert time.monotonic() < deadline, "no shard after 120 s"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    expected = _files(reference)
    done = [n for n in expected if n.endswith(".parquet") and (out / n).exists()]
    assert 1 <= len(done) < len([n for n in expected if n.endswith(".parquet")])  # really interrupted
    res = _encode(micro_env, micro_backbone, out)
    assert 0 in res.shards_reused and res.shards_written
    finalize_encoding(out)
    assert _files(out) == expected


def test_pooling_quarters_the_tokens(micro_env, micro_backbone, reference, tmp_path) -> None:
    """2x2 pooling of the 2x2 micro grid: 4 tokens -> 1, the mean of the unpooled ones."""
    kg = load_kg(micro_env.kg_dir)
    assert pooled_tokens(576, 2) == 144 and pooled_tokens(576, 3) == 64 and pooled_tokens(576, 1) == 576
    res = _encode(micro_env, micro_backbone, tmp_path, pool=2)
    manifest = finalize_encoding(tmp_path, res.shards)
    full, pooled = ImageTokens(reference, kg.num_entities), ImageTokens(tmp_path, kg.num_entities)
    assert (full.num_tokens, pooled.num_tokens, manifest["tokens"], manifest["pool"]) == (4, 1, 1, 2)
    batch = torch.arange(kg.num_entities)
    p_full, c_full, m_full = full.get(batch)
    p_pool, c_pool, m_pool = pooled.get(batch)
    torch.testing.assert_close(p_pool[:, :, 0].float(), p_full.float().mean(2), atol=2e-3, rtol=2e-3)
    assert torch.equal(c_pool, c_full) and torch.equal(m_pool, m_full)
    with pytest.raises(ValueError, match="does not divide"):
        _encode(micro_env, micro_backbone, tmp_path / "bad", pool=3)
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_stale_shards_and_leftovers_are_replaced(micro_env, micro_backbone, reference, tmp_path) -> None:
    """Shards from other params are re-encoded; temporaries and surplus shards are removed."""
    out = tmp_path / "encoded"
    shutil.copytree(reference, out)
    (out / f".{shard_name(1)}.x.tmp").write_bytes(b"half")
    shutil.copy(out / shard_name(0), out / shard_name(99))
    res = _encode(micro_env, micro_backbone, out, meta={"params_hash": "h2"})
    assert res.shards_written == list(range(res.shards))
    manifest = finalize_encoding(out)
    assert manifest["params_hash"] == "h2" and not (out / shard_name(99)).exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST] + [f(k) for k in range(res.shards)
                                                                         for f in (shard_name, sidecar_name)])
    res = _encode(micro_env, micro_backbone, out, meta={"params_hash": "h2"})  # nothing left to do
    assert res.encoded == 0 and res.shards_written == []


def test_worker_assignment() -> None:
    assert worker_assignment(None, {}) == (0, 1, False)
    assert worker_assignment("1/4", {"RANK": "3", "WORLD_SIZE": "8"}) == (1, 4, False)  # --shard wins
    assert worker_assignment(None, {"RANK": "3", "WORLD_SIZE": "8"}) == (3, 8, True)  # torchrun
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(ValueError):
            worker_assignment(bad, {})


def test_encode_params_are_validated() -> None:
    from elmm.config import ParamsError, from_dict

    assert from_dict({"encode": {"pool": 2, "shard_rows": None}}).encode.pool == 2  # tiny grid 4x4
    with pytest.raises(ParamsError, match="encode.pool"):
        from_dict({"encode": {"pool": 3}})
    with pytest.raises(ParamsError, match="encode.precision"):
        from_dict({"encode": {"precision": "fp8"}})
