"""LoRA fine-tuning of the pruned ELMM model, and the ranking pass shared by validation and evaluation.

Training at scale:

- **Distributed.** Under `torchrun` (WORLD_SIZE set) every process joins a process group (nccl on
  GPU, gloo on CPU) and the model is wrapped in DistributedDataParallel. `train.batch_size` is the
  *global* micro-batch: every rank takes a disjoint contiguous slice of each one, and the loss is
  weighted so the summed gradient equals the single-process gradient of the whole global batch.
  Logging, validation, checkpoints and the saved model come from rank 0 only.
- **Randomness is a function of the position.** The data order of epoch e is drawn from a
  generator seeded with (seed, e), the negatives of optimizer step s from one seeded with (seed, s)
  (identical on every rank, drawn for the whole global batch, then sliced), and the global RNG
  used by LoRA dropout is reseeded with (seed, s, rank) before every step. A resumed run and a run
  with another world size therefore see exactly the same batches and negatives.
- **Checkpoints** (:class:`Checkpoints`): every `train.checkpoint_every` steps and at every epoch
  end, atomically: trainable weights, best-epoch weights, AdamW state (safetensors), scheduler,
  position, RNG states, logged history and a fingerprint of the params, inputs and code (JSON).
  A run finding a checkpoint with its own fingerprint resumes from it; any other is ignored with a
  message.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .config import Params, TrainParams
from .evaluation import FilterIndex, RankAccumulator, compute_ranks
from .io import atomic_dir
from .model import ELMM, QueryOutput, elmm_loss, sample_negatives
from .workspace import Queries, Workspace, forward_batch, make_batch

CHECKPOINT_FORMAT = 1


def autocast(device: torch.device, precision: str):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- ranking (validation and evaluation) ---------------------------------------------------------
@dataclass
class RankingResult:
    metrics: dict
    queries: int
    seconds: float  # wall time of the pass (batch assembly + model + ranking), without on_batch hooks
    image_tokens: int  # image tokens per query entering the decoder
    forward_seconds: float = 0.0  # time inside the model's forward only

    @property
    def queries_per_second(self) -> float:
        return self.queries / self.seconds if self.seconds else 0.0


BatchHook = Callable[[Queries, QueryOutput, torch.Tensor], None]


@torch.no_grad()
def evaluate_ranking(model: ELMM, ws: Workspace, queries: Queries, filters: FilterIndex, batch_size: int, *,
                     precision: str = "fp32", desc: str = "rank", progress: bool = True,
                     on_batch: BatchHook | None = None) -> RankingResult:
    """Filtered ranks of every query against all entities, in chunks of `batch_size` queries.

    Memory is O(batch_size x entities) whatever the number of queries: ranks are counted per
    chunk (never sorted) and only the ranks are kept. `on_batch(queries, output, known)` sees each
    chunk's model output and filter mask (used for the faiss recall check).
    """
    model.eval()
    device = next(model.parameters()).device
    acc = RankAccumulator()
    image_tokens = 0
    forward = hooks = 0.0
    start = time.perf_counter()
    for lo in tqdm(range(0, len(queries), batch_size), desc=desc, unit="batch", disable=not progress):
        q = queries.subset(slice(lo, lo + batch_size))
        batch = make_batch(ws, q)
        _sync(device)
        t0 = time.perf_counter()
        with autocast(device, precision):
            out = forward_batch(model, batch)
        _sync(device)
        forward += time.perf_counter() - t0
        known = filters.mask(q.anchors, q.relations, q.directions).to(device)
        ranks = compute_ranks(out.scores.float(), q.targets.to(device), known)
        acc.add({k: v.cpu() for k, v in ranks.items()}, q.directions, q.relations)
        if on_batch is not None:
            t0 = time.perf_counter()
            on_batch(q, out, known)
            hooks += time.perf_counter() - t0
        image_tokens = out.image_tokens
    seconds = time.perf_counter() - start - hooks
    metrics = acc.metrics(relation_names=ws.kg.relations["name"].tolist())
    return RankingResult(metrics, len(queries), seconds, image_tokens, forward)


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to zero at `total` steps."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


# ---- distributed -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    enabled: bool = False  # a process group exists

    @property
    def main(self) -> bool:
        return self.rank == 0

    def slice(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share [lo, hi) of n rows (sizes differ by at most one)."""
        return n * self.rank // self.world, n * (self.rank + 1) // self.world


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE in the environment).

    GPU: one device per local rank and nccl; CPU: gloo. Returns this rank's device.
    """
    if "WORLD_SIZE" not in os.environ:
        return Dist(), device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        # Rank 0 validates alone while the others wait at a barrier: allow a long wait.
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=60))
    return Dist(rank, world, local, True), device


def shutdown_distributed(dist: Dist) -> None:
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def _barrier(dist: Dist) -> None:
    if dist.enabled:
        torch_dist.barrier()


def _all_sum(value: float, dist: Dist, device: torch.device) -> float:
    if not dist.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    return float(t.item())


def _broadcast_int(value: int, dist: Dist, device: torch.device) -> int:
    if not dist.enabled:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    torch_dist.broadcast(t, src=0)
    return int(t.item())


# ---- seeds -----------------------------------------------------------------------------------------
_ORDER, _NEGATIVES, _DROPOUT = 1, 2, 3


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, purpose, position, ...)."""
    words = [int(p) % 2**64 for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, _ORDER, epoch)))


