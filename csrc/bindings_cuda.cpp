// pybind11 face of the r4b CUDA gathers (module r4b._C_cuda).  Torch-free: device pointers
// and the CUDA stream arrive as integers (tensor.data_ptr(), stream.cuda_stream).  Arguments
// are checked here; launch errors raise RuntimeError with the CUDA error string.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "pack_cuda.h"

namespace py = pybind11;

namespace {

constexpr int kAbiVersion = 3;

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument(msg); }

void need_ptr(uintptr_t p, const char* name, bool needed) {
  if (needed && p == 0) bad(std::string(name) + " must be a non-null device pointer, got 0");
}

void need_nonneg(int64_t v, const char* name) {
  if (v < 0) bad(std::string(name) + " must be non-negative, got " + std::to_string(v));
}

void check(const char* err, const char* what) {
  if (err) throw std::runtime_error(std::string(what) + " launch failed: " + err);
}

void check_row_copy(uintptr_t dst, uintptr_t src, uintptr_t index, int64_t n_rows,
                    int64_t row_bytes) {
  need_nonneg(n_rows, "n_rows");
  if (row_bytes < 1) bad("row_bytes must be >= 1, got " + std::to_string(row_bytes));
  need_ptr(dst, "dst", n_rows > 0);
  need_ptr(src, "src", n_rows > 0);
  need_ptr(index, "index", n_rows > 0);
}

void gather_rows(uintptr_t dst, uintptr_t src, uintptr_t index, int64_t n_rows,
                 int64_t row_bytes, uintptr_t stream) {
  check_row_copy(dst, src, index, n_rows, row_bytes);
  check(r4b_cuda::gather_rows(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src),
                              reinterpret_cast<const int64_t*>(index), n_rows, row_bytes, stream),
        "gather_rows");
}

void scatter_rows(uintptr_t dst, uintptr_t src, uintptr_t index, int64_t n_rows,
                  int64_t row_bytes, uintptr_t stream) {
  check_row_copy(dst, src, index, n_rows, row_bytes);
  check(r4b_cuda::scatter_rows(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src),
                               reinterpret_cast<const int64_t*>(index), n_rows, row_bytes,
                               stream),
        "scatter_rows");
}

void pack_rows(uintptr_t tokens, int token_itemsize, uintptr_t seq_start, uintptr_t seq_len,
               uintptr_t prompt_len, uintptr_t seq_mode, uintptr_t seq_adv, uintptr_t cu,
               uintptr_t resp_off, int64_t k, int64_t rows, int64_t pad_token_id,
               uintptr_t input_ids, uintptr_t position_ids, uintptr_t labels,
               uintptr_t loss_mask, uintptr_t mode, uintptr_t advantage, uintptr_t seq_index,
               uintptr_t response_rows, int64_t n_response_rows, uintptr_t stream) {
  if (token_itemsize != 4 && token_itemsize != 8)
    bad("token_itemsize must be 4 (int32) or 8 (int64), got " + std::to_string(token_itemsize));
  need_nonneg(k, "k");
  need_nonneg(rows, "rows");
  need_nonneg(n_response_rows, "n_response_rows");
  if (rows > 0 && k == 0) bad("rows must be 0 when k is 0, got " + std::to_string(rows));
  if (rows < k) bad("rows must be >= k (every sequence has at least one row), got rows=" +
                    std::to_string(rows) + ", k=" + std::to_string(k));
  const bool any = rows > 0;
  need_ptr(tokens, "tokens", any);
  need_ptr(seq_start, "seq_start", any);
  need_ptr(seq_len, "seq_len", any);
  need_ptr(prompt_len, "prompt_len", any);
  need_ptr(seq_mode, "seq_mode", any);
  need_ptr(seq_adv, "seq_adv", any);
  need_ptr(cu, "cu", any);
  need_ptr(resp_off, "resp_off", any);
  need_ptr(input_ids, "input_ids", any);
  need_ptr(position_ids, "position_ids", any);
  need_ptr(labels, "labels", any);
  need_ptr(loss_mask, "loss_mask", any);
  need_ptr(mode, "mode", any);
  need_ptr(advantage, "advantage", any);
  need_ptr(seq_index, "seq_index", any);
  need_ptr(response_rows, "response_rows", n_response_rows > 0);
  r4b_cuda::DevicePackArgs a{
      reinterpret_cast<const void*>(tokens), token_itemsize,
      reinterpret_cast<const int64_t*>(seq_start), reinterpret_cast<const int64_t*>(seq_len),
      reinterpret_cast<const int64_t*>(prompt_len), reinterpret_cast<const int8_t*>(seq_mode),
      reinterpret_cast<const float*>(seq_adv), reinterpret_cast<const int32_t*>(cu),
      reinterpret_cast<const int64_t*>(resp_off), k, rows, pad_token_id,
      reinterpret_cast<int64_t*>(input_ids), reinterpret_cast<int64_t*>(position_ids),
      reinterpret_cast<int64_t*>(labels), reinterpret_cast<uint8_t*>(loss_mask),
      reinterpret_cast<int8_t*>(mode), reinterpret_cast<float*>(advantage),
      reinterpret_cast<int32_t*>(seq_index), reinterpret_cast<int64_t*>(response_rows)};
  check(r4b_cuda::pack_rows(a, stream), "pack_rows");
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "r4b ragged packer, CUDA gathers (torch-free: device pointers + stream handles)";
  m.def("abi_version", [] { return kAbiVersion; }, "Version of this module's calling convention.");
  m.def("gather_rows", &gather_rows, py::arg("dst"), py::arg("src"), py::arg("index"),
        py::arg("n_rows"), py::arg("row_bytes"), py::arg("stream"),
        "dst[i] = src[index[i]] (rows of row_bytes bytes; index < 0 writes zeros).");
  m.def("scatter_rows", &scatter_rows, py::arg("dst"), py::arg("src"), py::arg("index"),
        py::arg("n_rows"), py::arg("row_bytes"), py::arg("stream"),
        "dst[index[i]] = src[i] (rows with index < 0 are skipped).");
  m.def("pack_rows", &pack_rows, py::arg("tokens"), py::arg("token_itemsize"),
        py::arg("seq_start"), py::arg("seq_len"), py::arg("prompt_len"), py::arg("seq_mode"),
        py::arg("seq_adv"), py::arg("cu"), py::arg("resp_off"), py::arg("k"), py::arg("rows"),
        py::arg("pad_token_id"), py::arg("input_ids"), py::arg("position_ids"),
        py::arg("labels"), py::arg("loss_mask"), py::arg("mode"), py::arg("advantage"),
        py::arg("seq_index"), py::arg("response_rows"), py::arg("n_response_rows"),
        py::arg("stream"), "Fused THD pack of one micro-batch (see csrc/pack_cuda.h).");
}
