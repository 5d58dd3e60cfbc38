"""Find who we are (rank, local rank, world size) and where to meet, from whichever launcher started us; and end
the process group so that a failure on one rank ends the whole job fast.

In order: torchrun (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT); Slurm's srun (SLURM_PROCID, SLURM_LOCALID,
SLURM_NTASKS; the first host of the step's node list, resolved through Slurm's NodeAddr when its name does not
resolve; a port derived from the job id below Linux's ephemeral range unless MASTER_PORT is set); mpirun / mpiexec
through mpi4py (rank and size from COMM_WORLD, a non-loopback address and a free port chosen by rank 0 and
broadcast); otherwise one process. nccl on GPUs, gloo on CPUs.

:func:`session` owns the process group of a command. On success it waits for every rank and destroys the group;
on an exception it prints this rank's error first, aborts the group without waiting for anyone (a barrier there
would wait for peers that are stuck in a collective with this rank, until the timeout), and lets the process exit
non-zero, so ``torchrun``'s agent or ``srun --kill-on-bad-exit`` ends the other ranks at once.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import ipaddress
import os
import re
import socket
import subprocess
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Mapping, Optional

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


PORT_BASE, PORT_SPAN = 15000, 17000  # [15000, 32000): below Linux's ephemeral range (32768-60999 by default)


def port_from_job(job_id: str) -> int:
    """A port every task of a job computes alike, outside the range the kernel hands out to outgoing connections
    (so no other process already holds it); jobs sharing a node rarely collide."""
    return PORT_BASE + int(re.sub(r"\D", "", job_id) or 0) % PORT_SPAN


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


def is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def rendezvous_address(hostname: Optional[str] = None) -> str:
    """This host's address as other nodes reach it: the first non-loopback address its name resolves to (Debian and
    Ubuntu map the hostname to 127.0.1.1 in /etc/hosts), else the source address of the default route."""
    hostname = hostname or socket.gethostname()
    try:
        addrs = [a[4][0] for a in socket.getaddrinfo(hostname, None, socket.AF_INET)]
    except OSError:
        addrs = []
    for addr in addrs:
        if not is_loopback(addr):
            return addr
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            addr = s.getsockname()[0]
        except OSError:
            addr = "127.0.0.1"
    return addr


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
        single_node = local.Get_size() == world  # everyone on rank 0's host: loopback is fine, and fastest
        addr = env.get("MASTER_ADDR") or ("127.0.0.1" if single_node else rendezvous_address())
        with socket.socket() as s:  # a free port on rank 0's host
            s.bind(("", 0))
            port = int(env.get("MASTER_PORT") or s.getsockname()[1])
    addr, port = comm.bcast((addr, port), root=0)
    return DistInfo(rank, local.Get_rank(), world, local.Get_size(), "mpirun", addr, port)


def local_device_index(local_rank: int, n_gpus: int, local_world: int) -> int:
    """The GPU of a rank among those visible to it (torchtitan's rule): the only one where a rank sees one GPU
    (``--gpus-per-task=1``, ``--gpu-bind``), its local rank where it sees all of its node's GPUs."""
    if n_gpus == 1:
        return 0
    if local_world > n_gpus:
        raise UserError(f"{local_world} ranks on this node but {n_gpus} GPUs visible; start one rank per GPU "
                        f"(--ntasks-per-node={n_gpus}, --nproc-per-node={n_gpus}) or give each task one GPU "
                        f"(--gpus-per-task=1)")
    return local_rank


def init(timeout_s: float = 600.0, backend: str = "auto", device_type: str = "auto",
         env: Optional[Mapping[str, str]] = None) -> DistInfo:
    """Detect the launcher, check the placement and create the default process group (world > 1)."""
    info = detect(env)
    cuda = torch.cuda.is_available() if device_type == "auto" else device_type == "cuda"
    if cuda and info.world > 1:
        torch.cuda.set_device(local_device_index(info.local_rank, torch.cuda.device_count(), info.local_world))
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
    """Wait for every rank, then destroy the process group we created (ZeRO-3 aborts at exit otherwise)."""
    if info.initialized and dist.is_initialized():
        # Free what still holds a group (DDP reducers in reference cycles): a gloo group that outlives
        # destroy_process_group is destroyed at interpreter exit, where its threads can abort the process
        # ("terminate called without an active exception", seen once under Slurm after a clean run).
        gc.collect()
        dist.barrier()  # no rank tears its connections down while a peer still reads from them
        dist.destroy_process_group()
        info.initialized = False


def abort(info: DistInfo) -> None:
    """Tear the process group down at once, without waiting for peers (the error path)."""
    if not (info.initialized and dist.is_initialized()):
        return
    info.initialized = False
    try:
        dist.distributed_c10d._abort_process_group()  # every group; NCCL needs abort, not destroy, when stuck
    except (RuntimeError, ValueError, AttributeError, NotImplementedError):
        with contextlib.suppress(RuntimeError, ValueError):
            dist.destroy_process_group()


def backend_name() -> str:
    """The default process group's backend ("gloo", "nccl"), or "none" outside a process group."""
    return str(dist.get_backend()) if dist.is_initialized() else "none"


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def is_peer_gone(exc: BaseException) -> bool:
    """A collective that failed because another rank's process is gone (not a timeout: then nobody else reports)."""
    return isinstance(exc, (RuntimeError, dist.DistError)) and any(m in str(exc) for m in PEER_GONE)


def is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, (RuntimeError, dist.DistError)) and ("Timed out" in str(exc) or "timed out" in str(exc)
                                                                or isinstance(exc, dist.DistStoreError))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


