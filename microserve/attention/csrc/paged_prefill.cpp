// Paged varlen attention for CPU prefill: any number of new tokens per sequence, each attending
// to its sequence's whole context (cached prefix, earlier chunks and itself) read in place.
//
// torch's CPU flash kernel needs the context as one dense tensor (a gather per layer for prefix
// hits and chunks) and, for contexts shorter than its 512-key block, computes the whole square
// and masks half of it away; at small head dims it reaches ~30 GFLOP/s on one core. This kernel
// is a flash-style loop (online softmax over key blocks) that skips the blocks above the
// diagonal and vectorises over keys, so the score row of one query against a block is a few
// broadcast FMAs.
//
//   q               [T, Hq, D]              any row and head strides (a view of a fused qkv is fine), unit
//                                           stride within a head; q heads h*G .. h*G+G-1 share kv head h
//   kv_layer        [2, P, page_size, Hkv, D]  contiguous (one layer of the pool; 0 = K, 1 = V)
//   block_tables    [B, W] int32            sequence b's token t lives in page block_tables[b][t / page_size]
//   query_start_loc [B+1] int32             sequence b's new tokens are q rows qsl[b] .. qsl[b+1]-1
//   seq_lens        [B] int32               context length of sequence b, its new tokens included
//   out             [T, Hq, D]              contiguous; the rows of the B sequences are written, others untouched
//
// New token i of sequence b (0-based) sits at position p = seq_lens[b] - ql + i and attends to
// positions 0 ..= p (lower-right causal). Its K/V must already be in the pool. q, kv_layer and out
// share one dtype (fp32, bf16, fp16); math is fp32.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "dispatch.h"
#include "paged_pool.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using microserve::kAccRegs;
using microserve::kVecWidth;
using microserve::kWidthFor;
using microserve::load;
using microserve::PoolLayer;
using microserve::row_at;
using microserve::store;
using microserve::Vec;

constexpr int64_t kBlockKeys = 64;     // keys per block: 4 AVX-512 (8 AVX2) vectors of scores per query row
// New tokens per work item (times G query heads = its rows). Each item transposes every key block
// it reads, so bigger items amortise that over more rows (16 -> 64 took 1024 tokens from 10.2 to
// 7.3 ms); with fewer items than threads, a short prompt uses fewer threads.
constexpr int64_t kBlockTokens = 64;
constexpr float kMasked = -1e30f;      // finite: the file is built with -ffast-math, which assumes no infinities
constexpr float kMinExponent = -80.f;  // exp(-80) ~ 1.8e-35, still a normal float
constexpr int64_t kRows = 4;           // query rows computed together, independent FMA chains

// The largest divisor of n that is at most cap (>= 1): how many vectors a register-blocked pass
// takes at once, so the passes tile n exactly.
constexpr int divisor_at_most(int n, int cap) {
  for (int c = cap < n ? cap : n; c > 1; --c)
    if (n % c == 0) return c;
  return 1;
}

struct Workspace {
  std::vector<float> q, o, row_max, row_sum, kt, v;
  // rows: the most an item has, rounded up to kRows (padding rows compute, but are never stored).
  Workspace(int64_t rows, int64_t d)
      : q(rows * d), o(rows * d), row_max(rows), row_sum(rows), kt(d * kBlockKeys), v(kBlockKeys * d) {}
};

// Folds one block's scores into a row's online softmax. Turns s (the row's scores against the
// block) into unnormalised probabilities (0 beyond `visible`), updates the running max and sum,
// and returns the factor the row's output so far must be scaled by.
inline float softmax_step(float* s, int64_t visible, float& row_max, float& row_sum) {
  if (visible <= 0) {
    std::fill(s, s + kBlockKeys, 0.f);
    return 1.f;
  }
  float block_max = kMasked;
  for (int64_t r = 0; r < kBlockKeys; ++r) block_max = std::max(block_max, r < visible ? s[r] : kMasked);
  // Exponents are clamped above expf's underflow: below it, libm leaves the vector path for a
  // scalar one that sets errno, lane by lane (measured 2x slower). Masked lanes become 0 by select.
  const float new_max = std::max(row_max, block_max);
  const float carry = std::exp(std::max(row_max - new_max, kMinExponent));
  float sum = 0.f;
  for (int64_t r = 0; r < kBlockKeys; ++r) {
    const float p = std::exp(std::max(s[r] - new_max, kMinExponent));
    s[r] = r < visible ? p : 0.f;
    sum += s[r];
  }
  row_max = new_max;
  row_sum = row_sum * carry + sum;
  return carry;
}

