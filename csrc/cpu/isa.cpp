#include "isa.h"

#include <c10/util/Exception.h>

#include <atomic>

namespace dlcv_fast::cpu {
namespace {

bool supported(Isa isa) {
#if DLCV_CPU_X86 && defined(__GNUC__)
  switch (isa) {
    case Isa::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case Isa::Avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::Base: return true;
  }
  return false;
#else
  return isa == Isa::Base;
#endif
}

Isa best() {
  for (Isa isa : {Isa::Avx512, Isa::Avx2}) {
    if (supported(isa)) return isa;
  }
  return Isa::Base;
}

std::atomic<Isa>& current() {
  static std::atomic<Isa> isa{best()};
  return isa;
}

}  // namespace

Isa active_isa() { return current().load(std::memory_order_relaxed); }

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    case Isa::Base: return "base";
  }
  return "base";
}

void set_isa(const std::string& name) {
  Isa isa;
  if (name == "auto") {
    isa = best();
  } else if (name == "avx512") {
    isa = Isa::Avx512;
  } else if (name == "avx2") {
    isa = Isa::Avx2;
  } else if (name == "base") {
    isa = Isa::Base;
  } else {
    TORCH_CHECK_VALUE(false, "set_cpu_isa: expected 'auto', 'base', 'avx2' or 'avx512', but got '",
                      name, "'");
  }
  TORCH_CHECK_VALUE(supported(isa), "set_cpu_isa: this CPU does not support ", name);
  current().store(isa, std::memory_order_relaxed);
}

}  // namespace dlcv_fast::cpu
