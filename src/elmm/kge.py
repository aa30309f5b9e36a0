"""The structure-only KGE baseline: PyKEEN's RotatE on the train graph (docs/baselines.md).

What a model gets from the graph alone, with no text and no images. RotatE is trained on the train
split only (sLCWA, 'basic' negative sampling, self-adversarial NSSA loss, Adam), early-stopped on the
valid split (PyKEEN's filtered realistic MRR on valid, filters train + valid: the test split never
enters PyKEEN). Its scores for the test queries (`[queries, entities]`, in the order of
`queries_from_triples(test)`) are then ranked by the project's own `elmm.evaluation`, with the
candidates, filters and tie policy of the model (`elmm.baselines.rank_queries`).

PyKEEN is an optional dependency (`pip install -e '.[kge]'`), imported only when a KGE is trained;
without it set `baselines.kge: none` in params.yaml.

    python -m elmm.kge tune [--kg data/kg]

trains the grid `dims x lrs` (default {64, 128, 256} x {1e-3, 5e-3, 1e-2}) on a KG and prints the
configuration with the best valid MRR as JSON: the command that chose the `baselines` defaults.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .baselines import expected_rank_values, rank_queries
from .config import BaselinesParams
from .kg.queries import HEAD, TAIL, FilterIndex, Queries, queries_from_triples

__all__ = ["KGEConfig", "TrainedKGE", "KGEUnavailable", "pykeen_available", "train_kge", "score_queries", "tune"]

#: Improvement (relative) the early stopper requires to reset its patience.
RELATIVE_DELTA = 0.002
#: (query, entity) distances computed at once when scoring every entity (`all_entity_distances`,
#: float64: 32 MB a copy): query batches are sized to stay under it, so that scoring memory does not
#: grow with the number of queries.
SCORE_BUDGET = 2**22
ADVERSARIAL_TEMPERATURE = 1.0


class KGEUnavailable(RuntimeError):
    """PyKEEN is not installed."""


_DEFAULTS = BaselinesParams()


@dataclass(frozen=True)
class KGEConfig:
    """RotatE's settings: params.yaml `baselines` less `kge` (defaults from elmm.config, one source)."""

    dim: int = _DEFAULTS.dim
    lr: float = _DEFAULTS.lr
    max_epochs: int = _DEFAULTS.max_epochs
    patience: int = _DEFAULTS.patience  # evaluations without a relative improvement of RELATIVE_DELTA before stopping
    eval_every: int = _DEFAULTS.eval_every  # epochs between evaluations on valid
    negatives: int = _DEFAULTS.negatives  # per positive triple
    batch_size: int = _DEFAULTS.batch_size
    margin: float = _DEFAULTS.margin  # RotatE's gamma in the NSSA loss

    @classmethod
    def from_params(cls, b: BaselinesParams) -> KGEConfig:
        return cls(**{f.name: getattr(b, f.name) for f in fields(cls)})


@dataclass
class TrainedKGE:
    model: Any  # a pykeen Model
    config: KGEConfig
    epochs_run: int
    best_epoch: int | None
    stopped_early: bool
    valid_history: list[float] = field(default_factory=list)  # PyKEEN's valid MRR at each evaluation
    seconds: float = 0.0

    def report(self) -> dict[str, Any]:
        return {"model": "RotatE (PyKEEN)", **asdict(self.config), "epochs_run": self.epochs_run,
                "best_epoch": self.best_epoch, "stopped_early": self.stopped_early,
                "valid_mrr_history": [round(v, 6) for v in self.valid_history],
                "train_seconds": round(self.seconds, 2)}


_PYSTOW_TMP: str | None = None


