"""conv2d against PyTorch on the convolutions of ResNet-50: forward, backward (dgrad +
wgrad) and conv + bias + ReLU fused, in TFLOP/s and as a fraction of the measured
matrix-product throughput.

    python benchmarks/bench_conv2d.py [--dtype bf16 fp32] [--batch N] [--save benchmarks/results]

The same as `python -m dlcv_fast bench --op conv2d ...` (GPU: channels_last, batch 128;
CPU: NCHW and channels_last, batch 2).
"""

import sys

from dlcv_fast.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--op", "conv2d", *sys.argv[1:]]))
