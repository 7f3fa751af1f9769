// A CPU emulator of the little of CUDA that splat's kernels use, so that they run on CPU tensors
// where there is no GPU (SPLAT_CUDA_EMULATE=1). splat/_cuda.py compiles host copies of csrc/*.cu
// with this header force-included: kernel launches become splat_emu::launch calls, the ops are
// registered for CPU tensors, and the c10/cuda headers are left out (stubs below).
//
// Each CUDA thread of a block is a fiber (ucontext) of the calling OS thread; blocks run one after
// another. __syncthreads() and __shfl_xor_sync() switch fibers until every thread of the block, or
// every lane of the warp, has arrived at the same one (the same call in the source). What the
// hardware leaves undefined stops the launch with an error rather than emulating one outcome: a
// barrier or full-mask shuffle that not every thread or lane reaches, or reaches at another call
// (divergent code, exited threads); a launch configuration the driver rejects (empty or oversized
// grid, block size over 1024 or over the kernel's __launch_bounds__).
//
// __shared__ arrays (rewritten as splat_emu::shared calls) live in a per-block arena whose bytes
// start as 0xff (NaN for floating point), so that a read before any write shows. Between barriers
// a block's threads run one after another, in order of their index or, with
// SPLAT_CUDA_EMULATE_ORDER=reverse, in reverse: a shared-memory race (a read not separated by a
// barrier from another thread's write) gives different results in the two orders.
//
// Floating point is the host's. Multiply-adds are contracted into FMAs where the host has them
// (-march=native -ffp-contract=fast), as nvcc contracts them by default, so that rounding a kernel
// must control (its explicit __fadd_rn/__fmul_rn) is tested against fused neighbours here too;
// which expressions get fused may still differ between the two compilers. expf and exp are the
// host libm's, which may differ from CUDA's in the last bit.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

#define C10_COMPILE_TIME_MAX_GPUS 16
#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "splat CUDA emulator: ", #expr, " failed")
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace c10::cuda

// CUDA never merges these into a multiply-add: neither may the host compiler once they are inlined,
// so each result goes through a volatile (rounded to its type, opaque to contraction).
template <typename T>
inline T rounded(T x) {
  volatile T r = x;
  return r;
}
inline float __fadd_rn(float a, float b) { return rounded(a + b); }
inline float __fmul_rn(float a, float b) { return rounded(a * b); }
inline double __dadd_rn(double a, double b) { return rounded(a + b); }
inline double __dmul_rn(double a, double b) { return rounded(a * b); }

namespace splat_emu {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 64 * 1024;

inline size_t page_bytes() {
  static const size_t n = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return n;
}

inline size_t stack_stride() { return page_bytes() + kStackBytes; }

// SMs the emulated device reports ($SPLAT_CUDA_EMULATE_SMS, default 4): the launch plans size their
// grids to a wave of it, so a small count keeps launches small while still splitting long rows.
inline int sm_count() {
  static const int n = [] {
    const char* env = std::getenv("SPLAT_CUDA_EMULATE_SMS");
    const int v = env ? std::atoi(env) : 4;
    return v > 0 ? v : 4;
  }();
  return n;
}

// The emulated device's index for a tensor of the emulated device (CPU tensors have index -1).
inline c10::DeviceIndex device_index(const at::Tensor&) { return 0; }

enum class State { ready, block_barrier, warp_barrier, done };

struct Scheduler {
  std::mutex mutex;  // one launch at a time: the fibers share the globals above
  ucontext_t main;
  std::vector<ucontext_t> contexts;
  std::vector<State> states;
  std::vector<std::pair<const char*, int>> sites;  // the barrier a thread waits at: (file, call number)
  char* stacks = nullptr;  // stack_count fiber stacks, each above a PROT_NONE guard page
  size_t stack_count = 0;
  std::vector<uint64_t> slots;  // a value per thread, exchanged by shuffles
  std::vector<std::pair<std::pair<const char*, int>, std::unique_ptr<char[]>>> shared;  // the block's arrays
  int current = 0;
  int threads = 0;
  void (*body)(void*) = nullptr;
  void* arg = nullptr;
  std::string error;
};

inline Scheduler& scheduler() {
  static Scheduler s;
  return s;
}

inline void set_thread_index(int linear) {
  threadIdx = dim3(linear % blockDim.x, linear / blockDim.x % blockDim.y, linear / (blockDim.x * blockDim.y));
}

// Suspends the running fiber in `state`, at barrier `site` of `file`, until the scheduler releases it.
inline void suspend(State state, const char* file = nullptr, int site = 0) {
  Scheduler& s = scheduler();
  const int me = s.current;
  s.states[me] = state;
  s.sites[me] = {file, site};
  swapcontext(&s.contexts[me], &s.main);
}

// Stops the launch: the scheduler raises `what` and resumes no fiber of the block.
inline void fail(const std::string& what) {
  Scheduler& s = scheduler();
  if (s.error.empty()) s.error = what;
  suspend(State::done);
}

inline void fiber_main() {
  Scheduler& s = scheduler();
  s.body(s.arg);
  s.states[s.current] = State::done;
  // uc_link returns to the scheduler.
}

inline std::string block_name() {
  return "block (" + std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) + ", " +
         std::to_string(blockIdx.z) + ")";
}

