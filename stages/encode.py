"""Stage `encode`: run the backbone's vision tower (from `pretrain`) over every entity image once,
and write the image tokens to Parquet shards (plus memory-mappable Arrow sidecars) under data/encoded.

  python stages/encode.py                  everything, one process (the DVC command)
  python stages/encode.py --shard i/N      only shards with index % N == i (N processes, any nodes)
  python stages/encode.py --finalize       only check that every shard exists, write the manifest
                                           and metrics/encode.json (no model loaded)
  torchrun --nproc_per_node=N stages/encode.py
                                           every rank encodes its shards (RANK/WORLD_SIZE),
                                           rank 0 finalizes after a barrier
"""

import hashlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from _common import device, params, parser, setup
from elmm.backbone import load_backbone
from elmm.io import write_json
from elmm.kg.format import load_kg
from elmm.vision import available_cores, default_workers, encode_kg_images, finalize_encoding, worker_assignment

KG_DIR, BACKBONE_DIR, OUT_DIR = Path("data/kg"), Path("data/backbone"), Path("data/encoded")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _digest(path: Path) -> str:
    """sha256 of a file, or of a directory's small files (weights larger than 64 MB by name and size)."""
    h = hashlib.sha256()
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{f.stat().st_size}".encode())
        if f.stat().st_size <= 64 << 20:
            h.update(f.read_bytes())
    return h.hexdigest()


def params_hash(p) -> str:
    """Every shard carries this: a shard left from other params, another backbone or other images is
    never reused. DataLoader workers and the device are not in it (compute device/dtype is checked apart)."""
    fingerprint = json.dumps({"encode": asdict(p.encode), "backbone": _digest(BACKBONE_DIR),
                              "images": _digest(KG_DIR / "images.parquet")}, sort_keys=True)
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:16]


def finalize(p, kg, run: dict | None) -> None:
    """Manifest + metrics. `run`: what this invocation encoded (None for a separate --finalize)."""
    manifest = finalize_encoding(OUT_DIR)
    if manifest["params_hash"] != params_hash(p):
        sys.exit(f"error: {OUT_DIR} was encoded with other params or data (hash {manifest['params_hash']}); "
                 "rerun the encode workers")
    size = sum((OUT_DIR / s).stat().st_size for s in manifest["shards"])
    sidecars = sum((OUT_DIR / s).stat().st_size for s in manifest["sidecars"])
    with_images = int((kg.entities["num_images"] > 0).sum())
    encoded_now = run["encoded"] if run else 0
    write_json("metrics/encode.json", {
        "images": len(kg.images),
        "encoded": manifest["rows"],
        "skipped": len(manifest["skipped"]),
        "skipped_files": manifest["skipped"],
        # Only images this invocation encoded, over its encoding wall time: a resumed run that
        # found its shards done reports null rather than a rate it did not achieve.
        "images_per_second": round(encoded_now / run["seconds"], 1) if run and encoded_now and run["seconds"] else None,
        "images_encoded_this_run": encoded_now,
        "shards_reused_this_run": run["reused"] if run else None,
        "workers": run["workers"] if run else None,
        "compute": manifest["compute"],
        "tokens_per_image": manifest["tokens"],
        "tokens_unpooled": manifest["tokens_unpooled"],
        "pool": manifest["pool"],
        "width": manifest["width"],
        "shards": len(manifest["shards"]),
        "bytes": size,
        "sidecar_bytes": sidecars,
        "bytes_per_image": round(size / max(1, manifest["rows"])),
        "bytes_per_entity_with_images": round(size / max(1, with_images)),
    })
    for bad in manifest["skipped"]:
        print(f"encode: skipped {bad}")
    print(f"encode: {manifest['rows']} images -> {len(manifest['shards'])} shard(s), {manifest['tokens']} tokens x "
          f"{manifest['width']} each, {len(manifest['skipped'])} skipped")


def main(argv: list[str] | None = None) -> None:
    ap = parser("encode", __doc__)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--shard", help="i/N: encode only shards with index %% N == i (no finalize)")
    mode.add_argument("--finalize", action="store_true", help="only check all shards, write manifest and metrics")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers decoding images (default: cores - 1)")
    args = ap.parse_args([] if argv is None else argv)
    p = params()
    setup(p.seed)
    kg = load_kg(KG_DIR)
    if args.finalize:
        return finalize(p, kg, None)
    try:
        rank, world, torchrun = worker_assignment(args.shard)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if torchrun:
        import datetime

        import torch.distributed as dist

        # gloo: only barriers and a few numbers travel between ranks, on CPU.
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=6))
    if not (BACKBONE_DIR / "config.json").exists() and not (BACKBONE_DIR / "source.json").exists():
        sys.exit(f"error: {BACKBONE_DIR} missing; run `dvc repro pretrain` first")

    dev = device()
    if dev.type == "cuda" and torchrun:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    precision = p.encode.precision if p.encode.precision != "auto" else ("fp16" if dev.type == "cuda" else "fp32")
    dtype = DTYPES[precision]
    # Load on CPU and move only the tower: the decoder is not needed here (14 GB for a 7B in fp16).
    backbone = load_backbone(BACKBONE_DIR, dtype=dtype, device="cpu")
    backbone.vision_tower.to(dev)
    share = max(1, available_cores() // (world if torchrun else 1))  # this process's cores
    workers = default_workers(share) if args.workers is None else args.workers
    if dev.type == "cpu":
        # Decode workers and tower threads split the cores: oversubscribed intra-op threads spin and
        # measured 20x slower on 2 busy cores (70 vs 1,660 img/s, tiny tower).
        torch.set_num_threads(max(1, share - workers))
    encoder = p.model.backbone if p.model.backbone != "tiny" else "tiny-llava"  # tiny-qwen2-vl names itself
    res = encode_kg_images(kg, backbone, OUT_DIR, feature_layer=p.encode.feature_layer, batch_size=p.encode.batch_size,
                           shard_rows=p.encode.shard_rows, pool=p.encode.pool, num_workers=workers,
                           metadata={"encoder": encoder, "params_hash": params_hash(p)}, shard=(rank, world),
                           device=dev, dtype=dtype)
    print(f"encode: worker {rank}/{world} wrote {len(res.shards_written)} shard(s), reused {len(res.shards_reused)}, "
          f"{res.encoded} images in {res.seconds:.1f} s ({res.encoded / res.seconds if res.seconds else 0:.1f} img/s, "
          f"{workers} loader workers, {torch.get_num_threads() if dev.type == 'cpu' else 'GPU'} tower threads, "
          f"{dev.type}/{precision})")
    run = {"encoded": res.encoded, "seconds": res.seconds, "reused": len(res.shards_reused), "workers": workers}
    if torchrun:
        runs = [None] * world
        dist.all_gather_object(runs, run)  # also the barrier: every rank has written its shards
        # Ranks ran concurrently: total images over the slowest rank's time.
        run = {"encoded": sum(r["encoded"] for r in runs), "seconds": max(r["seconds"] for r in runs),
               "reused": sum(r["reused"] for r in runs), "workers": sum(r["workers"] for r in runs)}
    if args.shard is None and rank == 0:
        finalize(p, kg, run)
    if torchrun:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
