// The fp32 GEMM of gemm.h and the `linear` op built on it.
//
// brgemm compiles (JITs) one micro-kernel per (M, N, K, strides) and caches it per thread for the
// life of the process, so the shapes it sees must come from a small set: the output is cut into
// tiles of at most kTileM x kTileN, and a layer's kernels are its full tile and its edge tiles
// (at most kTileM row counts), whatever the batch sizes. A new kernel costs ~0.1 ms, once.
//
//          n0 ........ n0+kTileN                 tile (m0, n0) = x[m0:m0+kTileM, :] @ w_t[:, n0:n0+kTileN]
//   m0   [ tile ][ tile ][ edge ]               (the edge tiles are what is left of N and of M)
//        [ tile ][ tile ][ edge ]
//        [ edge ][ edge ][ edge ]
#include "gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>

namespace microserve {

namespace {
constexpr int64_t kTileM = 64, kTileN = 256;  // ~200 GFLOP/s from 16 to 2048 rows (measured)
constexpr int64_t kMinTaskMacs = 1 << 18;     // less work than this per task runs on the calling thread
}  // namespace

void gemm(const float* x, int64_t ld_x, int64_t M, int64_t K, const float* w_t, int64_t N, const float* bias,
          float* out, int64_t ld_out) {
  const int64_t tiles_m = (M + kTileM - 1) / kTileM, tiles_n = (N + kTileN - 1) / kTileN;
  const int64_t tile_macs = std::min(M, kTileM) * std::min(N, kTileN) * K;
  const int64_t grain = std::max<int64_t>(1, kMinTaskMacs / std::max<int64_t>(tile_macs, 1));
  at::parallel_for(0, tiles_m * tiles_n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t m0 = i / tiles_n * kTileM, n0 = i % tiles_n * kTileN;
      const int64_t m = std::min(kTileM, M - m0), n = std::min(kTileN, N - n0);
      float* c = out + m0 * ld_out + n0;
      at::native::cpublas::brgemm(m, n, K, ld_x, N, ld_out, /*add_C=*/false, x + m0 * ld_x, w_t + n0, c);
      if (bias != nullptr) {
        for (int64_t r = 0; r < m; ++r)
          for (int64_t j = 0; j < n; ++j) c[r * ld_out + j] += bias[n0 + j];
      }
    }
  });
}

namespace {

// out = x @ w_t (+ bias): x [M, K] fp32 with unit column stride, w_t [K, N] contiguous, bias [N] or
// None. Returns a new [M, N] tensor.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w_t, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w_t.dim() == 2 && x.size(1) == w_t.size(0) && x.stride(1) == 1 &&
              w_t.is_contiguous(), "linear: x must be [M, K] with unit column stride and w_t [K, N] contiguous");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w_t.scalar_type() == at::kFloat, "linear: fp32 only");
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->is_contiguous() && bias->numel() == w_t.size(1) && bias->scalar_type() == at::kFloat),
              "linear: bias must be [N] fp32");
  at::Tensor out = at::empty({x.size(0), w_t.size(1)}, x.options());
  gemm(x.data_ptr<float>(), x.stride(0), x.size(0), x.size(1), w_t.data_ptr<float>(), w_t.size(1),
       has_bias ? bias->data_ptr<float>() : nullptr, out.data_ptr<float>(), out.stride(0));
  return out;
}

}  // namespace
}  // namespace microserve

TORCH_LIBRARY_FRAGMENT(microserve, m) { m.def("linear(Tensor x, Tensor w_t, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(microserve, CPU, m) { m.impl("linear", &microserve::linear); }
