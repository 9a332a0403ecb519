// Element types a kernel is instantiated for (the launchers take untyped pointers).
#pragma once

namespace dlcv_fast {

// The integer types are max_pool2d's only (PyTorch's CPU kernel pools integer tensors too).
enum class DType { Float32, Float64, Float16, BFloat16, UInt8, Int8, Int16, Int32, Int64 };

}  // namespace dlcv_fast