// s[i][r] = q_i . k_r for kRows query rows (q: kRows x d) against a transposed key block
// (kt[e][r]): per e, one broadcast of q[i][e] times the key vectors of a column pass, into
// kRows x kCols accumulators held in registers (kAccRegs of them: one pass over the block's
// 4 vectors on AVX-512, four passes of 2 on AVX2, whose 16 registers 16 accumulators spilled).
inline void scores(const float* q, const float* kt, int64_t d, float (&s)[kRows][kBlockKeys]) {
  constexpr int W = kVecWidth, kVecs = kBlockKeys / W, kCols = divisor_at_most(kVecs, kAccRegs / kRows);
  for (int c0 = 0; c0 < kVecs; c0 += kCols) {
    Vec<W> acc[kRows][kCols] = {};
    for (int64_t e = 0; e < d; ++e) {
      Vec<W> k[kCols];
#pragma GCC unroll 4
      for (int c = 0; c < kCols; ++c) k[c] = load<W>(kt + e * kBlockKeys + (c0 + c) * W);
#pragma GCC unroll 4
      for (int i = 0; i < kRows; ++i) {
        const float qe = q[i * d + e];
#pragma GCC unroll 4
        for (int c = 0; c < kCols; ++c) acc[i][c] += qe * k[c];
      }
    }
    for (int i = 0; i < kRows; ++i)
      for (int c = 0; c < kCols; ++c) store<W>(s[i] + (c0 + c) * W, acc[i][c]);
  }
}

// o[i] = carry[i] * o[i] + sum_r p[i][r] * v[r] for kRows rows and keys r < keys (v: keys x kD
// rows). The accumulators, kRows x kChunk vectors of the head dim at a time (kAccRegs in all),
// stay in registers across the key loop. Head dims that are not a multiple of 8 take the plain loop.
template <int kD>
void accumulate_pv(const float (&p)[kRows][kBlockKeys], const float* carry, const float* v, int64_t keys,
                   int64_t d, float* o) {
  constexpr int W = kWidthFor<kD>;
  if constexpr (kD > 0 && kD % W == 0) {
    constexpr int kVecs = kD / W, kChunk = divisor_at_most(kVecs, kAccRegs / kRows);
    for (int c0 = 0; c0 < kVecs; c0 += kChunk) {
      Vec<W> acc[kRows][kChunk];
#pragma GCC unroll 4
      for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 4
        for (int c = 0; c < kChunk; ++c) acc[i][c] = load<W>(o + i * kD + (c0 + c) * W) * carry[i];
      for (int64_t r = 0; r < keys; ++r) {
        Vec<W> vr[kChunk];
#pragma GCC unroll 4
        for (int c = 0; c < kChunk; ++c) vr[c] = load<W>(v + r * kD + (c0 + c) * W);
#pragma GCC unroll 4
        for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 4
          for (int c = 0; c < kChunk; ++c) acc[i][c] += p[i][r] * vr[c];
      }
#pragma GCC unroll 4
      for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 4
        for (int c = 0; c < kChunk; ++c) store<W>(o + i * kD + (c0 + c) * W, acc[i][c]);
    }
  } else {
    for (int64_t i = 0; i < kRows; ++i)
      for (int64_t e = 0; e < d; ++e) o[i * d + e] *= carry[i];
    for (int64_t r = 0; r < keys; ++r)
      for (int64_t i = 0; i < kRows; ++i)
        for (int64_t e = 0; e < d; ++e) o[i * d + e] += p[i][r] * v[r * d + e];
  }
}

