"""LoRA fine-tuning of the pruned ELMM model: the loop, its progress and the lr schedule.

One optimizer step, top-down: the step's training queries -> their negatives (`negatives`) ->
model inputs (`batches`) -> scores of the target and the negatives only (`model`) -> the loss
(`model.elmm_loss`) -> backward -> AdamW (fused).

- **Distributed** (`distributed`). Under torchrun the model is wrapped in DDP. `train.batch_size`
  is the *global* micro-batch: every rank takes a disjoint contiguous slice of each one, and the
  loss is weighted so the summed gradient equals the single-process gradient of the whole global
  batch. Logging, validation, checkpoints and the saved model come from rank 0 only.
- **Randomness is a function of the position** (`seeds`): the data order of epoch e, the
  negatives of step s (drawn for the whole global batch, then sliced) and the LoRA dropout of
  step s on rank k. A resumed run and a run with another world size see the same batches.
- **Checkpoints** (`checkpointing`): every `train.checkpoint_every` steps and at every epoch end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch.profiler import record_function
from tqdm import tqdm

from .batches import forward_batch, make_batch
from .checkpointing import Checkpoints, TrainingProgress, restore, snapshot
from .config import TrainParams
from .device import autocast
from .distributed import Dist, all_sum, barrier, broadcast_int, wrap_ddp
from .kg.queries import FilterIndex, Queries
from .model import ELMM, elmm_loss, softmax_loss
from .negatives import NegativeSampler
from .seeds import DROPOUT, NEGATIVES, derive_seed, epoch_order, generator
from .workspace import Workspace


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to zero at `total` steps."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


class TrainingInterrupted(RuntimeError):
    """Raised by the `stop_after` test hook, as if the process had been killed after that step."""


#: Parameters with one row per entity (and the relational entity token's rows per relation, as a
#: KGE model's relation table): a KGE model trains such tables at ~1e-2, LoRA at ~3e-4.
ENTITY_TABLES = ("completion.entities.", "entity_embedding.", "entity_tokens", "relation_scales")


def param_groups(named: list[tuple[str, torch.nn.Parameter]], tp: TrainParams) -> list[dict]:
    """The optimizer's groups: everything at train.lr, and, when train.entity_lr_scale is not 1, the
    per-entity tables (`ENTITY_TABLES`) at lr x entity_lr_scale (LambdaLR scales both the same way)."""
    tables = [p for n, p in named if n.startswith(ENTITY_TABLES)]
    if tp.entity_lr_scale == 1.0 or not tables:
        return [{"params": [p for _, p in named]}]
    rest = [p for n, p in named if not n.startswith(ENTITY_TABLES)]
    return [{"params": rest}, {"params": tables, "lr": tp.lr * tp.entity_lr_scale}]


def train_model(model: ELMM, ws: Workspace, train_queries: Queries, train_filter: FilterIndex, tp: TrainParams, *,
                seed: int, validate: Callable[[int], dict] | None = None,
                log: Callable[[str, float, int], None] = lambda name, value, step: None,
                checkpoints: Checkpoints | None = None, dist: Dist | None = None,
                stop_after: int | None = None, progress: bool = True) -> dict:
    """Train the trainable parameters of `model` with the self-denoising BCE loss (eq. 15), or with
    `train.loss: softmax` the target's cross-entropy against every entity (model.softmax_loss).

    `validate(epoch)` (rank 0 only) is called before training and after every epoch and returns
    the validation metrics; the parameters of the best validation MRR are restored into `model`
    at the end (on rank 0, the rank that saves). `log(name, value, step)` receives the curves
    (rank 0 only); on resume the history up to the checkpoint is replayed through it first.
    Returns a summary: steps, epochs, final_loss (EMA), train_queries, best_epoch, valid_best_mrr.
    """
    dist = dist or Dist()
    device = next(model.parameters()).device
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    steps_per_epoch = math.ceil(len(train_queries) / (tp.batch_size * tp.grad_accum))
    total = tp.epochs * steps_per_epoch
    if tp.max_steps is not None:
        total = min(total, tp.max_steps)
    sampler = NegativeSampler(tp)
    every_entity = tp.loss == "softmax"  # the target against every entity: no negatives drawn
    # The fused kernel is AdamW's update in one pass over each tensor: the completion layer's
    # [entities, 3D] rows made the per-op update 13% of a step at 14,541 entities (benchmarks/train_step.py).
    opt = torch.optim.AdamW(param_groups(named, tp), lr=tp.lr, weight_decay=tp.weight_decay,
                            fused=device.type in ("cpu", "cuda")) if params else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tp.warmup_steps, total)) if params else None
    state = TrainingProgress()

    def emit(name: str, value: float, step: int) -> None:
        state.history.append([name, float(value), int(step)])
        if dist.main:
            log(name, float(value), int(step))

    def run_validation(epoch: int, step: int) -> None:
        if validate is not None and dist.main:
            m = validate(epoch)
            for key in ("mrr", "hits_at_1", "hits_at_10"):
                emit(f"valid/{key}", m[key], step)
            emit("epoch", epoch, step)
            if m["mrr"] > state.best_mrr:
                state.best_mrr, state.best_epoch, state.best_state = m["mrr"], epoch, snapshot(named)
        barrier(dist)

    def summary(epochs: int) -> dict:
        return {"steps": state.step, "epochs": epochs, "final_loss": state.ema,
                "train_queries": len(train_queries), "best_epoch": state.best_epoch,
                "valid_best_mrr": max(state.best_mrr, 0.0)}

    meta = checkpoints.load([n for n, _ in named]) if checkpoints is not None and params and total else None
    # Rank 0 decides; every rank must then have read the same checkpoint (shared storage).
    resume_step = broadcast_int(meta["step"] if meta else -1, dist, device)
    if resume_step >= 0:
        if meta is None or meta["step"] != resume_step:
            where = checkpoints.path if checkpoints else "data/checkpoints"
            raise RuntimeError(f"rank {dist.rank}: cannot read the checkpoint rank 0 resumes from (step "
                               f"{resume_step}); {where} must be on storage shared by all nodes")
        state = restore(meta, named, opt, sched)
        sampler.table = state.negatives
        if dist.main:
            print(f"train: resuming from {checkpoints.path} at step {state.step} of {total}")
            for name, value, step in state.history:
                log(name, value, step)
    else:
        run_validation(0, 0)  # the untrained starting point: the curve's first value
    if total == 0 or not params:
        return summary(0)

    ddp = wrap_ddp(model, dist)

    def optimizer_step(group: list[torch.Tensor], step: int) -> float:
        """One optimizer step over the micro-batches of `group`; returns the global mean loss."""
        sampler.refresh(model, step)
        gen = generator(seed, NEGATIVES, step)
        torch.manual_seed(derive_seed(seed, DROPOUT, step, dist.rank))  # LoRA dropout
        n_group = sum(len(i) for i in group)
        loss_sum = 0.0
        for j, idx in enumerate(group):
            # Phases named for the profiler (benchmarks/train_step.py); free when it is off.
            with record_function("step: negatives and filter mask"):
                q = train_queries.subset(idx)
                known = train_filter.mask(q.anchors, q.relations, q.directions)
                # Drawn for the whole global micro-batch on every rank, then sliced: the same
                # negatives whatever the world size.
                neg, neg_mask = (None, None) if every_entity else sampler.sample(q, known, gen)
            lo, hi = dist.slice(len(idx))
            # A rank whose slice is empty still runs one row with weight 0, so that the
            # gradient all-reduce sees every rank.
            rows = slice(lo, hi) if hi > lo else slice(0, 1)
            weight = (hi - lo) / n_group * dist.world  # DDP averages over ranks: undo it
            with ddp.no_sync() if dist.enabled and j < len(group) - 1 else nullcontext():
                qs = q.subset(rows)
                with record_function("step: make_batch"):
                    batch = make_batch(ws, qs, train=True, negatives=None if every_entity else neg[rows])
                # bce scores only the target (column 0) and the negatives (columns 1..K); softmax every entity.
                candidates = None if every_entity else torch.cat([qs.targets[:, None].cpu(), neg[rows]], dim=1).to(device)
                with autocast(device, tp.precision), record_function("step: forward"):
                    out = forward_batch(ddp, batch, candidates)
                with record_function("step: loss"):
                    if every_entity:
                        loss = softmax_loss(out.scores.float(), qs.targets.to(device), known[rows].to(device),
                                            None if tp.self_denoise else qs.anchors.to(device), tp.label_smoothing)
                    else:
                        b, c = candidates.shape
                        loss = elmm_loss(out.scores.float(), torch.zeros(b, dtype=torch.long, device=device),
                                         torch.arange(1, c, device=device).expand(b, c - 1), neg_mask[rows].to(device))
                    if out.extra_loss is not None:  # the knowledge path's lambda * L_align
                        loss = loss + out.extra_loss.float()
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite training loss ({loss.item()}) at step {step + 1}; "
                        f"lower train.lr (now {tp.lr}) or check the inputs")
                with record_function("step: backward"):
                    (loss * weight).backward()
            loss_sum += loss.item() * (hi - lo)
        loss_sum = all_sum(loss_sum, dist, device)
        with record_function("step: optimizer"):
            if tp.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, tp.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        return loss_sum / n_group

    bar = tqdm(total=total, initial=state.step, desc="train", unit="step", disable=not (progress and dist.main))
    stopped_early = None
    for epoch in range(state.step // steps_per_epoch, tp.epochs):
        if state.step >= total:
            break
        # Early stopping: `patience` epochs without a better validation MRR (rank 0 decides).
        stale = tp.patience and validate is not None and dist.main and epoch - state.best_epoch >= tp.patience
        if broadcast_int(int(bool(stale)), dist, device):
            stopped_early = epoch
            break
        model.train()
        order = epoch_order(len(train_queries), seed, epoch)
        chunks = [order[i:i + tp.batch_size] for i in range(0, len(order), tp.batch_size)]
        groups = [chunks[i:i + tp.grad_accum] for i in range(0, len(chunks), tp.grad_accum)]
        for g in range(state.step - epoch * steps_per_epoch, len(groups)):
            batch_loss = optimizer_step(groups[g], state.step)
            state.step += 1
            state.epoch = epoch
            state.ema = batch_loss if state.ema is None else 0.95 * state.ema + 0.05 * batch_loss
            emit("train/loss", batch_loss, state.step)
            emit("train/lr", sched.get_last_lr()[0], state.step)
            bar.set_postfix(loss=f"{state.ema:.4f}", epoch=epoch + 1, refresh=False)  # redraw at the bar's own interval
            bar.update(1)
            epoch_end = g == len(groups) - 1 or state.step >= total
            if epoch_end:
                run_validation(epoch + 1, state.step)
            due = tp.checkpoint_every and state.step % tp.checkpoint_every == 0
            if checkpoints is not None and dist.main and (due or epoch_end):
                state.negatives = sampler.table
                checkpoints.save(state, named, opt, sched)
            if stop_after is not None and state.step >= stop_after:
                bar.close()
                raise TrainingInterrupted(f"stopped after step {state.step} (test hook)")
            if state.step >= total:
                break
    bar.close()
    if dist.main and state.best_state is not None:
        with torch.no_grad():
            for n, p in named:
                p.copy_(state.best_state[n])
    return {**summary(min(tp.epochs, math.ceil(state.step / steps_per_epoch))), "stopped_early": stopped_early}
