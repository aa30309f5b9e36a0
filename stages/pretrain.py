"""Stage `pretrain`: make the backbone that every later stage adapts.

For `model.backbone: tiny` (or `tiny-qwen2-vl`): build the tiny model with a tokenizer trained on
the KG's text, pretrain it on captioned pictures and on reading the KG's descriptions and training
triples (elmm.pretraining), and save it with `save_pretrained` (safetensors) to data/backbone.
metrics/pretrain.json sets what the pretrained weights do (held-out caption accuracy per
attribute, held-out loss with all or one layer's attention zeroed) beside the same numbers for
the random-init weights; metrics/plots/pretrain.csv is the loss curve.

For a hub name or a local checkpoint directory it trains nothing and only records the reference.
"""

import sys

import numpy as np

from _common import params, parse_args, setup
from elmm.backbone import TINY_BACKBONES, make_tiny_backbone, save_backbone, write_backbone_pointer
from elmm.io import write_csv_rows, write_json
from elmm.kg.format import load_kg
from elmm.pretraining import (
    caption_pictures,
    evaluate_pretraining,
    evenly_spaced,
    pretrain,
    reading_exercises,
    text_corpus,
    tokenizer_texts,
)

OUT_DIR = "data/backbone"


def main(argv: list[str] | None = None) -> None:
    parse_args("pretrain", __doc__, argv)
    p = params()
    setup(p.seed)
    if p.model.backbone not in TINY_BACKBONES:
        write_backbone_pointer(OUT_DIR, p.model.backbone)
        write_json("metrics/pretrain.json", {"backbone": p.model.backbone, "pretrained_here": False})
        write_csv_rows("metrics/plots/pretrain.csv", [{"step": 0, "caption_loss": "", "text_loss": "", "reading_loss": ""}])
        print(f"pretrain: {p.model.backbone} is used as it is; {OUT_DIR} records the reference")
        return

    kg = load_kg("data/kg")
    pp, tiny, layer = p.pretrain, p.model.tiny, p.encode.feature_layer
    family = TINY_BACKBONES[p.model.backbone]
    backbone = make_tiny_backbone(tiny, tokenizer_texts(kg), p.seed, family)
    corpus = text_corpus(kg, pp.heldout_text)
    heldout_lines = evenly_spaced(corpus.heldout, pp.heldout_lines)
    pictures = caption_pictures(pp.pictures, tiny.image_size, p.seed, stream=0)
    heldout = caption_pictures(pp.heldout_pictures, tiny.image_size, p.seed, stream=1)
    taken = {n.lower() for n in kg.entities["name"]}  # exercises are about invented entities only
    exercises = reading_exercises(pp.heldout_pictures, p.seed, 0, taken)
    print(f"pretrain: {len(pictures)} captioned pictures, {len(corpus.descriptions)} descriptions, "
          f"{len(corpus.triples)} verbalised train triples ({len(corpus.heldout)} lines, {len(heldout_lines)} evaluated, and "
          f"{len(heldout)} pictures held out)")
    random_init = evaluate_pretraining(backbone, heldout, heldout_lines, layer, exercises)

    window: dict[str, list[float]] = {"caption": [], "text": [], "reading": []}
    curve: list[dict] = []

    def log(name: str, value: float, step: int) -> None:
        window[name.split("/")[1].removesuffix("_loss")].append(value)
        if step % 10 == 0 or step == pp.steps:  # a point per 10 steps: the mean of each kind's losses
            curve.append({"step": step, **{f"{k}_loss": round(float(np.mean(v)), 5) if v else ""
                                           for k, v in window.items()}})
            for v in window.values():
                v.clear()

    summary = pretrain(backbone, corpus, pictures, pp, feature_layer=layer, seed=p.seed, log=log, taken_names=taken)
    pretrained = evaluate_pretraining(backbone, heldout, heldout_lines, layer, exercises)
    save_backbone(OUT_DIR, backbone, {"kind": f"tiny-{family}", "seed": p.seed, "params": tiny.__dict__,
                                      "pretrained": True})
    write_json("metrics/pretrain.json", {
        "backbone": p.model.backbone, "pretrained_here": True, **summary,
        "corpus": {"pictures": len(pictures), "descriptions": len(corpus.descriptions),
                   "triples": len(corpus.triples), "heldout_lines": len(corpus.heldout),
                   "heldout_lines_evaluated": len(heldout_lines), "heldout_pictures": len(heldout)},
        "pretrained": pretrained, "random_init": random_init,
    })
    write_csv_rows("metrics/plots/pretrain.csv", curve)
    acc = pretrained["caption_accuracy"]
    print(f"pretrain: reading accuracy on new exercises {pretrained['reading_accuracy']:.2f} (random init "
          f"{random_init['reading_accuracy']:.2f}; without attention {pretrained['reading_accuracy_without_attention']:.2f})")
    print(f"pretrain: {summary['steps']} steps in {summary['seconds']} s; held-out caption accuracy "
          + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    for kind in ("caption", "text"):
        print(f"pretrain: held-out {kind} loss {pretrained['heldout_loss'][kind]:.3f} "
              f"(random init {random_init['heldout_loss'][kind]:.3f}); without attention +"
              f"{pretrained['rise_without_attention'][kind]:.3f} nats (random init "
              f"{random_init['rise_without_attention'][kind]:+.3f})")


if __name__ == "__main__":
    main(sys.argv[1:])
