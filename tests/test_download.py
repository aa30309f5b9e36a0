"""Real data sources: download (over a loopback HTTP server), safe extraction, MKGformer parsing, validation.

Everything is real: the test serves archives it builds from a `http.server` on 127.0.0.1 (with
Range support and a switch that drops the connection mid-file), and the code under test downloads
them with urllib, extracts them, and writes the canonical KG.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import re
import struct
import tarfile
import threading
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from elmm.config import ParamsError, from_dict
from elmm.kg.archive import UnsafeArchiveError, safe_extract
from elmm.kg.download import ChecksumError, DownloadError, cache_name, fetch
from elmm.kg.format import SPLITS, ImageWriter, coverage, load_kg, write_kg
from elmm.kg.ingest import ingest
from elmm.kg.mkgformer import LayoutError

FAST = {"backoff": 0.01, "timeout": 5.0}  # a few ms between retries; no test waits on a dead socket

# ----------------------------------------------------------------------------- test data


def jpeg(shade: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (shade, 255 - shade, 128)).save(buf, format="JPEG")
    return buf.getvalue()


def png_header_bomb(width: int, height: int) -> bytes:
    """A small, valid-looking PNG that declares width x height pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + (width + 7) // 8) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def lines(*rows) -> bytes:
    return ("".join("\t".join(r) + "\n" for r in rows)).encode()


FB_ENTITIES = ["/m/a0", "/m/a1", "/m/a2", "/m/a3", "/m/a4"]
FB_TRAIN = [("/m/a0", "/r/likes", "/m/a1"), ("/m/a1", "/r/near", "/m/a2"), ("/m/a2", "/r/likes", "/m/a3"),
            ("/m/a3", "/r/near", "/m/a4"), ("/m/a4", "/r/likes", "/m/a0"), ("/m/a0", "/r/near", "/m/a2")]
FB_DEV = [("/m/a1", "/r/likes", "/m/a3")]
FB_TEST = [("/m/a2", "/r/near", "/m/a0"), ("/m/a4", "/r/near", "/m/a1")]


def fb_layout(prefix: str = "FB15k-237/", train=FB_TRAIN, images: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """FB15k-237-IMG in MKGformer's layout: text files one folder down, images at the top."""
    files = {
        "train.tsv": lines(*train),
        "dev.tsv": lines(*FB_DEV),
        "test.tsv": lines(*FB_TEST),
        "entities.txt": lines(*[(e,) for e in FB_ENTITIES]),
        # entity2text covers more entities than the KG (like FB15k vs FB15k-237): the extra is ignored.
        "entity2text.txt": lines(*[(e, f"Entity {e[-2:]}") for e in FB_ENTITIES], ("/m/zz", "Not in the KG")),
        "entity2textlong.txt": lines(("/m/a0", "The first entity.\tWith a tab."), ("/m/a3", "The fourth.")),
        "relations.txt": lines(("/r/likes",), ("/r/near",)),
        "relation2text.txt": lines(("/r/likes", "likes"), ("/r/near", "is near")),
    }
    out = {prefix + k: v for k, v in files.items()}
    if images is None:
        # a0: 2 images, a1: 1, a3: 10 (the 10+ bucket), a2 and a4: none (missing is not an error)
        images = {"FB15k-images/m.a0/0.jpg": jpeg(10), "FB15k-images/m.a0/1.jpg": jpeg(20),
                  "FB15k-images/m.a1/x.jpg": jpeg(30)}
        images |= {f"FB15k-images/m.a3/{i:02d}.jpg": jpeg(40 + i) for i in range(10)}
    return out | images


WN_ENTITIES = ["00001", "00002", "00003", "00004"]


def wn_text_layout() -> dict[str, bytes]:
    files = {
        "train.tsv": lines(("00001", "_hypernym", "00002"), ("00002", "_hypernym", "00003"),
                           ("00003", "_part_of", "00004"), ("00004", "_part_of", "00001")),
        "dev.tsv": lines(("00001", "_part_of", "00003")),
        "test.tsv": lines(("00002", "_part_of", "00004")),
        "entities.txt": lines(*[(e,) for e in WN_ENTITIES]),
        "entity2text.txt": lines(("00001", "dog, a domesticated carnivore"), ("00002", "canine, a mammal"),
                                 ("00003", "mammal, an animal"), ("00004", "animal, a living thing, not a plant")),
        "relations.txt": lines(("_hypernym",), ("_part_of",)),
        "relation2text.txt": lines(("_hypernym", "hypernym"), ("_part_of", "part of")),
    }
    return {"WN18/" + k: v for k, v in files.items()}


WN_IMAGES = {"wn18-images/n00001/a.jpg": jpeg(1), "wn18-images/n00001/b.jpg": jpeg(2),
             "wn18-images/n00003/a.jpg": jpeg(3)}


def make_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in sorted(files.items()):
            zf.writestr(name, data)
    return path


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


# ----------------------------------------------------------------------------- loopback server


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start, end = 0, len(data) - 1
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if m:
            start = int(m.group(1))
            end = min(int(m.group(2)), end) if m.group(2) else end
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start : end + 1]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        cut = srv.drop_after.pop(self.path, None)
        if cut is not None:
            # Simulate a dropped connection: promise the whole body, send part of it, hang up.
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # keep the test output quiet
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.drop_after: dict[str, int] = {}

    def add(self, name: str, data: bytes) -> str:
        self.files[f"/{name}"] = data
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


