"""Stage `train`: LoRA fine-tuning of the pruned model with MVTC and the completion layer.

Logs the training curves and per-epoch validation metrics with DVCLive (metrics/train); keeps the
parameters of the best validation MRR epoch and saves them under data/model.
"""

import numpy as np
import torch
from _common import device, params, setup
from dvclive import Live

from elmm.evaluation import FilterIndex
from elmm.workspace import (PRUNING_FILE, add_lora, build_model, open_workspace, queries_from_triples, save_trained,
                            set_trainable)
from elmm.training import evaluate_ranking, train_model


def main() -> None:
    p = params()
    setup(p.seed)
    tp = p.train
    dev = device()
    ws = open_workspace(p)
    model = build_model(ws, f"data/pruning/{PRUNING_FILE}", seed=p.seed)
    lora = add_lora(model, tp.lora.r, tp.lora.alpha, tp.lora.dropout)
    trainable, total = set_trainable(model)
    model.to(dev)
    print(f"train: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%); "
          f"pruned layers {model.config.pruned_layers}; device {dev}")

    kg = ws.kg
    train_q = queries_from_triples(kg.triples["train"])
    valid_q = queries_from_triples(kg.triples["valid"])
    train_filter = FilterIndex(kg.triples["train"], kg.num_entities)
    # Validation filters use train + valid only: the test split is touched by `evaluate` alone.
    valid_filter = FilterIndex(np.concatenate([kg.triples["train"], kg.triples["valid"]]), kg.num_entities)

    best = {"mrr": -1.0, "epoch": 0, "state": None}
    with Live("metrics/train", dvcyaml=None, save_dvc_exp=False, report=None) as live:
        live.log_params({"lr": tp.lr, "batch_size": tp.batch_size, "trainable_parameters": trainable})

        def log(name, value, step):
            live.step = step
            live.log_metric(name, value, plot=True)

        # validation points are logged at the global step where they were taken
        steps_done = {"n": 0}
        _log = log

        def log(name, value, step):
            steps_done["n"] = step
            _log(name, value, step)

        def validate(epoch):
            live.step = steps_done["n"]
            res = evaluate_ranking(model, ws, valid_q, valid_filter, p.evaluate.batch_size, precision=tp.precision,
                                   desc="valid", progress=False)
            m = res.metrics
            for key in ("mrr", "hits_at_1", "hits_at_10"):
                live.log_metric(f"valid/{key}", m[key], plot=True)
            live.log_metric("epoch", epoch, plot=False)
            print(f"train: epoch {epoch} valid mrr {m['mrr']:.4f} hits@10 {m['hits_at_10']:.4f}")
            if m["mrr"] > best["mrr"]:
                best.update(mrr=m["mrr"], epoch=epoch,
                            state={k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad})
            return m

        validate(0)  # the untrained starting point: the curve's first value (and the only one at max_steps=0)
        summary = train_model(model, ws, train_q, train_filter, tp, seed=p.seed, validate=validate, log=log)
        if best["state"] is not None:
            with torch.no_grad():
                named = dict(model.named_parameters())
                for k, v in best["state"].items():
                    named[k].copy_(v)
        live.summary.update({"best_epoch": best["epoch"], "valid_best_mrr": max(best["mrr"], 0.0), **summary})
    save_trained("data/model", model, lora, {"summary": summary, "best_epoch": best["epoch"],
                                             "trainable_parameters": trainable, "total_parameters": total})
    print(f"train: {summary['steps']} steps; best validation MRR {max(best['mrr'], 0.0):.4f} at epoch {best['epoch']}")


if __name__ == "__main__":
    main()
