// The fiber scheduler and CUDA runtime calls of the CPU emulation (cuda_emu.h).

#include <sys/mman.h>

#include <array>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_emu.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// Stack switching for the fibers, x86-64 System V: push the callee-saved registers and the
// SSE and x87 control words, save the stack pointer to *from, load `to`, pop the same. A
// round trip took 24 ns on the 2-core test machine, swapcontext's 600 ns (it also saves and
// restores the signal mask, by system calls): the emulation switches at every barrier.
#if !defined(__x86_64__)
#error "the CUDA emulation's fiber switch is written for x86-64"
#endif
extern "C" void dlcv_emu_switch(void** from, void* to);
extern "C" void dlcv_emu_fiber_start();
asm(R"(
    .text
    .p2align 4
    .globl dlcv_emu_switch
    .type dlcv_emu_switch, @function
dlcv_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size dlcv_emu_switch, .-dlcv_emu_switch

    .globl dlcv_emu_fiber_start
    .type dlcv_emu_fiber_start, @function
dlcv_emu_fiber_start:
    call dlcv_emu_fiber_main
    ud2
    .size dlcv_emu_fiber_start, .-dlcv_emu_fiber_start
)");

namespace dlcv_fast::emu {
namespace {

// sm_90 limits.
constexpr size_t kStaticSmemLimit = 48 * 1024;   // dynamic memory above this needs opting in
constexpr int kOptinSmemLimit = 227 * 1024;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kDynamicSmemAlign = 128;  // as common.cuh's dynamic_smem() declares

enum class State { kReady, kBlockBarrier, kWarpBarrier, kDone };

struct AsyncCopy {
  unsigned char* dst;
  const unsigned char* src;
  int src_bytes, bytes;
  void land() const {
    std::memcpy(dst, src, src_bytes);
    std::memset(dst + src_bytes, 0, bytes - src_bytes);
  }
};

struct Fiber {
  void* sp;  // saved stack pointer while switched out
  unsigned char* stack;
  void* asan_fake_stack;
  uint3 index;
  int linear;
  State state;
  std::vector<AsyncCopy> uncommitted;
  std::deque<std::vector<AsyncCopy>> groups;  // committed, not yet waited for; oldest first
};

struct Launch {
  dim3 grid, block;
  uint3 block_index;
  void (*body)(void*);
  void* state;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  void* scheduler_sp;
  // Exactly the launch's bytes (AddressSanitizer then sees an access one past them).
  std::unique_ptr<unsigned char, decltype(&std::free)> dynamic_smem{nullptr, &std::free};
  size_t dynamic_smem_bytes = 0;
  std::vector<uint64_t> slots;  // a shuffle's value per thread
  // warp_exchange's values per thread, in two banks used in turn, so that a lane may write
  // the next exchange's while the others still read this one's (one warp barrier each).
  std::vector<std::array<unsigned char, 32>> exchange[2];
  std::vector<uint64_t> exchanges;              // per thread, this block
  std::vector<std::vector<MmaMemo>> mma_memos;  // per warp, by call
  std::vector<size_t> mma_calls;                // per thread, this block
  bool failed = false;
  std::string message;
};

Launch* active = nullptr;
bool reverse_order = false;  // this launch's, from DLCV_FAST_EMU_SCHEDULE
cudaError_t last_error = cudaSuccess;
std::string last_message;
std::map<const void*, int> max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize

Launch& launch_in_progress() {
  if (active == nullptr || active->current == nullptr) {
    std::fprintf(stderr, "dlcv_fast emulation: a device function called outside a kernel\n");
    std::abort();
  }
  return *active;
}

// Stack switches, told to AddressSanitizer where the build has it (else it takes a
// fiber's stack for a stray one and reports errors that are not there).
#if defined(__SANITIZE_ADDRESS__)
const void* asan_scheduler_bottom = nullptr;
size_t asan_scheduler_size = 0;
void* asan_scheduler_fake_stack = nullptr;
#endif

void to_fiber(Launch& l, Fiber& f) {
  l.current = &f;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(&asan_scheduler_fake_stack, f.stack, kStackBytes);
#endif
  dlcv_emu_switch(&l.scheduler_sp, f.sp);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(asan_scheduler_fake_stack, nullptr, nullptr);
#endif
  l.current = nullptr;
}

// In the fiber, after a switch to it.
void arrived(Fiber& f) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(f.asan_fake_stack, &asan_scheduler_bottom,
                                  &asan_scheduler_size);
#else
  (void)f;
#endif
}

// Back to the scheduler; returns when the scheduler resumes the fiber (never if `final`).
void to_scheduler(Launch& l, Fiber& f, bool final) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(final ? nullptr : &f.asan_fake_stack, asan_scheduler_bottom,
                                 asan_scheduler_size);
#endif
  dlcv_emu_switch(&f.sp, l.scheduler_sp);
  arrived(f);
}

