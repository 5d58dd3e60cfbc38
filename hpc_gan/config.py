"""Typed, strict configuration: dataclasses with defaults, YAML files that may set only known keys, and
``section.key=value`` overrides from the command line. Every error is one line that names the key and the fix.

The allowed values of every choice are the ``Literal`` annotations below; :data:`CHOICES` is derived from them, and
the modules that dispatch on a choice import its values from here."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import yaml

from hpc_gan.errors import UserError
from kernels import BACKENDS, D2D_MODES, SN_BACKENDS

# ---- allowed values: each choice is defined once, here, and every module imports it from here ----------------------
Device = Literal["auto", "cpu", "cuda"]
Arch = Literal["biggan", "biggan_deep"]
Resolution = Literal[16, 32, 64, 128, 256]
KernelBackend = Literal[BACKENDS]                  # kernels' own switch (auto: Triton on CUDA tensors)
SNBackend = Literal[SN_BACKENDS]                   # torch: per layer (reference); foreach / triton: whole network
DataName = Literal["synthetic", "folder", "npz", "shards"]
DataBackend = Literal["auto", "dali", "torch"]
DecodeDevice = Literal["auto", "mixed", "cpu"]
AdvLoss = Literal["hinge", "nonsaturating", "least_squares", "wasserstein"]
D2DMode = Literal[D2D_MODES]
Precision = Literal["fp32", "bf16", "fp16"]
Strategy = Literal["ddp", "zero1", "zero2"]
DistBackend = Literal["auto", "nccl", "gloo"]
Backbone = Literal["inception", "tiny"]
NonFinite = Literal["stop", "skip"]
OptimizerImpl = Literal["auto", "torch", "foreach", "fused", "apex"]
OrthoImpl = Literal["auto", "autograd", "grad", "sharded"]
AttnImpl = Literal["sdpa", "sdpa_narrow", "explicit"]
PoolImpl = Literal["auto", "nearest_grad", "reshape", "avg_pool2d"]
UpsampleImpl = Literal["auto", "interpolate", "expand"]
DRgbConv = Literal["conv2d", "nchw", "unfold_mm"]
GRgbConv = Literal["conv2d", "nchw", "pad_out"]
UpConvImpl = Literal["auto", "separate", "fused", "transposed"]
DownConvImpl = Literal["auto", "separate", "fused"]
AttnGamma = Literal["weight", "output"]
MemoryFormat = Literal["auto", "channels_last", "contiguous"]
CompileMode = Literal["off", "default", "max-autotune", "reduce-overhead"]
NegBackward = Literal["reduce_scatter", "all_reduce"]
DShortcut = Literal["biggan", "studiogan"]
OnAlarm = Literal["warn", "stop", "rollback"]
GradCompression = Literal["none", "bf16"]
ZeroCommDtype = Literal["fp32", "bf16"]
DIFFAUG_POLICIES = ("color", "translation", "cutout")   # loss.diffaug: a comma list of these
METRICS = ("fid", "is", "prd", "prdc")                  # eval.metrics: a comma list of these


@dataclass(frozen=True)
class Conditioning:
    """What a conditioning method (``loss.cond``) needs: the D head it reads, and whether it has a loss of its own
    (weighted by cond_lambda_d / cond_lambda_g; projection folds its term into D's adversarial score instead)."""
    head: str       # "embedding" (linear P + class proxies), "classifier" (class logits), "projection" or "none"
    has_loss: bool


CONDITIONING: Dict[str, Conditioning] = {
    "d2d_ce": Conditioning("embedding", True),    # ReACGAN's Data-to-Data Cross-Entropy
    "2c": Conditioning("embedding", True),        # ContraGAN's conditional contrastive loss
    "ac": Conditioning("classifier", True),       # ACGAN's cross-entropy
    "mh": Conditioning("classifier", True),       # multi-hinge (Crammer-Singer)
    "pd": Conditioning("projection", False),      # projection discriminator
    "none": Conditioning("none", False),
}
CondMethod = Literal[tuple(CONDITIONING)]


@dataclass
class RunConfig:
    dir: str = "runs/demo"                 # run directory: config.yaml, metrics.jsonl, samples/, checkpoints/
    preset: str = ""                       # the recipe this config came from (configs/NAME.yaml; docs/presets.md)
    device: Device = "auto"
    tensorboard: bool = True               # write TensorBoard events when tensorboard is installed
    preempt_signals: str = "USR1"          # signals that mean: checkpoint, requeue (Slurm), exit 0 ("" = none)


@dataclass
class ModelConfig:
    arch: Arch = "biggan"
    resolution: Resolution = 32
    g_ch: int = 32                         # channel multiplier of G
    d_ch: int = 32                         # channel multiplier of D
    z_dim: int = 80                        # biggan: chunk size x (blocks + 1)
    shared_dim: int = 128                  # shared class embedding in G
    embed_dim: int = 512                   # D's linear head P / proxies (d2d_ce, 2c)
    g_attn_res: int = 0                    # resolution of G's self-attention (0: none)
    d_attn_res: int = 0
    sn_eps: float = 1e-6
    bn_eps: float = 1e-4
    out_bn_eps: Optional[float] = None     # G's output BatchNorm (None: bn_eps; BigGAN-PyTorch's is 1e-5)
    d_shortcut: DShortcut = "biggan"       # studiogan: D blocks' shortcuts see ReLU(x), as StudioGAN's (ReACGAN's) D
    sn_backend: SNBackend = "auto"         # auto: triton on CUDA, foreach elsewhere; torch: per layer (reference)
    sn_static_weights: bool = False        # triton SN: W / sigma written where they were the last forward and
                                           # handed to train.cuda_graphs as static inputs, not copied in per replay
                                           # (hpc_gan.models.sn_fused; not yet measured on a GPU)
    attn_impl: AttnImpl = "sdpa"           # self-attention: torch's scaled_dot_product_attention with q/k padded to
                                           # v's width (flash / cuDNN kernels), sdpa_narrow (q/k padded to a multiple
                                           # of 8 only: the memory-efficient kernel, 3-4x fewer q.k FLOPs), explicit
                                           # (the map itself, reference)
    pool_impl: PoolImpl = "auto"           # D's 2x2 average pool: nearest_grad (backward as an upsampling), reshape
                                           # (a mean over a view), avg_pool2d (reference); auto: reshape on CUDA,
                                           # nearest_grad elsewhere (H100 and CPU numbers: docs/benchmarks.md)
    upsample_impl: UpsampleImpl = "auto"   # G's 2x nearest upsampling: interpolate (torch's, reference), expand (a
                                           # broadcast copy); auto: expand on CUDA, interpolate elsewhere
    d_rgb_conv_impl: DRgbConv = "conv2d"   # D's convolutions on the 3-channel image: conv2d (reference), nchw
                                           # (cuDNN's NCHW kernels, output back to the activations' layout),
                                           # unfold_mm (im2col + one batched product writing NHWC)
    g_rgb_conv_impl: GRgbConv = "conv2d"   # G's convolution to 3 channels: conv2d (reference), nchw, pad_out
                                           # (outputs zero-padded to 8, sliced); both timed by the check pack's
                                           # layers stage (hpc_gan.models.rgb_conv)
    g_upconv_impl: UpConvImpl = "auto"     # G's upsample + 3x3 conv: separate (reference), fused (one 2x2
                                           # conv over the 4 output phases: 4/9 of the products), transposed (one
                                           # 4x4 transposed conv, stride 2: the same products, no interleave);
                                           # auto: fused
    d_downconv_impl: DownConvImpl = "auto"  # D's 3x3 conv + 2x2 avg pool: separate (reference), fused (one
                                            # 4x4 conv, stride 2: 4/9 of the products); auto: fused
                                            # (hpc_gan.models.resample_conv)
    attn_gamma: AttnGamma = "weight"       # self-attention's learned scale: folded into its output 1x1 conv's
                                           # weight (gamma's gradient a sum over the weight), or on the conv's
                                           # output (BigGAN's form, reference: a sum over the activation,
                                           # 5.85 ms of the H200's CUDA-graph step at 256 per GPU)
    memory_format: MemoryFormat = "auto"   # of activations; auto: channels_last (measured faster on CPUs, 1.3-1.8x,
                                           # and on an H100, 12%: docs/benchmarks.md)


@dataclass
class DataConfig:
    name: DataName = "synthetic"           # shards: hpc-gan prepare-data output
    path: str = ""                         # folder of class folders, or .npz with images (N,H,W,3) uint8 and labels
    num_classes: int = 10
    synthetic_size: int = 10000            # images in the embedded synthetic set
    hflip: bool = True
    num_workers: int = 0
    backend: DataBackend = "auto"          # auto: DALI on GPUs for shards / folders
    decode_device: DecodeDevice = "auto"   # mixed: nvJPEG on the GPU
    dali_threads: int = 4
    dali_workers: int = 4                  # processes reading encoded files for DALI (0: on the training thread)


@dataclass
class LossConfig:
    adv: AdvLoss = "hinge"
    cond: CondMethod = "d2d_ce"
    cond_lambda_d: float = 1.0             # weight of the conditioning loss on real images in the D step
    cond_lambda_g: float = 1.0             # weight of the conditioning loss on fakes in the G step
    temperature: float = 0.5
    m_p: float = 0.98
    m_n: Optional[float] = None            # default 1 - m_p
    d2d_mode: D2DMode = "paper"
    backend: KernelBackend = "auto"        # fused kernels
    gp_lambda: float = 10.0                # gradient penalty weight, wasserstein only
    ortho_beta: float = 0.0                # BigGAN's off-diagonal orthogonal regularization in G (1e-4 in the paper)
    ortho_impl: OrthoImpl = "auto"         # grad: its gradient added after the backward (few ops); sharded: each
                                           # DDP rank seeds its share of the gradient's rows before the backward,
                                           # the all-reduce assembles them (1/world of the work); autograd: in the
                                           # loss (the reference; ZeRO and fp16 use it); auto: sharded with DDP on
                                           # several ranks, else grad where it can
    diffaug: str = ""                      # comma list of DIFFAUG_POLICIES ("" = off)
    cr_lambda: float = 0.0                 # consistency regularization on reals (flip + translation)
    global_negatives: bool = True          # d2d_ce: negatives from the whole global (micro-)batch across ranks


@dataclass
class TrainConfig:
    steps: int = 1000                      # G updates
    batch_size: int = 64                   # global batch (= micro_batch x accumulation x world size)
    micro_batch: int = 0                   # 0: the whole per-rank batch at once
    n_dis: int = 2                         # D updates per G update
    g_lr: float = 2e-4
    d_lr: float = 2e-4
    beta1: float = 0.0
    beta2: float = 0.999
    adam_eps: float = 1e-6
    optimizer_impl: OptimizerImpl = "auto"  # auto: torch's fused Adam where it runs, else foreach; torch: per tensor
    compile: CompileMode = "off"           # torch.compile of G's and D's forward (the first steps compile)
    cuda_graphs: bool = False              # CUDA graphs through torch.compile's reduce-overhead mode (CUDA only)
    compile_tuning: bool = False           # inductor's coordinate-descent tuning of its fused kernels' launch
                                           # configs (with compile or cuda_graphs; CUDA; longer first step)
    cudnn_benchmark: bool = True           # CUDA: cuDNN times its algorithms once per conv shape and keeps the
                                           # fastest (training shapes are fixed); false: its heuristics
    seed: int = 0
    precision: Precision = "fp32"          # bf16 / fp16 need a GPU
    ema_decay: float = 0.9999
    ema_start: int = 1000                  # before this G step the EMA copies G
    standing_stats: int = 16               # forward passes for standing statistics when sampling (0: off)
    truncation: float = 0.0                # sample sheets: resample |z| above this (0: no truncation)
    log_every: int = 50
    sample_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 3              # newest complete checkpoints kept (0: keep all)
    verify_checkpoints: bool = True        # resume: SHA-256 of the checkpoint against its manifest (else size only)
    diagnostics: bool = True               # ReACGAN Fig. 2 norms and BigGAN's sigma_0 every diag_every steps
    diag_every: int = 0                    # steps between diagnostics (0: log_every); the watchdog reads them
    watchdog: bool = True                  # collapse alarms (docs/stability.md) to RUN/alarms.jsonl
    on_alarm: OnAlarm = "warn"             # warn; stop (exit 3); rollback to the newest checkpoint before the alarm
    rollback_lr_scale: float = 0.5         # rollback: both learning rates times this, each time
    max_rollbacks: int = 2                 # rollback: then stop
    watch_window: int = 5                  # alarms compare a value with the previous this many observations
    watch_sigma_factor: float = 3.0        # sigma_0 max of G or D above this x its window minimum
    watch_grad_factor: float = 10.0        # conditioning-loss gradient norm above this x its window minimum
    watch_gap_fraction: float = 0.25       # D's real-fake logit gap below this x its best for a whole window
    watch_acc_drop: float = 0.15           # demo class accuracy of samples this far below its best
    watch_fid_rise: float = 0.25           # FID this fraction above its best
    watch_div_fraction: float = 0.5        # demo within-class diversity of samples below this x its best
    demo_classifier: bool = False          # report class accuracy of samples under a classifier of the data set
    nonfinite: NonFinite = "stop"          # a step with a non-finite loss or gradient: stop the run, or skip its update
    nonfinite_max: int = 10                # skip: stop after this many consecutive steps with a skipped update


@dataclass
class DistConfig:
    strategy: Strategy = "ddp"             # zero1 / zero2: DeepSpeed engines for G and D
    sync_bn: bool = True                   # G's BatchNorm statistics over the global batch (cross-replica BN)
    bn_group_size: int = 0                 # BN over groups of this many ranks (0: all ranks)
    timeout_s: float = 600.0               # process-group timeout at start-up and around checkpoints / evaluation
    step_timeout_s: float = 120.0          # ... and during steps, once the first step is done (0: keep timeout_s)
    hang_dump_factor: float = 10.0         # dump all ranks' Python stacks when a step takes this x the median (0: off)
    backend: DistBackend = "auto"          # auto: nccl on GPUs, gloo on CPUs
    dedicated_groups: bool = True          # BN statistics and D2D-CE negatives on their own communicators
    negatives_backward: NegBackward = "reduce_scatter"  # gathered negatives' gradient (all_reduce: the reference)
    bucket_cap_mb: float = 25.0            # DDP gradient bucket size
    static_graph: bool = True              # DDP static_graph where valid (not with accumulation or a gradient penalty)
    grad_compression: GradCompression = "none"  # bf16: DDP all-reduces gradients in bf16 (a communication hook)
    zero_bucket_mb: float = 200.0          # ZeRO reduce / all-gather bucket size
    zero_comm_dtype: ZeroCommDtype = "fp32"  # ZeRO gradient communication and accumulation dtype under bf16
    check_every: int = 0                   # also check that replicas agree every k steps (0: at checkpoints only)


@dataclass
class EvalConfig:
    every: int = 0                         # evaluate G_ema every k steps during training (0: off)
    n: int = 10000                         # generated samples per evaluation (50000 for published numbers)
    metrics: str = "fid,is"                # comma list of METRICS
    backbone: Backbone = "inception"       # inception: pt_inception-2015-12-05; tiny: tests, demo
    inception_path: str = ""               # local weights file (else $HPC_GAN_INCEPTION, else download once)
    truncation: float = 0.0
    ref_n: int = 50000                     # real images for the reference statistics
    ref_cache: str = "~/.cache/hpc-gan/ref-stats"
    batch: int = 100


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


# "section.key" -> allowed values, for every Literal field
CHOICES: Dict[str, Tuple[Any, ...]] = {
    f"{section.name}.{name}": typing.get_args(hint)
    for section in dataclasses.fields(Config)
    for name, hint in _hints(_hints(Config)[section.name]).items()
    if typing.get_origin(hint) is Literal
}


def choices(key: str) -> Tuple[Any, ...]:
    """The allowed values of a choice, e.g. ``choices("dist.strategy")``."""
    return CHOICES[key]


def comma_list(value: str) -> List[str]:
    """The items of a comma-list option (loss.diffaug, eval.metrics)."""
    return [p.strip() for p in value.split(",") if p.strip()]


POSITIVE = ("model.g_ch", "model.d_ch", "model.z_dim", "model.shared_dim", "model.embed_dim", "data.num_classes",
            "loss.temperature", "train.steps", "train.batch_size", "train.n_dis", "train.g_lr", "train.d_lr",
            "train.log_every", "train.sample_every", "train.checkpoint_every", "train.nonfinite_max", "dist.timeout_s",
            "data.dali_threads", "eval.n", "eval.ref_n", "eval.batch", "dist.bucket_cap_mb", "dist.zero_bucket_mb",
            "train.watch_window", "train.watch_sigma_factor", "train.watch_grad_factor", "train.watch_gap_fraction",
            "train.watch_acc_drop", "train.watch_fid_rise", "train.watch_div_fraction", "train.rollback_lr_scale")
NON_NEGATIVE = ("train.diag_every", "train.max_rollbacks", "train.micro_batch", "train.ema_start",
                "train.standing_stats", "train.truncation",
                "train.keep_checkpoints", "loss.gp_lambda", "loss.ortho_beta", "loss.cr_lambda",
                "loss.cond_lambda_d", "loss.cond_lambda_g", "data.num_workers", "model.g_attn_res", "model.d_attn_res",
                "dist.bn_group_size", "dist.check_every", "data.dali_workers", "dist.step_timeout_s",
                "dist.hang_dump_factor", "eval.every", "eval.truncation")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check a YAML value against the field's type; ints are accepted where floats are expected."""
    if typing.get_origin(hint) is Union:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is Literal:  # the value check against the choices comes in validate()
        allowed = typing.get_args(hint)
        if isinstance(value, bool) and ("off" if value is False else "on") in allowed:
            return "off" if value is False else "on"  # YAML 1.1 reads off / on as booleans
        hint = type(allowed[0])
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-4 (no dot) as a string
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise UserError(f"{key}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def from_dict(raw: Dict[str, Any], source: str = "config") -> Config:
    cfg = Config()
    sections = [f.name for f in dataclasses.fields(cfg)]
    if not isinstance(raw, dict):
        raise UserError(f"{source}: top level must be a mapping of sections {sections}")
    for section, values in raw.items():
        if section not in sections:
            raise UserError(f"{source}: unknown section {section!r}; valid sections: {', '.join(sections)}")
        sub = getattr(cfg, section)
        if not isinstance(values, dict):
            raise UserError(f"{source}: section {section!r} must be a mapping of keys to values")
        hints = _hints(type(sub))
        for key, value in values.items():
            if key not in hints:
                raise UserError(f"{source}: unknown key {section}.{key}; valid keys in {section}: "
                                f"{', '.join(hints)}")
            setattr(sub, key, _coerce(f"{section}.{key}", value, hints[key]))
    validate(cfg)
    return cfg


def get(cfg: Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def validate(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        if get(cfg, key) not in allowed:
            raise UserError(f"{key}: {get(cfg, key)!r} is not one of {', '.join(map(str, allowed))}")
    for key in POSITIVE:
        if not get(cfg, key) > 0:
            raise UserError(f"{key}: must be > 0, got {get(cfg, key)}")
    for key in NON_NEGATIVE:
        if get(cfg, key) < 0:
            raise UserError(f"{key}: must be >= 0, got {get(cfg, key)}")
    for key, allowed in (("loss.diffaug", DIFFAUG_POLICIES), ("eval.metrics", METRICS)):
        bad = [p for p in comma_list(get(cfg, key)) if p not in allowed]
        if bad:
            raise UserError(f"{key}: unknown {'policy' if key == 'loss.diffaug' else 'metric'} {bad[0]!r}; use a "
                            f"comma list of {', '.join(allowed)}")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise UserError(f"train.ema_decay: must be in [0, 1), got {cfg.train.ema_decay}")
    if cfg.model.arch != "biggan" and cfg.model.d_shortcut != "biggan":
        raise UserError(f"model.d_shortcut={cfg.model.d_shortcut} is StudioGAN's big_resnet D; model.arch="
                        f"{cfg.model.arch} has its own blocks: use model.d_shortcut=biggan")
    if cfg.model.arch == "biggan_deep" and cfg.model.resolution not in (128, 256):
        raise UserError(f"model.resolution: biggan_deep is defined at 128 and 256 px, not {cfg.model.resolution}")
    t = cfg.train
    if t.micro_batch and t.batch_size % t.micro_batch:
        raise UserError(f"train.micro_batch={t.micro_batch} does not divide train.batch_size={t.batch_size}; "
                        f"pick a divisor")
    if cfg.model.sn_static_weights and cfg.loss.adv == "wasserstein":
        raise UserError("model.sn_static_weights=true: the gradient penalty's second D forward would overwrite the "
                        "weights the first one's backward reads; leave it false with loss.adv=wasserstein")
    if cfg.dist.strategy != "ddp" and cfg.loss.adv == "wasserstein":
        raise UserError(f"dist.strategy={cfg.dist.strategy}: the gradient penalty needs a second D forward, which "
                        f"ZeRO engines do not allow; use dist.strategy=ddp or another loss.adv")
    if cfg.dist.strategy != "ddp" and t.precision == "fp16":
        raise UserError(f"dist.strategy={cfg.dist.strategy} runs fp32 or bf16; use train.precision=bf16")
    if t.cuda_graphs and t.compile not in ("off", "reduce-overhead"):
        raise UserError(f"train.cuda_graphs=true captures through torch.compile's reduce-overhead mode; leave "
                        f"train.compile=off (or reduce-overhead), not {t.compile}")
    if t.compile_tuning and t.compile == "off" and not t.cuda_graphs:
        raise UserError("train.compile_tuning=true tunes the kernels torch.compile generates; set "
                        "train.cuda_graphs=true or train.compile=default with it, or leave it false")
    compiled = t.compile != "off" or t.cuda_graphs
    if cfg.loss.adv == "wasserstein" and compiled:
        raise UserError("loss.adv=wasserstein: the gradient penalty differentiates D's gradient (a double backward), "
                        "which torch.compile'd forwards do not support; use train.compile=off and "
                        "train.cuda_graphs=false, or another loss.adv")
    if compiled and cfg.dist.bucket_cap_mb < 1.0:
        raise UserError(f"dist.bucket_cap_mb={cfg.dist.bucket_cap_mb}: torch.compile splits a DDP graph at buckets "
                        f"and asserts they are at least DDP's 1 MB first bucket; use dist.bucket_cap_mb>=1 with "
                        f"train.compile or train.cuda_graphs")
    if t.compile != "off" and cfg.dist.strategy != "ddp":
        raise UserError(f"train.compile={t.compile} is tested with dist.strategy=ddp only; use ddp or "
                        f"train.compile=off")
    if cfg.loss.ortho_impl in ("grad", "sharded") and (cfg.dist.strategy != "ddp" or t.precision == "fp16"):
        raise UserError(f"loss.ortho_impl={cfg.loss.ortho_impl} adds to gradients that ZeRO partitions and fp16 "
                        f"scales; use loss.ortho_impl=auto or autograd")
    if t.nonfinite == "skip" and t.optimizer_impl in ("torch", "foreach", "apex"):
        raise UserError(f"train.nonfinite=skip skips updates on the device through fused Adam; use "
                        f"train.optimizer_impl=auto or fused (not {t.optimizer_impl})")
    if cfg.dist.grad_compression != "none" and cfg.dist.strategy != "ddp":
        raise UserError(f"dist.grad_compression={cfg.dist.grad_compression} is a DDP communication hook; with "
                        f"dist.strategy={cfg.dist.strategy} set dist.zero_comm_dtype instead")
    if cfg.dist.strategy != "ddp" and t.nonfinite == "skip":
        raise UserError(f"train.nonfinite=skip needs the gradients that dist.strategy={cfg.dist.strategy} partitions "
                        f"over ranks; use train.nonfinite=stop or dist.strategy=ddp")
    if CONDITIONING[cfg.loss.cond].head == "embedding" and t.batch_size < 2:
        raise UserError(f"train.batch_size: loss.cond={cfg.loss.cond} needs at least 2 samples per batch for "
                        f"negatives")


def load(path: Union[str, Path], overrides: Optional[List[str]] = None) -> Config:
    """Read a YAML preset and apply ``section.key=value`` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; presets are in configs/ (e.g. configs/demo.yaml)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return from_dict(apply_overrides(raw, overrides or []), str(path))


def apply_overrides(raw: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise UserError(f"override {item!r} must look like section.key=value, e.g. train.steps=100")
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise UserError(f"override {item!r}: {section} is not a section")
        raw[section][name] = yaml.safe_load(value) if value != "" else ""
    return raw


def to_dict(cfg: Config) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
