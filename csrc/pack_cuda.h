// Launchers of the r4b CUDA gathers (module r4b._C_cuda).  Torch-free: device pointers, sizes
// and a cudaStream_t passed as an integer.  Each returns nullptr on success or the CUDA error
// string of the launch.
#pragma once

#include <cstdint>

namespace r4b_cuda {

// dst[i] = src[index[i]] for rows of row_bytes bytes; a negative index writes zeros.
const char* gather_rows(void* dst, const void* src, const int64_t* index, int64_t n_rows,
                        int64_t row_bytes, uintptr_t stream);

// dst[index[i]] = src[i]; rows with a negative index are skipped.
const char* scatter_rows(void* dst, const void* src, const int64_t* index, int64_t n_rows,
                         int64_t row_bytes, uintptr_t stream);

// Fused THD pack of one micro-batch of k sequences whose metadata lives on the device:
//   seq_start[k] (offset of each sequence in `tokens`), seq_len[k], prompt_len[k],
//   seq_mode[k] (int8), seq_adv[k] (float), cu[k+1] (int32, padded), resp_off[k+1] (int64,
//   exclusive prefix sum of seq_len - prompt_len).
// Writes input_ids/position_ids/labels (int64), loss_mask (uint8), mode (int8), advantage
// (float), seq_index (int32) for `rows` = cu[k] rows, and response_rows[resp_off[k]] (int64).
struct DevicePackArgs {
  const void* tokens;
  int token_itemsize;  // 4 or 8
  const int64_t* seq_start;
  const int64_t* seq_len;
  const int64_t* prompt_len;
  const int8_t* seq_mode;
  const float* seq_adv;
  const int32_t* cu;
  const int64_t* resp_off;
  int64_t k;
  int64_t rows;
  int64_t pad_token_id;
  int64_t* input_ids;
  int64_t* position_ids;
  int64_t* labels;
  uint8_t* loss_mask;
  int8_t* mode;
  float* advantage;
  int32_t* seq_index;
  int64_t* response_rows;
};

const char* pack_rows(const DevicePackArgs& a, uintptr_t stream);

}  // namespace r4b_cuda
