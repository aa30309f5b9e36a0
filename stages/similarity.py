"""Stage `similarity`: per decoder layer, the cosine similarity between the attention sub-block's
input and output on calibration queries, read two ways (`residual`: the residual stream before and
after the sub-block; `attention`: the attention module's own input and output); writes the layer
ranking the `calibrate` stage prunes by, from the reading `prune.similarity` names.

Both readings are also measured on a random-init control: the same backbone architecture with
freshly initialised weights, fed the same queries. What the backbone's curves show beyond the
control is what its weights learned; what both show comes from the architecture. The control's
seed is derived from `seed` (elmm.seeds.RANDOM_INIT), not `seed` itself: the tiny default backbone
is random weights drawn with `seed`, and would otherwise be its own control.

Image tokens here come from the MVTC at its seeded initialisation (attention pooling of the
projected image tokens, see elmm.model), i.e. exactly the decoder input training starts from.
"""

import dataclasses
import sys

from _common import check_layers, device, params, parse_args, setup
from elmm.backbone import random_init_copy
from elmm.batches import calibration_batches, forward_batch
from elmm.io import write_csv_rows, write_json
from elmm.model_io import build_analysis_model
from elmm.pruning.layers import SIMILARITY_READINGS, measure_similarity, rank_layers
from elmm.seeds import RANDOM_INIT, derive_seed
from elmm.workspace import open_workspace


def measure(model, batches: list[dict]) -> dict[str, list[float]]:
    """Both readings on `model`'s backbone, through the ELMM forward (MVTC at its seeded init)."""
    def run(batch):
        forward_batch(model, batch)
        return batch["decoder_mask"]

    return measure_similarity(model.backbone.layers, run, batches)


def main(argv: list[str] | None = None) -> None:
    parse_args("similarity", __doc__, argv)
    p = params()
    setup(p.seed)
    ws = open_workspace(p)
    check_layers(p, ws.backbone.num_layers)
    model = build_analysis_model(ws, p.seed).to(device())
    batches = calibration_batches(ws, model, p.prune.samples, p.prune.batch_size, p.seed)
    trained = measure(model, batches)
    ranking = rank_layers(trained[p.prune.similarity])
    # The control: the same queries (their masks depend on the configuration only) through a fresh backbone.
    del model
    control_seed = derive_seed(p.seed, RANDOM_INIT)
    control_ws = dataclasses.replace(ws, backbone=random_init_copy(ws.backbone, control_seed))
    del ws
    control = measure(build_analysis_model(control_ws, p.seed).to(device()), batches)
    trained, control = ({k: [round(v, 6) for v in vals] for k, vals in c.items()} for c in (trained, control))

    result = {"layers": len(ranking), "samples": sum(len(b["text"].ids) for b in batches),
              "ranked_by": p.prune.similarity, "ranking": ranking,
              "backbone": trained, "random_init": {"seed": control_seed, **control}}
    write_json("data/pruning/similarity.json", result)
    write_json("metrics/similarity.json", result)
    write_csv_rows("metrics/plots/similarity.csv", [
        {"layer": i, **{k: trained[k][i] for k in SIMILARITY_READINGS},
         **{f"{k}_random_init": control[k][i] for k in SIMILARITY_READINGS}} for i in range(len(ranking))])
    for name, curves in (("backbone", trained), ("random init", control)):
        for k in SIMILARITY_READINGS:
            print(f"similarity: {name:11s} {k:9s} " + ", ".join(f"L{i}={s:.4f}" for i, s in enumerate(curves[k])))
    print(f"similarity: pruning order by {p.prune.similarity} (most similar first): {ranking}")


if __name__ == "__main__":
    main(sys.argv[1:])
