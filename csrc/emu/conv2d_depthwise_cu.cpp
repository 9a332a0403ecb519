// csrc/cuda/conv2d_depthwise.cu built for the CPU emulation.
#include "cuda_emu.h"
#include "../cuda/conv2d_depthwise.cu"