void yield(State s) {
  Launch& l = launch_in_progress();
  Fiber& f = *l.current;
  f.state = s;
  to_scheduler(l, f, false);
}

// A new fiber's stack: the frame dlcv_emu_switch pops (control words as the caller's,
// zero registers), returning into dlcv_emu_fiber_start with the stack 16-byte aligned.
void* first_frame(unsigned char* top) {
  auto* p = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t{15});
  *--p = reinterpret_cast<uint64_t>(&dlcv_emu_fiber_start);
  for (int r = 0; r < 6; ++r) *--p = 0;  // rbp, rbx, r12-r15
  uint32_t mxcsr;
  uint16_t fpcw;
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(mxcsr), "=m"(fpcw));
  *--p = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpcw) << 32);
  return p;
}

void fiber_main() {
  Launch& l = *active;
  arrived(*l.current);
  l.body(l.state);
  const Fiber& f = *l.current;
  bool pending = !f.uncommitted.empty();
  for (const std::vector<AsyncCopy>& group : f.groups) pending = pending || !group.empty();
  if (pending) {
    fail("the thread exits with cp.async copies it never waited for (commit, then "
         "cp.async.wait_group)");
  }
  l.current->state = State::kDone;
  to_scheduler(l, *l.current, true);
}

int warp_of(const Fiber& f) { return f.linear / 32; }

// Releases warp w's lanes from a warp barrier if all of them have reached it (or exited).
bool release_warp(Launch& l, int w) {
  const int n = static_cast<int>(l.fibers.size());
  const int end = std::min(n, w * 32 + 32);
  bool any = false;
  for (int t = w * 32; t < end; ++t) {
    const State s = l.fibers[t].state;
    if (s != State::kWarpBarrier && s != State::kDone) return false;
    any = any || s == State::kWarpBarrier;
  }
  if (!any) return false;
  for (int t = w * 32; t < end; ++t) {
    if (l.fibers[t].state == State::kWarpBarrier) l.fibers[t].state = State::kReady;
  }
  return true;
}

// Releases the threads waiting at a barrier that every live thread it needs has reached;
// false if there is none (a deadlock, unless every thread is done).
bool release(Launch& l) {
  const int n = static_cast<int>(l.fibers.size());
  bool released = false;
  for (int w = 0; w < (n + 31) / 32; ++w) released = release_warp(l, w) || released;
  if (released) return true;
  bool all = true, any = false;
  for (const Fiber& f : l.fibers) {
    if (f.state == State::kBlockBarrier) any = true;
    else if (f.state != State::kDone) all = false;
  }
  if (any && all) {
    for (Fiber& f : l.fibers) {
      if (f.state == State::kBlockBarrier) f.state = State::kReady;
    }
    return true;
  }
  return false;
}

void run_block(Launch& l, unsigned char* stacks) {
  const int n = static_cast<int>(l.fibers.size());
  for (int t = 0; t < n; ++t) {
    Fiber& f = l.fibers[t];
    f.linear = t;
    f.index = make_uint3(t % l.block.x, (t / l.block.x) % l.block.y, t / (l.block.x * l.block.y));
    f.state = State::kReady;
    f.stack = stacks + static_cast<size_t>(t) * kStackBytes;
    f.asan_fake_stack = nullptr;
    f.uncommitted.clear();
    f.groups.clear();
    f.sp = first_frame(f.stack + kStackBytes);
  }
  l.mma_memos.assign((n + 31) / 32, {});
  l.mma_calls.assign(n, 0);
  l.exchanges.assign(n, 0);
  // Every byte 0xFF: NaN in float, half and bfloat16, so that an unwritten element a kernel
  // reads shows in its result even when multiplied by zero.
  if (l.dynamic_smem_bytes > 0) std::memset(l.dynamic_smem.get(), 0xFF, l.dynamic_smem_bytes);
  // The first ready thread in schedule order runs to its next barrier. A warp whose lanes
  // have all reached a warp barrier goes on at once, so each warp runs as far as it can
  // before the next one starts: between two block barriers, every write of the first warp
  // precedes every access of the last (and the reverse in the reverse order).
  for (;;) {
    bool ran = false;
    for (int i = 0; i < n; ++i) {
      Fiber& f = l.fibers[reverse_order ? n - 1 - i : i];
      if (f.state != State::kReady) continue;
      to_fiber(l, f);
      ran = true;
      if (l.failed) return;
      if (f.state == State::kWarpBarrier && release_warp(l, warp_of(f))) i = -1;
    }
    if (ran) continue;
    if (!release(l)) break;
  }
  for (const Fiber& f : l.fibers) {
    if (f.state != State::kDone) {
      l.failed = true;
      l.message = "deadlock: some threads wait at __syncthreads or a warp operation that the "
                  "others never reach (thread " + std::to_string(f.linear) + " waits at " +
                  (f.state == State::kBlockBarrier ? "__syncthreads" : "a warp operation") + ")";
      return;
    }
  }
}

