"""Where a rank learns who it is: a launcher's environment (deepspeed, torchrun), SLURM's (`srun`), or none (one rank).

    deepspeed --num_gpus 8 clipfast/train.py ...                       # the launcher sets RANK, LOCAL_RANK, ...
    torchrun --nnodes 2 --node_rank I --nproc_per_node 8 ... clipfast/train.py ...
    srun --ntasks-per-node 8 --gpus-per-node 8 python clipfast/train.py ...   # one process per GPU, no launcher
    python clipfast/train.py ... engine=torch                          # one rank on a free local port

Under `srun` each task reads its rank from SLURM (SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS); MASTER_ADDR
defaults to the step's first node (`scontrol show hostnames`) and MASTER_PORT to a port derived from the job and step
ids, so every task of the step picks the same one and another step of the job another. A launcher's own variables
always win. A batch script's own shell is no `srun` task: SLURM sets SLURM_PROCID=0 and the job's SLURM_NTASKS there
too, but not the step's variables, and `python clipfast/train.py` in it is one rank (taken as rank 0 of the job's N
tasks, it had waited for N - 1 that never start).
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
from pathlib import Path

log = logging.getLogger("clipfast.launch")


def slurm_env(environ=os.environ) -> str | None:
    """Started by `srun` without a launcher (SLURM_PROCID and the step's SLURM_STEP_NUM_TASKS set, RANK not): RANK,
    LOCAL_RANK, WORLD_SIZE and, for more than one task, MASTER_ADDR / MASTER_PORT from SLURM's variables. Returns a
    line saying what was taken (None where nothing was: not under SLURM, a launcher's ranks, a batch script's own
    shell). An unresolvable MASTER_ADDR is an error that names the variable and how to set it."""
    if "RANK" in environ or "SLURM_PROCID" not in environ or "SLURM_STEP_NUM_TASKS" not in environ:
        return None
    world = environ["SLURM_STEP_NUM_TASKS"]
    environ["RANK"], environ["WORLD_SIZE"] = environ["SLURM_PROCID"], world
    environ["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
    if int(world) > 1:
        if "MASTER_ADDR" not in environ:
            environ["MASTER_ADDR"] = first_node(environ)
        if "MASTER_PORT" not in environ:  # the same on every task of the step, apart from the job's other steps'
            environ["MASTER_PORT"] = str(master_port(environ))
    return (f"rank {environ['RANK']} of {world} (local {environ['LOCAL_RANK']}) from SLURM; master "
            f"{environ.get('MASTER_ADDR', '-')}:{environ.get('MASTER_PORT', '-')}")


def master_port(environ=os.environ) -> int:
    """20000 + (job id + 7919 x step id) mod 20000: every task of a step agrees; two steps of one job running at once
    on a node (e.g. two `srun ... &`) differ, and the first steps of two jobs differ unless their ids are a multiple
    of 20,000 apart (as with the job id alone)."""
    job, step = int(environ.get("SLURM_JOB_ID", "0")), int(environ.get("SLURM_STEP_ID", "0") or 0)
    return 20000 + (job + 7919 * step) % 20000


def first_node(environ=os.environ) -> str:
    """The first host of the SLURM step's (or job's) node list, through `scontrol show hostnames` (which expands
    `gpu[01-04,07]`)."""
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    scontrol = shutil.which("scontrol", path=environ.get("PATH"))
    if nodes and scontrol:
        hosts = subprocess.run([scontrol, "show", "hostnames", nodes], capture_output=True, text=True, timeout=60)
        if hosts.returncode == 0 and hosts.stdout.split():
            return hosts.stdout.split()[0]
    raise RuntimeError(f"MASTER_ADDR is not set and the first node of SLURM's node list ({nodes or 'not set'}) could "
                       "not be found (scontrol " + ("failed" if scontrol else "is not on PATH") + "): set it in the "
                       "job script, e.g. export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1)")


def free_port() -> int:
    """A local TCP port free now (a MASTER_PORT for ranks of this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_rank_env() -> None:
    """Started without a launcher (`python clipfast/train.py`): one rank on a free local port. A launcher's own
    RANK / WORLD_SIZE / MASTER_* are kept."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())


def shm_buffer_path(rank: int) -> Path:
    """DeepSpeed's shared-memory all-reduce buffer of `rank` (deepspeed/ops/csrc/cpu/comm/shm.cpp names it after the
    user, MASTER_ADDR and MASTER_PORT)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_buffer(rank: int) -> None:
    """DeepSpeed on the CPU with every rank on this machine (its launcher sets LOCAL_SIZE) creates a 69 MB shared-memory
    all-reduce buffer per rank in init_distributed, maps every rank's, and never unlinks them: each run left its
    buffers in /dev/shm, RAM that stays taken (300 such files, 20 GB, stalled this 24 GB machine on 2026-11-26).
    Called on each rank after a barrier that follows init_distributed, when every rank has mapped every buffer: the
    name goes now, the memory when the last process that maps it exits."""
    try:
        shm_buffer_path(rank).unlink()
    except FileNotFoundError:  # no shared-memory all-reduce (GPUs, one process without a launcher)
        pass
