"""scaled_dot_product_attention, forward and backward, against
torch.nn.functional.scaled_dot_product_attention on the same inputs in the same run, in
TFLOP/s (4 B H L S D forward, half when causal, 2.5 times that backward).

GPU: B * L = 16k tokens, H * D = 2048, D = 64 and 128, L = 512 .. 16k, causal and not,
against PyTorch's own choice of SDPA backend ("vs sdpa") and its FlashAttention-2 backend
("vs flash"). CPU: 8 heads, D = 64, L = 256 .. 2048.

    python benchmarks/bench_attention.py [--dtype bf16 fp16] [--backend cuda triton]
        [--save benchmarks/results]

The same as `python -m dlcv_fast bench --op scaled_dot_product_attention ...`.
"""

import sys

from dlcv_fast.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--op", "scaled_dot_product_attention", *sys.argv[1:]]))
