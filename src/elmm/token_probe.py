"""What the encoded image tokens carry: a linear probe per latent image attribute (docs/testbed.md).

    python -m elmm.token_probe                  # where `dvc repro encode` has run on a synthetic world
    python -m elmm.token_probe --encoded data/encoded --kg data/kg --backbone data/backbone --seed 0

MVTC hands the decoder, per head, a value map of a softmax-weighted mean of an entity's projected
image tokens; whatever layout the tokens had (a shape spread over several patches) is gone before
the decoder sees it, so what MVTC can pass on has to be in the tokens' content. Per attribute the
world shows in pictures (`data/kg/latent.parquet`: colour, shape, mark), a multinomial logistic
regression is fitted on a random 70% of the objects and scored on the rest, on pooled readings:

- `cls`: the mean over an entity's images of the CLS token (the image view's query is built from
  the projected CLS tokens);
- `patch_mean`: the mean over its images and patches of the stored patch tokens;
- `projected_mean` (with `--backbone`): the same mean after the backbone's frozen projector, a
  per-token MLP: the tokens MVTC actually averages.

A linear reading of a plain mean is evidence, not a bound: MVTC's content-dependent weights can
pick out tokens a uniform mean dilutes. The test without that caveat is the pipeline run without
MVTC (`no-mvtc` in elmm.experiments), where the decoder reads every token in place.

Prints JSON: per attribute, each reading's test accuracy beside `best_constant`, the accuracy of
the best single guess on the test objects (the largest class share there).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
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
                 seed: int = 0, train_share: float = 0.7,
                 project: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Probe accuracies per attribute (the columns of `labels`) and reading.

    patches [E, N, M, Dv], cls [E, N, Dv], mask [E, N] as `ImageTokens.get` returns them; row i of
    `labels` labels entity i of the tensors. Entities without images are left out; empty slots
    (mask False) are ignored whatever they hold. `project` (the backbone's projector) adds the
    reading `projected_mean`.
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
    w = mask.float()[..., None]

    def over_images(x: torch.Tensor) -> torch.Tensor:  # [E, N, D] -> [E, D], the mean over real slots
        return (x * w).sum(1) / w.sum(1)

    readings = {"cls": over_images(cls), "patch_mean": over_images(patches.mean(2))}
    if project is not None:
        with torch.no_grad():
            readings["projected_mean"] = over_images(project(patches).float().mean(2))
    out: dict = {"entities": n, "train_entities": int(train.sum()), "pictures": int(mask.sum())}
    for attr in labels.columns:
        y = torch.from_numpy(pd.Categorical(labels[attr]).codes.astype(np.int64))
        row = {"classes": int(y.max()) + 1,
               "best_constant": round(float(torch.bincount(y[~train]).max()) / int((~train).sum()), 4)}
        for name, x in readings.items():
            row[name] = round(fit_probe(x[train], y[train], x[~train], y[~train]), 4)
        out[attr] = row
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoded", default="data/encoded", help="the encode stage's output")
    ap.add_argument("--kg", default="data/kg", help="the KG directory with latent.parquet (synthetic worlds)")
    ap.add_argument("--backbone", default="data/backbone",
                    help="the backbone whose projector gives `projected_mean`; '' to skip that reading")
    ap.add_argument("--seed", type=int, default=0, help="seed of the objects' train/test split")
    args = ap.parse_args(argv)
    from .image_tokens import ImageTokens
    from .kg.format import load_kg

    if not Path(args.kg).is_dir():
        raise SystemExit(f"{args.kg}: missing; run `dvc repro generate`")
    latent_path = Path(args.kg) / "latent.parquet"
    if not latent_path.exists():
        raise SystemExit(f"{latent_path}: missing; the token probe needs a synthetic world's latent attributes")
    if not (Path(args.encoded) / "manifest.json").exists():
        raise SystemExit(f"{args.encoded}: no encoded image tokens; run `dvc repro encode`")
    kg = load_kg(args.kg)
    latent = pd.read_parquet(latent_path).set_index("entity")
    missing = [a for a in IMAGE_ATTRIBUTES if a not in latent.columns]
    if missing:
        raise SystemExit(f"{latent_path}: no column {', '.join(missing)}")
    labels = latent[list(IMAGE_ATTRIBUTES)].sort_index()
    tokens = ImageTokens(args.encoded, len(kg.entities))
    patches, cls, mask = tokens.get(torch.tensor(labels.index.to_numpy(), dtype=torch.long))  # entity rows
    project = None
    if args.backbone:
        from .backbone import load_backbone

        project = load_backbone(args.backbone).project_images
    out = probe_tokens(patches, cls, mask, labels.reset_index(drop=True), seed=args.seed, project=project)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
