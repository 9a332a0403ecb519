// Input checks for the host entry points. Each failure raises a Python exception that names
// the op, the argument and what was expected: ValueError for a bad value, TypeError for a
// bad dtype, RuntimeError otherwise.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#include "pool2d_shape.h"

#if defined(DLCV_FAST_CUDA_EMU)
#include <cuda_runtime_api.h>
namespace dlcv_fast::emu {
const char* error_string(cudaError_t err);
}
#elif defined(DLCV_FAST_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace dlcv_fast {

inline DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    case at::kByte: return DType::UInt8;
    case at::kChar: return DType::Int8;
    case at::kShort: return DType::Int16;
    case at::kInt: return DType::Int32;
    case at::kLong: return DType::Int64;
    default: break;
  }
  TORCH_CHECK_TYPE(false, "unsupported dtype ", t);
}

// float32, float64, float16 and bfloat16 on every device.
inline void check_floating(const char* op, const char* arg, const at::Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
                   op, ": ", arg, " must be float32, float64, float16 or bfloat16, but got ", s);
}

inline void check_same_device(const char* op, const char* arg, const at::Tensor& t,
                              const char* ref_arg, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", arg, " is on ", t.device(), " but ", ref_arg,
              " is on ", ref.device(), "; expected both on the same device");
}

inline void check_pair(const char* op, const char* arg, at::IntArrayRef v) {
  TORCH_CHECK_VALUE(v.size() == 2, op, ": ", arg, " must hold 2 ints, but got ", v.size());
}

// With DLCV_FAST_POISON=1, outputs start as NaN (int64 outputs as INT64_MIN) instead of
// uninitialised memory, so a test catches any element a kernel fails to write.
inline bool poison_outputs() {
  const char* v = std::getenv("DLCV_FAST_POISON");
  return v != nullptr && std::string(v) == "1";
}

// Whether x runs on the CPU kernels (else on the CUDA ones). The build that runs the CUDA
// kernels on the CPU for tests (csrc/emu) sends every tensor to the CUDA kernels.
#ifdef DLCV_FAST_CUDA_EMU
constexpr bool cpu_kernels(const at::Tensor&) { return false; }
#else
inline bool cpu_kernels(const at::Tensor& x) { return x.is_cpu(); }
#endif

#if defined(DLCV_FAST_CUDA_EMU)
// The emulated kernels run at once, on the CPU tensors they are given.
template <typename F>
void launch_cuda(const char* op, const at::Tensor& x, F&& launch) {
  TORCH_CHECK(x.is_cpu(), op, ": the CUDA emulation runs on CPU tensors, not on ", x.device());
  const cudaError_t err = launch(nullptr);
  TORCH_CHECK(err == cudaSuccess, op, " (cuda): kernel launch failed: ", emu::error_string(err));
}
#elif defined(DLCV_FAST_WITH_CUDA)
// Runs launch(stream) with x's GPU current and on its current stream; a failed launch
// raises, naming the op.
template <typename F>
void launch_cuda(const char* op, const at::Tensor& x, F&& launch) {
  TORCH_CHECK(x.is_cuda(), op, ": tensors on ", x.device(), " are not supported");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = launch(c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, op, " (cuda): kernel launch failed: ", cudaGetErrorString(err));
}
#else
[[noreturn]] inline void no_cuda_kernels(const char* op, const at::Tensor& x) {
  TORCH_CHECK(false, op, ": this build of dlcv_fast has no CUDA kernels (tensors on ",
              x.device(), ")");
}
#endif

}  // namespace dlcv_fast
