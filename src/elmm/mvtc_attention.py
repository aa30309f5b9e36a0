"""Where the compressor looks: each MVTC view's attention over an entity's image tokens, by relation.

    python -m elmm.mvtc_attention                       # the trained model of this checkout (data/model)
    python -m elmm.mvtc_attention --json out.json       # also the numbers as JSON

The textual view exists to make the compression relation-conditioned: its query pools the prompt,
so `has mark` should pick other image tokens than `has colour`. This measures whether the trained
model does. Every object with pictures is asked every relation as a tail query (the object is the
head of every relation), and for each view and relation it reports, averaged over objects and heads:

- `mark_mass`: the weight on the first token of each picture. On the embedded world that is the
  top-left patch of the tiny tower's 4 x 4 grid, the only region that shows the `has mark`
  attribute (`kg/synthetic.py`); a view that reads marks for `has mark` puts more weight there
  than for the other relations. Spread evenly, it is 1 / (tokens per picture).
- `top_head_mark_mass`: the same for the head that puts the most weight there (a view may give
  one head to the mark whatever the relation).
- `shift`: the total-variation distance between the view's weights for this relation and the same
  object's weights averaged over all relations: 0 when the relation changes nothing (the visual
  view's query never sees the relation, so its shift is 0 by construction: a built-in check).
- `from_uniform`: the total-variation distance from an even spread over the real tokens (0 for a
  mean pool, near 1 for a head that picks one token).

For analysis only; no stage depends on it. The token-to-patch reading is the embedded world's.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .batches import forward_batch, make_batch
from .kg.queries import TAIL, Queries
from .model import ELMM
from .workspace import Workspace

VIEWS = ("text_view", "image_view")


def view_statistics(weights: torch.Tensor, token_mask: torch.Tensor, tokens_per_image: int) -> dict[str, torch.Tensor]:
    """Per-object statistics of one view's weights [E, R, H, T] (E objects, each asked R relations)
    over tokens with mask [E, T]: `mark_mass`, `shift` and `from_uniform` [E, R] (means over
    heads) and `head_mark_mass` [E, R, H] (see the module docstring)."""
    mark = torch.zeros(weights.shape[-1], dtype=torch.bool)
    mark[::tokens_per_image] = True
    head_mark_mass = weights[..., mark].sum(-1)
    uniform = token_mask.float() / token_mask.sum(-1, keepdim=True).clamp(min=1)  # [E, T]
    from_uniform = 0.5 * (weights - uniform[:, None, None, :]).abs().sum(-1).mean(-1)
    mean = weights.mean(1, keepdim=True)  # the object's weights averaged over relations
    shift = 0.5 * (weights - mean).abs().sum(-1).mean(-1)
    return {"mark_mass": head_mark_mass.mean(-1), "head_mark_mass": head_mark_mass, "shift": shift,
            "from_uniform": from_uniform}


@torch.no_grad()
def attention_by_relation(model: ELMM, ws: Workspace, batch_size: int = 64) -> dict:
    """Each present view's statistics per relation (means over objects), and the even-spread mark mass."""
    views = {name: getattr(model, name) for name in VIEWS if getattr(model, name, None) is not None}
    if not views:
        raise ValueError("this model has no MVTC view (model.mvtc.enabled is false): nothing to measure")
    objects = torch.as_tensor((ws.kg.entities["num_images"].to_numpy() > 0).nonzero()[0], dtype=torch.long)
    relations = len(ws.kg.relations)
    if len(objects) == 0:
        raise ValueError("no entity has pictures: nothing to measure")
    grid_a, grid_r = torch.meshgrid(objects, torch.arange(relations), indexing="ij")  # [E, R], object-major
    anchors, rels = grid_a.reshape(-1), grid_r.reshape(-1)
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in views}
    masks: list[torch.Tensor] = []

    def capture(name):
        def hook(module, args):
            query, tokens, mask = args
            captured[name].append(module.weights(query, tokens, mask).float().cpu())
            if name == next(iter(views)):
                masks.append(mask.cpu())
        return hook

    handles = [view.register_forward_pre_hook(capture(name)) for name, view in views.items()]
    model.eval()
    try:
        for lo in range(0, len(anchors), batch_size):
            a = anchors[lo:lo + batch_size]
            q = Queries(a, rels[lo:lo + batch_size], torch.full_like(a, TAIL), torch.zeros_like(a))
            forward_batch(model, make_batch(ws, q))
    finally:
        for h in handles:
            h.remove()
    e = len(objects)
    token_mask = torch.cat(masks).view(e, relations, -1)[:, 0]
    tokens_per_image = model.backbone.projected_tokens(ws.tokens.num_tokens)
    names = ws.kg.relations["name"].tolist()
    report = {"objects": e, "tokens_per_image": tokens_per_image,
              "even_mark_mass": 1.0 / tokens_per_image, "views": {}}
    for name in views:
        w = torch.cat(captured[name])
        stats = view_statistics(w.view(e, relations, *w.shape[1:]), token_mask, tokens_per_image)
        top = stats.pop("head_mark_mass").mean(0).amax(-1)  # [R]: the top head, averaged over objects
        report["views"][name] = {names[r]: {**{k: round(float(v[:, r].mean()), 4) for k, v in stats.items()},
                                            "top_head_mark_mass": round(float(top[r]), 4)}
                                 for r in range(relations)}
    return report


def markdown(report: dict) -> str:
    views = list(report["views"])
    keys = ("mark_mass", "top_head_mark_mass", "shift", "from_uniform")
    head = "| relation | " + " | ".join(f"{v}: {k.replace('_', ' ')}" for v in views for k in keys) + " |"
    lines = [head, "|" + "---|" * (1 + len(keys) * len(views))]
    for rel in report["views"][views[0]]:
        cells = [f"{report['views'][v][rel][k]:.4f}" for v in views for k in keys]
        lines.append(f"| {rel} | " + " | ".join(cells) + " |")
    lines.append(f"\n{report['objects']} objects; an even spread puts {report['even_mark_mass']:.4f} on the "
                 f"first token of each picture ({report['tokens_per_image']} tokens per picture).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m elmm.mvtc_attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="data/model", help="a trained model directory (default: data/model)")
    parser.add_argument("--params", default="params.yaml", help="the params it was trained with")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    from .config import load_params
    from .io import write_json
    from .model_io import load_trained
    from .workspace import open_workspace

    ws = open_workspace(load_params(args.params))
    report = attention_by_relation(load_trained(ws, args.model), ws)
    print(markdown(report))
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main(sys.argv[1:])
