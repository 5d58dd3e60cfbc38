"""Find who we are (rank, local rank, world size) and where to meet, from whichever launcher started us.

In order: torchrun (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT); Slurm's srun (SLURM_PROCID, SLURM_LOCALID,
SLURM_NTASKS; the first host of SLURM_JOB_NODELIST, resolved through Slurm's NodeAddr when its name does not
resolve; port derived from the job id unless MASTER_PORT is set); mpirun / mpiexec through mpi4py (rank and size from
COMM_WORLD, address and port chosen by rank 0 and broadcast); otherwise one process. nccl on GPUs, gloo on CPUs.
"""
from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import List, Mapping, Optional

import torch
import torch.distributed as dist

from hpc_gan.errors import UserError

MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    local_world: int = 1
    launcher: str = "single"              # torchrun | srun | mpirun | single
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    backend: str = "gloo"
    initialized: bool = False             # a process group was created (by us)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---- Slurm helpers ---------------------------------------------------------------------------------------------
def expand_nodelist(nodelist: str) -> List[str]:
    """Slurm's compressed host list ("gpu[001-003,007],login1") as names, without needing scontrol."""
    hosts: List[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
    return hosts


def _resolve(host: str) -> str:
    try:
        socket.getaddrinfo(host, None)
        return host
    except OSError:  # fake or unregistered node names (as in slurm/local): ask Slurm where the node is
        try:
            out = subprocess.run(["scontrol", "show", "node", host], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        m = re.search(r"NodeAddr=(\S+)", out)
        if not m:
            raise UserError(f"cannot resolve the first Slurm node {host!r} and scontrol gives no NodeAddr for it; "
                            f"set MASTER_ADDR to its address")
        return m.group(1)


def port_from_job(job_id: str) -> int:
    """A port every task of a job computes alike; jobs sharing a node rarely collide (15000 + job id mod 20000)."""
    return 15000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def check_slurm(env: Mapping[str, str]) -> None:
    """Refuse the classic sbatch/srun mistake: --ntasks over several nodes without --ntasks-per-node, with which
    Slurm may pack tasks unevenly (e.g. 3 + 1), so local ranks no longer map one-to-one to GPUs."""
    nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", "1")))
    if nodes > 1 and not env.get("SLURM_NTASKS_PER_NODE"):
        raise UserError(f"{env.get('SLURM_NTASKS')} Slurm tasks over {nodes} nodes without --ntasks-per-node "
                        f"(placed as {env.get('SLURM_TASKS_PER_NODE', '?')}); submit with "
                        f"--ntasks-per-node=<GPUs per node>")


def _first_count(tasks_per_node: str) -> int:
    """Tasks on the first node from Slurm's per-node counts ("4", "4(x2)", "3,1")."""
    return int(tasks_per_node.split(",")[0].split("(")[0])


def detect(env: Optional[Mapping[str, str]] = None) -> DistInfo:
    """Who and where, from the environment; no process group is created here."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                        int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])), "torchrun",
                        env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:  # inside srun, not bare sbatch
        check_slurm(env)
        host = env.get("MASTER_ADDR") or _resolve(expand_nodelist(env.get("SLURM_STEP_NODELIST",
                                                                          env["SLURM_JOB_NODELIST"]))[0])
        port = int(env.get("MASTER_PORT") or port_from_job(env.get("SLURM_JOB_ID", "0")))
        local_world = _first_count(env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE", "1"))
        return DistInfo(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]),
                        local_world, "srun", host, port)
    if any(v in env for v in MPI_VARS):
        return _detect_mpi(env)
    return DistInfo()


def _detect_mpi(env: Mapping[str, str]) -> DistInfo:
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise UserError(f"started by mpirun/mpiexec but mpi4py is missing ({e}); pip install -e .[mpi]") from e
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    addr = port = None
    if rank == 0:
        addr = env.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
        with socket.socket() as s:  # a free port on rank 0's host
            s.bind(("", 0))
            port = int(env.get("MASTER_PORT") or s.getsockname()[1])
    addr, port = comm.bcast((addr, port), root=0)
    return DistInfo(rank, local.Get_rank(), world, local.Get_size(), "mpirun", addr, port)


def init(timeout_s: float = 600.0, backend: str = "auto", device_type: str = "auto",
         env: Optional[Mapping[str, str]] = None) -> DistInfo:
    """Detect the launcher, check the placement and create the default process group (world > 1)."""
    info = detect(env)
    cuda = torch.cuda.is_available() if device_type == "auto" else device_type == "cuda"
    if cuda and info.world > 1:
        n_gpu = torch.cuda.device_count()
        if info.local_world > n_gpu:
            raise UserError(f"{info.local_world} ranks on this node but {n_gpu} GPUs visible; start one rank per GPU "
                            f"(--ntasks-per-node={n_gpu}, --nproc-per-node={n_gpu})")
        torch.cuda.set_device(info.local_rank)
    info.backend = backend if backend != "auto" else ("nccl" if cuda else "gloo")
    if info.world > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", info.master_addr)
        os.environ.setdefault("MASTER_PORT", str(info.master_port))
        dist.init_process_group(info.backend, init_method=f"tcp://{info.master_addr}:{info.master_port}",
                                rank=info.rank, world_size=info.world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        info.initialized = True
    return info


def shutdown(info: DistInfo) -> None:
    """Destroy the process group we created (ZeRO-3 aborts at exit otherwise; and it is polite)."""
    if info.initialized and dist.is_initialized():
        try:  # no rank tears its connections down while a peer still reads from them
            dist.barrier()
        except RuntimeError:
            pass  # a peer is gone already: nothing left to wait for
        dist.destroy_process_group()
        info.initialized = False