// AddressSanitizer poisons a frame's red zones on entry and clears them on return: the
// frames that a block's fibers left on their stacks (switched out of, never returned from)
// would stay poisoned for whatever uses that memory next.
void clear_fiber_frames(Launch& l) {
#if defined(__SANITIZE_ADDRESS__)
  for (const Fiber& f : l.fibers) {
    unsigned char* const top = f.stack + kStackBytes;
    unsigned char* const sp = static_cast<unsigned char*>(f.sp);
    if (sp >= f.stack && sp < top) __asan_unpoison_memory_region(sp, top - sp);
  }
#else
  (void)l;
#endif
}

cudaError_t finish(cudaError_t err, std::string message) {
  last_error = err;
  last_message = std::move(message);
  return err;
}

}  // namespace

uint3 thread_idx() { return launch_in_progress().current->index; }
uint3 block_idx() { return launch_in_progress().block_index; }
dim3 block_dim() { return launch_in_progress().block; }
dim3 grid_dim() { return launch_in_progress().grid; }
int lane() { return launch_in_progress().current->linear % 32; }
unsigned char* dynamic_smem() { return launch_in_progress().dynamic_smem.get(); }

MmaMemo& next_mma_memo() {
  Launch& l = launch_in_progress();
  const int t = l.current->linear;
  std::vector<MmaMemo>& memos = l.mma_memos[t / 32];
  const size_t k = l.mma_calls[t]++;
  if (k == memos.size()) memos.emplace_back();
  return memos[k];
}

void async_copy(void* dst, const void* src, int src_bytes, int bytes) {
  Launch& l = launch_in_progress();
  if (bytes != 4 && bytes != 8 && bytes != 16) fail("cp.async of %d bytes (4, 8 or 16)", bytes);
  if (src_bytes < 0 || src_bytes > bytes) {
    fail("cp.async: source size %d outside 0..%d", src_bytes, bytes);
  }
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 ||
      reinterpret_cast<uintptr_t>(src) % bytes != 0) {
    fail("cp.async of %d bytes: source %p or destination %p not aligned to them", bytes, src, dst);
  }
  const AsyncCopy c{static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src),
                    src_bytes, bytes};
  if (reverse_order) {
    c.land();
  } else {
    l.current->uncommitted.push_back(c);
  }
}

void async_copy_commit() {
  Fiber& f = *launch_in_progress().current;
  f.groups.push_back(std::move(f.uncommitted));
  f.uncommitted.clear();
}

void async_copy_wait(int pending) {
  Fiber& f = *launch_in_progress().current;
  while (static_cast<int>(f.groups.size()) > pending) {
    for (const AsyncCopy& c : f.groups.front()) c.land();
    f.groups.pop_front();
  }
}

void sync_threads() { yield(State::kBlockBarrier); }
void sync_warp() { yield(State::kWarpBarrier); }

uint64_t shuffle(unsigned mask, uint64_t bits, int src) {
  Launch& l = launch_in_progress();
  const Fiber& f = *l.current;
  const int n = static_cast<int>(l.fibers.size());
  const int base = warp_of(f) * 32;
  const int lanes = std::min(32, n - base);
  const unsigned live = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
  if (mask != live) {
    fail("warp shuffle: mask 0x%08x does not name exactly the warp's %d threads (this "
         "emulation runs whole warps only)", mask, lanes);
  }
  l.slots[f.linear] = bits;
  sync_warp();
  for (int t = base; t < base + lanes; ++t) {
    if (l.fibers[t].state == State::kDone) {
      fail("warp shuffle: thread %d of the mask has exited", t);
    }
  }
  if (src >= lanes) fail("warp shuffle: source lane %d does not exist", src);
  const uint64_t out = l.slots[base + src];
  sync_warp();
  return out;
}

void warp_exchange(const void* mine, void* all, int bytes) {
  Launch& l = launch_in_progress();
  const Fiber& f = *l.current;
  const int n = static_cast<int>(l.fibers.size());
  const int base = warp_of(f) * 32;
  if (base + 32 > n) fail("a warp-wide matrix operation in a warp of fewer than 32 threads");
  if (bytes < 1 || bytes > 32) fail("warp_exchange of %d bytes", bytes);
  const uint64_t k = ++l.exchanges[f.linear];
  auto& bank = l.exchange[k % 2];
  std::memcpy(bank[f.linear].data(), mine, bytes);
  sync_warp();
  for (int t = base; t < base + 32; ++t) {
    // A lane may be one exchange ahead (it wrote the other bank), never behind.
    if (l.exchanges[t] < k) fail("warp matrix operation: lane %d exited before it", t - base);
    std::memcpy(static_cast<unsigned char*>(all) + (t - base) * bytes, bank[t].data(), bytes);
  }
}

