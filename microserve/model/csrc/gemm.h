// fp32 GEMM for the CPU linear layers: oneDNN's brgemm micro-kernels (through PyTorch's
// at::native::cpublas::brgemm), driven over fixed-size output tiles.
//
// torch's F.linear goes to its BLAS, which on this project's machines (AMD EPYC, AVX-512) runs small
// products at ~70 GFLOP/s plus ~3 us per call; oneDNN's matmul primitive reaches ~200 but costs
// ~12 us per call. brgemm reaches ~200 from 16 rows up at ~1 us per call (benchmarks/cpu_ops_micro.py).
#pragma once

#include <cstdint>

namespace microserve {

// The weight as gemm() reads it: w [N, K] transposed and cut into column blocks of kTileN, each
// block stored whole ([K, n] rows, n = kTileN or what is left), blocks one after another. A
// block is one contiguous stream for the micro-kernel (row-major w_t put each row of a block a
// whole weight row apart: a TLB miss per row for a 32000-column lm_head).
//
//   w_t:      [ k=0: cols 0..255 | 256..511 | ... ]      packed: [ block 0: K x 256 ][ block 1: K x 256 ] ... [ edge: K x n ]
//             [ k=1: cols 0..255 | 256..511 | ... ]
constexpr int64_t kTileM = 64, kTileN = 256, kTileK = 512;

// out[M, N] = x[M, K] @ w (+ bias[N] when bias is not null), w packed as above (gemm_pack op).
// x rows are ld_x floats apart, out rows ld_out. Tiles of the output are spread over torch's
// thread pool when the product is big enough; K is taken kTileK at a time, so a tile's slices of
// x and w stay in cache.
void gemm(const float* x, int64_t ld_x, int64_t M, int64_t K, const float* w_packed, int64_t N, const float* bias,
          float* out, int64_t ld_out);

}  // namespace microserve
