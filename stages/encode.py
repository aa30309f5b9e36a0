"""Stage `encode`: materialise the backbone, run its vision tower over every entity image once,
and write the image tokens to Parquet shards under data/encoded.

`--shard i/N` encodes only every N-th shard (run N of these on any machines), `--finalize N`
checks that all shards exist and writes the manifest; without flags it does both for one worker.
"""

import argparse
import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path

from _common import device, params, setup

from elmm.backbone import build_tiny_backbone, load_backbone, write_backbone_pointer
from elmm.io import write_json
from elmm.kg.format import load_kg
from elmm.vision import encode_kg_images, finalize_encoding

KG_DIR, BACKBONE_DIR, OUT_DIR = Path("data/kg"), Path("data/backbone"), Path("data/encoded")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shard", default="0/1", help="i/N: encode shards with index %% N == i")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers decoding images")
    ap.add_argument("--skip-backbone", action="store_true", help="reuse data/backbone (extra workers)")
    args = ap.parse_args()
    i, n = (int(v) for v in args.shard.split("/"))
    p = params()
    setup(p.seed)
    kg = load_kg(KG_DIR)

    if not args.skip_backbone:
        if p.model.backbone == "tiny":
            texts = kg.entities["name"].tolist() + kg.entities["description"].tolist() + kg.relations["name"].tolist()
            texts += ["entity: relation: inverse of , ?"]
            build_tiny_backbone(BACKBONE_DIR, p.model.tiny, texts, p.seed)
        else:
            write_backbone_pointer(BACKBONE_DIR, p.model.backbone)
    dev = device()
    backbone = load_backbone(BACKBONE_DIR, device=dev)

    # Shards carry this hash: a shard left from other params or other data is never reused.
    fingerprint = json.dumps({"encode": asdict(p.encode), "backbone": p.model.backbone,
                              "tiny": asdict(p.model.tiny) if p.model.backbone == "tiny" else None, "seed": p.seed,
                              "images": hashlib.sha256((KG_DIR / "images.parquet").read_bytes()).hexdigest()},
                             sort_keys=True)
    meta = {"encoder": backbone.name, "params_hash": hashlib.sha256(fingerprint.encode()).hexdigest()[:16]}
    res = encode_kg_images(kg, backbone, OUT_DIR, feature_layer=p.encode.feature_layer, batch_size=p.encode.batch_size,
                           shard_rows=p.encode.shard_rows, metadata=meta, num_workers=args.workers, shard=(i, n),
                           device=str(dev))
    if n > 1 and i != 0:
        return  # worker 0 (or `--finalize`) writes the manifest and metrics
    manifest = finalize_encoding(OUT_DIR, math.ceil(len(kg.images) / p.encode.shard_rows) or 1)
    size = sum(f.stat().st_size for f in OUT_DIR.glob("shard-*.parquet"))
    with_images = int((kg.entities["num_images"] > 0).sum())
    write_json("metrics/encode.json", {
        "images": len(kg.images),
        "encoded": manifest["rows"],
        "skipped": len(manifest["skipped"]),
        "skipped_files": manifest["skipped"],
        "images_per_second": round(res.encoded / res.seconds, 1) if res.seconds and res.encoded else None,
        "tokens_per_image": manifest["tokens"],
        "width": manifest["width"],
        "shards": len(manifest["shards"]),
        "bytes": size,
        "bytes_per_entity_with_images": round(size / max(1, with_images)),
    })
    for bad in manifest["skipped"]:
        print(f"encode: skipped {bad}")
    print(f"encode: {manifest['rows']} images -> {len(manifest['shards'])} shard(s), {manifest['tokens']} tokens x "
          f"{manifest['width']} each, {len(manifest['skipped'])} skipped")


if __name__ == "__main__":
    main()
