"""batch_norm against PyTorch on the batch-norm layers of ResNet-50: training forward +
backward against F.batch_norm, and batch norm + ReLU fused against F.batch_norm followed by
F.relu, with GB/s and the fraction of the measured copy bandwidth.

    python benchmarks/bench_batch_norm.py [--dtype bf16 fp32] [--batch 128] [--save benchmarks/results]

The same as `python -m dlcv_fast bench --op batch_norm ...`.
"""

import sys

from dlcv_fast.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--op", "batch_norm", *sys.argv[1:]]))
