"""Several processes on PyTorch's own engine, `torch.distributed` (launched by `torchrun`; NCCL
on CUDA, gloo on CPU): the process group from torchrun's environment, and the `Shard` that
splits a job's queries across ranks and combines what each rank found.

A plain `mmca ...` (no torchrun, WORLD_SIZE unset or 1) never touches torch.distributed:
`Shard()` is then a single shard whose collectives do nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mmca.errors import MmcaError

ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 300.0


def add_arguments(p) -> None:
    """--dist-backend / --dist-timeout, for commands that run under torchrun."""
    p.add_argument("--dist-backend", choices=("gloo", "nccl"), default=None,
                   help="under torchrun: the process group's backend (default: nccl on CUDA, gloo on CPU)")
    p.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help="under torchrun: seconds a collective waits for the other ranks "
                        f"(default: {DEFAULT_TIMEOUT_S:g})")


def launched() -> bool:
    """Whether this process was started as one of several ranks (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_from_env(device: str | None = None, backend: str | None = None,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> "Shard":
    """Join the process group torchrun describes (or return the single shard when not
    launched). Backend: NCCL for CUDA devices (each rank on cuda:LOCAL_RANK), gloo otherwise;
    `backend` overrides. A missing rendezvous variable is a clear error, and every collective
    gives up after `timeout_s` (a dead rank ends the job instead of hanging it)."""
    if not launched():
        return Shard()
    missing = [name for name in ENV if not os.environ.get(name)]
    if missing:
        raise MmcaError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set",
                        "launch with `torchrun --nproc-per-node N -m mmca ...`, which sets them all")
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), timeout=timedelta(seconds=timeout_s))
    return Shard(dist.get_rank(), dist.get_world_size(), f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")


def shutdown(completed: bool) -> bool:
    """Leave the process group, if this process joined one. After a completed job the ranks
    first meet at a barrier, so no rank tears down its gloo connections while another is still
    using them (a rank that exits first can abort the other with "terminate called without an
    active exception"); after a failure the group is torn down at once (the others' collectives
    then fail, or time out, instead of hanging). False when the final barrier failed: another
    rank did not complete."""
    if not dist.is_initialized():
        return True
    try:
        if completed:
            dist.barrier()
        return True
    except (RuntimeError, dist.DistError):
        return False
    finally:
        dist.destroy_process_group()


@dataclass(frozen=True)
class Shard:
    """This rank's share of a job: contiguous spans of queries, and the collectives that put
    the shares together (identities when world == 1)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"  # where collectives' own tensors live (NCCL: this rank's GPU)

    @property
    def main(self) -> bool:
        """The rank that writes files and prints (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def main_first(self, work):
        """`work()` on rank 0 first, then on the others (e.g. filling a shared cache once)."""
        if not self.main:
            self.barrier()
        out = work()
        if self.main:
            self.barrier()
        return out

    def device_for(self, device: str) -> str:
        """This rank's device: its own GPU under torchrun on CUDA, else `device` as given."""
        return self.device if self.world > 1 and torch.device(device).type == "cuda" else device

    def span(self, n: int) -> tuple[int, int]:
        """This rank's contiguous part of range(n): as even as possible, in rank order."""
        return n * self.rank // self.world, n * (self.rank + 1) // self.world

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `x` over ranks (in place), e.g. counts each rank made."""
        if self.world > 1:
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    def max(self, x: torch.Tensor) -> torch.Tensor:
        """The element-wise maximum of `x` over ranks (in place)."""
        if self.world > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return x

    def join(self, part: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's `part` (its span of a length-n first axis) put together in order."""
        if self.world == 1:
            return part
        s, e = self.span(n)
        out = torch.zeros((n, *part.shape[1:]), dtype=part.dtype, device=part.device)
        out[s:e] = part
        return self.sum(out)  # spans are disjoint: the sum places each part

    def total(self, value: int) -> int:
        """An integer summed over ranks (e.g. pair passes)."""
        if self.world == 1:
            return value
        return int(self.sum(torch.tensor([value], dtype=torch.int64, device=self.device)).item())
