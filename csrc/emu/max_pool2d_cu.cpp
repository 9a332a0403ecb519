// csrc/cuda/max_pool2d.cu built for the CPU emulation.
#include "cuda_emu.h"
#include "../cuda/max_pool2d.cu"
