// fp32 GEMM for the CPU linear layers: oneDNN's brgemm micro-kernels (through PyTorch's
// at::native::cpublas::brgemm), driven over fixed-size output tiles.
//
// torch's F.linear goes to its BLAS, which on this project's machines (AMD EPYC, AVX-512) runs small
// products at ~70 GFLOP/s plus ~3 us per call; oneDNN's matmul primitive reaches ~200 but costs
// ~12 us per call. brgemm reaches ~200 from 16 rows up at ~1 us per call (benchmarks/cpu_ops_micro.py).
#pragma once

#include <cstdint>

namespace microserve {

// out[M, N] = x[M, K] @ w_t[K, N] (+ bias[N] when bias is not null). x rows are ld_x floats apart,
// w_t is contiguous (the weight transposed once at load), out rows are ld_out floats apart.
// Tiles of the output are spread over torch's thread pool when the product is big enough.
void gemm(const float* x, int64_t ld_x, int64_t M, int64_t K, const float* w_t, int64_t N, const float* bias,
          float* out, int64_t ld_out);

}  // namespace microserve
