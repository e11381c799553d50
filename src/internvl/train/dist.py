"""Distributed setup: torchrun environment, process group (NCCL on GPUs, gloo on CPU) and FSDP2 sharding.

Without torchrun (or with one process) nothing is initialized and the model stays a plain module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..errors import TrainingError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce of a small tensor (a no-op on one process)."""
        if self.distributed:
            dist.all_reduce(values, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return values

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """ "auto": the local GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("--device cuda: no GPU is available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def init_distributed(device: str = "auto") -> DistContext:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and start the process group when there are several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30),
                                device_id=dev if dev.type == "cuda" else None)  # fmt: skip
    return DistContext(rank, world, local, dev)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_model(model: nn.Module, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2: every ViT and decoder layer is its own unit, the rest belongs to the root. With `param_dtype`
    (bf16) the sharded fp32 parameters are gathered in that dtype and gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kw = {"mp_policy": mp} if mp else {}
    for layer in model.vision_model.encoder.layers:
        fully_shard(layer, **kw)
    for layer in model.language_model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the gradient reduce-scatter on all but the last micro-step of an accumulation."""
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)


def full_state_dict(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Unsharded CPU copies of the parameters (and buffers), on rank 0 (empty elsewhere when sharded)."""
    if not is_sharded(model):
        params = dict(model.named_parameters())
        state = {k: v for k, v in model.state_dict().items() if not trainable_only or
                 (k in params and params[k].requires_grad)}  # fmt: skip
        return {k: v.detach().cpu() for k, v in state.items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=opts)


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of `full_state_dict` (keys may be a subset); rank 0's tensors are broadcast when sharded."""
    if not is_sharded(model):
        missing = set(state) - set(model.state_dict())
        if missing:
            raise TrainingError(f"checkpoint has tensors the model lacks, e.g. {min(missing)!r}")
        with torch.no_grad():
            own = model.state_dict()
            for k, v in state.items():
                own[k].copy_(v)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                 strict=False))  # fmt: skip


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter names (full tensors on rank 0 when sharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=opts)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    sharded = is_sharded(model)
    opts = StateDictOptions(full_state_dict=sharded, broadcast_from_rank0=sharded)
    set_optimizer_state_dict(model, optimizer, state, options=opts)
