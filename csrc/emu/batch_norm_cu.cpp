// csrc/cuda/batch_norm.cu built for the CPU emulation.
#include "cuda_emu.h"
#include "../cuda/batch_norm.cu"
