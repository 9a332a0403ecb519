// Fused attention on the CPU: the kernels of attention_impl.h for the compiler's baseline
// instruction set, and the dispatch to the AVX2 / AVX-512 builds (isa.h).

#include "common.h"
#include "isa.h"
#include "kernels.h"

#define DLCV_CPU_ISA base
#include "attention_impl.h"
#undef DLCV_CPU_ISA

namespace dlcv_fast::cpu {

void attention_forward(DType dtype, const AttentionParams& p, const void* q, const void* k,
                       const void* v, const void* mask, void* out, void* lse) {
  TORCH_CHECK(dtype == DType::Float32 || dtype == DType::Float64,
              "scaled_dot_product_attention (cpu kernel): float32 or float64 expected");
  DLCV_CPU_DISPATCH(attention_forward, dtype, p, q, k, v, mask, out, lse);
}

void attention_backward(DType dtype, const AttentionParams& p, const void* dout, const void* q,
                        const void* k, const void* v, const void* out, const void* lse,
                        const void* mask, void* delta, void* dq, void* dk, void* dv) {
  TORCH_CHECK(dtype == DType::Float32 || dtype == DType::Float64,
              "scaled_dot_product_attention_backward (cpu kernel): float32 or float64 expected");
  DLCV_CPU_DISPATCH(attention_backward, dtype, p, dout, q, k, v, out, lse, mask, delta, dq, dk,
                    dv);
}

}  // namespace dlcv_fast::cpu
