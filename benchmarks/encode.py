"""Benchmark: images/second of the encode path against a naive baseline, side by side, printed as JSON.

  encode path  `elmm.vision.encode_kg_images` as the stage runs it: DataLoader workers decode and
               preprocess, batches of `encode.batch_size`, inference_mode, fp16 on GPU, shards written
               (Parquet + Arrow sidecar); the CPU cores are split between workers and tower threads.
  naive        one image at a time through the HF image processor and the vision tower, one process,
               torch's default threads, torch.no_grad, float32; outputs kept in memory (no writing).

Data: data/kg of the default pipeline when present (read only), else the default synthetic world
generated into a temporary directory. Backbone: the tiny one of params.yaml built into a temporary
directory (as stages/encode.py does); `--scale` instead builds a CLIP ViT-L/14-336-shaped tower
(LLaVA-1.5's) with random weights, no download. Timing excludes model loading. Both paths run on the same images, and the naive
outputs are compared with the stored tokens (max_abs_diff).

  python benchmarks/encode.py                          # tiny tower, all default images
  python benchmarks/encode.py --scale --limit 4096     # on a GPU machine (see benchmarks/README.md)
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from elmm.backbone import LlavaBackbone, build_tiny_backbone, load_backbone, train_tokenizer
from elmm.config import load_params
from elmm.image_tokens import ImageTokens
from elmm.kg.format import ImageReader, load_kg
from elmm.kg.synthetic import generate_synthetic
from elmm.vision import available_cores, default_workers, encode_kg_images, finalize_encoding

ROOT = Path(__file__).resolve().parents[1]


def vit_flops(cfg) -> float:
    """Forward FLOPs of one image through a ViT (matmuls only: projections, MLP, attention)."""
    t = (cfg.image_size // cfg.patch_size) ** 2 + 1
    d, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    per_layer = 2 * t * (4 * d * d + 2 * d * f) + 4 * t * t * d
    patch_embed = 2 * (t - 1) * d * 3 * cfg.patch_size**2
    return layers * per_layer + patch_embed


def scale_backbone(texts: list[str]) -> LlavaBackbone:
    """LLaVA-1.5's vision tower shape (CLIP ViT-L/14 at 336 px) with random weights and a tiny decoder."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    tokenizer = train_tokenizer(texts, 512)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval().requires_grad_(False)
    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return LlavaBackbone.from_model("clip-vit-l-14-336-shaped (random)", model, tokenizer, processor)