# ---- negatives -------------------------------------------------------------------------------------
def nearest_entities(vectors: torch.Tensor, pool: int) -> torch.Tensor:
    """[E, pool] the `pool` entities whose vectors are most cosine-similar to each entity's (itself excluded)."""
    from .retrieval import knn_search

    e = vectors.shape[0]
    pool = max(1, min(pool, e - 1))
    v = torch.nn.functional.normalize(vectors.detach().float().cpu(), dim=1).numpy()
    ids = torch.from_numpy(knn_search(v, v, min(pool + 1, e))).long()
    keep = (ids != torch.arange(e)[:, None]) & (ids >= 0)
    # The kept neighbours first, in their order; each row has at most one self-match to drop.
    first = torch.argsort((~keep).int(), dim=1, stable=True)[:, :pool]
    return ids.gather(1, first)


class NegativeSampler:
    """Uniform negatives (model.sample_negatives), or with train.hard_negatives=faiss a share drawn
    from the target's nearest entity vectors, rebuilt every `hard_negatives_refresh` steps."""

    def __init__(self, tp: TrainParams):
        self.tp = tp
        self.table: torch.Tensor | None = None  # [E, pool] nearest entities of each entity
        self.hard = tp.hard_negatives == "faiss"

    def refresh(self, model: ELMM, step: int) -> None:
        if self.hard and (self.table is None or step % self.tp.hard_negatives_refresh == 0):
            from .retrieval import entity_vectors

            weight, _ = entity_vectors(model)
            self.table = nearest_entities(weight, self.tp.hard_negatives_pool)

    def sample(self, q: Queries, known: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        tp = self.tp
        if not self.hard:
            return sample_negatives(q.anchors, known, tp.negatives, tp.self_denoise, gen)
        b, e = known.shape
        n_hard = min(tp.negatives, round(tp.negatives * tp.hard_negatives_fraction))
        uniform = torch.randint(0, e, (b, tp.negatives - n_hard), generator=gen)
        pick = torch.randint(0, self.table.shape[1], (b, n_hard), generator=gen)
        hard = self.table[q.targets.cpu()].gather(1, pick)
        neg = torch.cat([hard, uniform], dim=1)
        if tp.self_denoise:
            neg = torch.cat([neg, q.anchors[:, None].cpu()], dim=1)
        return neg, ~known.cpu().gather(1, neg)


# ---- checkpoints -----------------------------------------------------------------------------------
def _digest_file(h, path: Path, max_bytes: int = 64 << 20) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    if size <= max_bytes:  # large weight files (a local 7B checkpoint) count by name and size only
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)


