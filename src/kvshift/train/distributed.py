"""One code path for 1 process, DDP and FSDP2.

`torchrun --nproc_per_node=N kvshift train ...` sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/PORT;
`setup()` then starts the process group (NCCL on CUDA, gloo on CPU) and each rank reads its own data
slice. Models are wrapped with DDP, or with FSDP2 (`fully_shard` per block, then the root) when
`fsdp=True`. Checkpoints always hold the FULL state: model weights gathered on rank 0 (keyed like
an unwrapped `LM.state_dict()`), optimizer state keyed by parameter name, so a checkpoint written by
N ranks loads in one process and vice versa.

torch.distributed's submodules (DDP, FSDP2, the state-dict helpers) are imported where they are used: some
torch builds ship without distributed support, and a single-process run never needs them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Dist", "setup", "teardown", "wrap_model", "model_state", "load_model_state", "optim_state",
           "load_optim_state", "all_reduce", "broadcast_object", "no_grad_sync"]


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mode: str = "none"  # "none" | "ddp" | "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto", fsdp: bool = False) -> Dist:
    """Reads the torchrun environment; starts the process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device = 'cuda' but CUDA is not available")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kw)
    mode = "none" if world == 1 else ("fsdp" if fsdp else "ddp")
    if world == 1 and fsdp:
        mode = "fsdp" if dist.is_initialized() else "none"
    return Dist(rank, world, local, dev, mode)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """Returns the module to call for forward/backward. FSDP2 shards `model` in place (the same
    object is returned); DDP returns a wrapper around it."""
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    if d.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(d.device.type, (d.world_size,))
        # bf16 autocast does the compute casting; keep params and the gradient reduction in fp32
        mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model
    return model


class no_grad_sync:
    """Skip the gradient all-reduce on accumulation micro-steps (all but the last)."""

    def __init__(self, wrapped: torch.nn.Module, d: Dist, skip: bool):
        self.wrapped, self.d, self.skip = wrapped, d, skip
        self._ctx = None

    def __enter__(self):
        if self.skip and self.d.mode == "ddp":
            self._ctx = self.wrapped.no_sync()
            self._ctx.__enter__()
        elif self.d.mode == "fsdp":
            self.wrapped.set_requires_gradient_sync(not self.skip)
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
        return False


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def model_state(model: torch.nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """Full model state dict on CPU (complete on rank 0; under FSDP every rank must call this)."""
    if d.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_model_state(model: torch.nn.Module, sd: dict[str, torch.Tensor], d: Dist) -> None:
    if d.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, sd, options=_options(full_state_dict=True))
    else:
        model.load_state_dict(sd)


def optim_state(model: torch.nn.Module, opt: torch.optim.Optimizer, d: Dist) -> dict:
    """Full optimizer state keyed by parameter name, on CPU (every rank must call this)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=_options(full_state_dict=True, cpu_offload=True))


def load_optim_state(model: torch.nn.Module, opt: torch.optim.Optimizer, osd: dict, d: Dist) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, osd, options=_options(full_state_dict=True))


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (no-op in one process); op 'sum' | 'mean' | 'max'."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        if op == "mean":
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(dist.get_world_size())
        else:
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
