"""Stage `train`: LoRA fine-tuning of the pruned model with MVTC and the completion layer.

Logs the training curves and per-epoch validation metrics with DVCLive (metrics/train), and the
trainable parameters per component (elmm.param_count) in its summary (`parameters`); keeps the
parameters of the best validation MRR epoch and saves them under data/model (the LoRA adapter in
peft's layout, the ELMM components in elmm.safetensors).

Runs unchanged as one process or under torchrun (DDP; docs/pipeline.md). Resumable:
periodic checkpoints go to data/checkpoints and a rerun with the same params, inputs and code
resumes from the last one; it is removed once data/model is saved.
"""

import sys
from pathlib import Path

import numpy as np

from _common import device, params, parse_args, setup
from elmm.checkpointing import Checkpoints, training_fingerprint
from elmm.distributed import init_distributed, shutdown_distributed
from elmm.kg.queries import FilterIndex, queries_from_triples
from elmm.model_io import add_lora, build_model, lora_config, save_trained, set_trainable
from elmm.param_count import model_parameters
from elmm.pruning.artifact import PRUNING_FILE
from elmm.ranking import evaluate_ranking
from elmm.training import train_model
from elmm.workspace import open_workspace

CHECKPOINT_DIR = "data/checkpoints"


def fingerprint(p) -> str:
    """Params that shape training, the stage's input files, and the code (the elmm package)."""
    import elmm  # here, not at the top: an `import elmm` sorts before `_common`, which must run first

    inputs = [*sorted(Path("data/kg").glob("*.parquet")), Path("data/kg/meta.json"),
              Path("data/encoded/manifest.json"), Path("data/backbone"), Path(f"data/pruning/{PRUNING_FILE}")]
    code = [Path(elmm.__file__).parent, Path(__file__).resolve(), Path(__file__).resolve().parent / "_common.py"]
    return training_fingerprint(p, [i for i in inputs if i.exists()], code)


def main(argv: list[str] | None = None, stop_after_steps: int | None = None) -> None:
    """`stop_after_steps` is a test hook: raise after that step, as if the run had been killed."""
    parse_args("train", __doc__, argv)
    p = params()
    setup(p.seed)
    tp = p.train
    dist, dev = init_distributed(device())
    say = print if dist.main else (lambda *a, **k: None)
    try:
        ws = open_workspace(p)
        model = build_model(ws, f"data/pruning/{PRUNING_FILE}", seed=p.seed)
        add_lora(model, lora_config(tp.lora.r, tp.lora.alpha, tp.lora.dropout))
        trainable, total = set_trainable(model)
        # Trainable parameters per component (elmm.param_count), and the frozen backbone's total.
        counts = model_parameters(model)
        parameters = {**{c: v["total"] for c, v in counts["components"].items() if c != "backbone_frozen"},
                      "trainable": counts["trainable"], "frozen": counts["frozen"]}
        model.to(dev)
        say(f"train: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%); "
            f"pruned layers {model.config.pruned_layers}; device {dev}; world size {dist.world}")
        say("train: trainable by component: " + ", ".join(f"{c} {n:,}" for c, n in parameters.items()
                                                          if c not in ("trainable", "frozen")))

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

        from dvclive import Live  # here: it imports tqdm, which must come after _common sets its interval

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
                live.summary["parameters"] = parameters
        finally:
            if live is not None:
                live.end()
        if dist.main:
            extra = {"summary": summary, "best_epoch": summary["best_epoch"], "trainable_parameters": trainable,
                     "total_parameters": total, "parameters": counts}
            save_trained("data/model", model, extra)
            checkpoints.clear()
            say(f"train: {summary['steps']} steps; best validation MRR {summary['valid_best_mrr']:.4f} at epoch "
                f"{summary['best_epoch']}")
    finally:
        shutdown_distributed(dist)


if __name__ == "__main__":
    main(sys.argv[1:])
