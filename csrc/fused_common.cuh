// CUDA helpers shared by the fused-loss kernels: vector packs, block reductions, grid sizing.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace orw_fast {

// Threads per block of every fused-loss kernel (reductions, and so the results' bits, depend on it).
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T val[N];
};

// Writes a pack as one 16-byte store (plain assignment lets nvcc split half/bf16 packs).
template <typename P>
__device__ __forceinline__ void store_pack(void* dst, const P& p) {
  if constexpr (sizeof(P) == 16) {
    uint4 bits;
    memcpy(&bits, &p, 16);
    __stwb(reinterpret_cast<uint4*>(dst), bits);
  } else {
    *reinterpret_cast<P*>(dst) = p;
  }
}

template <typename acc_t>
struct MaxOp {
  __device__ acc_t operator()(acc_t a, acc_t b) const { return a > b ? a : b; }
};
template <typename acc_t>
struct SumOp {
  __device__ acc_t operator()(acc_t a, acc_t b) const { return a + b; }
};

template <typename acc_t, typename Op>
__device__ acc_t warp_reduce(acc_t x, Op op) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x = op(x, __shfl_down_sync(0xffffffffu, x, off));
  return x;
}

// Reduces one value per thread over the block; every thread gets the result.
template <typename acc_t, typename Op>
__device__ acc_t block_reduce(acc_t x, Op op, acc_t* smem) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  x = warp_reduce(x, op);
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  x = smem[0];
#pragma unroll
  for (int k = 1; k < kWarps; ++k) x = op(x, smem[k]);
  return x;
}

// Blocks of `kernel` resident at once on `device` (SMs x occupancy of its register/shared-memory use):
// the grid of the grid-stride pass kernels, one full wave. The register count differs per instantiation
// (35-46 on sm_90), so a fixed 2048 / kThreads per SM would launch a partial second wave.
template <auto kernel>
int resident_blocks(int device) {
  static int cache[64] = {};
  if (device < 64 && cache[device]) return cache[device];
  int sms = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  const int blocks = sms * std::max(per_sm, 1);
  if (device < 64) cache[device] = blocks;
  return blocks;
}

inline bool aligned16(const at::Tensor& t) {
  return t.numel() == 0 || reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

}  // namespace orw_fast
