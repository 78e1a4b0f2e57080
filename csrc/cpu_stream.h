// Non-temporal (streaming) stores for the CPU kernels' gradient outputs, and when to use them.
//
// A plain store first reads the destination's cache line (write-allocate): a gradient written with
// plain stores costs its bytes twice in memory traffic. When the call moves more bytes than the
// last-level cache holds, nothing it writes would still be cached for the next reader anyway, so the
// kernels stream their gradients past the caches instead (measured on a 2-core AMD EPYC, 8 MB L3: a
// 3 MB gradient with 12 MB of inputs, about 20 % faster; with 3 MB of inputs plain stores win). Only
// x86-64 has them here; elsewhere stream_lanes is a plain copy and should_stream is false.
//
// Such a call also prefetches its inputs as non-temporal (lane_loop; quadratic_fm's norms loop too):
// they are read once, and plain loads would push them through the last-level cache, evicting what
// runs next: the interpreter and the autograd engine. On the AMD EPYC, `loss.backward()` after the
// loss took 0.24 ms with plain loads and 0.14 ms with these, and a whole 256x3x32x32 or 64x4x64x64
// fp32 step (loss + backward) became 1.4-1.5x faster (1.2-1.3x for the adaptive forms, whose gradient
// pass re-reads a sample from the cache).
#pragma once

#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define ORW_FAST_HAS_STREAM 1
#else
#define ORW_FAST_HAS_STREAM 0
#endif

#include <unistd.h>

namespace orw_fast {

// Bytes of the last-level cache: /sys (what lscpu reports; a VM's sysconf may give the host's), else
// sysconf, else 32 MiB.
inline int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    for (const char* index : {"index3", "index2"}) {
      std::ifstream f(std::string("/sys/devices/system/cpu/cpu0/cache/") + index + "/size");
      int64_t n = 0;
      char unit = 0;
      if (f >> n && n > 0) {
        f >> unit;
        return unit == 'K' ? n << 10 : unit == 'M' ? n << 20 : n;
      }
    }
#ifdef _SC_LEVEL3_CACHE_SIZE
    const long n = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (n > 0) return int64_t(n);
#endif
    return int64_t(32) << 20;
  }();
  return bytes;
}

// Whether a call that reads and writes `bytes` in all should stream its gradient stores: when
// `bytes` exceeds the environment variable ORW_FAST_STREAM_BYTES if set (0: always; the tests use it),
// else the last-level cache size.
inline bool should_stream(int64_t bytes) {
  const char* limit = std::getenv("ORW_FAST_STREAM_BYTES");
  return ORW_FAST_HAS_STREAM && bytes > (limit ? std::atoll(limit) : last_level_cache_bytes());
}

// Whether p is aligned for stream_lanes (16 bytes).
inline bool stream_aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Writes N values of src to dst (16-byte aligned; N * sizeof(T) a multiple of 16) with streaming
// stores. The caller ends its stores with stream_fence() before the data is handed on.
template <typename T, int64_t N>
inline void stream_lanes(T* dst, const T* src) {
  static_assert((N * sizeof(T)) % 16 == 0, "stream_lanes writes whole 16-byte packets");
#if ORW_FAST_HAS_STREAM
  for (int64_t q = 0; q < int64_t(N * sizeof(T) / 16); ++q) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst) + q,
                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(src) + q));
  }
#else
  std::memcpy(dst, src, N * sizeof(T));
#endif
}

inline void stream_fence() {
#if ORW_FAST_HAS_STREAM
  _mm_sfence();
#endif
}

// How far ahead of its loads lane_loop prefetches each input when streaming (four cache lines).
constexpr int64_t kPrefetchBytes = 256;

// Prefetches element j + kPrefetchBytes of each non-null input as non-temporal (a hint: no effect on
// any value).
template <typename T, size_t N>
inline void prefetch_ahead(const std::array<const T*, N>& ins, int64_t j) {
  for (const T* in : ins) {
    if (in != nullptr) __builtin_prefetch(in + j + kPrefetchBytes / int64_t(sizeof(T)), 0, 0);
  }
}

// The element loop of a CPU chunk kernel over the flat range [begin, end): calls
// body(j, lane, o0, o1, o2, o3, w) for every j, which reads element j, adds into accumulator `lane`
// (< L, for groups of L elements that vectorise without reassociation) and writes its outputs to
// index w of o0..o3 (those it was asked for; the others may be null). Each whole group of L goes
// through a stage, then out with streaming stores when `stream` and every non-null output is 16-byte
// aligned at begin (then a fence), else with plain copies: the arithmetic is the same code either way,
// so streaming changes no bit of any output. When streaming, the inputs `ins` are prefetched
// (prefetch_ahead).
template <typename T, int64_t L, typename Body>
__attribute__((always_inline)) inline void lane_loop(int64_t begin, int64_t end, bool stream, T* o0, T* o1,
                                                     T* o2, T* o3, std::array<const T*, 4> ins,
                                                     Body&& body) {
  T* const outs[4] = {o0, o1, o2, o3};
  const bool prefetch = stream;
  for (T* o : outs) stream = stream && (o == nullptr || stream_aligned(o + begin));
  alignas(64) T stage[4][L] = {};  // the stage of an absent output stays unused
  int64_t j = begin;
  for (; j + L <= end; j += L) {
    if (prefetch) prefetch_ahead(ins, j);
#pragma omp simd
    for (int64_t lane = 0; lane < L; ++lane) body(j + lane, lane, stage[0], stage[1], stage[2], stage[3], lane);
    for (int q = 0; q < 4; ++q) {
      if (outs[q] == nullptr) continue;
      if (stream) {
        stream_lanes<T, L>(outs[q] + j, stage[q]);
      } else {
        std::memcpy(outs[q] + j, stage[q], L * sizeof(T));
      }
    }
  }
  for (int64_t lane = 0; j < end; ++j, ++lane) body(j, lane, o0, o1, o2, o3, j);
  if (stream) stream_fence();
}

}  // namespace orw_fast
