"""Training strategies behind one interface, :class:`Net`, so the trainer's code is the same for all:
``dist.strategy``.

The interface of one network's training handle: ``net(*x)`` is the forward whose gradients are synchronized,
``net.module`` the plain module (no-grad and frozen calls: D in the G step). Each micro-batch runs its forward and
backward inside ``with net.micro(last):`` (the sync decision is made at the forward: DDP's ``no_sync`` and
DeepSpeed's accumulation boundary both need it then), the backward is ``net.micro_backward(loss)``, and after the
last micro-batch ``net.optimizer_step()`` applies the update (DeepSpeed's ``engine.step()``, once, at the boundary).

- ``ddp``: torch DistributedDataParallel (plain module on one rank); ``no_sync`` on accumulation micro-steps;
  gradients as views of the buckets, bucket size and static graph from :class:`CommOptions`, optional bf16 gradient
  all-reduce; buffers are not re-broadcast every forward (they stay identical: SN vectors are computed from
  identical weights, BN statistics are global with cross-replica BN or averaged before checkpoints without it).
- ``zero1`` / ``zero2``: a DeepSpeed engine per network (separate configs), optimizer states (and gradients for
  ZeRO-2) sharded over the ranks. What makes ZeRO work for a GAN (measured): D sees real and fake in one forward;
  in the G step D is frozen and called as the plain module, never through its engine; the process group is
  destroyed at exit. Gradients are reduced and accumulated in fp32 under bf16 (:func:`zero_config`); the EMA of G
  stays fp32 outside the engines and follows the fp32 master slices each rank owns (:meth:`Net.master_fragments`).

Every strategy saves the same world-size-independent state: full fp32 weights and a torch.optim.Adam state dict
(ZeRO shards are gathered with DeepSpeed's safe_get_full_* and re-scattered with safe_set_full_* on load), so a run
saved at W ranks under one strategy resumes at W' ranks under any other.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from hpc_gan.config import choices
from hpc_gan.errors import UserError


@dataclass(frozen=True)
class CommOptions:
    """How gradients travel (``dist.*``); docs/scaling.md explains each choice."""
    bucket_cap_mb: float = 25.0      # DDP bucket size: buckets all-reduce while the backward still runs
    static_graph: bool = False       # DDP: the same parameters every iteration (bucket order learned once)
    grad_compression: str = "none"   # "bf16": DDP all-reduces bf16 copies of the buckets (half the bytes)
    zero_bucket_mb: float = 200.0    # ZeRO reduce-scatter / all-gather bucket size
    zero_comm_dtype: str = "fp32"    # ZeRO gradient communication and accumulation dtype under bf16

    @staticmethod
    def from_config(d: Any, static_graph_valid: bool) -> "CommOptions":
        return CommOptions(d.bucket_cap_mb, d.static_graph and static_graph_valid, d.grad_compression,
                           d.zero_bucket_mb, d.zero_comm_dtype)


def bf16_allreduce_hook(group, bucket):  # no annotations: DDP compares them with real types, not strings
    """DDP communication hook (group: Optional[ProcessGroup], bucket: GradBucket) -> Future[Tensor]: all-reduce a
    bf16 copy of each gradient bucket (half the bytes of fp32), averaged, written back into the fp32 bucket.
    torch's own bf16 hook refuses non-NCCL backends by name; this one runs on gloo too, so the CPU tests run it."""
    buf = bucket.buffer()
    low = buf.to(torch.bfloat16).div_(dist.get_world_size(group))
    fut = dist.all_reduce(low, group=group, async_op=True).get_future()

    def back(f: torch.futures.Future) -> torch.Tensor:
        buf.copy_(f.value()[0])
        return buf

    return fut.then(back)


