"""What a backbone setting buys in picture perception, before spending pipeline runs on it.

    python benchmarks/caption_probe.py --steps 300 --variants base 'lr15:pretrain.lr=0.0015' \
        'p4:model.tiny.patch_size=4'

Run in a repository where `dvc repro generate` has run (it reads params.yaml and data/kg, for the
tokenizer). For each variant (params.yaml with the values given changed, as `dvc exp run -S`
changes them) the tiny backbone is built and pretrained by `elmm.pretraining.pretrain` on caption
batches only (`pretrain.caption_share` 1, `--steps` steps: the default curriculum's caption
steps are half of `pretrain.steps`), then measured on the held-out pictures:

- `caption_accuracy`: per attribute, as metrics/pretrain.json reports it: read by the decoder,
  which attends over every patch token in place;
- `token_probe`: per attribute, a linear probe (`elmm.token_probe.fit_probe`) on each picture's
  CLS token and mean patch token at `encode.feature_layer`, fitted on 2,000 training pictures:
  a linear reading of what survives pooling (MVTC passes on weighted means of the tokens); beside it
  `token_probe_random_init`, the same probe on the untrained tower (random features);
- `seconds`: the pretraining time (compare only within one run: the machine's speed drifts).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from elmm import config  # noqa: E402
from elmm.backbone import make_tiny_backbone  # noqa: E402
from elmm.experiments import with_overrides  # noqa: E402
from elmm.kg.format import load_kg  # noqa: E402
from elmm.kg.synthetic import CONCEPTS  # noqa: E402
from elmm.pretraining import Encoder, caption_accuracy, caption_pictures, pretrain, text_corpus, tokenizer_texts  # noqa: E402
from elmm.token_probe import fit_probe  # noqa: E402
from train_step import parse_variants  # noqa: E402

PROBED = ("colour", "shape", "mark")


@torch.no_grad()
def pooled_features(backbone, pictures, feature_layer: int) -> torch.Tensor:
    """[P, 2 Dv]: each picture's CLS token and mean patch token at `feature_layer`."""
    enc, out = Encoder(backbone), []
    for lo in range(0, len(pictures), 128):
        cls, patches = backbone.vision_features(enc.pixels([d for _, d in pictures[lo:lo + 128]]), feature_layer)
        out.append(torch.cat([cls, patches.mean(1)], 1).float())
    return torch.cat(out)


def probe_variant(p: config.Params, kg, steps: int, probe_pictures: int = 2000) -> dict:
    pp = dataclasses.replace(p.pretrain, steps=steps, caption_share=1.0)
    backbone = make_tiny_backbone(p.model.tiny, tokenizer_texts(kg), p.seed)
    pictures = caption_pictures(pp.pictures, p.model.tiny.image_size, p.seed, stream=0)
    heldout = caption_pictures(pp.heldout_pictures, p.model.tiny.image_size, p.seed, stream=1)
    layer = p.encode.feature_layer
    at_init = token_probe(backbone, pictures[:probe_pictures], heldout, layer)
    start = time.perf_counter()
    pretrain(backbone, text_corpus(kg, pp.heldout_text), pictures, pp, feature_layer=p.encode.feature_layer,
             seed=p.seed, progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 1), "caption_accuracy": caption_accuracy(backbone, heldout, layer),
            "token_probe": token_probe(backbone, pictures[:probe_pictures], heldout, layer),
            "token_probe_random_init": at_init}


def token_probe(backbone, train, test, layer: int) -> dict[str, float]:
    """Per attribute, the linear probe's held-out accuracy on `pooled_features`."""
    train_x, test_x = pooled_features(backbone, train, layer), pooled_features(backbone, test, layer)
    out = {}
    for attr in PROBED:
        values = CONCEPTS[attr]
        y_train = torch.tensor([values.index(getattr(look, attr)) for look, _ in train])
        y_test = torch.tensor([values.index(getattr(look, attr)) for look, _ in test])
        out[attr] = round(fit_probe(train_x, y_train, test_x, y_test), 4)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="caption steps per variant")
    ap.add_argument("--variants", nargs="+", default=["base"], metavar="NAME:KEY=VALUE,...")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kg = load_kg("data/kg")
    base = config.load_params("params.yaml")
    results = {}
    for name, overrides in parse_variants(args.variants).items():
        p = with_overrides(base, overrides)
        config.validate(p)
        results[name] = {"overrides": overrides, **probe_variant(p, kg, args.steps)}
        print(f"caption_probe: {name} {results[name]}", file=sys.stderr, flush=True)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "threads": args.threads, "steps": args.steps, "variants": results}, indent=1))


if __name__ == "__main__":
    main()
