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
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kGrainRows = 64;  // rows per task: fewer rows run on the calling thread alone

// out = weight * (x * rsqrt(mean(x^2) + eps)), row by row. With residual: residual += x first, and
// the norm is of the sum (the pre-norm transformer's "add then normalise", one pass over memory).
// x, out: [T, H] (out may be x); residual: [T, H] or undefined; weight: [H]. All contiguous.
void rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
              double eps, at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && out.is_contiguous() && weight.is_contiguous() &&
              out.sizes() == x.sizes() && weight.numel() == x.size(1), "rms_norm: bad shapes or strides");
  const bool add = residual.has_value() && residual->defined();
  TORCH_CHECK(!add || (residual->sizes() == x.sizes() && residual->is_contiguous() &&
                       residual->scalar_type() == x.scalar_type()), "rms_norm: residual must match x");
  const int64_t rows = x.size(0), h = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* rp = add ? residual->data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = xp + r * h;
        scalar_t* orow = op + r * h;
        const scalar_t* src = xr;
        if (add) {  // the sum is rounded to the model's dtype, as an eager `x + residual` would be
          scalar_t* rr = rp + r * h;
          for (int64_t i = 0; i < h; ++i) rr[i] = static_cast<scalar_t>(static_cast<float>(rr[i]) + static_cast<float>(xr[i]));
          src = rr;
        }
        float ss = 0.f;
        for (int64_t i = 0; i < h; ++i) ss += static_cast<float>(src[i]) * static_cast<float>(src[i]);
        const float inv = 1.f / std::sqrt(ss / static_cast<float>(h) + static_cast<float>(eps));
        for (int64_t i = 0; i < h; ++i)
          orow[i] = static_cast<scalar_t>(static_cast<float>(wp[i]) *
                                          static_cast<float>(static_cast<scalar_t>(static_cast<float>(src[i]) * inv)));
      }
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
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* g = xp + r * 2 * n;
        const scalar_t* u = g + n;
        scalar_t* o = op + r * n;
        for (int64_t i = 0; i < n; ++i) {
          const float a = static_cast<float>(g[i]);
          // exp's argument is capped so it stays finite: under -ffast-math an infinite exp turned
          // a / (1 + exp(-a)) into NaN for a below ~-88 (instead of ~0, which the cap still gives).
          // silu is rounded to the dtype before the product, as the two eager ops would round it.
          const float s = static_cast<float>(static_cast<scalar_t>(a / (1.f + std::exp(std::min(-a, 80.f)))));
          o[i] = static_cast<scalar_t>(s * static_cast<float>(u[i]));
        }
      }
    });
  });
}

// Rotate-half RoPE in place: x[t, h] = x * cos[t] + roll(x, D/2) * sin_signed[t], for x [T, H, D]
// with any row and head strides and unit stride within a head (the q and k heads of a fused qkv),
// cos and sin_signed [T, D] contiguous fp32 rows (sin_signed = [-sin, sin], the table the model
// keeps, so the rotation needs no sign flips).
void rotary_embedding(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin_signed) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0, "rotary_embedding: x must be [T, H, D], unit stride in D");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin_signed.scalar_type() == at::kFloat && cos.is_contiguous() &&
              sin_signed.is_contiguous() && cos.dim() == 2 && cos.size(0) == x.size(0) && cos.size(1) == x.size(2) &&
              sin_signed.sizes() == cos.sizes(), "rotary_embedding: cos and sin_signed must be [T, D] fp32, contiguous");
  const int64_t rows = x.size(0), heads = x.size(1), d = x.size(2), half = d / 2;
  const int64_t row_stride = x.stride(0), head_stride = x.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary_embedding", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin_signed.data_ptr<float>();
    at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const float* c = cp + t * d;
        const float* s = sp + t * d;
        for (int64_t h = 0; h < heads; ++h) {
          scalar_t* v = xp + t * row_stride + h * head_stride;
          for (int64_t i = 0; i < half; ++i) {
            const float a = static_cast<float>(v[i]), b = static_cast<float>(v[i + half]);
            v[i] = static_cast<scalar_t>(a * c[i] + b * s[i]);
            v[i + half] = static_cast<scalar_t>(b * c[i + half] + a * s[i + half]);
          }
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(microserve, m) {
  m.def("rms_norm(Tensor x, Tensor(b!)? residual, Tensor weight, float eps, Tensor(a!) out) -> ()");
  m.def("silu_and_mul(Tensor x, Tensor(a!) out) -> ()");
  m.def("rotary_embedding(Tensor(a!) x, Tensor cos, Tensor sin_signed) -> ()");
}

TORCH_LIBRARY_IMPL(microserve, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary_embedding", &rotary_embedding);
}
