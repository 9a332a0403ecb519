// Which instruction set the CPU kernels run with. Kernels that gain from wide vectors are
// compiled once per instruction set (base: the compiler's default target, SSE2 on x86-64;
// AVX2; AVX-512) and the best one the CPU supports runs, as in PyTorch's own CPU kernels.
#pragma once

#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#define DLCV_CPU_X86 1
#else
#define DLCV_CPU_X86 0
#endif

namespace dlcv_fast::cpu {

enum class Isa { Base, Avx2, Avx512 };

// The instruction set in use: the best supported, unless set_isa chose another.
Isa active_isa();

// "auto", "base", "avx2" or "avx512"; an instruction set the CPU lacks is an error.
void set_isa(const std::string& name);

std::string isa_name(Isa isa);

}  // namespace dlcv_fast::cpu

// `return NS::name(args...)` for the namespace of the active instruction set (base, avx2,
// avx512: each kernel's *_impl.h compiled once per set).
#if DLCV_CPU_X86
#define DLCV_CPU_DISPATCH(name, ...)                                      \
  switch (::dlcv_fast::cpu::active_isa()) {                               \
    case ::dlcv_fast::cpu::Isa::Avx512: return avx512::name(__VA_ARGS__); \
    case ::dlcv_fast::cpu::Isa::Avx2: return avx2::name(__VA_ARGS__);     \
    case ::dlcv_fast::cpu::Isa::Base: break;                              \
  }                                                                       \
  return base::name(__VA_ARGS__)
#else
#define DLCV_CPU_DISPATCH(name, ...) return base::name(__VA_ARGS__)
#endif