def broadcast_state(module: nn.Module, src: int = 0) -> None:
    """Parameters and buffers from rank ``src`` to all (DeepSpeed does not broadcast buffers)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


class Net:
    """One network with its optimizer: the trainer's single handle on it (see the module docstring)."""

    module: nn.Module

    def __call__(self, *args: Any) -> Any:
        raise NotImplementedError

    def micro(self, last: bool) -> contextlib.AbstractContextManager:
        """Wrap forward + backward of one micro-batch; ``last`` marks the one whose backward synchronizes."""
        return contextlib.nullcontext()

    def micro_backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss (already divided by the accumulation count)."""
        raise NotImplementedError

    def nonfinite_grads(self) -> Optional[torch.Tensor]:
        """A device flag (shape (1,)): 1 where any gradient is NaN or inf; None where the engine keeps them."""
        return None

    def optimizer_step(self, found_inf: Optional[torch.Tensor] = None) -> None:
        """Apply the accumulated gradients and clear them; not applied where ``found_inf`` is 1."""
        raise NotImplementedError

    def master_fragments(self) -> Optional[List[Tuple[int, int, torch.Tensor]]]:
        """The fp32 master weights this rank owns, as (parameter index, flat offset, fp32 fragment), where they are
        sharded (ZeRO); None where the module's parameters are the masters."""
        return None

    def scale_lr(self, factor: float) -> None:
        for group in self.param_groups():
            group["lr"] *= factor

    def param_groups(self) -> List[Dict[str, Any]]:
        raise NotImplementedError

    def weights_state_dict(self) -> Dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_weights(self, state: Dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)

    def optimizer_state_dict(self) -> Dict[str, Any]:
        raise NotImplementedError

    def load_optimizer_state_dict(self, state: Dict[str, Any]) -> None:
        raise NotImplementedError


class TorchNet(Net):
    """Single process, or DDP when ``ddp``; fp16 through a GradScaler."""

    def __init__(self, module: nn.Module, opt: torch.optim.Optimizer, ddp: bool, fp16: bool,
                 comm: CommOptions = CommOptions()) -> None:
        self.module, self.opt = module, opt
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self._one = torch.ones(1, device=self.params[0].device)
        self.wrapped: nn.Module = module
        if ddp:
            dev = next(module.parameters()).device
            ddp = nn.parallel.DistributedDataParallel
            # buffers stay identical without a per-forward broadcast (see the module docstring)
            no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in \
                inspect.signature(ddp.__init__).parameters else {"broadcast_buffers": False}
            # gradients as views of the buckets: no copy in and out of them, and no second gradient-sized buffer
            self.wrapped = ddp(module, device_ids=[dev.index] if dev.type == "cuda" else None,
                               bucket_cap_mb=comm.bucket_cap_mb, gradient_as_bucket_view=True,
                               static_graph=comm.static_graph, **no_buffer_sync)
            if comm.grad_compression == "bf16":
                self.wrapped.register_comm_hook(None, bf16_allreduce_hook)

    def __call__(self, *args: Any) -> Any:
        return self.wrapped(*args)

    def param_groups(self) -> List[Dict[str, Any]]:
        return self.opt.param_groups

    def micro(self, last: bool) -> contextlib.AbstractContextManager:
        if isinstance(self.wrapped, nn.parallel.DistributedDataParallel) and not last:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def micro_backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler.is_enabled() else loss).backward()

    def nonfinite_grads(self) -> Optional[torch.Tensor]:
        if self.scaler.is_enabled():  # fp16 overflows are the loss scaler's business (it skips those steps)
            return None
        found = torch.zeros(1, device=self._one.device)
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, self._one)  # one fused pass, scale 1
        return found

    def optimizer_step(self, found_inf: Optional[torch.Tensor] = None) -> None:
        if self.scaler.is_enabled():
            self.scaler.step(self.opt)
            self.scaler.update()
        elif found_inf is None:
            self.opt.step()
        elif self.opt.defaults.get("fused") is True:
            self.opt.found_inf = found_inf.reshape(())  # fused Adam skips the update on the device: no host sync
            try:
                self.opt.step()
            finally:
                self.opt.found_inf = None
        elif not bool(found_inf):  # other implementations cannot skip on the device: one host sync
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def optimizer_state_dict(self) -> Dict[str, Any]:
        state = {"adam": self.opt.state_dict()}
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_optimizer_state_dict(self, state: Dict[str, Any]) -> None:
        self.opt.load_state_dict(state["adam"])
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])