// One work item: kv head h of one sequence, new tokens [i0, i1) and their G query heads each.
// Row m of the item is token i0 + m / G, query head h*G + m % G.
template <typename T, int kD>
void attend_block(const T* q, int64_t q_row_stride, int64_t q_head_stride, T* out, int64_t hq,
                  const PoolLayer<T>& pool, int64_t h, int64_t groups, const int32_t* table, int64_t row0,
                  int64_t i0, int64_t i1, int64_t query_len, int64_t seq_len, int64_t d, float scale,
                  Workspace& ws) {
  const int64_t D = kD > 0 ? kD : d;
  const int64_t real_rows = (i1 - i0) * groups, rows = (real_rows + kRows - 1) / kRows * kRows;
  const int64_t row_stride = pool.row_stride, page_size = pool.page_size, first_pos = seq_len - query_len;
  float* qs = ws.q.data();
  float* o = ws.o.data();
  float* kt = ws.kt.data();
  float* vb = ws.v.data();
  std::fill(qs, qs + rows * D, 0.f);
  for (int64_t m = 0; m < real_rows; ++m) {
    const T* src = q + (row0 + i0 + m / groups) * q_row_stride + (h * groups + m % groups) * q_head_stride;
    for (int64_t e = 0; e < D; ++e) qs[m * D + e] = scale * static_cast<float>(src[e]);
  }
  std::fill(o, o + rows * D, 0.f);
  std::fill(ws.row_max.begin(), ws.row_max.end(), kMasked);
  std::fill(ws.row_sum.begin(), ws.row_sum.end(), 0.f);
  const int64_t last = first_pos + i1 - 1;  // the last position any row of the item sees
  for (int64_t t0 = 0; t0 <= last; t0 += kBlockKeys) {
    const int64_t n = std::min(kBlockKeys, last + 1 - t0);
    // K transposed (kt[e][r] = K[t0 + r][e]) so a query's scores against the block are D
    // broadcast FMAs over kBlockKeys lanes; V as rows. Missing keys are zeros and get masked.
    for (int64_t r = 0; r < kBlockKeys; ++r) {
      if (r < n) {
        const T* krow = row_at(pool.k, table, page_size, t0 + r, row_stride, h * D);
        const T* vrow = row_at(pool.v, table, page_size, t0 + r, row_stride, h * D);
        for (int64_t e = 0; e < D; ++e) {
          kt[e * kBlockKeys + r] = static_cast<float>(krow[e]);
          vb[r * D + e] = static_cast<float>(vrow[e]);
        }
      } else {
        for (int64_t e = 0; e < D; ++e) kt[e * kBlockKeys + r] = 0.f;
      }
    }
    for (int64_t m0 = 0; m0 < rows; m0 += kRows) {
      // kRows rows at a time, so their score and output accumulators are independent chains
      // (one row alone waits on FMA latency). visible[i]: row m0+i sees keys t0 .. t0+visible[i]-1.
      int64_t visible[kRows], most = 0;
      for (int64_t i = 0; i < kRows; ++i) {
        const int64_t token = std::min(i0 + (m0 + i) / groups, i1 - 1);  // padding rows copy the last row
        visible[i] = std::min(n, first_pos + token - t0 + 1);
        most = std::max(most, visible[i]);
      }
      if (most <= 0) continue;
      float s[kRows][kBlockKeys];
      scores(qs + m0 * D, kt, D, s);
      float carry[kRows];
      for (int64_t i = 0; i < kRows; ++i) carry[i] = softmax_step(s[i], visible[i], ws.row_max[m0 + i], ws.row_sum[m0 + i]);
      accumulate_pv<kD>(s, carry, vb, most, D, o + m0 * D);
    }
  }
  for (int64_t m = 0; m < real_rows; ++m) {
    T* dst = out + ((row0 + i0 + m / groups) * hq + h * groups + m % groups) * D;
    const float inv = 1.f / ws.row_sum[m];
    for (int64_t e = 0; e < D; ++e) dst[e] = static_cast<T>(o[m * D + e] * inv);
  }
}

