// A CPU emulation of the CUDA that the kernels in csrc/cuda use, so that the tests run those
// kernels on machines without a GPU (tests/cuda_emu.py builds them with this header first).
//
// A launch runs its blocks one after another on the calling thread. A block's threads are
// fibers, each running the kernel to its next __syncthreads or warp-wide operation, in thread
// order (with DLCV_FAST_EMU_SCHEDULE=reverse, in reverse order); a warp whose lanes all
// reach a warp barrier goes on at once, so each warp runs to its next __syncthreads before
// the next one starts. A result that depends on the order of threads or warps between two
// barriers (a missing __syncthreads) then shows up as a wrong answer in one of the orders.
// __shared__ variables are static: one copy, shared by the block's fibers. Asynchronous
// copies to shared memory (cp.async) land as late as CUDA allows, at the wait for their
// group, so that a read before the wait sees the old bytes; under the reverse schedule they
// land at once, so that a copy into a buffer another warp still reads (a missing barrier)
// overwrites it. ldmatrix and mma.sync follow their PTX fragment layouts (csrc/cuda/
// mma_sync.cuh). Launches are checked against the limits of an sm_90 GPU, WMMA, cp.async and
// ldmatrix against their alignment rules, and barriers for deadlock; a failed check fails
// the launch with a message (cudaGetErrorString), as a fault on a GPU would.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace dlcv_fast::emu {

uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();
void sync_threads();
void sync_warp();
// The value `bits` of lane `src` of the calling thread's warp (every lane of the warp, as
// named by `mask`, calls it: the emulation checks).
uint64_t shuffle(unsigned mask, uint64_t bits, int src);
int lane();
// Every lane of the calling thread's (whole) warp passes `bytes` (at most 32) at `mine`;
// each gets all 32 lanes' in `all`, in lane order (ldmatrix and mma.sync are built on it).
void warp_exchange(const void* mine, void* all, int bytes);
unsigned char* dynamic_smem();
// The memo of the calling lane's next warp-matrix multiply (its k-th of the block) in its
// warp: the warp's lanes make the same calls with the same operands, so one computes each
// product and the others find it here (include/mma.h).
struct MmaMemo {
  std::vector<unsigned char> operands;
  std::vector<float> product;
};
MmaMemo& next_mma_memo();
// cp.async of `bytes` (4, 8 or 16) from global `src` to shared `dst`, of which the first
// `src_bytes` are read and the rest zero-filled; its group is committed by
// async_copy_commit and waited for by async_copy_wait (cp.async.wait_group `pending`).
void async_copy(void* dst, const void* src, int src_bytes, int bytes);
void async_copy_commit();
void async_copy_wait(int pending);
// Ends the launch with cudaErrorLaunchFailure and `message` (printf-style).
[[noreturn]] void fail(const char* format, ...);

// Runs body(state) as every thread of the grid; the result is also cudaGetLastError's.
cudaError_t run(dim3 grid, dim3 block, size_t smem, const void* kernel, void (*body)(void*),
                void* state);

// The CUDA runtime calls the launchers make, answered as an H100 would. (Under names of
// their own: torch's CUDA libraries export the real ones.)
cudaError_t get_last_error();
const char* error_string(cudaError_t err);
cudaError_t get_device(int* device);
cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t set_max_dynamic_smem(const void* kernel, cudaFuncAttribute attr, int value);
template <typename Kernel>
cudaError_t func_set_attribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
  return set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), attr, value);
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  struct State {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
  };
  State state{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  run(grid, block, smem, reinterpret_cast<const void*>(kernel), [](void* s) {
    auto* st = static_cast<State*>(s);
    auto params = st->params;  // kernel parameters are per-thread copies
    std::apply(st->kernel, params);
  }, &state);
}

template <typename T>
T shfl_xor(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of more than 8 bytes");
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    fail("__shfl_xor_sync: width %d is not a power of two up to 32", width);
  }
  const int me = lane();
  int src = me ^ lane_mask;
  if (src / width > me / width) src = me;  // a later group: own value (CUDA's rule)
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = shuffle(mask, bits, src);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// TF32: 10 explicit mantissa bits, rounded to nearest with ties away from zero
// (cvt.rna.tf32.f32).
inline float round_to_tf32(float x) {
  if (!std::isfinite(x)) return x;
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&x, &u, 4);
  return x;
}

}  // namespace dlcv_fast::emu

#define cudaGetLastError ::dlcv_fast::emu::get_last_error
#define cudaGetErrorString ::dlcv_fast::emu::error_string
#define cudaGetDevice ::dlcv_fast::emu::get_device
#define cudaDeviceGetAttribute ::dlcv_fast::emu::device_get_attribute
#define cudaFuncSetAttribute ::dlcv_fast::emu::func_set_attribute
#define threadIdx (::dlcv_fast::emu::thread_idx())
#define blockIdx (::dlcv_fast::emu::block_idx())
#define blockDim (::dlcv_fast::emu::block_dim())
#define gridDim (::dlcv_fast::emu::grid_dim())
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#define __syncthreads() ::dlcv_fast::emu::sync_threads()
#define __syncwarp(...) ::dlcv_fast::emu::sync_warp()
#define __shfl_xor_sync(...) ::dlcv_fast::emu::shfl_xor(__VA_ARGS__)
#define __ldg(p) (*(p))
#define __umulhi(a, b) \
  static_cast<unsigned>((static_cast<uint64_t>(a) * static_cast<uint64_t>(b)) >> 32)
#define __fdividef(a, b) ((a) / (b))
#define __expf(x) std::exp(x)
#define __logf(x) std::log(x)
#define rsqrtf(x) (1.0f / std::sqrt(x))
#define rsqrt(x) (1.0 / std::sqrt(x))
