// Helpers shared by the CPU kernels. Everything a kernel file includes comes in through
// here, before any per-instruction-set `#pragma GCC target` (see isa.h), so that no inline
// function of a library header is compiled for an instruction set the CPU may lack.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../pool2d_shape.h"

namespace dlcv_fast::cpu {

// Taps o * stride - pad + k * dilation in [first, end), as in the CUDA kernel.
inline void window(int64_t o, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation,
                   int64_t size, int64_t& first, int64_t& end) {
  const int64_t begin = o * stride - pad;
  end = std::min(begin + (kernel - 1) * dilation + 1, size);
  first = begin >= 0 ? begin : begin + ((dilation - 1 - begin) / dilation) * dilation;
}

// Work items per task so that each task does about 32768 element visits (ATen's grain).
inline int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, int64_t{32768} / std::max<int64_t>(1, work_per_item));
}

}  // namespace dlcv_fast::cpu
