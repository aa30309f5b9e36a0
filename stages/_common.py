"""Shared by the stage scripts: the library of this checkout, `--help`, params, device, seeds."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# The library of *this* checkout, ahead of whatever `pip install -e` points at: a `dvc exp run
# --queue` task runs in a temporary copy of the repository, and must run the code of the commit it
# was queued from, not the main workspace's code as edited since.
ROOT = Path(__file__).resolve().parents[1]
_SRC = str(ROOT / "src")
if Path(_SRC).is_dir() and sys.path[:1] != [_SRC]:
    sys.path.insert(0, _SRC)

# In logs (not a terminal) a progress bar redraws as a new line each time: redraw every 10 s instead.
if not sys.stderr.isatty():
    os.environ.setdefault("TQDM_MININTERVAL", "10")

import torch  # noqa: E402

from elmm.config import ParamsError, load_params, validate  # noqa: E402
from elmm.device import default_device  # noqa: E402
from elmm.memory import start_heap_trimmer  # noqa: E402


def _stage_summary(name: str) -> str:
    """What dvc.yaml says stage `name` reads, which params it uses, and what it writes."""
    try:
        import yaml

        stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]
    except (OSError, KeyError, TypeError):
        return ""

    def names(items) -> str:
        return ", ".join(next(iter(i)) if isinstance(i, dict) else str(i) for i in items or []) or "-"

    outs = [*(stage.get("outs") or []), *(stage.get("metrics") or []), *(stage.get("plots") or [])]
    return (f"DVC stage `{name}` (dvc.yaml)\n  reads:  {names(stage.get('deps'))}\n"
            f"  params: {names(stage.get('params'))} (params.yaml)\n  writes: {names(outs)}")


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """An argument parser for stage `name`: its docstring, then what it reads and writes."""
    return argparse.ArgumentParser(prog=f"stages/{name}.py", description=doc,
                                   epilog=_stage_summary(name), formatter_class=argparse.RawDescriptionHelpFormatter)


def parse_args(name: str, doc: str | None, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a stage's command line (only `--help` for most stages): nothing runs before this."""
    return parser(name, doc).parse_args([] if argv is None else argv)


def params():
    try:
        return load_params("params.yaml")
    except ParamsError as e:
        sys.exit(f"error: {e}")


def check_layers(p, num_layers: int) -> None:
    """The checks that need the backbone's depth (e.g. prune.k), reported like any params error."""
    try:
        validate(p, num_layers=num_layers)
    except ParamsError as e:
        sys.exit(f"error: params.yaml: {e}")


def device() -> torch.device:
    return default_device()


def setup(seed: int) -> None:
    torch.manual_seed(seed)
    # glibc keeps freed heap memory: without trimming, resident memory at 14,541 entities varied
    # from 1.7 to 11 GB between identical runs (elmm.memory). ELMM_HEAP_TRIM=0 turns it off.
    if os.environ.get("ELMM_HEAP_TRIM", "1") != "0":
        start_heap_trimmer()
    # Two CPU cores by default in CI; more threads than cores only adds contention.
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
