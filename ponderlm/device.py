"""Turning a device name from the command line or a config into a ``torch.device``, with one-line
errors for devices this machine does not have."""

from __future__ import annotations

import torch

from ponderlm.errors import ConfigError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` (this process's GPU: index
    ``local_rank`` under torchrun) or ``cuda:N``. Raises ConfigError for an unknown name, CUDA on
    a machine without it, or an index beyond the GPUs present."""
    name = str(name).strip()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ConfigError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available on this machine; use cpu")
    index = local_rank if dev.index is None else dev.index
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"device cuda:{index} asked for, but this machine has {count} GPU(s)")
    return torch.device("cuda", index)
