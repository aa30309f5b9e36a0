"""Stage `train`: LoRA fine-tuning of the pruned model with MVTC and the completion layer.

Logs the training curves and per-epoch validation metrics with DVCLive (metrics/train); keeps the
parameters of the best validation MRR epoch and saves them under data/model.

Runs unchanged as one process or under torchrun (DDP; README "Training at scale"). Resumable:
periodic checkpoints go to data/checkpoints and a rerun with the same params, inputs and code
resumes from the last one; it is removed once data/model is saved.
"""

from pathlib import Path

import numpy as np
from _common import device, params, setup
from dvclive import Live

import elmm
from elmm.evaluation import FilterIndex
from elmm.training import Checkpoints, evaluate_ranking, init_distributed, shutdown_distributed, train_model, \
    training_fingerprint
from elmm.workspace import (PRUNING_FILE, add_lora, build_model, open_workspace, queries_from_triples, save_trained,
                            set_trainable)

CHECKPOINT_DIR = "data/checkpoints"


def fingerprint(p) -> str:
    """Params that shape training, the stage's input files, and the code (elmm.training)."""
    inputs = [*sorted(Path("data/kg").glob("*.parquet")), Path("data/kg/meta.json"),
              Path("data/encoded/manifest.json"), Path("data/backbone"), Path(f"data/pruning/{PRUNING_FILE}")]
    code = [Path(elmm.__file__).parent, Path(__file__).resolve(), Path(__file__).resolve().parent / "_common.py"]
    return training_fingerprint(p, [i for i in inputs if i.exists()], code)


def main(stop_after_steps: int | None = None) -> None:
    """`stop_after_steps` is a test hook: raise after that step, as if the run had been killed."""
    p = params()
    setup(p.seed)
    tp = p.train
    dist, dev = init_distributed(device())
    say = print if dist.main else (lambda *a, **k: None)
    try:
        ws = open_workspace(p)
        model = build_model(ws, f"data/pruning/{PRUNING_FILE}", seed=p.seed)
        lora = add_lora(model, tp.lora.r, tp.lora.alpha, tp.lora.dropout)
        trainable, total = set_trainable(model)
        model.to(dev)
        say(f"train: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%); "
            f"pruned layers {model.config.pruned_layers}; device {dev}; world size {dist.world}")

        kg = ws.kg
        train_q = queries_from_triples(kg.triples["train"])
        valid_q = queries_from_triples(kg.triples["valid"])
        train_filter = FilterIndex(kg.triples["train"], kg.num_entities)
        # Validation filters use train + valid only: the test split is touched by `evaluate` alone.
        valid_filter = FilterIndex(np.concatenate([kg.triples["train"], kg.triples["valid"]]), kg.num_entities)
        checkpoints = Checkpoints(CHECKPOINT_DIR, fingerprint(p), say=say)

        def validate(epoch):
            res = evaluate_ranking(model, ws, valid_q, valid_filter, p.evaluate.batch_size, precision=tp.precision,
                                   desc="valid", progress=False)
            m = res.metrics
            print(f"train: epoch {epoch} valid mrr {m['mrr']:.4f} hits@10 {m['hits_at_10']:.4f}")
            return m

        live = Live("metrics/train", dvcyaml=None, save_dvc_exp=False, report=None) if dist.main else None
        try:
            if live is not None:
                live.log_params({"lr": tp.lr, "batch_size": tp.batch_size, "trainable_parameters": trainable,
                                 "world_size": dist.world})

            def log(name, value, step):
                live.step = step
                live.log_metric(name, value, plot=name != "epoch")

            summary = train_model(model, ws, train_q, train_filter, tp, seed=p.seed, validate=validate, log=log,
                                  checkpoints=checkpoints, dist=dist, stop_after=stop_after_steps)
            if live is not None:
                live.summary.update(summary)
        finally:
            if live is not None:
                live.end()
        if dist.main:
            extra = {"summary": summary, "best_epoch": summary["best_epoch"], "trainable_parameters": trainable,
                     "total_parameters": total}
            save_trained("data/model", model, lora, extra)
            checkpoints.clear()
            say(f"train: {summary['steps']} steps; best validation MRR {summary['valid_best_mrr']:.4f} at epoch "
                f"{summary['best_epoch']}")
    finally:
        shutdown_distributed(dist)


if __name__ == "__main__":
    main()
