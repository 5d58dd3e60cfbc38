"""Typed, strict configuration: dataclasses with defaults, YAML files that may set only known keys, and
``section.key=value`` overrides from the command line. Every error is one line that names the key and the fix."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml


class ConfigError(ValueError):
    """A bad config key or value; the message is one line that says what to change."""


def _choice(*values: Any, doc: str = "") -> Any:
    return {"choices": values, "doc": doc}


@dataclass
class RunConfig:
    dir: str = "runs/demo"                 # run directory: config.yaml, metrics.jsonl, samples/, checkpoints/
    device: str = "auto"                   # auto | cpu | cuda
    tensorboard: bool = True               # write TensorBoard events when tensorboard is installed
    preempt_signals: str = "USR1"          # signals that mean: checkpoint, requeue (Slurm), exit 0 ("" = none)


@dataclass
class ModelConfig:
    arch: str = "biggan"                   # biggan | biggan_deep
    resolution: int = 32
    g_ch: int = 32                         # channel multiplier of G
    d_ch: int = 32                         # channel multiplier of D
    z_dim: int = 80                        # biggan: chunk size x (blocks + 1)
    shared_dim: int = 128                  # shared class embedding in G
    embed_dim: int = 512                   # D's linear head P / proxies (d2d_ce, 2c)
    g_attn_res: int = 0                    # resolution of G's self-attention (0: none)
    d_attn_res: int = 0
    sn_eps: float = 1e-6
    bn_eps: float = 1e-4
    sn_backend: str = "auto"               # auto | torch | triton: all SN layers in one fused power iteration


@dataclass
class DataConfig:
    name: str = "synthetic"                # synthetic | folder | npz | shards (hpc-gan prepare-data output)
    path: str = ""                         # folder of class folders, or .npz with images (N,H,W,3) uint8 and labels
    num_classes: int = 10
    synthetic_size: int = 10000            # images in the embedded synthetic set
    hflip: bool = True
    num_workers: int = 0
    backend: str = "auto"                  # auto | dali | torch (auto: DALI on GPUs for shards / folders)
    decode_device: str = "auto"            # auto | mixed (nvJPEG on the GPU) | cpu
    dali_threads: int = 4


@dataclass
class LossConfig:
    adv: str = "hinge"                     # hinge | nonsaturating | least_squares | wasserstein
    cond: str = "d2d_ce"                   # d2d_ce | 2c | ac | mh | pd | none
    cond_lambda_d: float = 1.0             # weight of the conditioning loss on real images in the D step
    cond_lambda_g: float = 1.0             # weight of the conditioning loss on fakes in the G step
    temperature: float = 0.5
    m_p: float = 0.98
    m_n: Optional[float] = None            # default 1 - m_p
    d2d_mode: str = "paper"                # paper | studiogan
    backend: str = "auto"                  # auto | torch | triton (fused kernels)
    gp_lambda: float = 10.0                # gradient penalty weight, wasserstein only
    ortho_beta: float = 0.0                # BigGAN's off-diagonal orthogonal regularization in G (1e-4 in the paper)
    diffaug: str = ""                      # comma list of color, translation, cutout ("" = off)
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
    seed: int = 0
    precision: str = "fp32"                # fp32 | bf16 | fp16 (bf16/fp16 need a GPU)
    ema_decay: float = 0.9999
    ema_start: int = 1000                  # before this G step the EMA copies G
    standing_stats: int = 16               # forward passes for standing statistics when sampling (0: off)
    truncation: float = 0.0                # sample sheets: resample |z| above this (0: no truncation)
    log_every: int = 50
    sample_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 3              # newest complete checkpoints kept (0: keep all)
    diagnostics: bool = True               # ReACGAN Fig. 2 norms at logging steps
    demo_classifier: bool = False          # report class accuracy of samples under a classifier of the data set


@dataclass
class DistConfig:
    strategy: str = "ddp"                  # ddp | zero1 | zero2 (DeepSpeed engines for G and D)
    sync_bn: bool = True                   # G's BatchNorm statistics over the global batch (cross-replica BN)
    bn_group_size: int = 0                 # BN over groups of this many ranks (0: all ranks)
    timeout_s: float = 600.0               # process-group timeout: a dead rank fails the job within this
    backend: str = "auto"                  # auto (nccl on GPUs, gloo on CPUs) | nccl | gloo
    check_every: int = 0                   # also check that replicas agree every k steps (0: at checkpoints only)


@dataclass
class EvalConfig:
    every: int = 0                         # evaluate G_ema every k steps during training (0: off)
    n: int = 10000                         # generated samples per evaluation (50000 for published numbers)
    metrics: str = "fid,is"                # comma list of fid, is, prd, prdc
    backbone: str = "inception"            # inception (pt_inception-2015-12-05) | tiny (tests, demo)
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


CHOICES: Dict[str, tuple] = {
    "run.device": ("auto", "cpu", "cuda"),
    "model.arch": ("biggan", "biggan_deep"),
    "model.resolution": (16, 32, 64, 128, 256),
    "data.name": ("synthetic", "folder", "npz", "shards"),
    "data.backend": ("auto", "dali", "torch"),
    "data.decode_device": ("auto", "mixed", "cpu"),
    "loss.adv": ("hinge", "nonsaturating", "least_squares", "wasserstein"),
    "loss.cond": ("d2d_ce", "2c", "ac", "mh", "pd", "none"),
    "loss.d2d_mode": ("paper", "studiogan"),
    "loss.backend": ("auto", "torch", "triton"),
    "model.sn_backend": ("auto", "torch", "triton"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "dist.strategy": ("ddp", "zero1", "zero2"),
    "eval.backbone": ("inception", "tiny"),
    "dist.backend": ("auto", "nccl", "gloo"),
}
POSITIVE = ("model.g_ch", "model.d_ch", "model.z_dim", "model.shared_dim", "model.embed_dim", "data.num_classes",
            "loss.temperature", "train.steps", "train.batch_size", "train.n_dis", "train.g_lr", "train.d_lr",
            "train.log_every", "train.sample_every", "train.checkpoint_every", "dist.timeout_s", "data.dali_threads", "eval.n",
            "eval.ref_n", "eval.batch")
NON_NEGATIVE = ("train.micro_batch", "train.ema_start", "train.standing_stats", "train.truncation",
                "train.keep_checkpoints", "loss.gp_lambda", "loss.ortho_beta", "loss.cr_lambda",
                "loss.cond_lambda_d", "loss.cond_lambda_g", "data.num_workers", "model.g_attn_res", "model.d_attn_res",
                "dist.bn_group_size", "dist.check_every", "eval.every", "eval.truncation")
DIFFAUG_POLICIES = ("color", "translation", "cutout")


def _fields(obj: Any) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _coerce(key: str, value: Any, default: Any, annotation: str) -> Any:
    """Check a YAML value against the field's type; ints are accepted where floats are expected."""
    optional = annotation.startswith("Optional")
    if value is None and optional:
        return None
    base = annotation.replace("Optional[", "").rstrip("]")
    want = {"int": int, "float": float, "str": str, "bool": bool}[base]
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-4 (no dot) as a string
        except ValueError:
            pass
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {base}, got {value!r} ({type(value).__name__})")
    return value


