// csrc/cuda/noise.cu built for the CPU emulation.
#include "cuda_emu.h"
#include "../cuda/noise.cu"
