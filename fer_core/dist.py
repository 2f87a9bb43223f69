"""Data-parallel training across processes started by torchrun (`fer run --nproc N`).

Only rank 0 writes files, tracks and shows progress. ``train.batch_size`` is the *global* batch:
every batch of the single-process order is split across the N processes (each trains on
batch_size / N of it), so one recipe means the same experiment at any N and a checkpoint resumes
at any N. Validation images are split across processes and their predictions gathered, so each
counts exactly once.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import numpy as np
import torch


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); no-op alone."""
    import torch.distributed as td

    if world_size() > 1 and not td.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        td.init_process_group("nccl" if cuda else "gloo")


def broadcast(obj: Any) -> Any:
    """Rank 0's value of ``obj`` on every rank (e.g. a run directory named by the clock)."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def sum_all(values: list[float]) -> list[float]:
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":  # nccl reduces CUDA tensors only
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return t.tolist()


def shard_batches(batches: Iterable[list[int]]) -> list[list[int]]:
    """This rank's part (every N-th item) of each global batch; a last batch too small to give
    every rank an item is dropped on all of them."""
    n, r = world_size(), rank()
    return [b[r::n] for b in batches if len(b) >= n]


def gather_rows(part: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rank r holds rows r, r+N, r+2N, … of each array: every rank gets the whole arrays back in
    the original order."""
    n = world_size()
    if n == 1:
        return part
    parts: list[Any] = [None] * n
    torch.distributed.all_gather_object(parts, part)
    out = {}
    for key, first in parts[0].items():
        full = np.empty((sum(len(p[key]) for p in parts), *first.shape[1:]), dtype=first.dtype)
        for r, p in enumerate(parts):
            full[r::n] = p[key]
        out[key] = full
    return out


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """For learnable tensors outside the DDP-wrapped model (e.g. a loss's task weights)."""
    if world_size() == 1:
        return
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= world_size()


def launch(nproc: int, argv: list[str]) -> int:
    """`fer run … --nproc N`: the same command in N processes on this machine through torchrun;
    returns the exit status (rank 0's error line is the one shown)."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)  # rank 0 reports; no agent tracebacks
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))  # share the cores, never oversubscribe
    try:
        run(get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "fer_core", *argv]))
    except ChildFailedError as e:
        codes = [f.exitcode for _, f in sorted(e.failures.items())]
        return 2 if 2 in codes else next((c for c in codes if c > 0), 1)  # 2: rank 0 reported a user error
    return 0