def from_dict(raw: Dict[str, Any], source: str = "config") -> Config:
    cfg = Config()
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections {sorted(_fields(cfg))}")
    for section, values in raw.items():
        if section not in _fields(cfg):
            raise ConfigError(f"{source}: unknown section {section!r}; valid sections: {', '.join(_fields(cfg))}")
        sub = getattr(cfg, section)
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping of keys to values")
        fields = _fields(sub)
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"{source}: unknown key {section}.{key}; valid keys in {section}: "
                                  f"{', '.join(fields)}")
            setattr(sub, key, _coerce(f"{section}.{key}", value, getattr(sub, key), str(fields[key].type)))
    validate(cfg)
    return cfg


def _get(cfg: Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def validate(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{key}: {_get(cfg, key)!r} is not one of {', '.join(map(str, allowed))}")
    for key in POSITIVE:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key}: must be > 0, got {_get(cfg, key)}")
    for key in NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {_get(cfg, key)}")
    bad = [p for p in cfg.loss.diffaug.split(",") if p.strip() and p.strip() not in DIFFAUG_POLICIES]
    if bad:
        raise ConfigError(f"loss.diffaug: unknown policy {bad[0]!r}; use a comma list of {', '.join(DIFFAUG_POLICIES)}")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay: must be in [0, 1), got {cfg.train.ema_decay}")
    if cfg.model.arch == "biggan_deep" and cfg.model.resolution not in (128, 256):
        raise ConfigError(f"model.resolution: biggan_deep is defined at 128 and 256 px, not {cfg.model.resolution}")
    t = cfg.train
    if t.micro_batch and t.batch_size % t.micro_batch:
        raise ConfigError(f"train.micro_batch={t.micro_batch} does not divide train.batch_size={t.batch_size}; "
                          f"pick a divisor")
    bad = [m for m in cfg.eval.metrics.split(",") if m.strip() and m.strip() not in ("fid", "is", "prd", "prdc")]
    if bad:
        raise ConfigError(f"eval.metrics: unknown metric {bad[0]!r}; use a comma list of fid, is, prd, prdc")
    if cfg.dist.strategy != "ddp" and cfg.loss.adv == "wasserstein":
        raise ConfigError(f"dist.strategy={cfg.dist.strategy}: the gradient penalty needs a second D forward, which "
                          f"ZeRO engines do not allow; use dist.strategy=ddp or another loss.adv")
    if cfg.dist.strategy != "ddp" and t.precision == "fp16":
        raise ConfigError(f"dist.strategy={cfg.dist.strategy} runs fp32 or bf16; use train.precision=bf16")
    if cfg.loss.cond in ("d2d_ce", "2c") and t.batch_size < 2:
        raise ConfigError("train.batch_size: d2d_ce / 2c need at least 2 samples per batch for negatives")


def load(path: Union[str, Path], overrides: Optional[List[str]] = None) -> Config:
    """Read a YAML preset and apply ``section.key=value`` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; presets are in configs/ (e.g. configs/demo.yaml)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return from_dict(apply_overrides(raw, overrides or []), str(path))


def apply_overrides(raw: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.steps=100")
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"override {item!r}: {section} is not a section")
        raw[section][name] = yaml.safe_load(value) if value != "" else ""
    return raw


def to_dict(cfg: Config) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
