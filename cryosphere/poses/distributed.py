"""torch.distributed plumbing: process groups, rank shares, collective checks, local launches.

CryoSphere runs on several processes with the engine PyTorch ships: ``torchrun`` (or SLURM's
``srun`` through ``torchrun``) starts one process per GPU or per CPU group and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env`
joins the group (NCCL on CUDA devices, Gloo on CPUs). Without those variables everything runs
as one process (rank 0 of 1) and no process group is made.

Rules every distributed entry point here follows:

* **Rank 0 writes.** Checkpoints, logs, STAR files and progress bars come from rank 0 only,
  always through :func:`cryosphere.io.atomic_path` (temporary file, then rename).
* **Checks agree.** Inputs are checked on every rank inside :func:`collective_check`; when any
  rank fails, every rank raises :class:`RankError` naming the failing ranks and their messages,
  so no rank waits for a peer that has already given up.
* **Dead peers end the run.** Collectives wait at most ``timeout_s`` (:func:`init_from_env`);
  a killed rank makes its peers' next collective fail (Gloo notices the closed connection at
  once, NCCL at the timeout), and since the output is written only after the final gather, a
  failed run leaves no output behind.

:func:`launch` starts ``world_size`` local processes on 127.0.0.1 (Gloo), the Python
counterpart of ``torchrun --nproc_per_node N`` used by the tests and the benchmark.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import util as mp_util
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = [
    "RankError",
    "DistributedContext",
    "init_from_env",
    "shutdown",
    "block_range",
    "collective_check",
    "gather_to_writer",
    "all_gather",
    "all_reduce_sum",
    "launch",
    "free_port",
]

DEFAULT_TIMEOUT_S = 600.0


class RankError(ValueError):
    """An input check or a step failed on at least one rank (raised on every rank)."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the run.

    Attributes:
        rank: global rank, ``0 .. world_size - 1``.
        world_size: number of processes (1: no process group).
        local_rank: rank on this node (selects the GPU).
        device: the torch device of this rank.
        joined_here: True when :func:`init_from_env` created the process group (and
            :func:`shutdown` should destroy it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    joined_here: bool = False

    @property
    def distributed(self) -> bool:
        """True when there is more than one process."""
        return self.world_size > 1

    @property
    def writes(self) -> bool:
        """True on the rank that writes files and shows progress (rank 0)."""
        return self.rank == 0


def init_from_env(
    device: str | torch.device | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> DistributedContext:
    """Join the process group described by the ``torchrun`` variables (or run alone).

    Args:
        device: ``"cpu"``, ``"cuda"`` or None (CUDA when available). With CUDA each rank takes
            ``cuda:LOCAL_RANK`` and the backend is NCCL; on CPU it is Gloo.
        timeout_s: the longest a collective waits for a peer before raising (seconds).
    """
    from cryosphere.imaging.projection import resolve_device  # noqa: PLC0415 - light module first

    device = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return DistributedContext(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    joined = False
    if not dist.is_initialized():
        missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise RankError(
                f"WORLD_SIZE={world} but {', '.join(missing)} is not set; start the run with "
                "torchrun (torchrun --nproc_per_node N -m cryosphere ...)"
            )
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=float(timeout_s)),
            rank=int(os.environ["RANK"]),
            world_size=world,
        )
        joined = True
    return DistributedContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
        joined_here=joined,
    )


def shutdown(context: DistributedContext) -> None:
    """Destroy the process group when :func:`init_from_env` made it."""
    if context.joined_here and dist.is_initialized():
        dist.destroy_process_group()


