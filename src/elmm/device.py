"""Where the model runs: the device choice, bf16 autocast, and timing barriers."""

from __future__ import annotations

import os

import torch


def default_device() -> torch.device:
    """`ELMM_DEVICE` if set (e.g. cpu on a GPU machine), else the GPU when there is one."""
    return torch.device(os.environ.get("ELMM_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def autocast(device: torch.device, precision: str):
    """bf16 autocast when `precision` is "bf16", a no-op context otherwise."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings measure it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
