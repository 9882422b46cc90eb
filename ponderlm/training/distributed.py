"""A training run's processes under torchrun: the process group (:class:`DistEnv`), the model's
DDP or FSDP2 wrapping, and the full (gathered) model and optimizer state that checkpoints hold.
In a single process every piece is a no-op."""

from __future__ import annotations

import contextlib
import os
import warnings
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ponderlm.device import resolve_device

if TYPE_CHECKING:
    from ponderlm.model.model import PonderLM


class DistEnv:
    """World size / rank from torchrun's environment; a no-op in a single process."""

    def __init__(self, device_pref: str, timeout_s: float = 600.0) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # "cuda" means this process's GPU (LOCAL_RANK under torchrun), never an index-less device
        self.device = resolve_device(device_pref, self.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            # a collective that waits longer than this (a peer died) raises instead of hanging forever
            dist.init_process_group(
                backend="nccl" if self.device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s)
            )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.to(self.device)
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def wrap_model(model: PonderLM, env: DistEnv, sharded: bool) -> torch.nn.Module:
    """The module the forward runs through: FSDP2 shards ``model`` in place (each block, then the
    whole) and returns it; DDP wraps it; one process runs ``model`` itself."""
    if sharded:
        from torch.distributed.fsdp import fully_shard

        # PonderOutput carries views (e.g. the mixed hidden state); nothing modifies them in place
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
    elif env.world > 1:
        ids = [env.device.index] if env.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


def grad_sync(wrapped: torch.nn.Module, sync: bool):
    """The context of one micro-batch's backward: under DDP, all but the last of a step skip the
    gradient all-reduce (no_sync); otherwise nothing."""
    if not sync and isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        return wrapped.no_sync()
    return contextlib.nullcontext()


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer, sharded: bool) -> tuple[dict, dict]:
    """(model state, optimizer state) as a checkpoint holds them: whole, gathered on the CPU under FSDP2."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (
            get_model_state_dict(model, options=opts),
            get_optimizer_state_dict(model, opt, options=opts),
        )
    return model.state_dict(), opt.state_dict()


def load_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict, sharded: bool) -> None:
    """Load a checkpoint's (full) optimizer state; under FSDP2, each rank keeps its shard of it."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)