def block_range(n: int, rank: int, world_size: int, align: int = 1) -> tuple[int, int]:
    """Contiguous share ``[start, stop)`` of ``n`` items for ``rank`` of ``world_size``.

    Blocks are made of whole ``align``-item units (the last unit may be short), split as evenly
    as possible, earlier ranks taking the extra unit; concatenating the ranks' blocks in rank
    order gives ``0 .. n - 1``. A rank may get an empty block when there are fewer units than
    ranks.
    """
    n, align = int(n), max(1, int(align))
    units = -(-n // align)
    per, extra = divmod(units, int(world_size))
    first = rank * per + min(rank, extra)
    last = first + per + (1 if rank < extra else 0)
    return min(n, first * align), min(n, last * align)


def all_gather(context: DistributedContext, value: Any) -> list[Any]:
    """``[value of rank 0, value of rank 1, ...]`` on every rank (picklable values)."""
    if not context.distributed:
        return [value]
    out: list[Any] = [None] * context.world_size
    dist.all_gather_object(out, value)
    return out


def gather_to_writer(context: DistributedContext, value: Any) -> list[Any] | None:
    """The ranks' values in rank order on rank 0; None on the other ranks."""
    if not context.distributed:
        return [value]
    out: list[Any] | None = [None] * context.world_size if context.writes else None
    dist.gather_object(value, out, dst=0)
    return out


def all_reduce_sum(context: DistributedContext, values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (float64), the same on every rank."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if context.distributed:
        if context.device.type == "cuda":
            tensor = tensor.to(context.device)
        dist.all_reduce(tensor)
    return [float(v) for v in tensor.cpu()]


@contextlib.contextmanager
def collective_check(context: DistributedContext, what: str) -> Iterator[None]:
    """Run the block on every rank, then raise :class:`RankError` on all ranks if any failed.

    The error names each failing rank with its exception type and message, e.g.
    ``"reading the particles failed on rank 1: FileNotFoundError: stack ... does not exist"``.
    Alone (one process) the block's own exception passes through unchanged.
    """
    error: BaseException | None = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - reported on every rank below
        if not context.distributed:
            raise
        error = exc
    reports = all_gather(context, None if error is None else f"{type(error).__name__}: {error}")
    failed = [(rank, text) for rank, text in enumerate(reports) if text is not None]
    if failed:
        lines = "; ".join(f"rank {rank}: {text}" for rank, text in failed)
        raise RankError(f"{what} failed on {len(failed)} of {context.world_size} ranks: {lines}")


# ---------------------------------------------------------------------------------------------
# local launches (the Python counterpart of torchrun --nproc_per_node N)
# ---------------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(
    local_rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    threads: int,
    timeout_s: float,
    args: tuple,
) -> None:
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(int(threads))
    context = init_from_env("cpu", timeout_s=timeout_s)
    code = 0
    try:
        fn(context, *args)
    except BaseException:
        traceback.print_exc()
        code = 1
    # Leave without tearing the process group down: once a peer has died, Gloo's teardown
    # (destroy_process_group or the interpreter's exit) can end in std::terminate at random,
    # which would replace how fn ended with SIGABRT. Everything fn wrote is already closed;
    # multiprocessing's own exit hooks still run (they release its semaphores).
    mp_util._exit_function()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launch(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    *,
    threads: int = 1,
    timeout_s: float = 120.0,
    collective_timeout_s: float = 30.0,
) -> list[int]:
    """Run ``fn(context, *args)`` in ``world_size`` new CPU processes joined by Gloo.

    ``fn`` must be importable (a module-level function) and its ``args`` picklable; results
    travel through files. Each process uses ``threads`` torch threads and collectives wait at
    most ``collective_timeout_s`` for a peer. Every rank runs to its own end (a failing rank
    does not kill the others, unlike torchrun), so a test sees how each one ended.

    Returns:
        the exit codes in rank order (0: ``fn`` returned; 1: it raised, traceback on stderr;
        negative: killed by that signal).

    Raises:
        TimeoutError: ranks still running after ``timeout_s``; they are terminated first.
    """
    spawn = mp.get_context("spawn")
    port = free_port()
    processes = [
        spawn.Process(
            target=_worker,
            args=(rank, fn, int(world_size), port, int(threads), collective_timeout_s, args),
        )
        for rank in range(int(world_size))
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + float(timeout_s)
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    late = [rank for rank, p in enumerate(processes) if p.is_alive()]
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(5.0)
    if late:
        raise TimeoutError(f"ranks {late} of {world_size} still running after {timeout_s:.0f} s")
    return [int(p.exitcode) for p in processes]


def concat_rows(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate per-rank dicts of row arrays (rank order) key by key."""
    keys = parts[0].keys()
    return {key: np.concatenate([part[key] for part in parts]) for key in keys}