// Runs one block's threads to completion, releasing barriers as they fill.
inline void run_block(bool reverse) {
  Scheduler& s = scheduler();
  const int n = s.threads;
  s.shared.clear();
  for (int i = 0; i < n; ++i) {
    ucontext_t& c = s.contexts[i];
    getcontext(&c);
    c.uc_stack.ss_sp = s.stacks + size_t(i) * stack_stride() + page_bytes();
    c.uc_stack.ss_size = kStackBytes;
    c.uc_link = &s.main;
    makecontext(&c, fiber_main, 0);
    s.states[i] = State::ready;
  }
  for (;;) {
    for (int k = 0; k < n; ++k) {
      const int i = reverse ? n - 1 - k : k;
      if (s.states[i] != State::ready) continue;
      s.current = i;
      set_thread_index(i);
      swapcontext(&s.main, &s.contexts[i]);
      TORCH_CHECK(s.error.empty(), "splat CUDA emulator: ", block_name(), ", thread ", i, ": ", s.error);
    }
    // Every thread has exited or waits. Release each warp whose lanes all wait at one shuffle.
    bool released = false;
    for (int first = 0; first < n; first += kWarp) {
      const int last = std::min(n, first + kWarp);
      bool any = false, all = true;
      for (int i = first; i < last; ++i) {
        any = any || s.states[i] == State::warp_barrier;
        all = all && s.states[i] == State::warp_barrier && s.sites[i] == s.sites[first];
      }
      if (!any) continue;
      TORCH_CHECK(last - first == kWarp, "splat CUDA emulator: ", block_name(),
                  ": full-mask shuffle in a partial warp of ", last - first, " threads");
      if (all) {
        for (int i = first; i < last; ++i) s.states[i] = State::ready;
        released = true;
      }
    }
    if (released) continue;
    // Else the block's threads must all have exited, or all wait at one __syncthreads.
    int done = 0, waiting = -1;
    bool one_barrier = true;
    for (int i = 0; i < n; ++i) {
      if (s.states[i] == State::done) {
        ++done;
      } else if (s.states[i] == State::block_barrier && (waiting < 0 || s.sites[i] == s.sites[waiting])) {
        waiting = waiting < 0 ? i : waiting;
      } else {
        one_barrier = false;
      }
    }
    if (done == n) return;
    TORCH_CHECK(one_barrier, "splat CUDA emulator: ", block_name(),
                ": threads wait at different barriers (a __syncthreads or full-mask shuffle in divergent "
                "code, or a shuffle with lanes that exited)");
    TORCH_CHECK(done == 0, "splat CUDA emulator: ", block_name(), ": __syncthreads after ", done, " of ", n,
                " threads exited");
    for (int i = 0; i < n; ++i) s.states[i] = State::ready;
  }
}

template <typename F>
void call_body(void* f) {
  (*static_cast<F*>(f))();
}

