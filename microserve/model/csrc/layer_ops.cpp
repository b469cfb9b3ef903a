// Fused CPU versions of the model's small per-token ops: RMSNorm (optionally with the residual add
// before it), SiLU-and-mul, and RoPE in place on the q/k heads of a fused qkv.
//
// At serving batch sizes of a small model these run on tens of rows, where torch's eager ops cost
// their dispatch, not their arithmetic: RMSNorm is six ops (~12 us at 16 x 64), RoPE five (~10 us),
// SiLU-and-mul three (~6 us). Each is one call here. Math is fp32 in the order transformers uses
// (so results agree with it to rounding: the compiler may fuse a multiply and an add into one FMA,
// and the mean of squares is summed in another order); inputs may be fp32, bf16 or fp16.
//
// Rows are split over torch's thread pool when there are enough of them to pay for it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "gemm.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kGrainRows = 64;  // rows per task: fewer rows run on the calling thread alone

// One row of each op, shared by the standalone ops and the fused layer ops below.

// out = weight * (x * rsqrt(mean(x^2) + eps)); with `residual` (non-null), residual += x first and
// the norm is of the sum. The sum is rounded to the model's dtype, as an eager `x + residual` is.
template <typename scalar_t>
inline void rms_norm_row(const scalar_t* x, scalar_t* residual, const scalar_t* weight, float eps, int64_t h,
                         scalar_t* out) {
  const scalar_t* src = x;
  if (residual != nullptr) {
    for (int64_t i = 0; i < h; ++i) residual[i] = static_cast<scalar_t>(static_cast<float>(residual[i]) + static_cast<float>(x[i]));
    src = residual;
  }
  float ss = 0.f;
  for (int64_t i = 0; i < h; ++i) ss += static_cast<float>(src[i]) * static_cast<float>(src[i]);
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(h) + eps);
  for (int64_t i = 0; i < h; ++i)
    out[i] = static_cast<scalar_t>(static_cast<float>(weight[i]) *
                                   static_cast<float>(static_cast<scalar_t>(static_cast<float>(src[i]) * inv)));
}

// out[i] = silu(gate_up[i]) * gate_up[n + i], i < n.
template <typename scalar_t>
inline void silu_and_mul_row(const scalar_t* gate_up, int64_t n, scalar_t* out) {
  const scalar_t* u = gate_up + n;
  for (int64_t i = 0; i < n; ++i) {
    const float a = static_cast<float>(gate_up[i]);
    // exp's argument is capped so it stays finite: under -ffast-math an infinite exp turned
    // a / (1 + exp(-a)) into NaN for a below ~-88 (instead of ~0, which the cap still gives).
    // silu is rounded to the dtype before the product, as the two eager ops would round it.
    const float s = static_cast<float>(static_cast<scalar_t>(a / (1.f + std::exp(std::min(-a, 80.f)))));
    out[i] = static_cast<scalar_t>(s * static_cast<float>(u[i]));
  }
}

// Rotate-half RoPE in place on `heads` heads of one token, head_stride apart, each d wide:
// v = v * cos + roll(v, d/2) * sin_signed (cos, sin_signed: this token's fp32 table rows).
template <typename scalar_t>
inline void rope_row(scalar_t* row, int64_t heads, int64_t head_stride, int64_t d, const float* c, const float* s) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < heads; ++h) {
    scalar_t* v = row + h * head_stride;
    for (int64_t i = 0; i < half; ++i) {
      const float a = static_cast<float>(v[i]), b = static_cast<float>(v[i + half]);
      v[i] = static_cast<scalar_t>(a * c[i] + b * s[i]);
      v[i + half] = static_cast<scalar_t>(b * c[i + half] + a * s[i + half]);
    }
  }
}

