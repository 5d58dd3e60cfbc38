"""``hpc-gan plan``: an alpha-beta model of one training iteration at a range of GPU counts.

One iteration is n_dis D steps and one G step. Per step the model adds:

- **compute**: the step's FLOPs (``hpc-gan info``) at this GPU count's per-GPU batch, over peak x MFU, or scaled
  from a measured ``hpc-gan bench`` JSON;
- **gradients**: a hierarchical all-reduce of the step's gradients (reduce-scatter and all-gather over NVLink inside
  a node, a ring over the nodes' links between them), overlapped with that step's backward (DDP buckets launch as
  gradients become ready); what does not fit under the backward is exposed, and the last bucket always is;
- **BN**: G's cross-replica BN all-reduces (one per BN layer per G forward, and per layer in G's backward), small
  and latency-bound, on the compute stream's critical path;
- **negatives**: D2D-CE's all-gather of the global batch's embeddings (bf16) per forward and the reduce-scatter of
  their gradient (fp32) per backward, also on the critical path.

Ring all-reduce of S bytes over p parties: 2 (p - 1) alpha + 2 (p - 1) / p * S / bandwidth; a tree: 2 log2(p) alpha +
2 S / bandwidth; each level of the hierarchy takes the faster (NCCL's choice by size). The assumptions are printed
with the rows, and docs/scaling.md checks the ring formula against measured all-reduces.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

from hpc_gan.config import Config
from hpc_gan.errors import UserError
from hpc_gan.peaks import H100_BF16_TFLOPS


@dataclass(frozen=True)
class Fabric:
    gpus_per_node: int = 8
    link_gbps: float = 400.0        # inter-node bandwidth per node (e.g. one 400 Gb/s NIC; 8 x 400 rail-optimized)
    nvlink_gbps: float = 3600.0     # per-GPU NVLink bandwidth, one direction (H100 SXM: 450 GB/s)
    alpha_inter_us: float = 10.0    # latency of one inter-node ring step
    alpha_intra_us: float = 3.0     # latency of one NVLink ring step
    bus_efficiency: float = 0.8     # fraction of the link rate a collective reaches


def ring_allreduce_s(nbytes: float, parties: int, gbps: float, alpha_us: float, efficiency: float = 1.0) -> float:
    """Seconds of a ring all-reduce of ``nbytes`` over ``parties`` at ``gbps`` (Gbit/s) per party."""
    if parties <= 1:
        return 0.0
    return 2 * (parties - 1) * alpha_us * 1e-6 + 2 * (parties - 1) / parties * nbytes * 8 / (gbps * 1e9 * efficiency)


def tree_allreduce_s(nbytes: float, parties: int, gbps: float, alpha_us: float, efficiency: float = 1.0) -> float:
    """Seconds of a (double binary) tree all-reduce: log-depth latency, each byte sent about twice."""
    if parties <= 1:
        return 0.0
    return 2 * math.ceil(math.log2(parties)) * alpha_us * 1e-6 + 2 * nbytes * 8 / (gbps * 1e9 * efficiency)


def _level_s(nbytes: float, parties: int, gbps: float, alpha_us: float, efficiency: float) -> float:
    # NCCL picks ring for bandwidth-bound and tree for latency-bound sizes: take the faster of the two
    return min(ring_allreduce_s(nbytes, parties, gbps, alpha_us, efficiency),
               tree_allreduce_s(nbytes, parties, gbps, alpha_us, efficiency))


def allreduce_s(nbytes: float, gpus: int, f: Fabric) -> float:
    """Hierarchical all-reduce: reduce-scatter + all-gather inside each node, and an all-reduce of each GPU's 1/g
    shard across the nodes, the g rails sharing the node's link."""
    g = min(gpus, f.gpus_per_node)
    nodes = max(1, gpus // g)
    intra = _level_s(nbytes, g, f.nvlink_gbps, f.alpha_intra_us, f.bus_efficiency)
    inter = _level_s(nbytes / g, nodes, f.link_gbps / g, f.alpha_inter_us, f.bus_efficiency)
    return intra + inter


def allgather_s(out_bytes: float, gpus: int, f: Fabric) -> float:
    """All-gather (or reduce-scatter) whose full result is ``out_bytes``: half of an all-reduce of that size."""
    return allreduce_s(out_bytes, gpus, f) / 2


@dataclass
class Row:
    gpus: int
    per_gpu_batch: float
    compute_ms: float
    comm_ms: float       # exposed gradient communication
    bn_ms: float
    negatives_ms: float
    step_ms: float
    samples_per_s: float
    efficiency: float    # compute / step


def plan_rows(cfg: Config, info: Dict[str, Any], gpus_list: List[int], fabric: Fabric, mfu: float = 0.45,
              peak_tflops: float = H100_BF16_TFLOPS, bench: Optional[Dict[str, Any]] = None) -> List[Row]:
    t = cfg.train
    grad_bytes = 2 if cfg.dist.grad_compression == "bf16" else 4
    gather_negatives = cfg.loss.cond == "d2d_ce" and cfg.loss.global_negatives
    bucket = cfg.dist.bucket_cap_mb * 2 ** 20
    rows = []
    for gpus in gpus_list:
        if t.batch_size % gpus:
            raise UserError(f"--gpus {gpus}: train.batch_size={t.batch_size} does not split over {gpus} GPUs")
        b = t.batch_size / gpus
        if bench:  # measured seconds per iteration at the bench's per-GPU batch, scaled to this one
            total = bench["sec_per_step"] * b / (bench["batch_size"] / bench["world"])
            d_share = t.n_dis * info["d_step_gflops_per_sample"] / info["gflops_per_sample_iteration"]
            d_step_s, g_step_s = total * d_share / t.n_dis, total * (1 - d_share)
        else:
            rate = peak_tflops * 1e12 * mfu
            d_step_s = info["d_step_gflops_per_sample"] * 1e9 * b / rate
            g_step_s = info["g_step_gflops_per_sample"] * 1e9 * b / rate
        # backward share of each step from the FLOP counts (forward: G (no grad) + D on real and fake; G step: G + D)
        d_fwd = info["g_forward_gflops_per_sample"] + 2 * info["d_forward_gflops_per_sample"]
        g_fwd = info["g_forward_gflops_per_sample"] + info["d_forward_gflops_per_sample"]
        d_bwd_s = d_step_s * (1 - d_fwd / info["d_step_gflops_per_sample"])
        g_bwd_s = g_step_s * (1 - g_fwd / info["g_step_gflops_per_sample"])

        def exposed(params: int, backward_s: float) -> float:
            total = allreduce_s(params * grad_bytes, gpus, fabric)
            last = allreduce_s(min(bucket, params * grad_bytes), gpus, fabric)
            return max(last, total - backward_s) if gpus > 1 else 0.0

        comm = t.n_dis * exposed(info["d_params"], d_bwd_s) + exposed(info["g_params"], g_bwd_s)
        # BN: one small all-reduce per layer per G forward (n_dis D steps + the G step) and per layer in G's backward
        bn_count = info["g_bn_layers"] * (t.n_dis + 2) if cfg.dist.sync_bn else 0
        bn_bytes = 8 * (2 * 16 * cfg.model.g_ch + 1)  # [n mean, n E[x^2], n] in double, widest layer
        bn_ranks = min(gpus, cfg.dist.bn_group_size) if cfg.dist.bn_group_size else gpus
        bn = bn_count * allreduce_s(bn_bytes, bn_ranks, fabric)
        neg = 0.0
        if gather_negatives and gpus > 1:
            n_losses = t.n_dis + 1  # D's loss on reals per D step, G's on fakes
            out = t.batch_size * cfg.model.embed_dim
            neg = n_losses * (allgather_s(out * 2, gpus, fabric) + allgather_s(out * 4, gpus, fabric))
        compute = t.n_dis * d_step_s + g_step_s
        step = compute + comm + bn + neg
        rows.append(Row(gpus, b, compute * 1e3, comm * 1e3, bn * 1e3, neg * 1e3, step * 1e3, t.batch_size / step,
                        compute / step))
    return rows


def assumptions(cfg: Config, fabric: Fabric, mfu: float, peak_tflops: float, bench: Optional[Dict[str, Any]]
                ) -> List[str]:
    compute = (f"compute scaled linearly in per-GPU batch from the bench JSON ({bench['sec_per_step'] * 1e3:.1f} ms "
               f"per iteration at per-GPU batch {bench['batch_size'] // bench['world']})" if bench else
               f"compute at {mfu:.0%} MFU of {peak_tflops:.0f} TFLOP/s (bf16 dense peak; --mfu, --peak-tflops)")
    return [
        compute,
        f"{fabric.gpus_per_node} GPUs per node, NVLink {fabric.nvlink_gbps:.0f} Gb/s per GPU, inter-node "
        f"{fabric.link_gbps:.0f} Gb/s per node, collectives at {fabric.bus_efficiency:.0%} of link rate, ring step "
        f"latency {fabric.alpha_intra_us:.0f} us (NVLink) / {fabric.alpha_inter_us:.0f} us (network)",
        f"gradients in {'bf16' if cfg.dist.grad_compression == 'bf16' else 'fp32'}, DDP buckets of "
        f"{cfg.dist.bucket_cap_mb:.0f} MB overlapped with the same step's backward (the last bucket exposed)",
        "BN and negatives collectives are on the critical path (each blocks the layer after it)",
        "no data-loading stalls, no stragglers; compute efficiency does not drop at small per-GPU batches "
        "(it does on real GPUs: measure with hpc-gan bench and pass --bench)",
    ]


def measure_allreduce(sizes_bytes: List[int], reps: int = 31) -> List[Dict[str, float]]:
    """Median seconds of one all-reduce of each size on the current process group (every rank calls this); each
    call starts after a barrier, so a late rank does not count as transfer time."""
    import torch
    import torch.distributed as dist
    out = []
    for n in sizes_bytes:
        buf = torch.zeros(max(1, n // 4))
        for _ in range(3):  # warm-up: connections, buffers
            dist.all_reduce(buf)
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(buf)
            times.append(time.perf_counter() - t0)
        out.append({"bytes": buf.numel() * 4, "seconds": sorted(times)[len(times) // 2]})
    return out


def fit_alpha_beta(small: List[Dict[str, float]], large: List[Dict[str, float]], parties: int
                   ) -> Dict[str, float]:
    """alpha (s per ring step) and bandwidth (Gbit/s) of t = 2 (p-1) alpha + 2 (p-1)/p S / B: bandwidth from the
    slope between the ``large`` sizes (where latency is negligible), alpha from the ``small`` ones' mean time less
    their transfer time."""
    k = 2 * (parties - 1) / parties * 8
    lo, hi = large[0], large[-1]
    inv_bw = (hi["seconds"] - lo["seconds"]) / (k * (hi["bytes"] - lo["bytes"]))
    rest = sum(p["seconds"] - k * p["bytes"] * inv_bw for p in small) / len(small)
    return {"alpha_us": max(0.0, rest) / (2 * (parties - 1)) * 1e6, "gbps": 1 / inv_bw / 1e9}


def rows_json(rows: List[Row]) -> List[Dict[str, Any]]:
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(r).items()} for r in rows]


def format_rows(rows: List[Row]) -> str:
    head = f"{'gpus':>5} {'batch/gpu':>9} {'compute':>9} {'comm':>8} {'bn':>7} {'negatives':>9} {'step':>9} " \
           f"{'samples/s':>10} {'eff':>5}"
    lines = [head] + [f"{r.gpus:>5} {r.per_gpu_batch:>9.1f} {r.compute_ms:>7.1f}ms {r.comm_ms:>6.1f}ms "
                      f"{r.bn_ms:>5.2f}ms {r.negatives_ms:>7.2f}ms {r.step_ms:>7.1f}ms {r.samples_per_s:>10.0f} "
                      f"{r.efficiency:>5.2f}" for r in rows]
    return "\n".join(lines)


def load_bench(path: str) -> Dict[str, Any]:
    try:
        bench = json.loads(open(path).read())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--bench {path}: cannot read a bench JSON ({e}); write one with hpc-gan bench --out") from None
    missing = {"sec_per_step", "batch_size", "world"} - set(bench)
    if missing:
        raise UserError(f"--bench {path}: not an hpc-gan bench JSON (no {', '.join(sorted(missing))})")
    return bench
