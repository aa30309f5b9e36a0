"""Shared by the stage scripts: run from the repository root, load params, pick a device."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The library of *this* checkout, ahead of whatever `pip install -e` points at: a `dvc exp run
# --queue` task runs in a temporary copy of the repository, and must run the code of the commit it
# was queued from, not the main workspace's code as edited since.
_SRC = str(Path(__file__).resolve().parents[1] / "src")
if Path(_SRC).is_dir() and sys.path[:1] != [_SRC]:
    sys.path.insert(0, _SRC)

# In logs (not a terminal) a progress bar redraws as a new line each time: redraw every 10 s instead.
if not sys.stderr.isatty():
    os.environ.setdefault("TQDM_MININTERVAL", "10")

import torch  # noqa: E402

from elmm.config import ParamsError, load_params  # noqa: E402


def params():
    try:
        return load_params("params.yaml")
    except ParamsError as e:
        sys.exit(f"error: {e}")


def device() -> torch.device:
    # ELMM_DEVICE lets a user force cpu on a GPU machine; otherwise use the GPU when there is one.
    return torch.device(os.environ.get("ELMM_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def setup(seed: int) -> None:
    torch.manual_seed(seed)
    # Two CPU cores by default in CI; more threads than cores only adds contention.
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
