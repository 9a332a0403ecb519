// The diffusion ops' CPU kernels for AVX2 CPUs, chosen at run time (isa.h).
#include "isa.h"

#if DLCV_CPU_X86
#define DLCV_CPU_ISA avx2
#define DLCV_CPU_VECTOR_BYTES 32
#define DLCV_CPU_TARGET_PRAGMA _Pragma("GCC target(\"avx2,fma\")")
#include "diffusion_impl.h"
#endif