// Maps `count` fiber stacks, each with an inaccessible page below it: a fiber that overflows its
// stack faults instead of writing into its neighbour's.
inline void map_stacks(Scheduler& s, size_t count) {
  if (s.stack_count >= count) return;
  if (s.stacks != nullptr) munmap(s.stacks, s.stack_count * stack_stride());
  void* p = mmap(nullptr, count * stack_stride(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(p != MAP_FAILED, "splat CUDA emulator: cannot map ", count, " fiber stacks");
  s.stacks = static_cast<char*>(p);
  s.stack_count = count;
  for (size_t i = 0; i < count; ++i) mprotect(s.stacks + i * stack_stride(), page_bytes(), PROT_NONE);
}

// kernel<<<grid, block, smem, stream>>>(args...). SPLAT_CUDA_EMULATE_ORDER=reverse also runs the
// blocks in reverse, so that a race between blocks on global memory changes results too.
template <typename... P, typename... Args>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t, const Args&... args) {
  const int64_t threads = int64_t(block.x) * block.y * block.z;
  TORCH_CHECK(threads >= 1 && threads <= kMaxThreads && block.z <= 64,
              "splat CUDA emulator: invalid block size (", block.x, ", ", block.y, ", ", block.z, ")");
  TORCH_CHECK(grid.x >= 1 && grid.x < (1u << 31) && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 &&
                  grid.z <= 65535,
              "splat CUDA emulator: invalid grid (", grid.x, ", ", grid.y, ", ", grid.z, ")");
  TORCH_CHECK(smem == 0, "splat CUDA emulator: dynamic shared memory is not emulated");
  Scheduler& s = scheduler();
  const std::lock_guard<std::mutex> lock(s.mutex);
  map_stacks(s, size_t(threads));
  s.contexts.resize(threads);
  s.states.resize(threads);
  s.sites.resize(threads);
  s.slots.resize(threads);
  s.threads = static_cast<int>(threads);
  s.error.clear();
  auto run = [&] { kernel(args...); };
  s.body = &call_body<decltype(run)>;
  s.arg = &run;
  const char* order = std::getenv("SPLAT_CUDA_EMULATE_ORDER");
  const bool reverse = order != nullptr && std::strcmp(order, "reverse") == 0;
  gridDim = grid;
  blockDim = block;
  const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
  for (int64_t k = 0; k < blocks; ++k) {
    const int64_t b = reverse ? blocks - 1 - k : k;
    blockIdx = dim3(b % grid.x, b / grid.x % grid.y, b / (int64_t(grid.x) * grid.y));
    run_block(reverse);
  }
}

// `__shared__ T name[N];` of a kernel, at declaration `site` of `file`: the block's array, the same
// for all its threads.
template <typename Array>
Array& shared(const char* file, int site) {
  static_assert(std::is_trivially_copyable_v<Array>);
  Scheduler& s = scheduler();
  for (auto& [key, bytes] : s.shared) {
    if (key == std::make_pair(file, site)) return *reinterpret_cast<Array*>(bytes.get());
  }
  static_assert(alignof(Array) <= __STDCPP_DEFAULT_NEW_ALIGNMENT__);
  std::unique_ptr<char[]> bytes(new char[sizeof(Array)]);
  std::memset(bytes.get(), 0xff, sizeof(Array));
  s.shared.emplace_back(std::make_pair(file, site), std::move(bytes));
  return *reinterpret_cast<Array*>(s.shared.back().second.get());
}

// The prologue the emulator's copy of a kernel with __launch_bounds__(max_threads) starts with.
inline void launch_bounds(int max_threads) {
  const int64_t threads = int64_t(blockDim.x) * blockDim.y * blockDim.z;
  if (threads > max_threads) {
    fail("launched with " + std::to_string(threads) + " threads per block, over its __launch_bounds__(" +
         std::to_string(max_threads) + ")");
  }
}

template <typename T>
T shfl_xor(const char* file, int site, unsigned mask, T v, int lane_mask, int width = kWarp) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  Scheduler& s = scheduler();
  if (mask != 0xffffffffu || width != kWarp) fail("only full-mask, full-width shuffles are emulated");
  const int me = s.current;
  std::memcpy(&s.slots[me], &v, sizeof(T));
  suspend(State::warp_barrier, file, site);
  // A source lane outside the warp gives the thread its own value, as on the GPU.
  const int lane = me % kWarp, src_lane = lane ^ lane_mask;
  const int src = src_lane >= 0 && src_lane < kWarp ? me - lane + src_lane : me;
  T r;
  std::memcpy(&r, &s.slots[src], sizeof(T));
  suspend(State::warp_barrier, file, site);  // every lane has read before a later shuffle overwrites the slots
  return r;
}

}  // namespace splat_emu

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = splat_emu::sm_count();
  return cudaSuccess;
}

// Macros, so that the emulator knows which barrier or shuffle a thread waits at: each call in the
// source is numbered (__COUNTER__), however many share a line.
#define __syncthreads() splat_emu::suspend(splat_emu::State::block_barrier, __FILE__, __COUNTER__)
#define __shfl_xor_sync(...) splat_emu::shfl_xor(__FILE__, __COUNTER__, __VA_ARGS__)