void fail(const char* format, ...) {
  Launch& l = launch_in_progress();
  char buf[512];
  va_list args;
  va_start(args, format);
  std::vsnprintf(buf, sizeof buf, format, args);
  va_end(args);
  l.failed = true;
  l.message = std::string(buf) + " (block (" + std::to_string(l.block_index.x) + ", " +
              std::to_string(l.block_index.y) + ", " + std::to_string(l.block_index.z) +
              "), thread " + std::to_string(l.current->linear) + ")";
  to_scheduler(l, *l.current, true);  // the launch is abandoned: never resumed
  std::abort();
}

cudaError_t run(dim3 grid, dim3 block, size_t smem, const void* kernel, void (*body)(void*),
                void* state) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0 || threads > 1024 ||
      block.x > 1024 || block.y > 1024 || block.z > 64 || grid.x > 2147483647u ||
      grid.y > 65535 || grid.z > 65535) {
    return finish(cudaErrorInvalidConfiguration,
                  "invalid launch: grid (" + std::to_string(grid.x) + ", " +
                      std::to_string(grid.y) + ", " + std::to_string(grid.z) + "), block (" +
                      std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
                      std::to_string(block.z) + ")");
  }
  if (smem > kStaticSmemLimit) {
    const auto it = max_dynamic_smem.find(kernel);
    if (it == max_dynamic_smem.end() || static_cast<size_t>(it->second) < smem) {
      return finish(cudaErrorInvalidValue,
                    std::to_string(smem) + " bytes of dynamic shared memory without "
                    "cudaFuncAttributeMaxDynamicSharedMemorySize set that high");
    }
  }
  // One launch at a time, whichever host thread makes it: the launch state and the kernels'
  // __shared__ variables are global. (Recursive: a launch from a kernel fails, not hangs.)
  static std::recursive_mutex one_at_a_time;
  const std::lock_guard<std::recursive_mutex> lock(one_at_a_time);
  if (active != nullptr) return finish(cudaErrorLaunchFailure, "a launch inside a kernel");

  const char* schedule = std::getenv("DLCV_FAST_EMU_SCHEDULE");
  reverse_order = schedule != nullptr && std::string(schedule) == "reverse";
  Launch l;
  l.grid = grid;
  l.block = block;
  l.body = body;
  l.state = state;
  l.fibers.resize(threads);
  l.slots.resize(threads);
  l.exchange[0].resize(threads);
  l.exchange[1].resize(threads);
  void* buffer = nullptr;
  if (posix_memalign(&buffer, kDynamicSmemAlign, smem) != 0) {
    return finish(cudaErrorMemoryAllocation, "no memory for dynamic shared memory");
  }
  l.dynamic_smem.reset(static_cast<unsigned char*>(buffer));
  l.dynamic_smem_bytes = smem;
  const size_t stack_bytes = threads * kStackBytes;
  void* stacks = mmap(nullptr, stack_bytes, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (stacks == MAP_FAILED) return finish(cudaErrorMemoryAllocation, "no memory for stacks");
  active = &l;
  for (unsigned z = 0; z < grid.z && !l.failed; ++z)
    for (unsigned y = 0; y < grid.y && !l.failed; ++y)
      for (unsigned x = 0; x < grid.x && !l.failed; ++x) {
        l.block_index = make_uint3(x, y, z);
        run_block(l, static_cast<unsigned char*>(stacks));
        clear_fiber_frames(l);
      }
  active = nullptr;
  munmap(stacks, stack_bytes);
  if (l.failed) return finish(cudaErrorLaunchFailure, l.message);
  return finish(cudaSuccess, "");
}

cudaError_t get_last_error() {
  const cudaError_t err = last_error;
  last_error = cudaSuccess;
  return err;
}

const char* error_string(cudaError_t err) {
  if (err == cudaSuccess) return "no error";
  static thread_local std::string text;
  text = "emulated CUDA error " + std::to_string(static_cast<int>(err)) + ": " + last_message;
  return text.c_str();
}

cudaError_t get_device(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = kOptinSmemLimit; break;
    case cudaDevAttrMultiProcessorCount: *value = 132; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t set_max_dynamic_smem(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || value > kOptinSmemLimit) return cudaErrorInvalidValue;
  max_dynamic_smem[kernel] = value;
  return cudaSuccess;
}

}  // namespace dlcv_fast::emu

// Where dlcv_emu_fiber_start enters a new fiber.
extern "C" void dlcv_emu_fiber_main() { dlcv_fast::emu::fiber_main(); }
