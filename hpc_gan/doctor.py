"""``hpc-gan doctor [--config C]``: a preflight for a login or compute node. One line per check, ok / warn / fail /
skip, with the fix; exit 1 when a check fails. Run it before submitting a job (login node: what can be checked
there) and as the first line of a job script (compute node: GPUs, NCCL, kernels for the local GPU)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch

from hpc_gan.config import Config
from hpc_gan.errors import UserError


@dataclass
class Check:
    name: str
    status: str      # ok | warn | fail | skip
    detail: str      # what was found, and the fix where it is not ok


def _gpus() -> Check:
    if not torch.cuda.is_available():
        return Check("gpus", "skip", "no GPU visible (a login node?): GPU checks skipped")
    names = [f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2 ** 30:.1f} GiB)"
             for i in range(torch.cuda.device_count())]
    return Check("gpus", "ok", f"{len(names)}: " + ", ".join(names))


def _versions() -> Check:
    parts = [f"python {sys.version.split()[0]}", f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        parts.append(f"CUDA {torch.version.cuda}")
        try:
            parts.append("NCCL " + ".".join(map(str, torch.cuda.nccl.version())))
        except (AttributeError, RuntimeError):
            return Check("cuda/nccl", "fail", ", ".join(parts) + "; NCCL is missing from this torch build: install "
                         "a CUDA build of torch")
        return Check("cuda/nccl", "ok", ", ".join(parts))
    return Check("cuda/nccl", "skip", ", ".join(parts) + " (CPU build or no GPU)")


def _triton(compile_kernels: bool) -> Check:
    if importlib.util.find_spec("triton") is None:
        return Check("triton", "warn", "not installed: the fused kernels fall back to torch; pip install -e .[triton]")
    import triton
    if not compile_kernels:
        return Check("triton", "ok", f"triton {triton.__version__} (kernels not compiled: --skip-compile)")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        archs, dtypes, where = [major * 10 + minor], ["fp32", "bf16"], "the local GPU"
    else:  # the builds a bf16 run makes on H100s and A100s
        archs, dtypes, where = [90, 80], ["bf16"], "sm_90 and sm_80, bf16 (no GPU here)"
    # a subprocess: compiling needs TRITON_INTERPRET unset, and the interpreter may be on in this process
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--arch", *map(str, archs), "--dtype",
                           *dtypes], capture_output=True, text=True, env=env, timeout=900)
    lines = [x for x in proc.stdout.splitlines() if x.strip()]
    if proc.returncode:
        bad = [x for x in lines if "FAIL" in x] or lines[-1:] or [proc.stderr.strip()[-300:]]
        return Check("triton", "fail", f"triton {triton.__version__}: kernels do not compile for {where}: {bad[0]}; "
                     f"use loss.backend=torch model.sn_backend=foreach, or another triton")
    return Check("triton", "ok", f"triton {triton.__version__}: {len(lines) - 1} kernel builds for {where}")


def _dali() -> Check:
    from hpc_gan.data.dali import dali_available
    if not dali_available():
        return Check("dali", "warn", "not installed: data falls back to the torch DataLoader (PIL decode); "
                     "pip install -e .[dali]")
    import nvidia.dali as dali
    if not torch.cuda.is_available():
        return Check("dali", "ok", f"DALI {dali.__version__}; GPU decode not checked (no GPU)")
    try:
        _decode_on_gpu()
    except Exception as e:  # noqa: BLE001 -- any failure here means: no GPU decode; say which
        return Check("dali", "fail", f"DALI {dali.__version__} cannot decode on the GPU ({str(e).splitlines()[0]}); "
                     f"install the nvidia-dali build for this CUDA, or data.decode_device=cpu")
    return Check("dali", "ok", f"DALI {dali.__version__}, nvJPEG decode on the GPU works")


def _decode_on_gpu() -> None:
    import io

    import numpy as np
    from nvidia.dali import fn, pipeline_def, types
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="JPEG")
    data = np.frombuffer(buf.getvalue(), np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=torch.cuda.current_device())
    def pipe():
        enc = fn.external_source(source=lambda: [data], batch=True, dtype=types.UINT8)
        return fn.decoders.image(enc, device="mixed")
    p = pipe()
    p.build()
    p.run()


def _optional(module: str, extra: str, what: str) -> Check:
    if importlib.util.find_spec(module) is None:
        return Check(module, "warn", f"not installed ({what}): pip install -e .[{extra}]")
    try:
        if module == "mpi4py":
            from mpi4py import MPI
            version = f"mpi4py, {MPI.Get_library_version().splitlines()[0].strip()}"
        else:
            mod = __import__(module)
            version = f"{module} {getattr(mod, '__version__', '?')}"
    except Exception as e:  # noqa: BLE001 -- an import that fails half-way (e.g. no libmpi) is what we look for
        return Check(module, "fail", f"installed but does not import ({str(e).splitlines()[0]}); reinstall it "
                     f"(pip install -e .[{extra}])")
    return Check(module, "ok", version)


def _data(cfg: Config) -> Check:
    d = cfg.data
    if d.name == "synthetic":
        return Check("data", "ok", "synthetic (embedded)")
    path = Path(d.path)
    if not path.exists():
        return Check("data", "fail", f"data.path={d.path} does not exist; set data.path (prepare shards with "
                     f"hpc-gan prepare-data)")
    if d.name == "shards":
        meta = path / "dataset.json"
        if not meta.is_file():
            return Check("data", "fail", f"{path} has no dataset.json: prepare-data did not finish; run it again "
                         f"(it resumes)")
        info = json.loads(meta.read_text())
        missing = [s["name"] for s in info["shards"]
                   if not all((path / s["name"]).with_suffix(ext).is_file() for ext in (".tar", ".idx", ".json"))]
        if missing:
            return Check("data", "fail", f"{len(missing)} of {len(info['shards'])} shards lack their tar, index or "
                         f"labels (first: {missing[0]}); run hpc-gan prepare-data again (it resumes)")
        if info.get("resolution") != cfg.model.resolution:
            return Check("data", "fail", f"shards are {info.get('resolution')} px but model.resolution="
                         f"{cfg.model.resolution}; prepare them at that resolution")
        if info["num_classes"] != d.num_classes:
            return Check("data", "fail", f"shards hold {info['num_classes']} classes but data.num_classes="
                         f"{d.num_classes}; set data.num_classes={info['num_classes']}")
        return Check("data", "ok", f"{info['num_images']} images in {len(info['shards'])} complete shards, "
                     f"{info['num_classes']} classes")
    if d.name == "folder":
        classes = [p for p in path.iterdir() if p.is_dir()] if path.is_dir() else []
        if not classes:
            return Check("data", "fail", f"{path} has no class folders; point data.path at train/ of ImageNet")
        if len(classes) != d.num_classes:
            return Check("data", "fail", f"{path} has {len(classes)} class folders but data.num_classes="
                         f"{d.num_classes}; set data.num_classes={len(classes)}")
        return Check("data", "warn", f"{len(classes)} class folders: every rank walks the tree at start-up and reads "
                     f"files one by one; prepare shards for multi-node runs (hpc-gan prepare-data)")
    return Check("data", "ok", f"{d.name}: {path}")


def checkpoint_bytes(cfg: Config) -> int:
    """One checkpoint: fp32 G, D and G_ema, and Adam's two moments of G and D."""
    from hpc_gan.models import build_models
    g, d = (sum(p.numel() for p in net.parameters()) for net in build_models(cfg))
    return 4 * (g + d + g + 2 * (g + d))