class DeepSpeedNet(Net):
    def __init__(self, module: nn.Module, opt: torch.optim.Optimizer, stage: int, micro: int, accum: int,
                 world: int, bf16: bool, comm: CommOptions = CommOptions()) -> None:
        if next(module.parameters()).device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
        try:
            import deepspeed
        except ImportError as e:
            raise UserError(f"dist.strategy=zero{stage} needs DeepSpeed ({e}); "
                            f"DS_BUILD_OPS=0 pip install -e .[deepspeed], or dist.strategy=ddp") from None
        config = zero_config(stage, micro, accum, world, bf16, comm, next(module.parameters()).device.type == "cuda")
        self.module = module
        # DeepSpeed broadcasts rank 0's parameters as bytes (p.view(torch.uint8)), which fails for a 0-dim one
        # (self-attention's gamma). Replicas hold rank 0's weights already (broadcast_state, or the checkpoint
        # every rank loads), and DeepSpeed skips parameters it marks ds_optim_param in that broadcast only.
        for p in module.parameters():
            if p.dim() == 0:
                p.ds_optim_param = True
        self.engine, self.opt, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=config,
                                                           dist_init_required=False)
        if bf16:  # the engine casts the module, buffers included: SN vectors and BN statistics stay fp32
            for buf in module.buffers():
                if buf.is_floating_point():
                    buf.data = buf.data.float()
        self._params = list(module.parameters())
        self._boundary = False

    def __call__(self, *args: Any) -> Any:
        return self.engine(*args)

    def param_groups(self) -> List[Dict[str, Any]]:
        return self.opt.optimizer.param_groups  # the base Adam's groups, which DeepSpeed's wrapper steps with

    @contextlib.contextmanager
    def micro(self, last: bool) -> Iterator[None]:
        # the caller owns the boundary (DeepSpeed's documented pattern): set before each forward/backward
        self.engine.set_gradient_accumulation_boundary(last)
        self._boundary = last
        yield

    def micro_backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the trainer already divides by the accumulation count

    def optimizer_step(self, found_inf: Optional[torch.Tensor] = None) -> None:
        if found_inf is not None:
            raise UserError("train.nonfinite=skip is not available with DeepSpeed engines; use train.nonfinite=stop")
        if not self._boundary:
            raise RuntimeError("DeepSpeedNet.optimizer_step before the last micro-batch's backward")
        self.engine.step()

    def master_fragments(self) -> Optional[List[Tuple[int, int, torch.Tensor]]]:
        # DeepSpeed links each parameter to the slice of the flat fp32 partition this rank owns (the mapping its
        # own safe_get_full_fp32_param reads); a parameter wholly owned by other ranks has no fragment here
        out = []
        for i, p in enumerate(self._params):
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is not None:
                out.append((i, mapping.lp_fragment_address.start, mapping.get_hp_fragment()))
        return out

    # ---- world-size independent state -----------------------------------------------------------------------
    def weights_state_dict(self) -> Dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param
        state = dict(self.module.state_dict())
        for name, p in self.module.named_parameters():
            full = safe_get_full_fp32_param(p)  # collective: every rank calls this
            state[name] = (full if full is not None else p.detach().float()).to(p.device).clone()
        return state

    def load_weights(self, state: Dict[str, torch.Tensor]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param
        self.module.load_state_dict(state)
        for name, p in self.module.named_parameters():
            safe_set_full_fp32_param(p, state[name].to(p.device).float())

    def _base_states(self) -> List[Dict[str, Any]]:
        return list(self.opt.optimizer.state.values())

    def _ensure_states(self) -> None:
        """Adam creates its state at the first step and DeepSpeed links parameter fragments to it only then; a
        resumed run needs both before the saved moments can be scattered into the shards."""
        base = self.opt.optimizer
        for group in base.param_groups:
            for flat in group["params"]:
                if not base.state[flat]:
                    base.state[flat] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                                        "exp_avg_sq": torch.zeros_like(flat)}
        self.opt._lazy_init_hp_params_optimizer_state()

    def optimizer_state_dict(self) -> Dict[str, Any]:
        from deepspeed.utils import safe_get_full_optimizer_state
        self._ensure_states()  # a checkpoint before the first step
        steps = [float(s["step"]) for s in self._base_states() if "step" in s]
        step = steps[0] if steps else 0.0
        state = {}
        for i, p in enumerate(self._params):
            entry: Dict[str, Any] = {"step": torch.tensor(step)}
            for key in ("exp_avg", "exp_avg_sq"):
                full = safe_get_full_optimizer_state(p, key)
                entry[key] = torch.zeros_like(p, dtype=torch.float32) if full is None else full.clone()
            state[i] = entry
        group = {k: v for k, v in self.opt.optimizer.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(self._params)))
        return {"adam": {"state": state, "param_groups": [group]}}

    def load_optimizer_state_dict(self, state: Dict[str, Any]) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state
        adam = state["adam"]
        if len(adam["state"]) not in (0, len(self._params)):
            raise UserError(f"optimizer state has {len(adam['state'])} entries for {len(self._params)} parameters; "
                            f"resume with the config the run was started with")
        if not adam["state"]:
            return
        step = float(next(iter(adam["state"].values()))["step"])
        self._ensure_states()
        for i, p in enumerate(self._params):
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, adam["state"][i][key].to(p.device).float(), key)
        for s in self._base_states():
            if "step" in s:
                s["step"] = torch.tensor(step) if torch.is_tensor(s["step"]) else step


