"""Stage `similarity`: per decoder layer, the cosine similarity between the attention sub-block's
input and output on calibration queries; writes the layer ranking the `calibrate` stage prunes by.

Image tokens here come from the MVTC at its seeded initialisation (attention pooling of the
projected image tokens, see elmm.model), i.e. exactly the decoder input training starts from.
"""

import sys

from _common import check_layers, device, params, parse_args, setup
from elmm.batches import calibration_batches, forward_batch
from elmm.io import write_csv_rows, write_json
from elmm.model_io import build_model
from elmm.pruning.layers import measure_similarity, rank_layers
from elmm.workspace import open_workspace


def main(argv: list[str] | None = None) -> None:
    parse_args("similarity", __doc__, argv)
    p = params()
    setup(p.seed)
    ws = open_workspace(p)
    check_layers(p, ws.backbone.num_layers)
    model = build_model(ws, seed=p.seed, head="completion", knowledge=False).to(device())
    batches = calibration_batches(ws, model, p.prune.samples, p.prune.batch_size, p.seed)

    def run(batch):
        forward_batch(model, batch)
        return batch["decoder_mask"]

    sims = measure_similarity(ws.backbone.layers, run, batches)
    ranking = rank_layers(sims)
    result = {"layers": len(sims), "samples": sum(len(b["text"].ids) for b in batches),
              "similarity": [round(s, 6) for s in sims], "ranking": ranking}
    write_json("data/pruning/similarity.json", result)
    write_json("metrics/similarity.json", result)
    write_csv_rows("metrics/plots/similarity.csv", [{"layer": i, "cosine": round(s, 6)} for i, s in enumerate(sims)])
    print("similarity: " + ", ".join(f"L{i}={s:.4f}" for i, s in enumerate(sims)))
    print(f"similarity: pruning order (most similar first): {ranking}")


if __name__ == "__main__":
    main(sys.argv[1:])
