// csrc/cuda/scheduler_step.cu built for the CPU emulation.
#include "cuda_emu.h"
#include "../cuda/scheduler_step.cu"
