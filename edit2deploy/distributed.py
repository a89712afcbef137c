"""Work across processes with torch.distributed, when the command was launched by `torchrun`.

`torchrun --nproc-per-node N -m edit2deploy stats|edit ...` starts N copies of the command; each learns its place
from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR). The process group is the only
shared state: it lives inside torch.distributed, so these helpers keep none of their own. Outside torchrun (or
before `process_group` has started one) every helper answers as the only process would (rank 0 of 1, sums
unchanged), so code that calls them runs unchanged in one process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
# Ranks other than 0 wait in a collective while rank 0 alone generates the corpus or writes the cache: on a
# large model that can take far longer than torch's default timeouts (10 min for nccl).
TIMEOUT = timedelta(hours=6)

T = TypeVar("T")


def launched_by_torchrun() -> bool:
    """True when torchrun (or any launcher setting the same variables) started this process."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def active() -> bool:
    """True when a process group is running: collectives then talk to the other ranks."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the group (0 without one)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """How many processes share the work (1 without a group)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files, prints and shows progress bars."""
    return rank() == 0


def backend_for(device: str | torch.device) -> str:
    """nccl for CUDA tensors (it reduces them on the GPU), gloo for everything on the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def rank_device(device: str) -> str:
    """The device this rank should use: a bare "cuda" under torchrun means this rank's own GPU (LOCAL_RANK),
    so N ranks on one machine do not all load onto GPU 0. Anything else is returned as given."""
    if device == "cuda" and launched_by_torchrun():
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


@contextlib.contextmanager
def process_group(device: str) -> Iterator[str]:
    """Under torchrun: start the process group once (backend by device) and destroy it on the way out, also on
    an error, so torchrun sees each worker exit with its own code. Outside torchrun: nothing. Yields the device
    this rank should use (`rank_device`)."""
    device = rank_device(device)
    started = False
    if launched_by_torchrun() and not active():
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(torch.device(device))  # nccl's object collectives use the current device
        dist.init_process_group(backend=backend_for(device), timeout=TIMEOUT)
        started = True
    try:
        yield device
    finally:
        if started and active():
            dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a float64 tensor over all ranks, in place, and return it (unchanged in one process). float64 only:
    the sums it serves are accumulated in float64, and a narrower type would lose what that bought."""
    if t.dtype != torch.float64:
        raise TypeError(f"all_reduce_sum: expected a float64 tensor, got {t.dtype}")
    if not active() or world_size() == 1:
        return t
    if dist.get_backend() == "gloo" and t.device.type != "cpu":
        cpu = t.cpu()
        dist.all_reduce(cpu, op=dist.ReduceOp.SUM)
        t.copy_(cpu)
    else:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    """Wait until every rank gets here (e.g. until rank 0 has written the cache); nothing in one process."""
    if active() and world_size() > 1:
        dist.barrier()


def broadcast_object(obj: T | None, src: int = 0) -> T:
    """Rank `src`'s `obj` (any picklable value) on every rank; others pass None. In one process: `obj`."""
    if not active() or world_size() == 1:
        return obj  # type: ignore[return-value]
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]  # type: ignore[return-value]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's `obj` (any picklable value), indexed by rank, on every rank. In one process: `[obj]`.
    Tensors should be on the CPU: a CUDA tensor would be unpickled onto its sender's device index."""
    if not active() or world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
