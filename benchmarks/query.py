"""Query latency/throughput, training throughput and peak memory of the ELMM evaluate/train path, side by side.

Configurations measured in one run, on the same random inputs:
  all_tokens   w/o MVTC: all N x M image tokens enter the decoder
  mvtc         MVTC (2 x heads tokens), no pruning (K = 0)
  mvtc_k<K>    MVTC with K attention sub-blocks replaced by x + x W_c, for each K of --k

    python benchmarks/query.py                                  # tiny default backbone, CPU, K = L/2, top layers
    python benchmarks/query.py --k 2 4 6 --similarity metrics/similarity.json   # the layers the pipeline prunes
    python benchmarks/query.py --scale llava-1.5-7b             # LLaVA-1.5-7B decoder shape, random weights (GPU, bf16)

Which layers are pruned matters for cost: once every layer above some point is pruned, those layers
run on the positions ELMM reads only (elmm.pruning.layers.hidden_at). `--similarity` takes the
ranking the `similarity` stage wrote (the K most similar layers, as `calibrate` prunes them);
without it the top K layers are pruned.

Prints one JSON object (medians over --rounds): ms per query at batch 1 and at --batch, queries/s, training triples/s and
peak memory per configuration (on CPU each configuration runs in its own process, so its peak RSS is
its own; `rss_model_mb` is the resident size once the model is built), and the ratios pruned vs
unpruned and compressed vs all tokens. Needs only torch, transformers, peft and tokenizers (no dvc,
no faiss): it runs on the GPU image.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import multiprocessing
import platform
import resource
import statistics
import tempfile
import time

import torch

from elmm.backbone import LlavaBackbone, build_tiny_backbone, load_backbone, train_tokenizer
from elmm.config import MVTCParams, TinyBackboneParams
from elmm.model import ELMM, ELMMConfig, elmm_loss
from elmm.model_io import add_lora, lora_config, set_trainable
from elmm.prompt import TextBatch
from elmm.pruning.layers import prune_layers

SCALES = {
    # LLaVA-1.5-7B: Llama-2-7B decoder, CLIP ViT-L/14-336 tower (576 patches of width 1024 per image)
    "llava-1.5-7b": dict(hidden=4096, layers=32, heads=32, intermediate=11008, vocab=32064,
                         vision_hidden=1024, patches=576, images=10, heads_per_view=32, k=16, entities=14541),
}


def tiny_backbone(device, dtype):
    tmp = tempfile.mkdtemp(prefix="elmm-bench-")
    texts = ["entity: relation: inverse of , ?", "a painter known in the northern region"] * 20
    build_tiny_backbone(tmp, TinyBackboneParams(), texts, seed=0)
    b = load_backbone(tmp, dtype=dtype, device=device)
    return b, dict(patches=16, images=10, heads_per_view=MVTCParams().heads, entities=334, layers=b.num_layers)


def scale_backbone(name: str, device, dtype):
    """The published shape with random weights: nothing is downloaded."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    s = SCALES[name]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=s["vision_hidden"], intermediate_size=4096, num_hidden_layers=1,
                                       num_attention_heads=16, image_size=336, patch_size=14),
        text_config=LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                                num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                num_key_value_heads=s["heads"], max_position_embeddings=4096),
        vision_feature_layer=-2,
    )
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype).eval()
    model.requires_grad_(False)
    tokenizer = train_tokenizer(["entity relation"], 300)
    b = LlavaBackbone.from_model(name, model, tokenizer, None)
    return b, dict(s)