def naive(kg, backbone, feature_layer: int, device: torch.device) -> tuple[float, int, dict]:
    """One image at a time: PIL -> HF processor -> tower; returns (seconds, images, outputs by (entity, slot))."""
    outputs = {}
    start = time.perf_counter()
    reader = ImageReader(kg.root, kg.images)
    with torch.no_grad():
        for row, (entity, slot) in enumerate(zip(kg.images["entity"].tolist(), kg.images["slot"].tolist())):
            try:
                with Image.open(io.BytesIO(reader.read(row))) as im:
                    im = im.convert("RGB")
            except Exception:
                continue  # the corrupt ones: the encode path skips them too
            pixels = backbone.image_processor(images=im, return_tensors="pt")["pixel_values"].to(device)
            hidden = backbone.vision_tower(pixels, output_hidden_states=True).hidden_states[feature_layer]
            outputs[(int(entity), int(slot))] = hidden[0, 1:].float().cpu().numpy()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, len(outputs), outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kg", default=str(ROOT / "data" / "kg"), help="canonical KG dir (generated if missing)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images (both paths)")
    ap.add_argument("--scale", action="store_true", help="CLIP ViT-L/14-336-shaped tower, random weights")
    ap.add_argument("--batch-size", type=int, default=None, help="default: encode.batch_size of params.yaml")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: cores - 1, max 8)")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="accelerator peak for the compute limit (H200 dense bf16/fp16: 989)")
    args = ap.parse_args()

    p = load_params(ROOT / "params.yaml")
    device = torch.device(os.environ.get("ELMM_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="elmm-bench-") as tmp:
        tmp = Path(tmp)
        kg_dir = Path(args.kg)
        if not (kg_dir / "meta.json").exists():
            s = p.data.synthetic
            generate_synthetic(tmp / "kg", seed=p.seed, progress=False, **s.__dict__)
            kg_dir = tmp / "kg"
        kg = load_kg(kg_dir)
        if args.limit:
            kg = copy.copy(kg)
            kg.images = kg.images.iloc[:args.limit].reset_index(drop=True)
        texts = kg.entities["name"].tolist() + kg.entities["description"].tolist() + kg.relations["name"].tolist()
        if args.scale:
            backbone = scale_backbone(texts)
        else:
            build_tiny_backbone(tmp / "backbone", p.model.tiny, texts + ["entity: relation: inverse of , ?"], p.seed)
            backbone = load_backbone(tmp / "backbone")
        backbone.vision_tower.to(device)

        # Naive twice: with torch's default threads (a plain script) and with one thread, which on
        # a small, busy CPU avoids spinning intra-op threads and is the fairer baseline there.
        naive_s, naive_n, ref = naive(kg, backbone, p.encode.feature_layer, device)
        naive1_s = None
        if device.type == "cpu":
            torch.set_num_threads(1)
            naive1_s, _, _ = naive(kg, backbone, p.encode.feature_layer, device)

        cores = available_cores()
        workers = default_workers(cores) if args.workers is None else args.workers
        if device.type == "cpu":
            torch.set_num_threads(max(1, cores - workers))  # as stages/encode.py
        backbone.vision_tower.to(dtype)
        batch = args.batch_size or p.encode.batch_size
        res = encode_kg_images(kg, backbone, tmp / "encoded", feature_layer=p.encode.feature_layer, batch_size=batch,
                               shard_rows=p.encode.shard_rows, metadata={"params_hash": "bench"}, num_workers=workers,
                               device=device, dtype=dtype, pool=1, progress=False)
        finalize_encoding(tmp / "encoded", res.shards)
        tokens = ImageTokens(tmp / "encoded", kg.num_entities)
        diff = 0.0
        for e in sorted({e for e, _ in ref})[:50]:  # spot check: stored tokens = naive outputs
            patches, _, mask = tokens.get(torch.tensor([e]))
            slots = sorted(s for ee, s in ref if ee == e)
            for j, s in enumerate(slots):
                diff = max(diff, float(np.abs(patches[0, j].float().numpy() - ref[(e, s)]).max()))

    cfg = backbone.vision_tower.config
    flops = vit_flops(cfg)
    encode_ips = res.encoded / res.seconds
    naive_ips = naive_n / naive_s
    out = {
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "cores": cores,
                    "load_average_1min": round(os.getloadavg()[0], 2)},
        "tower": {"name": "clip-vit-l-14-336-shaped (random)" if args.scale else "tiny (params.yaml model.tiny)",
                  "image_size": cfg.image_size, "patch_size": cfg.patch_size,
                  "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "gflop_per_image": round(flops / 1e9, 4)},
        "images": len(kg.images),
        "encode": {"images": res.encoded, "seconds": round(res.seconds, 3), "images_per_second": round(encode_ips, 2),
                   "batch_size": batch, "loader_workers": workers,
                   "tower_threads": torch.get_num_threads() if device.type == "cpu" else None,
                   "dtype": str(dtype).removeprefix("torch."), "shards": res.shards},
        "naive": {"images": naive_n, "seconds": round(naive_s, 3), "images_per_second": round(naive_ips, 2),
                  "batch_size": 1, "threads": default_threads if device.type == "cpu" else None, "dtype": "float32"},
        "speedup": round(encode_ips / naive_ips, 2),
    }
    if naive1_s is not None:
        out["naive_1_thread"] = {"images": naive_n, "seconds": round(naive1_s, 3),
                                 "images_per_second": round(naive_n / naive1_s, 2)}
        out["speedup_vs_naive_1_thread"] = round(encode_ips / (naive_n / naive1_s), 2)
    out |= {
        "max_abs_diff_vs_naive": round(diff, 5),
    }
    if device.type == "cuda":
        limit = args.peak_tflops * 1e12 / flops
        out["compute_limit"] = {"peak_tflops": args.peak_tflops, "images_per_second": round(limit, 1),
                                "encode_fraction": round(encode_ips / limit, 3)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