@pytest.fixture
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def run_ingest(tmp: Path, name: str, urls: list[str], sha256s: list[str] | None = None, **kw) -> dict:
    return ingest(name, urls, sha256s or [], tmp / "kg", tmp / "cache", progress=False, fetch_kwargs=FAST, **kw)


# ----------------------------------------------------------------------------- round trips


def test_fb15k_round_trip_over_http(server, tmp_path: Path) -> None:
    files = fb_layout()
    url = server.add("fb15k.tar.gz", make_tar(tmp_path / "fb.tar.gz", files).read_bytes())
    run_ingest(tmp_path, "fb15k-237-img", [url])

    kg = load_kg(tmp_path / "kg")
    assert kg.entities["id"].tolist() == FB_ENTITIES  # entities.txt order; /m/zz of entity2text is not in the KG
    assert kg.entities["name"].tolist() == [f"Entity {e[-2:]}" for e in FB_ENTITIES]
    assert kg.entities["description"].tolist() == ["The first entity.\tWith a tab.", "", "", "The fourth.", ""]
    assert kg.relations.to_dict("list") == {"id": ["/r/likes", "/r/near"], "name": ["likes", "is near"],
                                            "modality": ["", ""]}
    e, r = {x: i for i, x in enumerate(FB_ENTITIES)}, {"/r/likes": 0, "/r/near": 1}
    for split, rows in (("train", FB_TRAIN), ("valid", FB_DEV), ("test", FB_TEST)):
        np.testing.assert_array_equal(kg.triples[split], [[e[h], r[rel], e[t]] for h, rel, t in rows])
    assert kg.entities["num_images"].tolist() == [2, 1, 0, 10, 0]
    assert kg.image_bytes(0) == [files["FB15k-images/m.a0/0.jpg"],
                                                           files["FB15k-images/m.a0/1.jpg"]]
    report = coverage(kg)
    assert report["entities"] == report["candidates"] == 5 and report["relations"] == 2
    assert report["triples"] == {"train": 6, "valid": 1, "test": 2} and report["images"] == 13
    assert report["entities_by_images"] == {"0": 2, "1-9": 2, "10+": 1}
    assert report["skipped_images"] == 0 and report["duplicate_triples"] == {s: 0 for s in SPLITS}
    sha = hashlib.sha256(server.files["/fb15k.tar.gz"]).hexdigest()
    assert kg.meta["inputs"] == [{"name": cache_name(url), "kind": "archive", "sha256": sha}]
    assert not list((tmp_path / "cache").glob(".extract-*"))  # the scratch extraction is cleaned up


def test_wn18_round_trip_two_archives_with_checksums(server, tmp_path: Path) -> None:
    text = make_zip(tmp_path / "wn18.zip", wn_text_layout()).read_bytes()
    images = make_tar(tmp_path / "wn18-images.tar.gz", WN_IMAGES).read_bytes()
    urls = [server.add("wn18.zip", text), server.add("wn18-images.tar.gz", images)]
    sums = [hashlib.sha256(text).hexdigest(), hashlib.sha256(images).hexdigest().upper()]
    run_ingest(tmp_path, "wn18-img", urls, sums)

    kg = load_kg(tmp_path / "kg")
    assert kg.entities["id"].tolist() == WN_ENTITIES
    # WN18's entity2text is "name, gloss".
    assert kg.entities["name"].tolist() == ["dog", "canine", "mammal", "animal"]
    assert kg.entities["description"].iloc[3] == "a living thing, not a plant"
    assert kg.entities["num_images"].tolist() == [2, 0, 1, 0]
    assert coverage(kg)["triples"] == {"train": 4, "valid": 1, "test": 1}
    assert kg.image_bytes(2)[0] == WN_IMAGES["wn18-images/n00003/a.jpg"]


