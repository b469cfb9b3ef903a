// Paged decode attention for CPU: one query token per sequence, reading K/V in place.
//
// The torch backend gathers every sequence's whole context out of the paged pool into a padded
// dense copy before SDPA, once per layer and step; at serving batch sizes that copy is most of a
// decode step. This kernel walks each sequence's block table instead, so K and V are read once,
// where they are, and nothing is padded.
//
//   q            [B, Hq, D]              contiguous; q heads h*G .. h*G+G-1 share kv head h
//   kv_layer     [2, P, page_size, Hkv, D]  contiguous (one layer of the pool; 0 = K, 1 = V)
//   block_tables [B, W] int32            sequence b's token t lives in page block_tables[b][t / page_size]
//   seq_lens     [B] int32               context length of each sequence, its new token included
//   out          [B, Hq, D]              written in full
// q, kv_layer and out share one dtype: fp32, bf16 or fp16. Math is fp32 throughout (half-precision
// K/V rows are widened as they are read), so only the inputs and the final store are rounded.
//
// Work is split with at::parallel_for, so it shares torch's thread pool (and its thread count)
// instead of bringing a second OpenMP runtime.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "dispatch.h"
#include "paged_pool.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using microserve::for_each_row;
using microserve::PoolLayer;

// One sequence, kv heads [h0, h1) and their G query heads each, against `len` context rows. Rows
// are read whole (all heads of a token are adjacent), which streams better than one head at a time.
// q and out are fp32 (the caller converts); K/V rows are of type T. kD > 0 fixes the head dim at
// compile time so the inner loops unroll and vectorize; kD == 0 reads it from `d`.
template <typename T, int kD>
void attend(const float* q, const PoolLayer<T>& pool, int64_t h0, int64_t h1, const int32_t* table, int64_t len,
            int64_t groups, int64_t d, float scale, float* scores, float* out) {
  const int64_t D = kD > 0 ? kD : d;
  const T *k_pool = pool.k, *v_pool = pool.v;
  const int64_t row_stride = pool.row_stride, page_size = pool.page_size, nq = (h1 - h0) * groups;
  const int64_t prefetch_bytes = (h1 - h0) * D * static_cast<int64_t>(sizeof(T));
  // Pass 1: scores[j][t] = scale * q_j . k_t for the nq query heads j (j / groups is the kv head,
  // counted from h0).
  for_each_row(k_pool, table, page_size, len, row_stride, h0 * D, prefetch_bytes, [&](int64_t t, const T* krow) {
    microserve::prefetch(krow + (v_pool - k_pool), prefetch_bytes);  // its V row, for pass 3
    for (int64_t kh = 0, j = 0; kh < h1 - h0; ++kh) {
      const T* k = krow + kh * D;
      for (int64_t g = 0; g < groups; ++g, ++j) {
        const float* qj = q + j * D;
        float acc = 0.f;
        for (int64_t i = 0; i < D; ++i) acc += qj[i] * static_cast<float>(k[i]);
        scores[j * len + t] = acc * scale;
      }
    }
  });
  // Pass 2: softmax over each query head's row.
  for (int64_t j = 0; j < nq; ++j) {
    float* s = scores + j * len;
    float m = s[0];
    for (int64_t t = 1; t < len; ++t) m = std::max(m, s[t]);
    float z = 0.f;
    for (int64_t t = 0; t < len; ++t) {
      // Clamped above expf's underflow, below which libm leaves its vector path lane by lane.
      s[t] = std::exp(std::max(s[t] - m, -80.f));
      z += s[t];
    }
    const float inv = 1.f / z;
    for (int64_t t = 0; t < len; ++t) s[t] *= inv;
  }
  // Pass 3: out_j = sum_t p[j][t] * v_t.
  std::fill(out, out + nq * D, 0.f);
  for_each_row(v_pool, table, page_size, len, row_stride, h0 * D, prefetch_bytes, [&](int64_t t, const T* vrow) {
    for (int64_t kh = 0, j = 0; kh < h1 - h0; ++kh) {
      const T* v = vrow + kh * D;
      for (int64_t g = 0; g < groups; ++g, ++j) {
        const float p = scores[j * len + t];
        float* o = out + j * D;
        for (int64_t i = 0; i < D; ++i) o[i] += p * static_cast<float>(v[i]);
      }
    }
  });
}

template <typename T, int kD>
void run(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& tables, const at::Tensor& lens,
         double scale, at::Tensor& out) {
  const PoolLayer<T> pool(kv);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), width = tables.size(1);
  const int64_t Hkv = pool.kv_heads, page_size = pool.page_size, groups = Hq / Hkv;
  const T* qp = q.data_ptr<T>();
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int32_t* lp = lens.data_ptr<int32_t>();
  T* op = out.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= width * page_size, "seq_lens[", b, "] = ", lp[b],
                " is outside [1, block_tables width * page_size = ", width * page_size, "]");
  }
  // A work item is one sequence, all heads; with fewer sequences than threads, one (sequence, kv
  // head) pair, so a single long decode still uses every thread.
  const int64_t split = B >= at::get_num_threads() ? 1 : Hkv, per = Hkv / split, nq = per * groups;
  at::parallel_for(0, B * split, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, qf(nq * D), of(nq * D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / split, h0 = (i % split) * per, len = lp[b];
      const int64_t head = (b * Hq + h0 * groups) * D;  // first element of this item's q heads
      for (int64_t e = 0; e < nq * D; ++e) qf[e] = static_cast<float>(qp[head + e]);
      scores.resize(nq * len);
      attend<T, kD>(qf.data(), pool, h0, h0 + per, tp + b * width, len, groups, D, static_cast<float>(scale),
                    scores.data(), of.data());
      for (int64_t e = 0; e < nq * D; ++e) op[head + e] = static_cast<T>(of[e]);
    }
  });
}

void paged_decode_attention(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& tables,
                            const at::Tensor& lens, double scale, at::Tensor& out) {
  TORCH_CHECK(q.dim() == 3 && kv.dim() == 5 && tables.dim() == 2 && lens.dim() == 1, "bad ranks");
  TORCH_CHECK(kv.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "q, kv_layer and out must share one dtype");
  TORCH_CHECK(tables.scalar_type() == at::kInt && lens.scalar_type() == at::kInt, "block_tables/seq_lens must be int32");
  TORCH_CHECK(q.is_contiguous() && kv.is_contiguous() && tables.is_contiguous() && lens.is_contiguous() &&
              out.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(kv.size(0) == 2 && kv.size(4) == q.size(2) && q.size(1) % kv.size(3) == 0, "shape mismatch");
  TORCH_CHECK(tables.size(0) == q.size(0) && lens.size(0) == q.size(0) && out.sizes() == q.sizes(), "batch mismatch");
  microserve::dispatch(q.scalar_type(), q.size(2), "paged_decode_attention", [&](auto t, auto d) {
    run<decltype(t), decltype(d)::value>(q, kv, tables, lens, scale, out);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(microserve, m) {
  m.def("paged_decode_attention(Tensor q, Tensor kv_layer, Tensor block_tables, Tensor seq_lens, float scale, "
        "Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(microserve, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