def training_fingerprint(p: Params, inputs: Iterable[str | Path], code: Iterable[str | Path] = ()) -> str:
    """What a checkpoint must match to be resumed: the params that shape training (train.* except
    checkpoint_every, seed, the model keys train reads), the input files, and the code."""
    train = asdict(p.train)
    train.pop("checkpoint_every")
    m = p.model
    keys = {"seed": p.seed, "train": train, "model": {"mvtc": asdict(m.mvtc), "head": m.head,
                                                      "max_text_tokens": m.max_text_tokens,
                                                      "max_image_tokens": m.max_image_tokens}}
    h = hashlib.sha256(json.dumps(keys, sort_keys=True).encode())
    for group in (inputs, code):
        files: list[Path] = []
        for item in map(Path, group):
            files += sorted(f for f in item.rglob("*") if f.is_file()) if item.is_dir() else [item]
        for f in files:
            if f.suffix != ".pyc":
                _digest_file(h, f)
    return h.hexdigest()[:16]


def _snapshot(named: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in named}


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


@dataclass
class TrainState:
    """Everything a resumed run needs besides the model and optimizer objects."""

    step: int = 0
    ema: float | None = None
    best_mrr: float = -1.0
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    history: list | None = None  # [name, value, step] of everything logged, replayed on resume

    def __post_init__(self):
        self.history = [] if self.history is None else self.history


class Checkpoints:
    """The last resumable state in `directory/last`, replaced atomically (io.atomic_dir).

    Files: state.json (fingerprint, position, scheduler, optimizer param groups, history, RNG
    states of python/numpy), trainable.safetensors, best.safetensors, optimizer.safetensors,
    rng.safetensors (torch CPU/CUDA, numpy), negatives.safetensors (hard-negative table).
    No pickle anywhere. The directory carries its own `.gitignore` (it is not a DVC output:
    a `persist` output would disable DVC's run cache for the train stage).
    """

    def __init__(self, directory: str | Path, fingerprint: str, say: Callable[[str], None] = print):
        self.directory = Path(directory)
        self.path = self.directory / "last"
        self.fingerprint = fingerprint
        self.say = say

    def save(self, *, step: int, epoch: int, names: list[str], named, opt, sched, state: TrainState,
             sampler: NegativeSampler) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        ignore = self.directory / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# resumable training state (stages/train.py); not versioned\n*\n")
        osd = opt.state_dict()
        np_state = np.random.get_state()
        py_state = random.getstate()
        meta = {
            "format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint, "step": step, "epoch": epoch,
            "names": names, "scheduler": sched.state_dict(), "param_groups": osd["param_groups"],
            "ema": state.ema, "best_mrr": state.best_mrr, "best_epoch": state.best_epoch,
            "history": state.history,
            "numpy_rng": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
        }
        with atomic_dir(self.path) as tmp:
            _save(dict(named), tmp / "trainable.safetensors")
            _save({f"{i}.{k}": v for i, s in osd["state"].items() for k, v in s.items()}, tmp / "optimizer.safetensors")
            rng = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_state[1].astype(np.int64))}
            if torch.cuda.is_available():
                rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
            _save(rng, tmp / "rng.safetensors")
            if state.best_state is not None:
                _save(state.best_state, tmp / "best.safetensors")
            if sampler.table is not None:
                _save({"table": sampler.table}, tmp / "negatives.safetensors")
            (tmp / "state.json").write_text(json.dumps(meta) + "\n")

    def load(self, names: list[str]) -> dict | None:
        """The saved state if it matches this run (fingerprint and trainable names), else None."""
        meta_path = self.path / "state.json"
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != CHECKPOINT_FORMAT or meta.get("fingerprint") != self.fingerprint:
                self.say(f"train: ignoring {self.path}: written for other params, inputs or code "
                         f"(fingerprint {meta.get('fingerprint')}, this run {self.fingerprint}); starting from scratch")
                return None
            if meta["names"] != names:
                self.say(f"train: ignoring {self.path}: its trainable parameters differ from this model's")
                return None
            meta["trainable"] = load_file(str(self.path / "trainable.safetensors"))
            meta["optimizer"] = load_file(str(self.path / "optimizer.safetensors"))
            meta["rng"] = load_file(str(self.path / "rng.safetensors"))
            best = self.path / "best.safetensors"
            meta["best"] = load_file(str(best)) if best.exists() else None
            neg = self.path / "negatives.safetensors"
            meta["negatives"] = load_file(str(neg))["table"] if neg.exists() else None
            return meta
        except (OSError, ValueError, KeyError) as e:  # unreadable or incomplete: never crash on a stale file
            self.say(f"train: ignoring unreadable checkpoint {self.path} ({e}); starting from scratch")
            return None

    def clear(self) -> None:
        """Drop the state once the trained model is saved: a finished run leaves nothing to resume."""
        if self.path.exists():
            shutil.rmtree(self.path)


