"""Resumable training state: one `TrainingProgress` object, saved and restored atomically.

`Checkpoints` keeps the last state in `<directory>/last`, replaced atomically (io.atomic_dir):

- state.json: format, fingerprint, the progress counters and curves, scheduler, optimizer param
  groups, the python and numpy RNG states;
- trainable.safetensors, best.safetensors, optimizer.safetensors, rng.safetensors (torch CPU/CUDA
  and numpy), negatives.safetensors (the hard-negative table, when there is one).

No pickle anywhere. A checkpoint is resumed only when its fingerprint (the params that shape
training, the input files and the code) matches the run; any other is ignored with a message.
The directory carries its own `.gitignore`: it is not a DVC output, because a `persist` output
would disable DVC's run cache for the train stage.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import Params
from .io import atomic_dir

CHECKPOINT_FORMAT = 1


@dataclass
class TrainingProgress:
    """Everything a resumed run needs besides the model, optimizer and scheduler objects."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch the last step belongs to (0-based)
    ema: float | None = None  # smoothed training loss
    best_mrr: float = -1.0  # best validation MRR so far
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None  # trainable tensors at the best epoch
    history: list = field(default_factory=list)  # [name, value, step] of everything logged, replayed on resume
    negatives: torch.Tensor | None = None  # the hard-negative table (negatives.NegativeSampler.table)


def _digest_file(h, path: Path, max_bytes: int = 64 << 20) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    if size <= max_bytes:  # large weight files (a local 7B checkpoint) count by name and size only
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)


#: The entity token's options, with the value that means the behaviour from before each existed.
ENTITY_TOKEN_OPTIONS_BEFORE = {"entity_token_at": "name", "entity_token_tied": False, "entity_token_dropout": 0.0}


def training_fingerprint(p: Params, inputs: Iterable[str | Path], code: Iterable[str | Path] = ()) -> str:
    """What a checkpoint must match to be resumed: the params that shape training (train.* except
    checkpoint_every, seed, the model keys train reads), the input files, and the code."""
    train = asdict(p.train)
    train.pop("checkpoint_every")
    m = p.model
    keys = {"seed": p.seed, "train": train, "model": {"mvtc": asdict(m.mvtc), "head": m.head,
                                                      "entity_readout": m.entity_readout,
                                                      "max_text_tokens": m.max_text_tokens,
                                                      "max_image_tokens": m.max_image_tokens}}
    if m.answer_prefix:  # (likewise: fingerprints of runs without it stay as they were)
        keys["model"]["answer_prefix"] = True
    if m.knowledge.enabled:  # (only then, so that fingerprints of runs without it stay as they were)
        keys["model"]["knowledge"] = asdict(m.knowledge)
    if m.entity_token != "none":  # (likewise, and each option only away from its behaviour before it existed)
        keys["model"]["entity_token"] = m.entity_token
        for key, before in ENTITY_TOKEN_OPTIONS_BEFORE.items():
            if getattr(m, key) != before:
                keys["model"][key] = getattr(m, key)
    h = hashlib.sha256(json.dumps(keys, sort_keys=True).encode())
    for group in (inputs, code):
        files: list[Path] = []
        for item in map(Path, group):
            files += sorted(f for f in item.rglob("*") if f.is_file()) if item.is_dir() else [item]
        for f in files:
            if f.suffix != ".pyc":
                _digest_file(h, f)
    return h.hexdigest()[:16]


def snapshot(named: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    """CPU copies of the named tensors (e.g. the weights of the best epoch)."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in named}


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


class Checkpoints:
    """The last resumable state in `directory/last` (see the module docstring)."""

    def __init__(self, directory: str | Path, fingerprint: str, say: Callable[[str], None] = print):
        self.directory = Path(directory)
        self.path = self.directory / "last"
        self.fingerprint = fingerprint
        self.say = say

    def save(self, progress: TrainingProgress, named: list[tuple[str, torch.nn.Parameter]], opt, sched) -> None:
        """Write `progress`, the trainable tensors `named`, and the optimizer and scheduler state."""
        self.directory.mkdir(parents=True, exist_ok=True)
        ignore = self.directory / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# resumable training state (stages/train.py); not versioned\n*\n")
        osd = opt.state_dict()
        np_state = np.random.get_state()
        py_state = random.getstate()
        meta = {
            "format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint, "step": progress.step,
            "epoch": progress.epoch, "names": [n for n, _ in named], "scheduler": sched.state_dict(),
            "param_groups": osd["param_groups"], "ema": progress.ema, "best_mrr": progress.best_mrr,
            "best_epoch": progress.best_epoch, "history": progress.history,
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
            if progress.best_state is not None:
                _save(progress.best_state, tmp / "best.safetensors")
            if progress.negatives is not None:
                _save({"table": progress.negatives}, tmp / "negatives.safetensors")
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


def restore(meta: dict, named, opt, sched) -> TrainingProgress:
    """Put a loaded checkpoint (`Checkpoints.load`) back: weights, optimizer, scheduler, RNGs."""
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
    return TrainingProgress(step=meta["step"], epoch=meta["epoch"], ema=meta["ema"], best_mrr=meta["best_mrr"],
                            best_epoch=meta["best_epoch"], best_state=meta["best"], history=meta["history"],
                            negatives=meta["negatives"])
