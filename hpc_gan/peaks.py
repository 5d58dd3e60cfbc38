"""Dense peak TFLOP/s of the GPUs this project measures and plans for, by device-name fragment and precision (tensor
cores; fp32 means TF32 where torch allows it): one table for `hpc-gan bench`'s MFU and `hpc-gan plan`'s compute."""
PEAK_TFLOPS = {"H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},
               "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},
               "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}}
H100_BF16_TFLOPS = PEAK_TFLOPS["H100"]["bf16"]  # hpc-gan plan's default