bool defined(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// x, out: [T, H] (out may be x); residual: [T, H] or undefined; weight: [H]. All contiguous.
void rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
              double eps, at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && out.is_contiguous() && weight.is_contiguous() &&
              out.sizes() == x.sizes() && weight.numel() == x.size(1), "rms_norm: bad shapes or strides");
  const bool add = defined(residual);
  TORCH_CHECK(!add || (residual->sizes() == x.sizes() && residual->is_contiguous() &&
                       residual->scalar_type() == x.scalar_type()), "rms_norm: residual must match x");
  const int64_t rows = x.size(0), h = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* rp = add ? residual->data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        rms_norm_row(xp + r * h, add ? rp + r * h : nullptr, wp, static_cast<float>(eps), h, op + r * h);
    });
  });
}

// out = silu(x[:, :n]) * x[:, n:], x: [T, 2n] contiguous, out: [T, n] contiguous.
void silu_and_mul(const at::Tensor& x, at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && out.is_contiguous() && x.size(1) % 2 == 0 &&
              out.size(0) == x.size(0) && out.size(1) == x.size(1) / 2 && out.scalar_type() == x.scalar_type(),
              "silu_and_mul: x must be [T, 2n] and out [T, n], contiguous, of one dtype");
  const int64_t rows = x.size(0), n = out.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) silu_and_mul_row(xp + r * 2 * n, n, op + r * n);
    });
  });
}

void check_rope_table(const at::Tensor& cos, const at::Tensor& sin_signed, int64_t rows, int64_t d) {
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin_signed.scalar_type() == at::kFloat && cos.is_contiguous() &&
              sin_signed.is_contiguous() && cos.dim() == 2 && cos.size(0) == rows && cos.size(1) == d &&
              sin_signed.sizes() == cos.sizes(), "rotary_embedding: cos and sin_signed must be [T, D] fp32, contiguous");
}

// Rotate-half RoPE in place: x[t, h] = x * cos[t] + roll(x, D/2) * sin_signed[t], for x [T, H, D]
// with any row and head strides and unit stride within a head (the q and k heads of a fused qkv),
// cos and sin_signed [T, D] contiguous fp32 rows (sin_signed = [-sin, sin], the table the model
// keeps, so the rotation needs no sign flips).
void rotary_embedding(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin_signed) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0, "rotary_embedding: x must be [T, H, D], unit stride in D");
  check_rope_table(cos, sin_signed, x.size(0), x.size(2));
  const int64_t rows = x.size(0), heads = x.size(1), d = x.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary_embedding", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin_signed.data_ptr<float>();
    at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) rope_row(xp + t * x.stride(0), heads, x.stride(1), d, cp + t * d, sp + t * d);
    });
  });
}

// ---- fused layer ops (fp32): a decoder layer is two calls around its attention ---------------------
//
// At a small model's serving batch sizes, every Python-level op costs more than its arithmetic (a
// batch-16 decode layer of stories260K was ~20 calls, ~95 us, ~10 us of it arithmetic). These
// run a layer's other work as two calls, in the same order and with the same row functions and
// GEMM as the separate ops, so results match those to rounding.

const float* data_or_null(const c10::optional<at::Tensor>& t) { return defined(t) ? t->data_ptr<float>() : nullptr; }

void check_weight(const at::Tensor& w_t, int64_t in, const c10::optional<at::Tensor>& bias, const char* name) {
  TORCH_CHECK(w_t.dim() == 2 && w_t.size(0) == in && w_t.is_contiguous() && w_t.scalar_type() == at::kFloat, name,
              ": weight must be gemm_pack's [", in, ", N] fp32 layout");
  TORCH_CHECK(!defined(bias) || (bias->numel() == w_t.size(1) && bias->is_contiguous() && bias->scalar_type() == at::kFloat),
              name, ": bias must be [N] fp32");
}

