// Writes a step's new K and V rows into their slots of one pool layer, for the CPU backend: one
// call where torch needs two index_copy_ calls and the views around them (~10 us per layer at
// serving batch sizes, more than the copy itself).
//
//   k, v         [T, Hkv, D]   any row stride, heads adjacent (head stride D, unit stride in a head):
//                              the k and v columns of a fused qkv are fine
//   kv_layer     [2, P, page_size, Hkv, D]  contiguous; token t goes to slot slot_mapping[t]
//   slot_mapping [T] int64     slot = page * page_size + offset (every slot < P * page_size)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

namespace {

void store_kv(at::Tensor& kv, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots) {
  TORCH_CHECK(kv.dim() == 5 && kv.size(0) == 2 && kv.is_contiguous(), "store_kv: kv_layer must be [2, P, page_size, Hkv, D], contiguous");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.size(1) == kv.size(3) && k.size(2) == kv.size(4),
              "store_kv: k and v must be [T, Hkv, D] like the pool's rows");
  TORCH_CHECK(k.scalar_type() == kv.scalar_type() && v.scalar_type() == kv.scalar_type(), "store_kv: dtype mismatch");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(1) == v.size(2),
              "store_kv: the heads of a token must be adjacent");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == k.size(0) && slots.scalar_type() == at::kLong && slots.is_contiguous(),
              "store_kv: slot_mapping must be [T] int64");
  const int64_t tokens = k.size(0), num_slots = kv.size(1) * kv.size(2), row = k.size(1) * k.size(2);
  const int64_t bytes = row * static_cast<int64_t>(kv.element_size());
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, "store_kv: slot ", sp[t], " is outside the pool's ", num_slots);
  char* kdst = static_cast<char*>(kv.data_ptr());
  char* vdst = kdst + num_slots * bytes;
  const char* ksrc = static_cast<const char*>(k.data_ptr());
  const char* vsrc = static_cast<const char*>(v.data_ptr());
  const int64_t ks = k.stride(0) * k.element_size(), vs = v.stride(0) * v.element_size();
  at::parallel_for(0, tokens, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      std::memcpy(kdst + sp[t] * bytes, ksrc + t * ks, bytes);
      std::memcpy(vdst + sp[t] * bytes, vsrc + t * vs, bytes);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(microserve, m) {
  m.def("store_kv(Tensor(a!) kv_layer, Tensor k, Tensor v, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(microserve, CPU, m) { m.impl("store_kv", &store_kv); }