@pytest.mark.parametrize("layout", ["mkgformer", "canonical", "canonical-v1"])
def test_custom_from_a_local_directory_is_copied_not_moved(tmp_path: Path, layout: str) -> None:
    """Also converts a format-1 canonical KG (one file per image), what earlier versions wrote."""
    src = tmp_path / "mine"
    if layout == "canonical-v1":
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer = ImageWriter(src)
        writer.add(1, 0, jpeg(5))
        writer.add(1, 1, jpeg(6))
        write_kg(src, pd.DataFrame({"id": ["x", "y"], "name": ["X", "Y"], "description": ["", "why"]}),
                 pd.DataFrame({"id": ["r"], "name": ["rel"], "modality": ["text"]}),
                 {"train": np.array([[0, 0, 1]]), "valid": np.array([[1, 0, 0]]), "test": np.array([[0, 0, 0]])},
                 writer.close(), {"source": "mine"})
        (src / "images-00000.parquet").unlink()  # format 1 kept one file per image instead
        write_tree(src, {"images/000001/00.jpg": jpeg(5), "images/000001/01.jpg": jpeg(6)})
        pq.write_table(pa.table({"entity": pa.array([1, 1], pa.int32()), "slot": pa.array([0, 1], pa.int16()),
                                 "path": ["images/000001/00.jpg", "images/000001/01.jpg"]}), src / "images.parquet")
        meta = json.loads((src / "meta.json").read_text())
        (src / "meta.json").write_text(json.dumps({**meta, "format_version": 1, "image_parts": []}))
    elif layout == "mkgformer":
        write_tree(src, fb_layout(prefix=""))
    else:
        import pandas as pd

        writer = ImageWriter(src)
        writer.add(1, 0, jpeg(5))
        writer.add(1, 1, jpeg(6))
        write_kg(src, pd.DataFrame({"id": ["x", "y"], "name": ["X", "Y"], "description": ["", "why"]}),
                 pd.DataFrame({"id": ["r"], "name": ["rel"], "modality": ["text"]}),
                 {"train": np.array([[0, 0, 1]]), "valid": np.array([[1, 0, 0]]), "test": np.array([[0, 0, 0]])},
                 writer.close(), {"source": "mine"})
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    run_ingest(tmp_path, "custom", [src.as_uri()])
    kg = load_kg(tmp_path / "kg")
    assert kg.meta["layout"] == layout.removesuffix("-v1") and kg.meta["source"] == "custom"
    assert sum(kg.entities["num_images"]) == (13 if layout == "mkgformer" else 2)
    if layout != "mkgformer":
        assert kg.image_bytes(1) == [jpeg(5), jpeg(6)]
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before  # the user's directory is untouched


# ----------------------------------------------------------------------------- downloads


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path: Path) -> None:
    data = np.random.default_rng(0).bytes(300_000)
    url = server.add("big.bin", data)
    server.drop_after["/big.bin"] = 100_000  # the first response stops a third of the way
    path = fetch(url, tmp_path, hashlib.sha256(data).hexdigest(), progress=False, **FAST)
    assert path.read_bytes() == data
    assert server.requests == [("/big.bin", None), ("/big.bin", "bytes=100000-")]
    assert not path.with_name(path.name + ".part").exists()

    # A partial file left by an earlier (killed) run is resumed as well.
    url2 = server.add("big2.bin", data)
    (tmp_path / (cache_name(url2) + ".part")).write_bytes(data[:12345])
    assert fetch(url2, tmp_path, progress=False, **FAST).read_bytes() == data
    assert server.requests[-1] == ("/big2.bin", "bytes=12345-")
    # A complete cached file is reused without a request.
    n = len(server.requests)
    fetch(url2, tmp_path, progress=False, **FAST)
    assert len(server.requests) == n


def test_http_errors_retry_then_give_up(server, tmp_path: Path) -> None:
    port = server.server_address[1]
    with pytest.raises(DownloadError, match="HTTP 404"):  # not transient: no retry
        fetch(f"http://127.0.0.1:{port}/missing.zip", tmp_path, progress=False, **FAST)
    assert len(server.requests) == 1
    server.shutdown()  # nothing listens any more: connection refused, retried, then a clear error
    server.server_close()
    with pytest.raises(DownloadError, match="giving up after 2 retries"):
        fetch(f"http://127.0.0.1:{port}/gone.zip", tmp_path, progress=False, retries=2, **FAST)


