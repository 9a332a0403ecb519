// Element types a kernel is instantiated for (the launchers take untyped pointers).
#pragma once

namespace dlcv_fast {

enum class DType { Float32, Float64, Float16, BFloat16 };

}  // namespace dlcv_fast
