"""add_noise and get_velocity against the same formulas as plain PyTorch ops, on
latent-diffusion latents (64x4x64x64) and pixel images (16x3x256x256).

    python benchmarks/bench_noise.py [--dtype bf16 fp32] [--save benchmarks/results]

The same as `python -m dlcv_fast bench --op add_noise get_velocity ...`.
"""

import sys

from dlcv_fast.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--op", "add_noise", "get_velocity", *sys.argv[1:]]))
