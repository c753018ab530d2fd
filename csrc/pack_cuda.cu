// CUDA gathers of the r4b packer: generic row gather/scatter and the fused THD pack.
// Memory-bound by design: every row is written once, reads are coalesced within a sequence.
#include <cuda_runtime.h>

#include <cstdint>

#include "pack_cuda.h"

namespace r4b_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kIgnoreIndex = -100;

inline unsigned blocks_for(int64_t work, int64_t per_block) {
  int64_t b = (work + per_block - 1) / per_block;
  return unsigned(b < 1 ? 1 : (b > 65535 * 32 ? 65535 * 32 : b));
}

// One warp-stride loop per row; 16-byte vectors when rows and pointers allow, else bytes.
template <class V>
__global__ void gather_kernel(V* dst, const V* src, const int64_t* index, int64_t n_rows,
                              int64_t row_vecs) {
  const int64_t total = n_rows * row_vecs;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = row_vecs == 1 ? t : t / row_vecs, col = t - row * row_vecs;
    const int64_t s = index[row];
    V v;
    if (s >= 0) {
      v = src[s * row_vecs + col];
    } else {
      v = V{};
    }
    dst[t] = v;
  }
}

template <class V>
__global__ void scatter_kernel(V* dst, const V* src, const int64_t* index, int64_t n_rows,
                               int64_t row_vecs) {
  const int64_t total = n_rows * row_vecs;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = row_vecs == 1 ? t : t / row_vecs, col = t - row * row_vecs;
    const int64_t d = index[row];
    if (d >= 0) dst[d * row_vecs + col] = src[t];
  }
}

template <bool Scatter>
const char* launch_rows(void* dst, const void* src, const int64_t* index, int64_t n_rows,
                        int64_t row_bytes, uintptr_t stream) {
  if (n_rows == 0) return nullptr;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const uintptr_t align = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src);
  auto go = [&](auto vec_tag) {
    using V = decltype(vec_tag);
    const int64_t row_vecs = row_bytes / int64_t(sizeof(V));
    const unsigned grid = blocks_for(n_rows * row_vecs, kThreads * 4);
    if (Scatter)
      scatter_kernel<V><<<grid, kThreads, 0, s>>>(static_cast<V*>(dst),
                                                  static_cast<const V*>(src), index, n_rows,
                                                  row_vecs);
    else
      gather_kernel<V><<<grid, kThreads, 0, s>>>(static_cast<V*>(dst),
                                                 static_cast<const V*>(src), index, n_rows,
                                                 row_vecs);
  };
  if (row_bytes % 16 == 0 && align % 16 == 0)
    go(int4{});
  else if (row_bytes % 8 == 0 && align % 8 == 0)
    go(int2{});
  else if (row_bytes % 4 == 0 && align % 4 == 0)
    go(int{});
  else if (row_bytes % 2 == 0 && align % 2 == 0)
    go(short{});
  else
    go(char{});
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// Largest j in [lo, hi] with cu[j] <= row (cu ascending, cu[lo] <= row).
__device__ __forceinline__ int64_t find_seq(const int32_t* cu, int64_t lo, int64_t hi,
                                            int64_t row) {
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (int64_t(cu[mid]) <= row)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

constexpr int kTileRows = 2048;

// Each block packs a tile of kTileRows consecutive rows.  Thread 0 locates the tile's first and
// last sequence once; each row then searches only that short range (a tile spans few sequences).
template <class Tok>
__global__ void pack_kernel(DevicePackArgs a) {
  __shared__ int64_t s_range[2];
  const Tok* tok = static_cast<const Tok*>(a.tokens);
  const int64_t n_tiles = (a.rows + kTileRows - 1) / kTileRows;
  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    const int64_t r0 = tile * kTileRows;
    const int64_t r1 = min(r0 + kTileRows, a.rows);
    __syncthreads();
    if (threadIdx.x == 0) {
      s_range[0] = find_seq(a.cu, 0, a.k - 1, r0);
      s_range[1] = find_seq(a.cu, s_range[0], a.k - 1, r1 - 1);
    }
    __syncthreads();
    const int64_t lo = s_range[0], hi = s_range[1];
    for (int64_t row = r0 + threadIdx.x; row < r1; row += blockDim.x) {
      const int64_t j = find_seq(a.cu, lo, hi, row);
      const int64_t p = row - a.cu[j];
      const int64_t L = a.seq_len[j], P = a.prompt_len[j];
      const Tok* t = tok + a.seq_start[j];
      a.input_ids[row] = p < L ? int64_t(t[p]) : a.pad_token_id;
      a.position_ids[row] = p;
      // Row p is scored iff P-1 <= p < L-1; the label never leaves its sequence.
      const bool scored = p >= P - 1 && p < L - 1;
      a.labels[row] = scored ? int64_t(t[p + 1]) : kIgnoreIndex;
      a.loss_mask[row] = scored ? 1 : 0;
      a.advantage[row] = scored ? a.seq_adv[j] : 0.0f;
      a.mode[row] = a.seq_mode[j];
      a.seq_index[row] = int32_t(j);
      if (scored) a.response_rows[a.resp_off[j] + p - (P - 1)] = row;
    }
  }
}

}  // namespace

const char* gather_rows(void* dst, const void* src, const int64_t* index, int64_t n_rows,
                        int64_t row_bytes, uintptr_t stream) {
  return launch_rows<false>(dst, src, index, n_rows, row_bytes, stream);
}

const char* scatter_rows(void* dst, const void* src, const int64_t* index, int64_t n_rows,
                         int64_t row_bytes, uintptr_t stream) {
  return launch_rows<true>(dst, src, index, n_rows, row_bytes, stream);
}

const char* pack_rows(const DevicePackArgs& a, uintptr_t stream) {
  if (a.rows == 0 || a.k == 0) return nullptr;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const unsigned grid = blocks_for(a.rows, kTileRows);
  if (a.token_itemsize == 4)
    pack_kernel<int32_t><<<grid, kThreads, 0, s>>>(a);
  else
    pack_kernel<int64_t><<<grid, kThreads, 0, s>>>(a);
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace r4b_cuda