// Runs f(r0, m, scratch) over chunks of the rows, r0 .. r0+m-1 with m <= kTileM, spread over
// torch's threads; each task gets one scratch buffer of scratch_per_row floats per row for the
// op's intermediates. A chunk goes through all of an op's stages with the row functions above:
// one allocation per task instead of one tensor per stage, and no per-stage checks or dispatch,
// which is what a decode batch's call costs beside its arithmetic. A single chunk (decode batches)
// runs on the calling thread, so the GEMMs inside may still split their tiles over threads.
template <typename F>
void for_row_chunks(int64_t rows, int64_t scratch_per_row, const at::TensorOptions& opts, F&& f) {
  const int64_t chunks = (rows + microserve::kTileM - 1) / microserve::kTileM;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    at::Tensor scratch = at::empty({std::min(rows, microserve::kTileM) * scratch_per_row}, opts);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * microserve::kTileM;
      f(r0, std::min(microserve::kTileM, rows - r0), scratch.data_ptr<float>());
    }
  });
}

// Before attention: qkv = rms_norm(x [+ residual]) @ w_qkv_t + b, then RoPE in place on its first
// rot_heads heads (q and k). residual, when given, becomes residual + x (the stream), as rms_norm's.
// x: [T, H] contiguous fp32; w_qkv_t: [H, N]; cos/sin_signed: [T, D]. Returns qkv [T, N].
at::Tensor norm_qkv_rope(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& norm_weight,
                         double eps, const at::Tensor& w_qkv_t, const c10::optional<at::Tensor>& b_qkv,
                         const at::Tensor& cos, const at::Tensor& sin_signed, int64_t rot_heads, int64_t head_dim) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && norm_weight.is_contiguous() &&
              norm_weight.numel() == x.size(1) && norm_weight.scalar_type() == at::kFloat,
              "norm_qkv_rope: x must be [T, H] fp32, contiguous, with an [H] norm weight");
  const bool add = defined(residual);
  TORCH_CHECK(!add || (residual->sizes() == x.sizes() && residual->is_contiguous() && residual->scalar_type() == at::kFloat),
              "norm_qkv_rope: residual must match x");
  const int64_t rows = x.size(0), h = x.size(1);
  check_weight(w_qkv_t, h, b_qkv, "norm_qkv_rope");
  check_rope_table(cos, sin_signed, rows, head_dim);
  const int64_t n = w_qkv_t.size(1);
  TORCH_CHECK(rot_heads * head_dim <= n && head_dim % 2 == 0, "norm_qkv_rope: rot_heads * head_dim exceeds qkv");
  at::Tensor qkv = at::empty({rows, n}, x.options());
  const float *xp = x.data_ptr<float>(), *wn = norm_weight.data_ptr<float>(), *w = w_qkv_t.data_ptr<float>();
  const float *bias = data_or_null(b_qkv), *cp = cos.data_ptr<float>(), *sp = sin_signed.data_ptr<float>();
  float* rp = add ? residual->data_ptr<float>() : nullptr;
  float* out = qkv.data_ptr<float>();
  for_row_chunks(rows, h, x.options(), [&](int64_t r0, int64_t m, float* normed) {
    for (int64_t r = 0; r < m; ++r)
      rms_norm_row(xp + (r0 + r) * h, add ? rp + (r0 + r) * h : nullptr, wn, static_cast<float>(eps), h, normed + r * h);
    microserve::gemm(normed, h, m, h, w, n, bias, out + r0 * n, n);
    for (int64_t t = r0; t < r0 + m; ++t) rope_row(out + t * n, rot_heads, head_dim, head_dim, cp + t * head_dim, sp + t * head_dim);
  });
  return qkv;
}

