// Paged decode attention for CPU: one query token per sequence, reading K/V in place.
//
// The torch backend gathers every sequence's whole context out of the paged pool into a padded
// dense copy before SDPA, once per layer and step; at serving batch sizes that copy is most of a
// decode step. This kernel walks each sequence's block table instead, so K and V are read once,
// where they are, and nothing is padded.
//
//   q            [B, Hq, D]              any row and head strides (a view of a fused qkv is fine), unit
//                                        stride within a head; q heads h*G .. h*G+G-1 share kv head h
//   kv_layer     [2, P, page_size, Hkv, D]  contiguous (one layer of the pool; 0 = K, 1 = V)
//   block_tables [>= B, W] int32         sequence b's token t lives in page block_tables[b][t / page_size]
//   seq_lens     [>= B] int32            context length of each sequence, its new token included
//                                        (only the first B rows of both are read: a mixed batch's
//                                        decodes come first, so its whole tables can be passed)
//   out          [B, Hq, D]              written in full
// q, kv_layer and out share one dtype: fp32, bf16 or fp16. Math is fp32 throughout (half-precision
// K/V rows are widened as they are read), so only the inputs and the final store are rounded.
//
// Per work item, three passes: scores (kept token-major, so eight query heads' scores for a token
// are one vector, summed out of eight dot products by a shuffle tree), softmax, then P.V with the
// output sums held in registers. Plain per-head loops spent most of their time on horizontal sums
// and on output stores the compiler could not keep in registers (3x slower at head dim 8).
//
// Work is split with at::parallel_for, so it shares torch's thread pool (and its thread count)
// instead of bringing a second OpenMP runtime.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "dispatch.h"
#include "paged_pool.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

using microserve::for_each_row;
using microserve::load;
using microserve::PoolLayer;
using microserve::store;
using microserve::kAccRegs;
using microserve::kWidthFor;
using microserve::Vec;
using microserve::Vec4;
using microserve::Vec8;
using microserve::Vec16;
using microserve::widen_bf16;
using microserve::widen_fp16;

// Widens W elements of a K/V row to floats (a plain vector load for fp32).
template <int W, typename T>
inline Vec<W> load_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return load<W>(p);
  } else {
    static_assert(std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>);
    constexpr int S = W < 8 ? W : 8;  // 8 at a time (one AVX2 register) where the vector holds 8 or more
    float f[W];
    for (int i = 0; i < W; i += S) {
      store<S>(f + i, std::is_same_v<T, at::BFloat16> ? widen_bf16<S>(p + i) : widen_fp16<S>(p + i));
    }
    return load<W>(f);
  }
}

// The lane sums of eight vectors, as one vector: out[i] = sum of a[i]'s lanes. A tree of
// shuffles and adds (a transpose as it sums) costs ~3 ops per sum where eight separate horizontal
// sums cost ~6 each. Each level halves the lanes a vector holds per input and pairs inputs up;
// the tree leaves input i in lane bitreverse3(i), so inputs are taken in that order.
// (__builtin_shufflevector is Clang's and GCC's from 12; with an older compiler the build fails and
// `--attention-backend auto` takes the torch backend.)
inline Vec8 sum_lanes8(const Vec8 (&a)[8]) {
  Vec8 b[4], c[2];
  constexpr int r[8] = {0, 4, 2, 6, 1, 5, 3, 7};  // bitreverse3, its own inverse
  for (int i = 0; i < 4; ++i) {
    const Vec8 x = a[r[2 * i]], y = a[r[2 * i + 1]];
    b[i] = __builtin_shufflevector(x, y, 0, 1, 2, 3, 8, 9, 10, 11) + __builtin_shufflevector(x, y, 4, 5, 6, 7, 12, 13, 14, 15);
  }
  for (int i = 0; i < 2; ++i) {
    const Vec8 x = b[2 * i], y = b[2 * i + 1];
    c[i] = __builtin_shufflevector(x, y, 0, 1, 8, 9, 4, 5, 12, 13) + __builtin_shufflevector(x, y, 2, 3, 10, 11, 6, 7, 14, 15);
  }
  return __builtin_shufflevector(c[0], c[1], 0, 8, 2, 10, 4, 12, 6, 14) +
         __builtin_shufflevector(c[0], c[1], 1, 9, 3, 11, 5, 13, 7, 15);
}

inline Vec8 fold_to8(Vec4 v) { return __builtin_shufflevector(v, Vec4{}, 0, 1, 2, 3, 4, 5, 6, 7); }  // zeros above
inline Vec8 fold_to8(Vec8 v) { return v; }
inline Vec8 fold_to8(Vec16 v) {
  return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
}

constexpr int64_t kHeadBlock = 8;  // query heads per score vector; a work item's heads are padded to a multiple

