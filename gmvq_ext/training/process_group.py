"""Single-process and torchrun plumbing: who am I, which device, reductions,
and a shutdown that cannot hang.

Shutdown order matters. A gloo worker thread may still be releasing the last
work of a collective (its tensors are Python-owned, so it needs the GIL) when
the process group is destroyed; a thread that destroys the group while
holding the GIL then waits for that worker forever. torch releases the GIL
when the group's Python object dies, but not when some other C++ owner holds
the last reference, and DDP's Reducer is such an owner. So:
``run_distributed`` runs the whole job in a function whose frame (models,
DDP wrappers, optimisers) is gone, garbage collected, before the process
group is destroyed, and a watchdog ends the process if shutdown still
blocks. Collective failures (a lost peer, a timeout) become one-line errors.
"""

from __future__ import annotations

import datetime
import functools
import gc
import os
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

# How long shutdown may take before the process ends itself.
SHUTDOWN_GRACE_SECONDS = 30.0

Result = TypeVar("Result")


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class LostPeerError(RuntimeError):
    """A collective failed: another process died, hung past the timeout or left early."""


def setup(device: str | None, timeout_seconds: float = 300.0) -> Context:
    """Join the torchrun process group when launched by torchrun (gloo on CPU,
    NCCL on CUDA) and pick this process's device.

    ``timeout_seconds`` bounds every collective: a rank whose peer died or
    hung fails with an error after at most that long instead of waiting forever."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} was asked for but no CUDA device is available")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(resolved)
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_seconds)
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        store = restart_scoped_store(world_size, timeout)
        if store is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return Context(rank, world_size, local_rank, resolved)


def restart_scoped_store(world_size: int, timeout: datetime.timedelta):
    """The torchrun agent's key-value store, with this restart's own key prefix;
    None when not launched by a torchrun agent that shares its store.

    Why: restarted workers (torchrun --max-restarts) reuse the agent's store, and
    the process group's keys (each rank's address) are the same in every round.
    A restarted rank could read a dead rank's address before its successor
    wrote its own, and fail to connect ("Connection refused"): a prefix per
    restart keeps the rounds apart."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"gmvq_ext/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def run_distributed(job: Callable[[Context], Result], ctx: Context) -> Result:
    """``job(ctx)``, then an orderly shutdown of the process group, always.

    Everything the job built lives in its own frame and is released (and
    garbage collected) while the process group still exists; only then is the
    group destroyed. A failed collective is re-raised as ``LostPeerError``."""
    try:
        return job(ctx)
    except BaseException as error:
        # The traceback keeps the job's frame (and its DDP Reducer) alive: clear it first.
        traceback.clear_frames(error.__traceback__)
        if ctx.distributed and is_collective_failure(error):
            raise LostPeerError(f"rank {ctx.rank}: a collective with the other processes failed: "
                                f"{first_line(error)}") from None
        raise
    finally:
        gc.collect()
        teardown(ctx)


def teardown(ctx: Context) -> None:
    """Destroy the process group; if that blocks for SHUTDOWN_GRACE_SECONDS, exit the process."""
    if not (ctx.distributed and dist.is_initialized()):
        return
    watchdog = threading.Timer(SHUTDOWN_GRACE_SECONDS, _exit_stuck_shutdown, args=(ctx.rank,))
    watchdog.daemon = True
    watchdog.start()
    try:
        dist.destroy_process_group()
    finally:
        watchdog.cancel()


def _exit_stuck_shutdown(rank: int) -> None:
    print(f"rank {rank}: destroying the process group took over {SHUTDOWN_GRACE_SECONDS:.0f} s; exiting",
          file=sys.stderr, flush=True)
    os._exit(1)


# gloo reports a dead or hung peer as a plain RuntimeError; these words (any case) mark it.
_COLLECTIVE_FAILURE_MARKERS = ("gloo", "nccl", "connection", "closed by peer", "timed out", "timeout",
                               "remote worker", "pair closure")


def is_collective_failure(error: BaseException) -> bool:
    message = str(error).lower()
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(marker in message for marker in _COLLECTIVE_FAILURE_MARKERS))


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def all_reduce_sum(tensor: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Sum over ranks (in place; returns the tensor)."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: torch.nn.Module, ctx: Context) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics drift apart
    because each rank updates them with its own shard)."""
    if ctx.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def gather_objects(obj, ctx: Context) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not ctx.distributed:
        return [obj]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, ctx: Context):
    """Rank 0's ``obj`` on every rank (other ranks' argument is ignored)."""
    if not ctx.distributed:
        return obj
    holder = [obj if ctx.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def keep_gradient_strides(module: torch.nn.Module) -> None:
    """Give each parameter's incoming gradient the parameter's own strides.

    Why: the CPU convolution backward returns the weight gradient of a 1x1
    convolution with channels-last strides (the same memory order, since its
    spatial dimensions have size 1), which DDP's gradient buckets, laid out
    like the parameters, take only with a warning and a copy per step. Only
    parameters with a size-1 dimension can be affected."""
    for parameter in module.parameters():
        if parameter.dim() > 1 and 1 in parameter.shape:
            parameter.register_hook(functools.partial(_with_strides, parameter.stride()))


def _with_strides(strides: tuple[int, ...], grad: torch.Tensor) -> torch.Tensor:
    if grad.stride() == strides:
        return grad
    return torch.empty_strided(grad.shape, strides, dtype=grad.dtype, device=grad.device).copy_(grad)


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()
