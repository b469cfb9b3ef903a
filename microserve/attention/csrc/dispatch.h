// Picks the kernel instantiation for a call's dtype and head dim, shared by the CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <type_traits>

namespace microserve {

// Calls f(T{}, std::integral_constant<int, kD>{}) with T the element type of `dtype` (fp32, bf16
// or fp16; math is fp32 either way) and kD the head dim when it has a specialisation (8, 16, 32,
// 64, 128: unrolled, vectorised inner loops), else 0 (the kernel reads it at run time).
template <typename F>
void dispatch(at::ScalarType dtype, int64_t head_dim, const char* op, F&& f) {
  auto with_dim = [&](auto t) {
    switch (head_dim) {
      case 8: return f(t, std::integral_constant<int, 8>{});
      case 16: return f(t, std::integral_constant<int, 16>{});
      case 32: return f(t, std::integral_constant<int, 32>{});
      case 64: return f(t, std::integral_constant<int, 64>{});
      case 128: return f(t, std::integral_constant<int, 128>{});
      default: return f(t, std::integral_constant<int, 0>{});
    }
  };
  switch (dtype) {
    case at::kFloat: return with_dim(float{});
    case at::kBFloat16: return with_dim(at::BFloat16{});
    case at::kHalf: return with_dim(at::Half{});
    default: TORCH_CHECK(false, op, " supports fp32, bf16 and fp16, not ", dtype);
  }
}

}  // namespace microserve