// Pass 2: softmax over t of each query head's scores, in place; scores are token-major
// (s[t * width + j], width a multiple of kHeadBlock), so a row of kHeadBlock heads is one vector.
// The exponentials are one flat loop, which the compiler hands to libmvec's vector expf.
inline void softmax_columns(float* s, int64_t width, int64_t len) {
  for (int64_t j0 = 0; j0 < width; j0 += kHeadBlock) {
    Vec8 m = load<8>(s + j0);
    for (int64_t t = 1; t < len; ++t) {
      const Vec8 x = load<8>(s + t * width + j0);
      m = x > m ? x : m;
    }
    // Clamped above expf's underflow, below which libm leaves its vector path lane by lane.
    const Vec8 floor = Vec8{} - 80.f;
    for (int64_t t = 0; t < len; ++t) {
      const Vec8 x = load<8>(s + t * width + j0) - m;
      store<8>(s + t * width + j0, x > floor ? x : floor);
    }
  }
  for (int64_t e = 0; e < len * width; ++e) s[e] = std::exp(s[e]);
  for (int64_t j0 = 0; j0 < width; j0 += kHeadBlock) {
    Vec8 z = {};
    for (int64_t t = 0; t < len; ++t) z += load<8>(s + t * width + j0);
    const Vec8 inv = 1.f / z;
    for (int64_t t = 0; t < len; ++t) store<8>(s + t * width + j0, load<8>(s + t * width + j0) * inv);
  }
}

