"""Stage `calibrate`: remove attention from the prune.k most similar layers, bottom-up, and fit
each compensation W_c in closed form; report the error before and after for every method."""

import sys

from _common import check_layers, device, params, parse_args, setup
from elmm.batches import calibration_batches, forward_batch
from elmm.io import read_json, write_csv_rows, write_json
from elmm.model_io import build_analysis_model
from elmm.pruning.artifact import PRUNING_FILE, save_pruning
from elmm.pruning.layers import calibrate_bottom_up
from elmm.workspace import open_workspace


def main(argv: list[str] | None = None) -> None:
    parse_args("calibrate", __doc__, argv)
    p = params()
    setup(p.seed)
    ws = open_workspace(p)
    check_layers(p, ws.backbone.num_layers)
    ranking = read_json("data/pruning/similarity.json")["ranking"]
    selected = sorted(ranking[: p.prune.k])
    model = build_analysis_model(ws, p.seed).to(device())
    batches = calibration_batches(ws, model, p.prune.samples, p.prune.batch_size, p.seed)
    n_held = int(round(len(batches) * p.prune.heldout)) if len(batches) > 1 else 0
    fit, held = batches[: len(batches) - n_held], batches[len(batches) - n_held:]

    results = calibrate_bottom_up(ws.backbone.layers, selected, lambda b: forward_batch(model, b), fit, held,
                                  method=p.prune.compensation, target=p.prune.target, damp=p.prune.ridge,
                                  init=p.prune.init)
    save_pruning(f"data/pruning/{PRUNING_FILE}", selected, {r.layer: r.weight for r in results},
                 p.prune.compensation, p.prune.init)

    split = "heldout" if held else "fit"
    per_layer, rows = [], []
    for r in results:
        per_layer.append({"layer": r.layer, **r.errors})
        e = r.errors
        rows.append({"layer": r.layer,
                     "uncompensated": round(e["none"][split][p.prune.target]["before"], 6),
                     "paper": round(e["paper"][split][p.prune.target]["after"], 6),
                     "ridge": round(e["ridge"][split][p.prune.target]["after"], 6)})

    def total(method: str, where: str, target: str) -> dict:
        before = sum(r.errors[method][where][target]["before"] for r in results)
        after = sum(r.errors[method][where][target]["after"] for r in results)
        return {"before": round(before, 6), "after": round(after, 6), "relative": round(after / before, 6) if before else 0.0}

    summary = {method: {where: {t: total(method, where, t) for t in ("global", "local")}
                        for where in ("fit", "heldout")} for method in ("ridge", "paper")} if results else {}
    write_json("metrics/calibrate.json", {
        "k": p.prune.k, "layers": selected, "compensation": p.prune.compensation, "init": p.prune.init,
        "target": p.prune.target, "ridge": p.prune.ridge,
        "fit_tokens": results[0].errors["none"]["fit"]["global"]["tokens"] if results else 0,
        "heldout_tokens": results[0].errors["none"]["heldout"]["global"]["tokens"] if results and held else 0,
        "total": summary, "per_layer": per_layer,
    })
    write_csv_rows("metrics/plots/calibrate.csv", rows or [{"layer": -1, "uncompensated": 0, "paper": 0, "ridge": 0}])
    for name in ("paper", "ridge"):
        if summary:
            s = summary[name][split][p.prune.target]
            print(f"calibrate: {name}: {split} error (sum over layers) {s['before']:.4g} -> {s['after']:.4g} "
                  f"({100 * s['relative']:.1f}%)")


if __name__ == "__main__":
    main(sys.argv[1:])
