"""max_pool2d against PyTorch on the pooling layers of AlexNet, VGG-16 and ResNet-50.

    python benchmarks/bench_max_pool2d.py [--dtype bf16 fp32] [--batch N] [--save benchmarks/results]

The same as `python -m dlcv_fast bench --op max_pool2d ...`.
"""

import sys

from dlcv_fast.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--op", "max_pool2d", *sys.argv[1:]]))
