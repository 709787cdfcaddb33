// y[M, N] = x[M, K] . w[N, K]^T in float32, for the few rows of batched decoding on CPU.
//
// Decoding multiplies a handful of rows by every weight matrix once per token,
// so its speed is the rate at which weights stream from memory. XLA:CPU's
// library matmul reaches about a third of the machine's bandwidth at 8 rows
// (benchmarks/bench_small_matmul.py). Here each weight row is read from memory
// once and multiplied, while it sits in L1, with up to eight input rows whose
// partial sums stay in registers. Blocks of weight rows are shared between the
// threads of XLA's intra-op pool.
//
// Written with GCC/Clang vector extensions rather than intrinsics, and compiled
// with -march=native on the machine that runs it (see cpu_matmul.py).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 8;
constexpr int kMaxTileRows = 8;   // 8 accumulators + 1 weight + 1 input register
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float Sum(Vec v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// The problem, with the input repacked as [k / 8][m][8]: each step of the inner
// loop reads one contiguous run of vectors instead of rows k floats apart
// (rows 4 KB apart alias in L1). The k % 8 tail is read from x itself.
struct Problem {
  const float* x;
  const float* w;
  float* y;
  int64_t m, k, n;
  std::unique_ptr<float[]> packed;

  void Pack() {
    const int64_t k_vec = k / kLanes * kLanes;
    packed.reset(new float[std::max<int64_t>(k_vec * m, 1)]);
    for (int64_t i = 0; i < k_vec; i += kLanes)
      for (int64_t r = 0; r < m; ++r)
        std::memcpy(&packed[i * m + r * kLanes], x + r * k + i, kLanes * sizeof(float));
  }

  // Input rows [r0, r0 + R) against weight row j.
  template <int R>
  void Tile(int64_t r0, int64_t j) const {
    Vec acc[R] = {};
    const float* wj = w + j * k;
    const int64_t k_vec = k / kLanes * kLanes;
    const float* xp = packed.get() + r0 * kLanes;
    for (int64_t i = 0; i < k_vec; i += kLanes) {
      const Vec wv = Load(wj + i);
      const float* xi = xp + i * m;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r] += Load(xi + r * kLanes) * wv;
    }
    for (int r = 0; r < R; ++r) {
      float s = Sum(acc[r]);
      for (int64_t i = k_vec; i < k; ++i) s += x[(r0 + r) * k + i] * wj[i];
      y[(r0 + r) * n + j] = s;
    }
  }

  // Every input row against weight rows [begin, end).
  void Rows(int64_t begin, int64_t end) const {
    for (int64_t j = begin; j < end; ++j) {
      int64_t r = 0;
      for (; r + kMaxTileRows <= m; r += kMaxTileRows) Tile<kMaxTileRows>(r, j);
      switch (m - r) {
        case 7: Tile<7>(r, j); break;
        case 6: Tile<6>(r, j); break;
        case 5: Tile<5>(r, j); break;
        case 4: Tile<4>(r, j); break;
        case 3: Tile<3>(r, j); break;
        case 2: Tile<2>(r, j); break;
        case 1: Tile<1>(r, j); break;
        default: break;
      }
    }
  }
};

// Blocks of weight rows handed out to the calling thread and the pool's. A
// helper may start after every block is taken, so this is reference counted.
struct Work {
  Problem problem;
  int64_t block = 0, blocks = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Run() {
    for (int64_t b = next.fetch_add(1); b < blocks; b = next.fetch_add(1)) {
      problem.Rows(b * block, std::min(problem.n, (b + 1) * block));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error SmallRowsMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1]) {
    return ffi::Error::InvalidArgument(
        "muse_small_rows_matmul expects x [M, K] and w [N, K] with the same K");
  }
  auto work = std::make_shared<Work>();
  Problem& p = work->problem;
  p.x = x.typed_data();
  p.w = w.typed_data();
  p.y = y->typed_data();
  p.m = xd[0];
  p.k = xd[1];
  p.n = wd[0];
  p.Pack();
  // ~64 KB of weights per block: fine enough to balance a few dozen threads.
  work->block = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.k, 1));
  work->blocks = (p.n + work->block - 1) / work->block;

  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->blocks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load(std::memory_order_acquire) < work->blocks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MuseSmallRowsMatmul, SmallRowsMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