def test_wrong_checksum_fails_and_leaves_no_output(server, tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "fb.tar.gz", fb_layout())
    url = server.add("fb.tar.gz", archive.read_bytes())
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        run_ingest(tmp_path, "fb15k-237-img", [url], ["0" * 64])
    assert not (tmp_path / "kg").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # neither the file nor a .part remains
    with pytest.raises(ChecksumError, match="sha256 mismatch"):  # the same for a local archive
        run_ingest(tmp_path, "fb15k-237-img", [archive.as_uri()], ["f" * 64])
    assert not (tmp_path / "kg").exists()


# ----------------------------------------------------------------------------- safe extraction


def _tar_with(path: Path, member: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w") as tf:
        ok = tarfile.TarInfo("FB15k-237/train.tsv")
        ok.size = 3
        tf.addfile(ok, io.BytesIO(b"a\tb"))
        tf.addfile(member, io.BytesIO(b"evil") if member.isfile() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = 4 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    "member, reason",
    [
        (_member("../evil.txt"), "escapes the target"),
        (_member("FB15k-237/../../evil.txt"), "escapes the target"),
        (_member("/tmp/evil.txt"), "absolute path"),
        (_member("link", tarfile.SYMTYPE, "../../outside"), "symbolic link"),
        (_member("hard", tarfile.LNKTYPE, "/etc/passwd"), "hard link"),
        (_member("dev", tarfile.CHRTYPE), "device"),
    ],
)
def test_unsafe_tar_is_refused(tmp_path: Path, member: tarfile.TarInfo, reason: str) -> None:
    archive = _tar_with(tmp_path / "bad.tar", member)
    target = tmp_path / "a" / "b" / "out"
    with pytest.raises(UnsafeArchiveError, match=rf"bad\.tar: refusing member '{re.escape(member.name)}': .*{reason}"):
        safe_extract(archive, target)
    assert not target.exists() and not list(tmp_path.rglob("evil.txt"))
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == []  # no scratch directory left


def test_unsafe_zip_is_refused_and_ingest_writes_nothing(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "bad.zip", fb_layout() | {"../evil.txt": b"evil"})
    with pytest.raises(UnsafeArchiveError, match=r"bad\.zip: refusing member '\.\./evil\.txt'"):
        run_ingest(tmp_path, "fb15k-237-img", [archive.as_uri()])
    assert not (tmp_path / "kg").exists() and not list(tmp_path.rglob("evil.txt"))

    link = zipfile.ZipInfo("FB15k-237/link")
    link.create_system, link.external_attr = 3, (0o120777 << 16)
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as zf:
        zf.writestr(link, "../../etc/passwd")
    with pytest.raises(UnsafeArchiveError, match=r"link\.zip: refusing member 'FB15k-237/link': symbolic link"):
        safe_extract(tmp_path / "link.zip", tmp_path / "out")


def test_html_instead_of_an_archive_is_explained(tmp_path: Path) -> None:
    page = tmp_path / "uc"
    page.write_bytes(b"<!DOCTYPE html><html>Google Drive can't scan this file for viruses</html>")
    with pytest.raises(ValueError, match="not a zip or tar archive .*HTML page"):
        run_ingest(tmp_path, "fb15k-237-img", [str(page)])


# ----------------------------------------------------------------------------- validation


def test_malformed_tsv_line_is_reported_with_file_and_line(tmp_path: Path) -> None:
    files = fb_layout()
    files["FB15k-237/train.tsv"] = lines(*FB_TRAIN[:2]) + b"/m/a2\t/r/likes\n" + lines(*FB_TRAIN[2:])
    archive = make_tar(tmp_path / "fb.tar.gz", files)
    with pytest.raises(LayoutError, match=r"fb\.tar\.gz:FB15k-237/train\.tsv:3: expected 3 tab-separated columns .*got 2"):
        run_ingest(tmp_path, "fb15k-237-img", [archive.as_uri()])
    assert not (tmp_path / "kg").exists()


def test_unknown_entity_fails_or_is_dropped_and_counted(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "fb.tar.gz", fb_layout(train=FB_TRAIN + [("/m/a1", "/r/likes", "/m/zz")]))
    with pytest.raises(LayoutError, match=r"train\.tsv:7: unknown entity '/m/zz' \(not in entities\.txt\).*drop_unknown"):
        run_ingest(tmp_path, "fb15k-237-img", [archive.as_uri()])
    result = run_ingest(tmp_path, "fb15k-237-img", [archive.as_uri()], drop_unknown=True)
    report = coverage(load_kg(tmp_path / "kg"))
    assert report["dropped_unknown_triples"] == {"train": 1, "valid": 0, "test": 0}
    assert report["triples"]["train"] == 6
    assert any("train.tsv:7: unknown entity '/m/zz'" in w for w in result["warnings"])


def test_duplicates_are_dropped_and_counted_and_empty_splits_fail(tmp_path: Path) -> None:
    # A repeat inside train, and a test triple that is already in train.
    files = fb_layout(train=FB_TRAIN + [FB_TRAIN[0]])
    files["FB15k-237/test.tsv"] += lines(FB_TRAIN[1])
    run_ingest(tmp_path, "fb15k-237-img", [make_tar(tmp_path / "d.tar.gz", files).as_uri()])
    report = coverage(load_kg(tmp_path / "kg"))
    assert report["duplicate_triples"] == {"train": 1, "valid": 0, "test": 1}
    assert report["triples"] == {"train": 6, "valid": 1, "test": 2}

    files["FB15k-237/dev.tsv"] = b"\n"
    with pytest.raises(LayoutError, match=r"dev\.tsv: empty split 'valid'"):
        run_ingest(tmp_path, "fb15k-237-img", [make_tar(tmp_path / "e.tar.gz", files).as_uri()])


def test_bad_images_are_skipped_and_counted(tmp_path: Path) -> None:
    good = jpeg(99, size=16)
    bad = {
        "FB15k-images/m.a0/1-truncated.jpg": good[: len(good) // 2],
        "FB15k-images/m.a0/2-garbage.jpg": b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(range(256)) * 2,
        "FB15k-images/m.a1/bomb.png": png_header_bomb(20_000, 20_000),  # 400 Mpx: PIL's error
        "FB15k-images/m.a1/bomb-warn.png": png_header_bomb(9_000, 9_000),  # 81 Mpx: PIL's warning
    }
    images = {"FB15k-images/m.a0/0.jpg": good, "FB15k-images/m.a0/3.jpg": good, "FB15k-images/m.a2/big.jpg": good} | bad
    archive = make_tar(tmp_path / "fb.tar.gz", fb_layout(images=images))
    result = run_ingest(tmp_path, "fb15k-237-img", [archive.as_uri()])
    kg = load_kg(tmp_path / "kg")
    assert kg.entities["num_images"].tolist() == [2, 0, 1, 0, 0]
    assert kg.images["slot"].tolist() == [0, 1, 0]  # slots stay contiguous after skipping
    assert coverage(kg)["skipped_images"] == 4
    reasons = dict(line.split(": ", 1) for line in result["skipped_images"])
    assert set(reasons) == set(bad)
    assert reasons["FB15k-images/m.a1/bomb.png"].startswith("decompression bomb")
    assert reasons["FB15k-images/m.a1/bomb-warn.png"].startswith("decompression bomb")
    assert reasons["FB15k-images/m.a0/1-truncated.jpg"].startswith("cannot be decoded")

    # data.max_image_pixels applies its own limit: 16x16 = 256 pixels > 100.
    run_ingest(tmp_path, "fb15k-237-img", [archive.as_uri()], max_image_pixels=100)
    assert coverage(load_kg(tmp_path / "kg"))["images"] == 0


def test_data_params_are_validated() -> None:
    ok = from_dict({"data": {"name": "fb15k-237-img", "url": "file:///data/fb.tar.gz"}})
    assert ok.data.url == ["file:///data/fb.tar.gz"]
    for data, key in [
        ({"name": "wn18-img", "url": "ftp://host/wn18.zip"}, r"data\.url\[0\]"),
        ({"name": "wn18-img", "url": ["a.zip"], "sha256": ["abc"]}, r"data\.sha256\[0\]"),
        ({"name": "wn18-img", "url": ["a.zip", "b.zip"], "sha256": [""]}, r"data\.sha256"),
        ({"name": "custom"}, r"data\.url"),
        ({"max_image_pixels": 0}, r"data\.max_image_pixels"),
    ]:
        with pytest.raises(ParamsError, match=key):
            from_dict({"data": data})
