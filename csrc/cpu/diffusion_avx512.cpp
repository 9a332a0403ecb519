// The diffusion ops' CPU kernels for AVX512 CPUs, chosen at run time (isa.h).
#include "isa.h"

#if DLCV_CPU_X86
#define DLCV_CPU_ISA avx512
#define DLCV_CPU_VECTOR_BYTES 64
#define DLCV_CPU_TARGET_PRAGMA _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq\")")
#include "diffusion_impl.h"
#endif
