// Addressing of one K or V plane of a paged pool layer, shared by the CPU attention kernels.
//
//   position t:   [ page 0: 0 .. ps-1 ][ page 1: ps .. 2ps-1 ] ... [ last page: .. len-1 ]
//   page id:        table[0]              table[1]                   table[(len-1) / ps]
//   row of t:     pool + (table[t / ps] * ps + t % ps) * row_stride + head_offset
//
// row_stride is Hkv * D (all kv heads of a token are adjacent); head_offset picks a kv head.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

namespace microserve {

// One layer of the pool as the kernels read it, from kv_layer [2, P, page_size, Hkv, D]
// (contiguous; 0 = K, 1 = V): the two planes and what row addressing needs.
template <typename T>
struct PoolLayer {
  const T* k;
  const T* v;
  int64_t page_size, kv_heads, row_stride;  // row_stride = Hkv * D, one token's row in a plane
  explicit PoolLayer(const at::Tensor& kv)
      : k(kv.data_ptr<T>()), v(k + kv.numel() / 2), page_size(kv.size(2)), kv_heads(kv.size(3)),
        row_stride(kv.size(3) * kv.size(4)) {}
};

template <typename T>
inline const T* row_at(const T* pool, const int32_t* table, int64_t page_size, int64_t t, int64_t row_stride,
                       int64_t head_offset) {
  return pool + (static_cast<int64_t>(table[t / page_size]) * page_size + t % page_size) * row_stride + head_offset;
}

// Asks for the cache lines of `bytes` bytes from p on (a hint: never faults, never waits).
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off);
}

// Calls f(t, row) for t = 0 .. len-1 in order. Pages are walked whole, so inside a page the rows
// are adjacent (row_stride apart) and the table is read once per page. While it walks a page it
// prefetches the same rows of the next one: pages sit anywhere in the pool, so the hardware
// prefetcher cannot guess the next one and every jump would otherwise wait on DRAM (and the TLB).
// `prefetch_bytes` of each row are fetched from the row's head_offset on.
template <typename T, typename F>
inline void for_each_row(const T* pool, const int32_t* table, int64_t page_size, int64_t len, int64_t row_stride,
                         int64_t head_offset, int64_t prefetch_bytes, F&& f) {
  for (int64_t t0 = 0; t0 < len; t0 += page_size) {
    const int64_t rows = std::min(page_size, len - t0), next = t0 + page_size;
    const int64_t next_rows = std::min(page_size, len - next);  // <= 0 on the last page
    const T* page = row_at(pool, table, page_size, t0, row_stride, head_offset);
    const T* next_page = next_rows > 0 ? row_at(pool, table, page_size, next, row_stride, head_offset) : nullptr;
    for (int64_t r = 0; r < rows; ++r) {
      if (r < next_rows) prefetch(next_page + r * row_stride, prefetch_bytes);
      f(t0 + r, page + r * row_stride);
    }
  }
}

}  // namespace microserve
