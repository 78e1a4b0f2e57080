// Helpers shared by the fused-loss ops (orw_cfm_w2, quadratic_fm) and their CPU / CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <type_traits>

namespace orw_fast {

// Same memory layout: equal strides in every dimension of size > 1 (a size-1 dimension's stride
// is arbitrary, e.g. the channel stride of a [B, 1, H, W] channels-last tensor).
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// Calls f(F1, F2, ...) with std::true_type / std::false_type for each runtime flag, so a kernel can
// take them as template parameters: the gradient flags (it drops the stores it does not need), the
// forms of quadratic_fm_cpu.cpp's passes (what a pass need not read or compute).
template <typename F>
void dispatch_flags(F&& f) {
  f();
}
template <typename F, typename... Rest>
void dispatch_flags(F&& f, bool flag, Rest... rest) {
  auto bind = [&](auto value) {
    dispatch_flags([&](auto... tail) { f(value, tail...); }, rest...);
  };
  flag ? bind(std::true_type{}) : bind(std::false_type{});
}

}  // namespace orw_fast

// x86-64 builds carry AVX-512 and AVX2+FMA copies of the CPU hot loops, picked when the library loads.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ORW_FAST_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ORW_FAST_CPU_CLONES
#endif
