// The fp32 GEMM of gemm.h and the `linear` op built on it.
//
// brgemm compiles (JITs) one micro-kernel per (M, N, K, strides) and caches it per thread for the
// life of the process, so the shapes it sees must come from a small set: the output is cut into
// tiles of at most kTileM x kTileN and K into slices of kTileK, and a layer's kernels are its full
// tile and its edge tiles (at most kTileM row counts), whatever the batch sizes. A new kernel
// costs ~0.1 ms, once.
//
//          n0 ........ n0+kTileN                 tile (m0, n0) = sum over K slices k0 of
//   m0   [ tile ][ tile ][ edge ]                  x[m0:m0+kTileM, k0:k0+kTileK] @ block(n0)[k0:k0+kTileK, :]
//        [ tile ][ tile ][ edge ]               (the first slice writes the tile, the rest add to it)
//        [ edge ][ edge ][ edge ]
#include "gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>

namespace microserve {

namespace {
constexpr int64_t kMinTaskMacs = 1 << 18;  // less work than this per task runs on the calling thread
}  // namespace

void gemm(const float* x, int64_t ld_x, int64_t M, int64_t K, const float* w_packed, int64_t N, const float* bias,
          float* out, int64_t ld_out) {
  const int64_t tiles_m = (M + kTileM - 1) / kTileM, tiles_n = (N + kTileN - 1) / kTileN;
  const int64_t tile_macs = std::min(M, kTileM) * std::min(N, kTileN) * K;
  const int64_t grain = std::max<int64_t>(1, kMinTaskMacs / std::max<int64_t>(tile_macs, 1));
  at::parallel_for(0, tiles_m * tiles_n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t m0 = i / tiles_n * kTileM, n0 = i % tiles_n * kTileN;
      const int64_t m = std::min(kTileM, M - m0), n = std::min(kTileN, N - n0);
      const float* block = w_packed + n0 * K;  // [K, n]
      float* c = out + m0 * ld_out + n0;
      for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
        at::native::cpublas::brgemm(m, n, std::min(kTileK, K - k0), ld_x, n, ld_out, /*add_C=*/k0 > 0,
                                    x + m0 * ld_x + k0, block + k0 * n, c);
      }
      if (bias != nullptr) {
        for (int64_t r = 0; r < m; ++r)
          for (int64_t j = 0; j < n; ++j) c[r * ld_out + j] += bias[n0 + j];
      }
    }
  });
}

namespace {

// w [N, K] -> the layout gemm() reads (gemm.h). The result is shaped [K, N], like w.t(), so
// callers can check shapes, but its elements are in block order: it is not that matrix.
at::Tensor gemm_pack(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "gemm_pack: w must be [N, K] fp32");
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor wt = w.t().contiguous();  // [K, N]
  at::Tensor packed = at::empty({K, N}, w.options());
  const float* src = wt.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  for (int64_t n0 = 0; n0 < N; n0 += kTileN) {
    const int64_t n = std::min(kTileN, N - n0);
    for (int64_t k = 0; k < K; ++k) std::copy(src + k * N + n0, src + k * N + n0 + n, dst + n0 * K + k * n);
  }
  return packed;
}

// out = x @ w + bias: x [M, K] fp32 with unit column stride, w_packed [K, N] from gemm_pack, bias
// [N] or None. Returns a new [M, N] tensor.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w_packed, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kFloat,
              "linear: x must be [M, K] fp32 with unit column stride");
  TORCH_CHECK(w_packed.dim() == 2 && w_packed.size(0) == x.size(1) && w_packed.scalar_type() == at::kFloat &&
              w_packed.is_contiguous(), "linear: w_packed must be gemm_pack's [K, N] layout, K = x.size(1)");
  const int64_t n = w_packed.size(1);
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->is_contiguous() && bias->numel() == n && bias->scalar_type() == at::kFloat),
              "linear: bias must be [N] fp32");
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  gemm(x.data_ptr<float>(), x.stride(0), x.size(0), x.size(1), w_packed.data_ptr<float>(), n,
       has_bias ? bias->data_ptr<float>() : nullptr, out.data_ptr<float>(), out.stride(0));
  return out;
}

}  // namespace
}  // namespace microserve

TORCH_LIBRARY_FRAGMENT(microserve, m) {
  m.def("gemm_pack(Tensor w) -> Tensor");
  m.def("linear(Tensor x, Tensor w_packed, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(microserve, CPU, m) {
  m.impl("gemm_pack", &microserve::gemm_pack);
  m.impl("linear", &microserve::linear);
}