def build_optimizer(params: List[nn.Parameter], impl: str, lr: float, betas: tuple, eps: float
                    ) -> torch.optim.Optimizer:
    """Adam, ``train.optimizer_impl``: "torch" (one tensor at a time: the reference), "foreach" (a few ops for all
    tensors), "fused" (one kernel; on CUDA and, in torch >= 2.4, on CPUs), "apex" (NVIDIA apex's FusedAdam, CUDA,
    where installed) or "auto" (fused where it runs, else foreach). All compute the same update."""
    kw = dict(lr=lr, betas=betas, eps=eps)
    if impl == "apex":
        try:
            from apex.optimizers import FusedAdam
        except ImportError:
            raise UserError("train.optimizer_impl=apex needs NVIDIA apex (not on PyPI: NVIDIA's PyTorch containers "
                            "ship it, or build it from github.com/NVIDIA/apex); use train.optimizer_impl=auto"
                            ) from None
        return FusedAdam(params, adam_w_mode=False, **kw)
    if impl in ("auto", "fused"):
        try:
            return torch.optim.Adam(params, fused=True, **kw)
        except (RuntimeError, ValueError) as e:  # this device or torch has no fused Adam
            if impl == "fused":
                raise UserError(f"train.optimizer_impl=fused: {str(e).splitlines()[0]}; use auto or foreach") from None
    return torch.optim.Adam(params, foreach=impl != "torch", **kw)


def zero_config(stage: int, micro: int, accum: int, world: int, bf16: bool, comm: CommOptions, cuda: bool
                ) -> Dict[str, Any]:
    """DeepSpeed's config for one network. Under bf16 DeepSpeed would otherwise reduce and accumulate gradients in
    bf16 (8 mantissa bits: a sum over 256 ranks drops the small terms); here both are fp32 unless
    dist.zero_comm_dtype says bf16. overlap_comm runs the reduce-scatter on a side stream (CUDA only)."""
    # DeepSpeed counts bucket sizes in elements, and asserts they are even (its 4-byte alignment of 2-byte
    # elements); at least one alignment unit
    bucket = max(2, int(comm.zero_bucket_mb * 2 ** 20 / 4) // 2 * 2)
    config: Dict[str, Any] = {
        "train_batch_size": micro * accum * world, "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "zero_optimization": {"stage": stage, "overlap_comm": cuda, "contiguous_gradients": True,
                              "reduce_scatter": True, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket},
        "bf16": {"enabled": bf16}, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
        "steps_per_print": 2 ** 62, "wall_clock_breakdown": False,
    }
    if bf16:
        config["communication_data_type"] = comm.zero_comm_dtype
        config["data_types"] = {"grad_accum_dtype": comm.zero_comm_dtype}
    return config


def build_net(module: nn.Module, strategy: str, lr: float, betas: tuple, eps: float, micro: int, accum: int,
              world: int, precision: str, optimizer_impl: str = "auto", comm: CommOptions = CommOptions()) -> Net:
    """The training handle of one network."""
    opt = build_optimizer(list(module.parameters()), optimizer_impl, lr, betas, eps)
    if strategy == "ddp" or (strategy in ("zero1", "zero2") and world == 1):  # one rank: nothing to shard
        return TorchNet(module, opt, ddp=world > 1, fp16=precision == "fp16", comm=comm)
    if strategy in ("zero1", "zero2"):
        if precision == "fp16":
            raise UserError(f"dist.strategy={strategy} supports train.precision fp32 or bf16; use bf16 (or ddp)")
        return DeepSpeedNet(module, opt, int(strategy[-1]), micro, accum, world, precision == "bf16", comm)
    raise UserError(f"dist.strategy={strategy!r} is not one of {', '.join(choices('dist.strategy'))}")
