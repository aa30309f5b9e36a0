"""Per-query ranks as a CSV file: `metrics/ranks/model.csv`, written by `evaluate`, read by
`elmm.experiments` for paired comparisons between experiments.

One row per query, in the order of `queries_from_triples(<split> triples)` (every triple's tail
query, then every triple's head query):

    query,relation,direction,anchor,target,rank,optimistic,pessimistic
    0,3,tail,17,52,2.5,2,3

- `query`: the row's index in that order (0-based);
- `relation`, `anchor`, `target`: row indices into data/kg's relations and entities tables;
- `direction`: `tail` (predict the tail of (anchor, relation, ?)) or `head`;
- `rank`: the realistic filtered rank (the mean of the two below, a multiple of 0.5);
- `optimistic`, `pessimistic`: 1 + #(scores > true) and #(scores >= true) (elmm.evaluation).

Plain numbers and words only (no quoting needed), so the file diffs well in git.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from .io import atomic_path

COLUMNS = ("query", "relation", "direction", "anchor", "target", "rank", "optimistic", "pessimistic")
KEY_COLUMNS = ("query", "relation", "direction", "anchor", "target")  # what identifies a query
DIRECTIONS = ("tail", "head")  # index = the direction code (elmm.kg.queries TAIL = 0, HEAD = 1)


MODEL_RANKS = "metrics/ranks/model.csv"  # the model's, of evaluate.split (recorded in evaluate.json)


def ranks_path(split: str | None = None) -> str:
    """Where `evaluate` writes the model's per-query ranks (whatever the split), relative to the repo root."""
    return MODEL_RANKS


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def write_rank_table(path: str | os.PathLike, relations, directions, anchors, targets, realistic, optimistic,
                     pessimistic) -> None:
    """Write the table (module docstring) atomically; each argument holds one value per query, in order."""
    columns = [np.asarray(c) for c in (relations, directions, anchors, targets, realistic, optimistic, pessimistic)]
    n = len(columns[0])
    if any(len(c) != n for c in columns):
        raise ValueError(f"{path}: columns of different lengths {[len(c) for c in columns]}")
    rel, dirs, anc, tgt, real, opt, pes = columns
    lines = [",".join(COLUMNS)]
    for i in range(n):
        lines.append(f"{i},{int(rel[i])},{DIRECTIONS[int(dirs[i])]},{int(anc[i])},{int(tgt[i])},"
                     f"{_number(real[i])},{int(opt[i])},{int(pes[i])}")
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")


def parse_rank_table(text: str, source: str = "ranks") -> dict[str, np.ndarray]:
    """Columns of a rank table as numpy arrays (`direction` as strings, `rank` as float, others int)."""
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or tuple(rows[0]) != COLUMNS:
        raise ValueError(f"{source}: expected the header {','.join(COLUMNS)}, got {','.join(rows[0]) if rows else '(empty)'}")
    body = [r for r in rows[1:] if r]
    table = {}
    for j, name in enumerate(COLUMNS):
        values = [r[j] for r in body]
        if name == "direction":
            table[name] = np.array(values, dtype=str)
        elif name == "rank":
            table[name] = np.array(values, dtype=np.float64)
        else:
            table[name] = np.array(values, dtype=np.int64)
    return table


def read_rank_table(path: str | os.PathLike) -> dict[str, np.ndarray]:
    path = Path(path)
    return parse_rank_table(path.read_text(), str(path))
