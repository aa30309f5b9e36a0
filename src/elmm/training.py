"""LoRA fine-tuning of the pruned ELMM model, and the ranking pass shared by validation and evaluation."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .config import TrainParams
from .evaluation import FilterIndex, RankAccumulator, compute_ranks
from .model import ELMM, elmm_loss, sample_negatives
from .workspace import Queries, Workspace, forward_batch, make_batch


def autocast(device: torch.device, precision: str):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@dataclass
class RankingResult:
    metrics: dict
    queries: int
    seconds: float  # wall time of the whole pass (batch assembly + model + ranking)
    image_tokens: int  # image tokens per query entering the decoder

    @property
    def queries_per_second(self) -> float:
        return self.queries / self.seconds if self.seconds else 0.0


@torch.no_grad()
def evaluate_ranking(model: ELMM, ws: Workspace, queries: Queries, filters: FilterIndex, batch_size: int, *,
                     precision: str = "fp32", desc: str = "rank", progress: bool = True) -> RankingResult:
    """Filtered ranks of every query against all entities, in chunks of `batch_size` queries."""
    model.eval()
    device = next(model.parameters()).device
    acc = RankAccumulator()
    image_tokens = 0
    start = time.perf_counter()
    for lo in tqdm(range(0, len(queries), batch_size), desc=desc, unit="batch", disable=not progress):
        q = queries.subset(slice(lo, lo + batch_size))
        with autocast(device, precision):
            out = forward_batch(model, make_batch(ws, q))
        known = filters.mask(q.anchors, q.relations, q.directions).to(device)
        ranks = compute_ranks(out.scores.float(), q.targets.to(device), known)
        acc.add({k: v.cpu() for k, v in ranks.items()}, q.directions, q.relations)
        image_tokens = out.image_tokens
    seconds = time.perf_counter() - start
    metrics = acc.metrics(relation_names=ws.kg.relations["name"].tolist())
    return RankingResult(metrics, len(queries), seconds, image_tokens)


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to zero at `total` steps."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def train_model(model: ELMM, ws: Workspace, train_queries: Queries, train_filter: FilterIndex, tp: TrainParams, *,
                seed: int, validate: Callable[[int], dict] | None = None,
                log: Callable[[str, float, int], None] = lambda name, value, step: None) -> dict:
    """Train the trainable parameters of `model` with the self-denoising BCE loss (eq. 15).

    `validate(epoch)` is called after every epoch (model selection on the validation split) and
    returns its metrics; `log(name, value, step)` receives the training curves.
    """
    device = next(model.parameters()).device
    torch.manual_seed(seed)  # LoRA dropout draws from the global generator
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    micro = tp.batch_size
    steps_per_epoch = math.ceil(len(train_queries) / (micro * tp.grad_accum))
    total = tp.epochs * steps_per_epoch
    if tp.max_steps is not None:
        total = min(total, tp.max_steps)
    summary = {"steps": 0, "epochs": 0, "final_loss": None, "train_queries": len(train_queries)}
    if total == 0 or not params:
        return summary
    opt = torch.optim.AdamW(params, lr=tp.lr, weight_decay=tp.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tp.warmup_steps, total))
    step = 0
    bar = tqdm(total=total, desc="train", unit="step")
    ema = None
    for epoch in range(tp.epochs):
        model.train()
        order = torch.randperm(len(train_queries), generator=gen)
        chunks = [order[i:i + micro] for i in range(0, len(order), micro)]
        for start in range(0, len(chunks), tp.grad_accum):
            group = chunks[start:start + tp.grad_accum]
            loss_sum = 0.0
            for idx in group:
                q = train_queries.subset(idx)
                with autocast(device, tp.precision):
                    out = forward_batch(model, make_batch(ws, q))
                known = train_filter.mask(q.anchors, q.relations, q.directions)
                neg, neg_mask = sample_negatives(q.anchors, known, tp.negatives, tp.self_denoise, gen)
                loss = elmm_loss(out.scores.float(), q.targets.to(device), neg.to(device), neg_mask.to(device))
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite training loss ({loss.item()}) at step {step + 1} (epoch {epoch + 1}); "
                        f"lower train.lr (now {tp.lr}) or check the inputs")
                (loss * len(idx) / sum(len(i) for i in group)).backward()
                loss_sum += loss.item() * len(idx)
            if tp.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, tp.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            batch_loss = loss_sum / sum(len(i) for i in group)
            ema = batch_loss if ema is None else 0.95 * ema + 0.05 * batch_loss
            log("train/loss", batch_loss, step)
            log("train/lr", sched.get_last_lr()[0], step)
            bar.set_postfix(loss=f"{ema:.4f}", epoch=epoch + 1)
            bar.update(1)
            if step >= total:
                break
        summary.update(steps=step, epochs=epoch + 1, final_loss=ema)
        if validate is not None:
            validate(epoch + 1)
        if step >= total:
            break
    bar.close()
    return summary