def _pykeen():
    """Import PyKEEN (lazily), keeping its data directory out of the home directory."""
    global _PYSTOW_TMP
    if "PYSTOW_HOME" not in os.environ and _PYSTOW_TMP is None:
        _PYSTOW_TMP = tempfile.mkdtemp(prefix="elmm-pystow-")
        os.environ["PYSTOW_HOME"] = _PYSTOW_TMP
        atexit.register(shutil.rmtree, _PYSTOW_TMP, True)
    try:
        import pykeen.pipeline
        import pykeen.triples
    except ImportError as e:
        raise KGEUnavailable(f"the KGE baseline needs PyKEEN ({e}): pip install -e '.[kge]', "
                             "or set baselines.kge: none in params.yaml") from None
    return pykeen


_MODEL_CLASS = None


def rotate_class():
    """PyKEEN's RotatE with its distance |h * r - t|_2 taken on the real view of the complex vectors.

    The same function; torch's `vector_norm` of a complex tensor is ~25x slower on CPU than the sum
    of squares of its real view, and was 3/4 of the training time.
    """
    global _MODEL_CLASS
    if _MODEL_CLASS is not None:
        return _MODEL_CLASS
    _pykeen()
    from pykeen.models import RotatE
    from pykeen.nn.modules import RotatEInteraction
    from pykeen.utils import ensure_complex, estimate_cost_of_sequence

    class RealViewRotatEInteraction(RotatEInteraction):
        def forward(self, h, r, t):
            h, r, t = ensure_complex(h, r, t)
            against_all = _against_all_entities(h, r, t)
            if against_all is not None:
                return -all_entity_distances(*against_all)
            # as RotatEInteraction: rotate whichever side is cheaper (|h * r - t| = |h - conj(r) * t|, |r| = 1)
            if estimate_cost_of_sequence(h.shape, r.shape) < estimate_cost_of_sequence(r.shape, t.shape):
                h = h * r
            else:
                t = t * torch.conj(r)
            # clamp: the gradient of sqrt at an exact 0 distance would be infinite
            return -torch.view_as_real(h - t).square().sum(dim=(-1, -2)).clamp_min(1e-30).sqrt()

    class ElmmRotatE(RotatE):
        """RotatE (PyKEEN) with the real-view distance of `RealViewRotatEInteraction`."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.interaction = RealViewRotatEInteraction()

    _MODEL_CLASS = ElmmRotatE
    return ElmmRotatE


def _against_all_entities(h, r, t):
    """`(queries [B, D], entities [N, D])` when (h, r, t) is a `score_t` / `score_h` call (PyKEEN's
    broadcast shapes `[B, 1, D], [B, 1, D], [1, N, D]` or `[1, N, D], [B, 1, D], [B, 1, D]`), else None.

    The rotated side is the query: h * r against every t, or t * conj(r) against every h
    (|h * r - t| = |h - conj(r) * t| since |r| = 1, as RotatEInteraction itself uses)."""
    if not (h.dim() == r.dim() == t.dim() == 3 and r.shape[1] == 1):
        return None
    if t.shape[0] == 1 and h.shape[1] == 1 and t.shape[1] > 1:
        return (h * r)[:, 0], t[0]
    if h.shape[0] == 1 and t.shape[1] == 1 and h.shape[1] > 1:
        return (t * torch.conj(r))[:, 0], h[0]
    return None


def all_entity_distances(queries: torch.Tensor, entities: torch.Tensor) -> torch.Tensor:
    """`[B, N]` float32 distances |q_b - e_n|_2 of complex `[B, D]` queries to complex `[N, D]` entities.

    As one matrix product, |q|^2 + |e|^2 - 2 Re<q, e>, in float64 (cancellation costs about
    |q|^2 / d^2 ulps: in float64 far below float32's own rounding of the direct form). The direct
    form builds a `[B, N, D]` complex intermediate: at 14,541 entities and D = 256 that was 32 ms a
    query and 768 MB of fresh pages every 9 queries; this is under 1 ms.
    """
    q = torch.view_as_real(queries).reshape(queries.shape[0], -1).double()
    e = torch.view_as_real(entities).reshape(entities.shape[0], -1).double()
    squared = q.square().sum(1, keepdim=True) + e.square().sum(1) - 2.0 * (q @ e.T)
    # clamp as the direct form: no infinite gradient at an exact 0 (and no negative rounding here)
    return squared.clamp_min(1e-30).sqrt().float()


def pykeen_available() -> bool:
    try:
        _pykeen()
    except KGEUnavailable:
        return False
    return True


def train_kge(train: np.ndarray, valid: np.ndarray, num_entities: int, num_relations: int, config: KGEConfig,
              seed: int) -> TrainedKGE:
    """Train RotatE on `train`, early-stopped on `valid` (entity and relation ids kept as they are).

    The weights of the best evaluation are kept whether or not the stopper triggers (PyKEEN
    restores them only when it stops early). Deterministic on CPU for a fixed `seed`.
    """
    pykeen = _pykeen()
    make = lambda x: pykeen.triples.CoreTriplesFactory.create(  # noqa: E731
        mapped_triples=torch.as_tensor(np.asarray(x, dtype=np.int64).reshape(-1, 3)),
        num_entities=num_entities, num_relations=num_relations)
    training, validation = make(train), make(valid)
    # PyKEEN runs gc.collect() after every epoch; with the objects already alive (PyKEEN's imports
    # among them) frozen out of the collector's view, that no longer costs ~0.3 s an epoch.
    gc.freeze()
    try:
        with _quiet():
            return _train(pykeen, training, validation, config, seed)
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def _quiet():
    """PyKEEN and torch_max_mem log every evaluation and warn about CPU batch sizes at INFO/WARNING:
    keep the stage's log to what it prints itself (errors still show)."""
    loggers = [logging.getLogger(name) for name in ("pykeen", "torch_max_mem")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _train(pykeen, training, validation, config: KGEConfig, seed: int) -> TrainedKGE:
    with tempfile.TemporaryDirectory(prefix="elmm-kge-") as tmp:
        best_path = Path(tmp) / "best.pt"
        start = time.perf_counter()
        result = pykeen.pipeline.pipeline(
            training=training, validation=validation,
            testing=validation, use_testing_data=False,  # PyKEEN never sees the test split
            model=rotate_class(), model_kwargs=dict(embedding_dim=config.dim),
            training_loop="sLCWA",
            negative_sampler="basic", negative_sampler_kwargs=dict(num_negs_per_pos=config.negatives),
            loss="NSSALoss", loss_kwargs=dict(margin=config.margin, adversarial_temperature=ADVERSARIAL_TEMPERATURE),
            optimizer="Adam", optimizer_kwargs=dict(lr=config.lr),
            training_kwargs=dict(num_epochs=config.max_epochs, batch_size=config.batch_size, use_tqdm_batch=False),
            stopper="early",
            stopper_kwargs=dict(frequency=config.eval_every, patience=config.patience, relative_delta=RELATIVE_DELTA,
                                metric="inverse_harmonic_mean_rank", best_model_path=best_path,
                                clean_up_checkpoint=False),
            evaluator_kwargs=dict(filtered=True),
            evaluation_kwargs=dict(batch_size=query_batch_size(training.num_entities)),
            random_seed=seed, device="cpu", use_tqdm=False,
        )
        seconds = time.perf_counter() - start
        stopper, model = result.stopper, result.model
        if not stopper.stopped and best_path.is_file():  # ran out of epochs: go back to the best evaluation
            model.load_state_dict(torch.load(best_path, weights_only=True))
    model.eval()
    return TrainedKGE(model=model, config=config, epochs_run=len(result.losses), best_epoch=stopper.best_epoch,
                      stopped_early=bool(stopper.stopped), valid_history=[float(v) for v in stopper.results],
                      seconds=seconds)


def query_batch_size(num_entities: int) -> int:
    """Queries scored at once against all `num_entities`: the most that keep the `[queries,
    entities]` distances within `SCORE_BUDGET` cells."""
    return max(1, SCORE_BUDGET // num_entities)


def score_queries(model: Any, queries: Queries) -> torch.Tensor:
    """`[len(queries), num_entities]` RotatE scores (higher = better): `score_t` of (anchor, r) for
    tail queries, `score_h` of (r, anchor) for head queries, in batches of `query_batch_size`."""
    num_entities = model.num_entities
    out = torch.empty(len(queries), num_entities, dtype=torch.float32)
    pairs = torch.stack([queries.anchors, queries.relations], dim=1)
    step = query_batch_size(num_entities)
    with torch.inference_mode():
        for direction, score in ((TAIL, model.score_t), (HEAD, model.score_h)):
            rows = torch.nonzero(queries.directions == direction).flatten()
            for start in range(0, len(rows), step):
                chunk = rows[start:start + step]
                # score_h takes (relation, tail) rows
                out[chunk] = score(pairs[chunk] if direction == TAIL else pairs[chunk].flip(1)).float()
    return out


def kge_scorer(model: Any):
    """`score_queries` as a scorer for `elmm.baselines.rank_queries`."""
    return lambda batch: score_queries(model, batch)


# ----------------------------------------------------------------------------- tuning


def tune(kg_dir: str | Path, dims=(64, 128, 256), lrs=(1e-3, 5e-3, 1e-2), seed: int = 0,
         base: KGEConfig | None = None, log=print) -> dict[str, Any]:
    """Train every (dim, lr) of the grid on `kg_dir`; the one with the best valid MRR.

    Valid MRR here is the project's own (elmm.evaluation, realistic ranks, filters train + valid:
    the test split is not read for the choice).
    """
    from .kg.format import load_kg

    kg = load_kg(kg_dir)
    base = base or KGEConfig()
    valid_queries = queries_from_triples(kg.triples["valid"])
    filters = FilterIndex(np.concatenate([kg.triples["train"], kg.triples["valid"]]), kg.num_entities)
    runs = []
    for dim in dims:
        for lr in lrs:
            config = replace(base, dim=int(dim), lr=float(lr))
            trained = train_kge(kg.triples["train"], kg.triples["valid"], kg.num_entities, kg.num_relations, config, seed)
            ranks = rank_queries(kge_scorer(trained.model), valid_queries, filters)
            mrr = float(np.mean(1.0 / ranks["realistic"]))
            run = {"dim": int(dim), "lr": float(lr), "valid_mrr": round(mrr, 6),
                   "valid_mrr_expected_ties": round(float(np.mean(expected_rank_values(ranks)["rr"])), 6),
                   "epochs_run": trained.epochs_run, "best_epoch": trained.best_epoch,
                   "stopped_early": trained.stopped_early, "train_seconds": round(trained.seconds, 2)}
            log(json.dumps(run))
            runs.append(run)
    best = max(runs, key=lambda r: r["valid_mrr"])
    return {"best": {"dim": best["dim"], "lr": best["lr"]}, "best_valid_mrr": best["valid_mrr"], "seed": seed,
            "fixed": {k: v for k, v in asdict(base).items() if k not in ("dim", "lr")}, "kg": str(kg_dir), "runs": runs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m elmm.kge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tune", help="grid-search RotatE's dim and lr on valid MRR; prints the best as JSON")
    t.add_argument("--kg", default="data/kg", help="KG directory (default data/kg)")
    t.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    t.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 5e-3, 1e-2])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-epochs", type=int, default=KGEConfig.max_epochs)
    t.add_argument("--patience", type=int, default=KGEConfig.patience)
    t.add_argument("--eval-every", type=int, default=KGEConfig.eval_every)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base = KGEConfig(max_epochs=args.max_epochs, patience=args.patience, eval_every=args.eval_every)
    result = tune(args.kg, args.dims, args.lrs, args.seed, base, log=lambda s: print(s, file=sys.stderr))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
