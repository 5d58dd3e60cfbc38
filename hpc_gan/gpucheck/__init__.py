"""The GPU check pack: everything a first GPU session must measure, in one prepared call (scripts/gpu-check.sh).

Modules: ``runner`` (the stages' boxes and processes, the command line), ``stages`` (all but train),
``train_cases`` (the train stage: its cases, each in a fresh process), ``report`` (report.json / report.md and the
speed goals), ``common`` (what they share).

Stages, each in its own subprocess with a time box, each written to
DIR/report.json and DIR/report.md as soon as it ends; a stage that loops saves what it has after every case, so one
cut off by its time box (or the lease) still reports its finished cases:

  env          GPU, versions, measured device-to-device copy bandwidth and bf16 matmul rate
  accuracy     the kernels against float64 at the real shapes, fp32 and bf16: |out - ref| / |ref|, gradients too
  kernels      where the host's time goes in one D2D-CE call (kernels.host_bench); D2D-CE forward + backward:
               the kernel in its modes, torch fp32, a torch bf16 path, torch.compile of the reference (medians of
               triton.testing.do_bench, and device time alone from CUDA-graph replays)
  sn           spectral norm of BigGAN-128's 65 layers: per-layer loop, foreach, Triton, and the bandwidth floor
  layers       at BigGAN-128's shapes, batch 256, bf16, channels-last, each formulation as the steps call it: the
               resampling convolutions (separate, fused), the RGB convolutions, D's poolings and G's upsamplings,
               the self-attention; ms per iteration against the floor, and the fastest of each
  tests        tests/test_gpu.py (no host sync in a training step) and tests/test_kernels.py on the GPU (less the
               ahead-of-time compile check, which needs no GPU)
  determinism  20 runs of each kernel, bitwise equal
  dali         nvJPEG decode img/s (where DALI is installed)
  deepspeed    one ZeRO-2 bf16 step (where DeepSpeed is installed and 2 GPUs are visible)
  train        the BigGAN-128 ReACGAN step in bf16 at 32 and 256 samples per GPU: eager, compiled, CUDA graphs;
               MFU, host vs device time, kernels per iteration (last: it gets what the others left of their boxes)

``--smoke`` (also chosen where no GPU is visible) runs every stage at toy sizes on the CPU, the kernels in Triton's
interpreter, so the pack cannot rot; it is tested.
"""