template <typename T, int kD>
void run(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& tables, const at::Tensor& qsl,
         const at::Tensor& lens, double scale, at::Tensor& out) {
  const PoolLayer<T> pool(kv);
  const int64_t T_ = q.size(0), Hq = q.size(1), D = q.size(2), B = lens.size(0), width = tables.size(1);
  const int64_t Hkv = pool.kv_heads, page_size = pool.page_size, groups = Hq / Hkv;
  const T* qp = q.data_ptr<T>();
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int32_t* sp = qsl.data_ptr<int32_t>();
  const int32_t* lp = lens.data_ptr<int32_t>();
  T* op = out.data_ptr<T>();
  // Work items: (sequence, kv head, block of kBlockTokens new tokens), listed by sequence.
  std::vector<int64_t> first_item(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t ql = sp[b + 1] - sp[b];
    TORCH_CHECK(sp[b] >= 0 && ql >= 1 && sp[b + 1] <= T_, "query_start_loc must rise by >= 1 within [0, ",
                T_, "], got ", sp[b], " then ", sp[b + 1]);
    TORCH_CHECK(lp[b] >= ql && lp[b] <= width * page_size, "seq_lens[", b, "] = ", lp[b],
                " is outside [query length ", ql, ", block_tables width * page_size = ", width * page_size, "]");
    first_item[b + 1] = first_item[b] + Hkv * ((ql + kBlockTokens - 1) / kBlockTokens);
  }
  at::parallel_for(0, first_item[B], 1, [&](int64_t begin, int64_t end) {
    Workspace ws((kBlockTokens * groups + kRows - 1) / kRows * kRows, D);
    int64_t b = std::upper_bound(first_item.begin(), first_item.end(), begin) - first_item.begin() - 1;
    for (int64_t item = begin; item < end; ++item) {
      while (item >= first_item[b + 1]) ++b;
      const int64_t ql = sp[b + 1] - sp[b], k = item - first_item[b];
      const int64_t h = k % Hkv, i0 = (k / Hkv) * kBlockTokens, i1 = std::min(ql, i0 + kBlockTokens);
      attend_block<T, kD>(qp, q.stride(0), q.stride(1), op, Hq, pool, h, groups, tp + b * width, sp[b], i0, i1, ql,
                          lp[b], D, static_cast<float>(scale), ws);
    }
  });
}

void paged_prefill_attention(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& tables,
                             const at::Tensor& qsl, const at::Tensor& lens, double scale, at::Tensor& out) {
  TORCH_CHECK(q.dim() == 3 && kv.dim() == 5 && tables.dim() == 2 && qsl.dim() == 1 && lens.dim() == 1, "bad ranks");
  TORCH_CHECK(kv.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "q, kv_layer and out must share one dtype");
  TORCH_CHECK(tables.scalar_type() == at::kInt && qsl.scalar_type() == at::kInt && lens.scalar_type() == at::kInt,
              "block_tables, query_start_loc and seq_lens must be int32");
  TORCH_CHECK(q.stride(2) == 1 && kv.is_contiguous() && tables.is_contiguous() && qsl.is_contiguous() &&
              lens.is_contiguous() && out.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(kv.size(0) == 2 && kv.size(4) == q.size(2) && q.size(1) % kv.size(3) == 0, "shape mismatch");
  TORCH_CHECK(tables.size(0) == lens.size(0) && qsl.size(0) == lens.size(0) + 1 && out.sizes() == q.sizes(),
              "batch mismatch");
  microserve::dispatch(q.scalar_type(), q.size(2), "paged_prefill_attention", [&](auto t, auto d) {
    run<decltype(t), decltype(d)::value>(q, kv, tables, qsl, lens, scale, out);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(microserve, m) {
  m.def("paged_prefill_attention(Tensor q, Tensor kv_layer, Tensor block_tables, Tensor query_start_loc, "
        "Tensor seq_lens, float scale, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(microserve, CPU, m) { m.impl("paged_prefill_attention", &paged_prefill_attention); }
