// csrc/cuda/attention.cu built for the CPU emulation.
#include "cuda_emu.h"
#include "../cuda/attention.cu"