// One sequence, kv heads [h0, h1) and their G query heads each, against `len` context rows. Rows
// are read whole (all heads of a token are adjacent), which streams better than one head at a time.
// q and out are fp32 (the caller converts); K/V rows are of type T. kD > 0 (a multiple of 8) fixes
// the head dim so a head is one or more W-float vectors; kD == 0 reads it from `d` (plain loops).
// scores: len * width floats, width = nq rounded up to kHeadBlock. head_offset[j] (j < width) is
// where query head j's kv head starts in a row; padding heads repeat the last real head.
template <typename T, int kD>
void attend(const float* q, const PoolLayer<T>& pool, int64_t h0, int64_t h1, const int32_t* table, int64_t len,
            int64_t groups, int64_t d, float scale, const int64_t* head_offset, float* scores, float* out) {
  const int64_t D = kD > 0 ? kD : d;
  const int64_t row_stride = pool.row_stride, page_size = pool.page_size, nkv = h1 - h0, nq = nkv * groups;
  const int64_t width = (nq + kHeadBlock - 1) / kHeadBlock * kHeadBlock;
  const int64_t prefetch_bytes = nkv * D * static_cast<int64_t>(sizeof(T));
  // W: the target's vector width where it divides the head dim (vec.h), so nothing here is wider
  // than a register.
  constexpr int W = kWidthFor<kD>, kVecs = kD / W;
  constexpr bool kVector = kD > 0 && kD % 8 == 0;
  // Pass 1: scores[t][j] = scale * q_j . k_t, kHeadBlock query heads at a time: their q vectors
  // and kv head offsets (padding heads repeat the last real head) against each K row.
  struct HeadBlock {
    Vec<W> q[kHeadBlock][kVector ? kVecs : 1];
    int64_t off[kHeadBlock];
  };
  auto load_block = [&](int64_t j0, HeadBlock& hb) {
    for (int i = 0; i < kHeadBlock; ++i) {
      const int64_t j = std::min<int64_t>(j0 + i, nq - 1);
      hb.off[i] = head_offset[j];
      for (int c = 0; c < kVecs; ++c) hb.q[i][c] = load<W>(q + j * kD + c * W);
    }
  };
  // always_inline: without it this ran 5-7% slower at head dims 32 and 64 than the same code written
  // out at its two call sites (benchmarks/decode_kernel_ab.py --rev 2990c62).
  auto block_scores = [&](const HeadBlock& hb, const T* krow, float* dst) __attribute__((always_inline)) {
    Vec8 dots[kHeadBlock];
#pragma GCC unroll 8
    for (int i = 0; i < kHeadBlock; ++i) {
      Vec<W> v = {};
#pragma GCC unroll 16
      for (int c = 0; c < kVecs; ++c) v += hb.q[i][c] * load_float<W>(krow + hb.off[i] + c * W);
      dots[i] = fold_to8(v);
    }
    store<8>(dst, sum_lanes8(dots) * scale);
  };
  // With one block (up to 8 query heads: small models, or one kv head's group) it is loaded once,
  // before the walk, and stays in registers; more blocks are loaded row by row.
  const bool one_block = width == kHeadBlock;
  HeadBlock first;
  if constexpr (kVector) load_block(0, first);
  for_each_row(pool.k, table, page_size, len, row_stride, h0 * D, prefetch_bytes, [&](int64_t t, const T* krow) {
    microserve::prefetch(krow + (pool.v - pool.k), prefetch_bytes);  // its V row, for pass 3
    float* st = scores + t * width;
    if constexpr (kVector) {
      if (one_block) {
        block_scores(first, krow, st);
        return;
      }
      for (int64_t j0 = 0; j0 < width; j0 += kHeadBlock) {
        HeadBlock hb;
        load_block(j0, hb);
        block_scores(hb, krow, st + j0);
      }
    } else {
      for (int64_t j = 0; j < width; ++j) {
        const float* qj = q + std::min(j, nq - 1) * D;
        const T* k = krow + head_offset[j];
        float acc = 0.f;
        for (int64_t i = 0; i < D; ++i) acc += qj[i] * static_cast<float>(k[i]);
        st[j] = acc * scale;
      }
    }
  });
  softmax_columns(scores, width, len);
  // Pass 3: out_j = sum_t p[t][j] * v_t. The sums of up to kHeads query heads (kAccRegs vectors:
  // 16 on AVX-512, 8 on AVX2) stay in registers for a whole walk over the rows: one walk for head
  // dims up to 32 at 8 query heads on AVX-512, more walks over the (by then cached) rows for wider
  // heads or narrower registers.
  if constexpr (kVector) {
    constexpr int kHeads = kVecs >= kAccRegs ? 1 : kAccRegs / kVecs;  // accumulators: half the register file
    // One walk for query heads j0 .. j0+nh-1, their V offsets read once, before it. N heads are
    // unrolled; when nh == N is known at compile time (kExact) no head is checked per row.
    auto walk = [&](int64_t j0, int64_t nh, auto n, auto exact) __attribute__((always_inline)) {
      constexpr int N = decltype(n)::value;
      constexpr bool kExact = decltype(exact)::value;
      int64_t off[N];
      for (int i = 0; i < N; ++i) off[i] = head_offset[std::min<int64_t>(j0 + i, nq - 1)];
      Vec<W> acc[N][kVecs] = {};
      for_each_row(pool.v, table, page_size, len, row_stride, h0 * D, prefetch_bytes, [&](int64_t t, const T* vrow) {
        const float* pt = scores + t * width + j0;
#pragma GCC unroll 16
        for (int i = 0; i < N; ++i) {
          if (kExact || i < nh) {
#pragma GCC unroll 16
            for (int c = 0; c < kVecs; ++c) acc[i][c] += pt[i] * load_float<W>(vrow + off[i] + c * W);
          }
        }
      });
      for (int64_t i = 0; i < nh; ++i)
        for (int c = 0; c < kVecs; ++c) store<W>(out + (j0 + i) * kD + c * W, acc[i][c]);
    };
    using Full = std::integral_constant<int, kHeads>;
    using Eight = std::integral_constant<int, (kHeads > 8 ? 8 : kHeads)>;  // 8 query heads, at head dims 8 and 16
    for (int64_t j0 = 0; j0 < nq; j0 += kHeads) {
      const int64_t nh = std::min<int64_t>(kHeads, nq - j0);
      if (nh == kHeads) {
        walk(j0, nh, Full{}, std::true_type{});
      } else if (nh == Eight::value) {
        walk(j0, nh, Eight{}, std::true_type{});
      } else {
        walk(j0, nh, Full{}, std::false_type{});
      }
    }
  } else {
    std::fill(out, out + nq * D, 0.f);
    for_each_row(pool.v, table, page_size, len, row_stride, h0 * D, prefetch_bytes, [&](int64_t t, const T* vrow) {
      for (int64_t j = 0; j < nq; ++j) {
        const float pt = scores[t * width + j];
        const T* v = vrow + head_offset[j];
        float* o = out + j * D;
        for (int64_t i = 0; i < D; ++i) o[i] += pt * static_cast<float>(v[i]);
      }
    });
  }
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
  const int64_t padded = (nq + kHeadBlock - 1) / kHeadBlock * kHeadBlock;
  std::vector<int64_t> head_offset(padded);  // query head j of an item reads its kv head j / groups
  for (int64_t j = 0; j < padded; ++j) head_offset[j] = std::min(j, nq - 1) / groups * D;
  at::parallel_for(0, B * split, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, qf(nq * D), of(nq * D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / split, h0 = (i % split) * per, len = lp[b];
      const int64_t head = (b * Hq + h0 * groups) * D;  // first element of this item's heads in out
      for (int64_t j = 0; j < nq; ++j) {
        const T* src = qp + b * q.stride(0) + (h0 * groups + j) * q.stride(1);
        for (int64_t e = 0; e < D; ++e) qf[j * D + e] = static_cast<float>(src[e]);
      }
      scores.resize(padded * len);
      attend<T, kD>(qf.data(), pool, h0, h0 + per, tp + b * width, len, groups, D, static_cast<float>(scale),
                    head_offset.data(), scores.data(), of.data());
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
  TORCH_CHECK(q.stride(2) == 1 && kv.is_contiguous() && tables.is_contiguous() && lens.is_contiguous() &&
              out.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(kv.size(0) == 2 && kv.size(4) == q.size(2) && q.size(1) % kv.size(3) == 0, "shape mismatch");
  TORCH_CHECK(tables.size(0) >= q.size(0) && lens.size(0) >= q.size(0) && out.sizes() == q.sizes(), "batch mismatch");
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
