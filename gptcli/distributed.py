"""Distributed training under torchrun: this process's place in the job and the few collectives
training needs (sum, any, gather, rank-0-first). Without torchrun, a one-process ``Dist``."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .devices import resolve_device
from .errors import GptcliError, UserError

if TYPE_CHECKING:
    import torch


class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0,
                 local_world: int | None = None) -> None:
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.local_world = local_world or world  # processes per node

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def command(self, args: str) -> str:
        """``gpt ARGS`` as this job would run it again: under torchrun, the torchrun command of
        this job's shape (processes per node, nodes)."""
        if not self.enabled:
            return f"gpt {args}"
        nodes = max(1, self.world // self.local_world)
        where = "--standalone" if nodes == 1 else f"--nnodes {nodes} (on every node, as before)"
        return f"torchrun {where} --nproc_per_node {self.local_world} -m gptcli {args}"

    def device(self, name: str) -> torch.device:
        """The device for this rank: one GPU per local rank under torchrun."""
        device = resolve_device(name)
        if self.enabled and device.type == "cuda":
            import torch

            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum of ``values`` over all ranks."""
        if not self.enabled:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is true on some rank (keeps ranks in step)."""
        return bool(self.sum([float(flag)], device)[0]) if self.enabled else flag

    def gather(self, obj):
        """Every rank's ``obj``, as a list (on every rank)."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def main_first(self, fn):
        """Run ``fn`` on rank 0 only and hand its result (or its error) to every rank."""
        if not self.enabled:
            return fn()
        import torch.distributed as dist

        box = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except GptcliError as e:
                box[0] = ("error", e)
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value


_DIST = Dist()


def current_dist() -> Dist:
    return _DIST


def setup_distributed(device_name: str = "auto") -> Dist:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, LOCAL_RANK, ...):
    nccl on CUDA, gloo on the CPU. Without torchrun, a one-process Dist."""
    global _DIST
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _DIST = Dist()
        return _DIST
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    _DIST = Dist(rank, world, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE") or world))
    device = _DIST.device(device_name)
    if device.type == "mps":  # gloo cannot reduce MPS tensors, and nccl is CUDA only
        _DIST = Dist()
        raise UserError("distributed training supports CUDA (nccl) and CPUs (gloo), not mps; "
                        "pass --device cpu to train under torchrun on this machine")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return _DIST


def teardown_distributed(clean: bool = True) -> None:
    """Leave the torchrun job. After a clean run the ranks first wait for each other, so none
    tears the group down while another still uses it; after an error nobody waits (the others
    are ended by torchrun)."""
    global _DIST
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
    _DIST = Dist()