def inputs(b, shape: dict, batch: int, text_len: int, device):
    g = torch.Generator().manual_seed(0)
    n, m, dv = shape["images"], shape["patches"], b.vision_hidden_size
    patches = torch.randn(batch, n, m, dv, generator=g).half().to(device)
    cls = torch.randn(batch, n, dv, generator=g).half().to(device)
    slots = torch.ones(batch, n, dtype=torch.bool, device=device)
    ids = torch.randint(5, 250, (batch, text_len), generator=g).to(device)
    text = TextBatch(ids, torch.ones_like(ids, dtype=torch.bool), torch.full((batch,), text_len // 2, device=device),
                     torch.full((batch,), text_len - 1, device=device), torch.full((batch,), text_len // 2, device=device))
    return patches, cls, slots, text


def timed(fn, device, repeats: int) -> float:
    for _ in range(2):  # warm-up (allocator, kernels)
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_step(model, x, targets, neg, mask, opt) -> None:
    """Forward + backward + AdamW on LoRA, MVTC, completion layer and compensation."""
    loss = elmm_loss(model(*x).scores.float(), targets, neg, mask)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def rss_mb() -> float:
    """Resident set size now (Linux /proc), in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def measure_config(args, cfg_name: str, layers: list[int]) -> dict:
    """One configuration: its eval latency at batch 1 and --batch, then a LoRA training step."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    b, shape = (scale_backbone(args.scale, device, dtype) if args.scale else tiny_backbone(device, dtype))
    prune_layers(b.layers, {i: torch.zeros(b.hidden_size, b.hidden_size, device=device, dtype=dtype) for i in layers})
    config = ELMMConfig(num_entities=shape["entities"], mvtc_enabled=cfg_name != "all_tokens",
                        heads=shape["heads_per_view"], pruned_layers=layers, compensation="ridge",
                        max_image_tokens=shape["images"] * shape["patches"])
    model = ELMM(b, config).to(device=device, dtype=dtype)
    row = {"pruned_layers": sorted(layers)}
    if device.type == "cpu":
        row["rss_model_mb"] = round(rss_mb(), 1)
    with torch.inference_mode():
        for batch in (1, args.batch):
            x = inputs(b, shape, batch, args.text_tokens, device)
            sec = timed(functools.partial(model, *x), device, args.repeats)
            row[f"ms_per_query_b{batch}"] = round(1000 * sec / batch, 4)
            row[f"queries_per_second_b{batch}"] = round(batch / sec, 1)
        row["decoder_tokens"] = 1 + model(*inputs(b, shape, 1, args.text_tokens, device)).image_tokens + args.text_tokens
    if device.type == "cpu":
        row["peak_rss_eval_mb"] = round(peak_rss_mb(), 1)
    # Training step: forward + backward + AdamW on LoRA, MVTC, completion layer, compensation.
    add_lora(model, lora_config(8, 16, 0.0))
    model.to(device=device, dtype=dtype)
    set_trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = inputs(b, shape, args.train_batch, args.text_tokens, device)
    targets = torch.randint(0, shape["entities"], (args.train_batch,), device=device)
    neg = torch.randint(0, shape["entities"], (args.train_batch, 32), device=device)
    mask = torch.ones_like(neg, dtype=torch.bool)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step = functools.partial(train_step, model, x, targets, neg, mask, opt)
    sec = timed(step, device, max(3, args.repeats // 2))
    row["train_triples_per_second"] = round(args.train_batch / sec, 1)
    if device.type == "cuda":
        row["train_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        row["peak_rss_train_mb"] = round(peak_rss_mb(), 1)
    return row


def pruning_order(args, num_layers: int) -> list[int]:
    """The order in which layers are pruned: the similarity stage's ranking, or top down."""
    if args.similarity:
        with open(args.similarity) as f:
            ranking = json.load(f)["ranking"]
        if sorted(ranking) != list(range(num_layers)):
            raise SystemExit(f"{args.similarity}: its ranking {ranking} is not a permutation of the {num_layers} layers")
        return ranking
    return list(range(num_layers - 1, -1, -1))


def measure(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    num_layers = SCALES[args.scale]["layers"] if args.scale else TinyBackboneParams().layers
    ks = args.k if args.k is not None else [SCALES[args.scale]["k"] if args.scale else num_layers // 2]
    if any(not 0 < k <= num_layers for k in ks):
        raise SystemExit(f"--k: each K must lie in 1..{num_layers}, got {ks}")
    order = pruning_order(args, num_layers)
    configs = [("all_tokens", []), ("mvtc", [])] + [(f"mvtc_k{k}", order[:k]) for k in ks]
    runs: dict[str, list[dict]] = {name: [] for name, _ in configs}
    for _ in range(args.rounds):  # every configuration once per round: slow drifts hit all alike
        if device.type == "cpu":
            # One process per configuration: the peak RSS a process reports is then that configuration's.
            ctx = multiprocessing.get_context("spawn")
            for name, layers in configs:
                with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                    runs[name].append(pool.submit(measure_config, args, name, layers).result())
        else:
            for name, layers in configs:
                runs[name].append(measure_config(args, name, layers))
                torch.cuda.empty_cache()
    # the median over rounds of each figure (processes differ by up to ~1.5x on a shared 2-core machine)
    results = {name: {k: (round(statistics.median(r[k] for r in rows), 4) if isinstance(rows[0][k], float) else rows[0][k])
                      for k in rows[0]} for name, rows in runs.items()}
    big = f"b{args.batch}"

    def ratio(a: str, b: str, key: str) -> float:
        return round(results[a][key] / results[b][key], 3)

    ratios = {
        "compressed_vs_all_tokens_b1": ratio("all_tokens", "mvtc", "ms_per_query_b1"),
        f"compressed_vs_all_tokens_{big}": ratio("all_tokens", "mvtc", f"ms_per_query_{big}"),
    }
    for k in ks:
        ratios[f"k{k}_pruned_vs_unpruned_b1"] = ratio("mvtc", f"mvtc_k{k}", "ms_per_query_b1")
        ratios[f"k{k}_pruned_vs_unpruned_{big}"] = ratio("mvtc", f"mvtc_k{k}", f"ms_per_query_{big}")
        ratios[f"k{k}_train_pruned_vs_unpruned"] = ratio(f"mvtc_k{k}", "mvtc", "train_triples_per_second")
    return {
        "benchmark": "query",
        "scale": args.scale or "tiny",
        "device": (torch.cuda.get_device_name() if device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
        "dtype": str(dtype).removeprefix("torch."),
        "batch": args.batch, "train_batch": args.train_batch, "text_tokens": args.text_tokens, "rounds": args.rounds,
        "pruning_order": order,
        "results": results,
        "ratios": ratios,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), help="a published shape with random weights (GPU)")
    ap.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--text-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--k", type=int, nargs="+", help="pruned attention sub-blocks, one configuration each (default: L/2)")
    ap.add_argument("--rounds", type=int, default=1, help="measure every configuration this many times, "
                    "alternating, and report the medians")
    ap.add_argument("--similarity", help="a similarity stage's output (metrics/similarity.json): prune its ranking's "
                    "first K layers (default: the top K)")
    print(json.dumps(measure(ap.parse_args()), indent=2))


if __name__ == "__main__":
    main()