def _size(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def _disk(cfg: Config) -> Check:
    need = checkpoint_bytes(cfg) * (max(cfg.train.keep_checkpoints, 1) + 1)  # the kept ones + the one being written
    where = Path(cfg.run.dir).resolve()
    probe = next(p for p in [where, *where.parents] if p.exists())
    free = shutil.disk_usage(probe).free
    detail = f"{_size(need)} for {max(cfg.train.keep_checkpoints, 1)} kept + 1 new checkpoint, {_size(free)} free " \
             f"at {probe}"
    if free < need:
        return Check("disk", "fail", f"{detail}; free space or set run.dir elsewhere / train.keep_checkpoints lower")
    return Check("disk", "warn" if free < 2 * need else "ok", detail)


def _placement(cfg: Config, env: dict) -> List[Check]:
    from hpc_gan.dist.launch import detect
    from hpc_gan.plan import StepPlan
    if not any(k in env for k in ("SLURM_JOB_ID", "RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")):
        return [Check("launch", "skip", "not inside a job (no Slurm, torchrun or MPI variables)")]
    out = []
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" not in env:  # the batch script itself, before srun
        nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
        per_node = int((env.get("SLURM_NTASKS_PER_NODE") or "0").split("(")[0] or 0)
        world = nodes * per_node if per_node else int(env.get("SLURM_NTASKS", "1"))
        if env.get("SLURM_CPUS_PER_TASK") and env.get("SRUN_CPUS_PER_TASK") != env.get("SLURM_CPUS_PER_TASK"):
            out.append(Check("slurm cpus", "warn", f"SLURM_CPUS_PER_TASK={env['SLURM_CPUS_PER_TASK']} but "
                             f"SRUN_CPUS_PER_TASK={env.get('SRUN_CPUS_PER_TASK', 'unset')}: srun of Slurm 22.05-23.02 "
                             f"then gives each rank one core; export SRUN_CPUS_PER_TASK (slurm/common.sh does)"))
        launcher = f"Slurm job {env['SLURM_JOB_ID']}: {nodes} nodes x {per_node or '?'} tasks"
        port = None
    else:
        try:
            info = detect(env)
        except UserError as e:
            return [Check("launch", "fail", str(e))]
        world, launcher, port = info.world, f"{info.launcher}: {info.world} ranks", info.master_port
    try:
        plan = StepPlan.from_config(cfg, 0, world)
        out.append(Check("launch", "ok", f"{launcher}; batch {cfg.train.batch_size} = {plan.micro} x {plan.accum} "
                         f"x {world} ranks"))
    except UserError as e:
        out.append(Check("launch", "fail", f"{launcher}: {e}"))
    if port is not None:
        out.append(_port(port))
    return out


def _port(port: int) -> Check:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError as e:
            return Check("port", "fail", f"rendezvous port {port} is taken on this host ({e.strerror}); set "
                         f"MASTER_PORT to a free one")
    return Check("port", "ok", f"rendezvous port {port} is free here")


def run_checks(cfg: Optional[Config], compile_kernels: bool = True, env: Optional[dict] = None) -> List[Check]:
    env = dict(os.environ) if env is None else env
    checks: List[Callable[[], object]] = [
        _gpus, _versions, lambda: _triton(compile_kernels), _dali,
        lambda: _optional("deepspeed", "deepspeed", "dist.strategy=zero1/zero2 needs it"),
        lambda: _optional("mpi4py", "mpi", "launching with mpirun needs it"),
    ]
    if cfg is not None:
        checks += [lambda: _data(cfg), lambda: _disk(cfg), lambda: _placement(cfg, env)]
    else:
        from hpc_gan.dist.launch import PORT_BASE
        checks.append(lambda: Check("config", "skip", f"no --config: data, disk and placement not checked "
                                    f"(rendezvous ports start at {PORT_BASE})"))
    out: List[Check] = []
    for check in checks:
        result = check()
        out += result if isinstance(result, list) else [result]
    return out


def print_checks(checks: List[Check]) -> None:
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{c.status:<5} {c.name:<{width}}  {c.detail}")
    counts = {s: sum(c.status == s for c in checks) for s in ("ok", "warn", "fail", "skip")}
    print(", ".join(f"{n} {s}" for s, n in counts.items() if n))