// After attention: residual += attn @ w_o_t + b_o; h = rms_norm(residual);
// returns silu_and_mul(h @ w_gate_up_t + b_gu) @ w_down_t + b_down, [T, H]. attn: [T, q_size]
// with unit column stride; residual: [T, H] contiguous, updated in place.
at::Tensor oproj_norm_mlp(const at::Tensor& attn, at::Tensor& residual, const at::Tensor& w_o_t,
                          const c10::optional<at::Tensor>& b_o, const at::Tensor& norm_weight, double eps,
                          const at::Tensor& w_gate_up_t, const c10::optional<at::Tensor>& b_gate_up,
                          const at::Tensor& w_down_t, const c10::optional<at::Tensor>& b_down) {
  TORCH_CHECK(attn.dim() == 2 && attn.stride(1) == 1 && attn.scalar_type() == at::kFloat, "oproj_norm_mlp: attn must be [T, q_size] fp32");
  const int64_t rows = attn.size(0), h = residual.size(1);
  check_weight(w_o_t, attn.size(1), b_o, "oproj_norm_mlp (o_proj)");
  check_weight(w_gate_up_t, h, b_gate_up, "oproj_norm_mlp (gate_up_proj)");
  const int64_t inter = w_gate_up_t.size(1) / 2;
  check_weight(w_down_t, inter, b_down, "oproj_norm_mlp (down_proj)");
  TORCH_CHECK(w_o_t.size(1) == h && w_down_t.size(1) == h && residual.dim() == 2 && residual.size(0) == rows &&
              residual.is_contiguous() && residual.scalar_type() == at::kFloat && norm_weight.numel() == h &&
              norm_weight.is_contiguous() && norm_weight.scalar_type() == at::kFloat, "oproj_norm_mlp: shape mismatch");
  at::Tensor out = at::empty({rows, h}, attn.options());
  const float *ap = attn.data_ptr<float>(), *wn = norm_weight.data_ptr<float>();
  const float *wo = w_o_t.data_ptr<float>(), *wgu = w_gate_up_t.data_ptr<float>(), *wd = w_down_t.data_ptr<float>();
  const float *bo = data_or_null(b_o), *bgu = data_or_null(b_gate_up), *bd = data_or_null(b_down);
  float *rp = residual.data_ptr<float>(), *op = out.data_ptr<float>();
  const int64_t lda = attn.stride(0), q_size = attn.size(1);
  // scratch per row: o_proj's output [h], its norm [h], gate/up [2 * inter], the activation [inter]
  for_row_chunks(rows, 2 * h + 3 * inter, attn.options(), [&](int64_t r0, int64_t m, float* scratch) {
    float *o = scratch, *normed = o + m * h, *gate_up = normed + m * h, *act = gate_up + m * 2 * inter;
    microserve::gemm(ap + r0 * lda, lda, m, q_size, wo, h, bo, o, h);
    for (int64_t r = 0; r < m; ++r) rms_norm_row(o + r * h, rp + (r0 + r) * h, wn, static_cast<float>(eps), h, normed + r * h);
    microserve::gemm(normed, h, m, h, wgu, 2 * inter, bgu, gate_up, 2 * inter);
    for (int64_t r = 0; r < m; ++r) silu_and_mul_row(gate_up + r * 2 * inter, inter, act + r * inter);
    microserve::gemm(act, inter, m, inter, wd, h, bd, op + r0 * h, h);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(microserve, m) {
  m.def("rms_norm(Tensor x, Tensor(b!)? residual, Tensor weight, float eps, Tensor(a!) out) -> ()");
  m.def("silu_and_mul(Tensor x, Tensor(a!) out) -> ()");
  m.def("rotary_embedding(Tensor(a!) x, Tensor cos, Tensor sin_signed) -> ()");
  m.def("norm_qkv_rope(Tensor x, Tensor(b!)? residual, Tensor norm_weight, float eps, Tensor w_qkv_t, Tensor? b_qkv, "
        "Tensor cos, Tensor sin_signed, int rot_heads, int head_dim) -> Tensor");
  m.def("oproj_norm_mlp(Tensor attn, Tensor(a!) residual, Tensor w_o_t, Tensor? b_o, Tensor norm_weight, float eps, "
        "Tensor w_gate_up_t, Tensor? b_gate_up, Tensor w_down_t, Tensor? b_down) -> Tensor");
}

TORCH_LIBRARY_IMPL(microserve, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary_embedding", &rotary_embedding);
  m.impl("norm_qkv_rope", &norm_qkv_rope);
  m.impl("oproj_norm_mlp", &oproj_norm_mlp);
}
