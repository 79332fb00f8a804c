"""Ranks outside Lightning (the latent cache, evaluation): which device a rank uses, barriers, and gathering
per-rank rows onto every rank.

Under ``torchrun`` (``WORLD_SIZE`` > 1), or ``srun`` with several tasks (``adopt_slurm_ranks``), the default process group is initialised here (nccl on CUDA, gloo on
the CPU) with a long timeout, because ranks wait for each other across long steps (rank 0 alone computes
reference statistics once per dataset), and left initialised: Lightning reuses an existing group. In a single process every function is a no-op or the identity.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# Ranks wait at barriers while rank 0 computes reference statistics (tens of minutes for 50k images).
_TIMEOUT = timedelta(hours=6)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def adopt_slurm_ranks() -> None:
    """Under ``srun`` with several tasks and no torchrun, set torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR = the step's first node, MASTER_PORT from the job id) from SLURM's, as Lightning's SLURM environment
    does for train.py: ``srun python -m ldm.cache ...`` then runs one rank per task on every node."""
    env = os.environ
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))  # set by srun only (not in the batch script itself)
    if "RANK" in env or tasks < 2 or "SLURM_PROCID" not in env:
        return
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=str(tasks), LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
    env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")))
    env.setdefault("MASTER_PORT", str(12000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[07-09,12],cpu1`` -> ``gpu07``; empty -> ``127.0.0.1``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        return "127.0.0.1"
    prefix, ranges = match.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group when launched by torchrun or srun (idempotent); returns (rank, world)."""
    adopt_slurm_ranks()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=_TIMEOUT)
    return rank_world()


def barrier() -> None:
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. an output folder named after rank 0's clock, or its error)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_rows(rows: dict[str, Any]) -> dict[str, Any]:
    """Concatenate every rank's ``rows`` (numpy arrays along axis 0, lists by extension), in rank order.

    All ranks must call this with the same keys; all ranks receive the result.
    """
    if not is_distributed():
        return rows
    parts: list[dict[str, Any]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(parts, rows)
    out: dict[str, Any] = {}
    for key in rows:
        values = [p[key] for p in parts]
        if isinstance(rows[key], np.ndarray):
            out[key] = np.concatenate(values, axis=0)
        else:
            out[key] = [v for chunk in values for v in chunk]
    return out


def gather_values(value: Any) -> list[Any]:
    """Every rank's ``value`` (e.g. the number of images it generated), in rank order, on every rank."""
    return gather_rows({"v": [value]})["v"]


def check_on_rank0(problem: str | None) -> None:
    """Raise rank 0's ``problem`` (a message, or None) on every rank, so no rank waits at a barrier forever."""
    problem = broadcast_object(problem)
    if problem:
        raise ValueError(problem)