def _restore(meta: dict, named, opt, sched, state: TrainState, sampler: NegativeSampler) -> None:
    with torch.no_grad():
        for n, p in named:
            p.copy_(meta["trainable"][n])
    groups = meta["param_groups"]
    for g in groups:
        g["betas"] = tuple(g["betas"])
    opt_state: dict[int, dict] = {}
    for key, value in meta["optimizer"].items():
        i, name = key.split(".", 1)
        opt_state.setdefault(int(i), {})[name] = value
    opt.load_state_dict({"state": opt_state, "param_groups": groups})
    sched.load_state_dict(meta["scheduler"])
    state.step, state.ema = meta["step"], meta["ema"]
    state.best_mrr, state.best_epoch, state.best_state = meta["best_mrr"], meta["best_epoch"], meta["best"]
    state.history = meta["history"]
    sampler.table = meta["negatives"]
    rng = meta["rng"]
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted((k for k in rng if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy_rng"]
    np.random.set_state((kind, rng["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss_next))


class TrainingInterrupted(RuntimeError):
    """Raised by the `stop_after` test hook, as if the process had been killed after that step."""


# ---- the loop --------------------------------------------------------------------------------------
def train_model(model: ELMM, ws: Workspace, train_queries: Queries, train_filter: FilterIndex, tp: TrainParams, *,
                seed: int, validate: Callable[[int], dict] | None = None,
                log: Callable[[str, float, int], None] = lambda name, value, step: None,
                checkpoints: Checkpoints | None = None, dist: Dist | None = None,
                stop_after: int | None = None, progress: bool = True) -> dict:
    """Train the trainable parameters of `model` with the self-denoising BCE loss (eq. 15).

    `validate(epoch)` (rank 0 only) is called before training and after every epoch and returns
    the validation metrics; the parameters of the best validation MRR are restored into `model`
    at the end (on rank 0, the rank that saves). `log(name, value, step)` receives the curves
    (rank 0 only); on resume the history up to the checkpoint is replayed through it first.
    Returns a summary: steps, epochs, final_loss (EMA), train_queries, best_epoch, valid_best_mrr.
    """
    dist = dist or Dist()
    device = next(model.parameters()).device
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    params = [p for _, p in named]
    micro = tp.batch_size
    steps_per_epoch = math.ceil(len(train_queries) / (micro * tp.grad_accum))
    total = tp.epochs * steps_per_epoch
    if tp.max_steps is not None:
        total = min(total, tp.max_steps)
    state = TrainState()
    sampler = NegativeSampler(tp)

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
                state.best_mrr, state.best_epoch, state.best_state = m["mrr"], epoch, _snapshot(named)
        _barrier(dist)

    def summary(epochs: int) -> dict:
        return {"steps": state.step, "epochs": epochs, "final_loss": state.ema, "train_queries": len(train_queries),
                "best_epoch": state.best_epoch, "valid_best_mrr": max(state.best_mrr, 0.0)}

    opt = torch.optim.AdamW(params, lr=tp.lr, weight_decay=tp.weight_decay) if params else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tp.warmup_steps, total)) if params else None

    meta = checkpoints.load(names) if checkpoints is not None and params and total else None
    # Rank 0 decides; every rank must then have read the same checkpoint (shared storage).
    resume_step = _broadcast_int(meta["step"] if meta else -1, dist, device)
    if resume_step >= 0:
        if meta is None or meta["step"] != resume_step:
            where = checkpoints.path if checkpoints else "data/checkpoints"
            raise RuntimeError(f"rank {dist.rank}: cannot read the checkpoint rank 0 resumes from (step "
                               f"{resume_step}); {where} must be on storage shared by all nodes")
        _restore(meta, named, opt, sched, state, sampler)
        if dist.main:
            print(f"train: resuming from {checkpoints.path} at step {state.step} of {total}")
            for name, value, step in state.history:
                log(name, value, step)
    else:
        run_validation(0, 0)  # the untrained starting point: the curve's first value
    if total == 0 or not params:
        return summary(0)

    ddp = model
    if dist.enabled:
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # The model moves its inputs itself; buffers (rotary tables) are identical on every rank,
        # so they need no broadcast before every forward (newer torch renamed the option).
        no_sync_buffers = ({"forward_sync_buffers": False}
                           if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                           else {"broadcast_buffers": False})
        ddp = DistributedDataParallel(model, **no_sync_buffers)
    bar = tqdm(total=total, initial=state.step, desc="train", unit="step", disable=not (progress and dist.main))
    for epoch in range(state.step // steps_per_epoch, tp.epochs):
        if state.step >= total:
            break
        model.train()
        order = epoch_order(len(train_queries), seed, epoch)
        chunks = [order[i:i + micro] for i in range(0, len(order), micro)]
        groups = [chunks[i:i + tp.grad_accum] for i in range(0, len(chunks), tp.grad_accum)]
        for g in range(state.step - epoch * steps_per_epoch, len(groups)):
            group = groups[g]
            sampler.refresh(model, state.step)
            gen = torch.Generator().manual_seed(derive_seed(seed, _NEGATIVES, state.step))
            torch.manual_seed(derive_seed(seed, _DROPOUT, state.step, dist.rank))  # LoRA dropout
            n_group = sum(len(i) for i in group)
            loss_sum = 0.0
            for j, idx in enumerate(group):
                q = train_queries.subset(idx)
                known = train_filter.mask(q.anchors, q.relations, q.directions)
                # Drawn for the whole global micro-batch on every rank, then sliced: the same
                # negatives whatever the world size.
                neg, neg_mask = sampler.sample(q, known, gen)
                lo, hi = dist.slice(len(idx))
                # A rank whose slice is empty still runs one row with weight 0, so that the
                # gradient all-reduce sees every rank.
                rows = slice(lo, hi) if hi > lo else slice(0, 1)
                weight = (hi - lo) / n_group * dist.world  # DDP averages over ranks: undo it
                last = j == len(group) - 1
                with ddp.no_sync() if dist.enabled and not last else nullcontext():
                    qs = q.subset(rows)
                    with autocast(device, tp.precision):
                        out = forward_batch(ddp, make_batch(ws, qs))
                    loss = elmm_loss(out.scores.float(), qs.targets.to(device), neg[rows].to(device),
                                     neg_mask[rows].to(device))
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"non-finite training loss ({loss.item()}) at step {state.step + 1} (epoch {epoch + 1}); "
                            f"lower train.lr (now {tp.lr}) or check the inputs")
                    (loss * weight).backward()
                loss_sum += loss.item() * (hi - lo)
            loss_sum = _all_sum(loss_sum, dist, device)
            if tp.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, tp.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state.step += 1
            batch_loss = loss_sum / n_group
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
                checkpoints.save(step=state.step, epoch=epoch, names=names, named=named, opt=opt, sched=sched,
                                 state=state, sampler=sampler)
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
    return summary(min(tp.epochs, math.ceil(state.step / steps_per_epoch)))
