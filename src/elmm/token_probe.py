"""What the encoded image tokens carry: a linear probe per latent image attribute (docs/testbed.md).

    python -m elmm.token_probe                  # where `dvc repro encode` has run on a synthetic world
    python -m elmm.token_probe --encoded data/encoded --kg data/kg --seed 0

MVTC hands the decoder attention-weighted means of an entity's (projected) image tokens, so what it
can pass on must be readable from the tokens' content; an attribute that lives only in how the
tokens are arranged (a shape spread over several patches) is gone before the decoder sees it. Per
attribute the world shows in pictures (`data/kg/latent.parquet`: colour, shape, mark), a
multinomial logistic regression is fitted on a random 70% of the objects and scored on the rest,
on two pooled readings of the tokens:

- `cls`: the mean over an entity's images of the CLS token (what the image view's query pools);
- `patch_mean`: the mean over its images and patches of the patch tokens (what pooling keeps).

An attribute near its majority share on both is one the compressed tokens cannot carry, whatever
MVTC's attention weights; the pretraining's caption accuracy (metrics/pretrain.json), read by a
decoder attending over every patch in place, is the comparison.

Prints JSON: per attribute, each reading's test accuracy beside the majority class's share.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

IMAGE_ATTRIBUTES = ("colour", "shape", "mark")


def fit_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
              steps: int = 300, l2: float = 1e-3) -> float:
    """Test accuracy of a softmax regression fitted full-batch on standardised features
    (zero start, Adam: deterministic for the same inputs)."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    classes = int(max(y_train.max(), y_test.max())) + 1
    weight = torch.zeros(x_train.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(x_train @ weight + bias, y_train) + l2 * weight.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(((x_test @ weight + bias).argmax(1) == y_test).float().mean())


def probe_tokens(patches: torch.Tensor, cls: torch.Tensor, mask: torch.Tensor, labels: pd.DataFrame,
                 seed: int = 0, train_share: float = 0.7) -> dict:
    """Probe accuracies per attribute (the columns of `labels`, indexed by entity row) and reading.

    patches [E, N, M, Dv], cls [E, N, Dv], mask [E, N] as `ImageTokens.get` returns them for the
    entities `labels.index` names (in that order); entities without images are left out.
    """
    has = mask.any(1)
    patches, cls, mask = patches[has].float(), cls[has].float(), mask[has]
    labels = labels[has.numpy()]
    n = len(labels)
    if n < 10:
        raise ValueError(f"token probe: {n} entities with images and labels; need at least 10")
    order = np.random.default_rng(seed).permutation(n)
    train = torch.zeros(n, dtype=torch.bool)
    train[torch.from_numpy(order[: int(train_share * n)])] = True
    w = mask.float()
    count = w.sum(1, keepdim=True)
    readings = {
        "cls": (cls * w[..., None]).sum(1) / count,
        "patch_mean": (patches.mean(2) * w[..., None]).sum(1) / count,
    }
    out: dict = {"entities": n, "train_entities": int(train.sum()), "pictures": int(mask.sum())}
    for attr in labels.columns:
        y = torch.from_numpy(pd.Categorical(labels[attr]).codes.astype(np.int64))
        row = {"classes": int(y.max()) + 1,
               "majority": round(float((y[~train] == y[train].mode().values).float().mean()), 4)}
        for name, x in readings.items():
            row[name] = round(fit_probe(x[train], y[train], x[~train], y[~train]), 4)
        out[attr] = row
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoded", default="data/encoded", help="the encode stage's output")
    ap.add_argument("--kg", default="data/kg", help="the KG directory with latent.parquet (synthetic worlds)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the objects' train/test split")
    args = ap.parse_args(argv)
    from .image_tokens import ImageTokens
    from .kg.format import load_kg

    latent_path = Path(args.kg) / "latent.parquet"
    if not latent_path.exists():
        raise SystemExit(f"{latent_path}: missing; the token probe needs a synthetic world's latent attributes")
    torch.manual_seed(args.seed)
    kg = load_kg(args.kg)
    latent = pd.read_parquet(latent_path).set_index("entity")
    missing = [a for a in IMAGE_ATTRIBUTES if a not in latent.columns]
    if missing:
        raise SystemExit(f"{latent_path}: no column {', '.join(missing)}")
    labels = latent[list(IMAGE_ATTRIBUTES)].sort_index()
    tokens = ImageTokens(args.encoded, len(kg.entities))
    patches, cls, mask = tokens.get(torch.tensor(labels.index.to_numpy(), dtype=torch.long))
    print(json.dumps(probe_tokens(patches, cls, mask, labels.reset_index(drop=True), seed=args.seed), indent=1))


if __name__ == "__main__":
    main()