SAME_ON_ALL_RANKS = "hpc_gan_same_on_all_ranks"  # attribute of an error every rank raised alike: rank 0 reports it


def report_failure(exc: BaseException, info: DistInfo) -> None:
    """This rank's error, printed before its connections close (so it comes before the peers' broken-pipe errors),
    and recorded where torchrun's agent collects the root cause (TORCHELASTIC_ERROR_FILE)."""
    if getattr(exc, SAME_ON_ALL_RANKS, False) and not info.is_main:
        return
    head = f"hpc-gan: rank {info.rank} of {info.world} failed"
    if isinstance(exc, UserError):
        print(f"{head}: {exc}", file=sys.stderr, flush=True)
    elif is_peer_gone(exc):  # collateral: a peer died first; its report is the cause
        print(f"{head}: a collective failed ({_first_line(exc)}); the first rank's report is the cause",
              file=sys.stderr, flush=True)
    elif is_timeout(exc):  # a peer is stuck: the stack dumps (dist.hang_dump_factor) above show where each rank was
        print(f"{head}: a collective timed out ({_first_line(exc)}): another rank is stuck; see the stack dumps "
              f"above (dist.hang_dump_factor), and dist.step_timeout_s / dist.timeout_s", file=sys.stderr, flush=True)
    else:
        lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
        print(f"{head}:\n" + "".join(lines).rstrip(), file=sys.stderr, flush=True)
    if os.environ.get("TORCHELASTIC_ERROR_FILE") and isinstance(exc, Exception):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
        with contextlib.suppress(Exception):  # the report above is what matters; the file is a bonus
            ErrorHandler().record_exception(exc)


REPORTED = "hpc_gan_reported"  # attribute set on an exception whose report is already printed


@contextlib.contextmanager
def session(timeout_s: float = 600.0, backend: str = "auto", device_type: str = "auto") -> Iterator[DistInfo]:
    """The process group of one command (see the module docstring)."""
    info = init(timeout_s, backend, device_type)
    try:
        yield info
    except BaseException as e:
        if info.world > 1 and not isinstance(e, (KeyboardInterrupt, SystemExit)):
            report_failure(e, info)
            setattr(e, REPORTED, True)
        abort(info)
        raise
    shutdown(info)


def set_timeout(seconds: float) -> None:
    """Change the timeout of every process group of this process (e.g. shorter once training runs steadily, so a
    hung collective fails in seconds, not after the start-up timeout)."""
    if not dist.is_initialized():
        return
    delta = datetime.timedelta(seconds=seconds)
    for group in list(dist.distributed_c10d._world.pg_map):
        with contextlib.suppress(ValueError, RuntimeError):
            dist.distributed_c10d._set_pg_timeout(delta, group)


class StepTimeouts:
    """The process-group timeout of a training run: ``long`` at start-up and around between-step actions (where
    rank 0 may write a checkpoint or a sample sheet while the others wait), ``short`` during steps once the first
    one is done, so a collective that hangs mid-training fails in seconds instead of minutes (0: always long)."""

    def __init__(self, info: DistInfo, long: float, short: float) -> None:
        self.on = info.world > 1 and short > 0
        self.long, self.short, self.steps = long, short, 0

    @contextlib.contextmanager
    def between_steps(self, busy: bool) -> Iterator[None]:
        """Around what runs after a step; ``busy``: something does (actions are due)."""
        self.steps += 1
        if self.on and busy:
            set_timeout(self.long)
        yield
        if self.on and busy:
            dist.barrier()  # nobody starts the next step's collectives under the short timeout while rank 0 writes
        if self.on and (busy or self.steps == 1):
            set_timeout(self.short)


def agree(fn: Callable[[], Any], info: DistInfo) -> Any:
    """Rank 0's ``fn()``, on every rank, or the UserError it raised, raised on every rank (reported by rank 0): a
    decision that must not depend on what each rank sees, e.g. which checkpoint to resume from on a file system
    whose attribute caches may disagree. ``fn`` runs on rank 0 only."""
    if info.world == 1 or not dist.is_initialized():
        return fn()
    box: List[Any] = [None]
    if info.is_main:
        try:
            box[0] = fn()
        except UserError as e:
            box[0] = e
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], UserError):
        setattr(box[0], SAME_ON_ALL_RANKS, True)
        raise box[0]
    return box[0]
