// pybind11 face of the torch-free packer core (module r4b._C).  NumPy buffers in and out; every
// argument is checked here (dtype, rank, contiguity, length) and every value in the core; a bad
// argument raises ValueError (std::invalid_argument) naming it, the index and the constraint.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "pack_core.h"

namespace py = pybind11;

namespace {

constexpr int kAbiVersion = 3;

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument(msg); }

std::string describe(const py::array& a) {
  std::ostringstream os;
  os << "dtype " << std::string(py::str(a.dtype())) << ", ndim " << a.ndim();
  return os.str();
}

// Checks that `a` is a C-contiguous 1-D array of dtype T (and of length `len` when >= 0).
template <class T>
const T* vec(const py::array& a, const char* name, int64_t len = -1) {
  if (!a.dtype().is(py::dtype::of<T>()) || a.ndim() != 1)
    bad(std::string(name) + " must be a 1-D " + std::string(py::str(py::dtype::of<T>())) +
        " array, got " + describe(a));
  if (!(a.flags() & py::array::c_style))
    bad(std::string(name) + " must be C-contiguous");
  if (len >= 0 && a.shape(0) != len)
    bad(std::string(name) + " must have one entry per sequence (" + std::to_string(len) +
        "), got " + std::to_string(a.shape(0)));
  return static_cast<const T*>(a.data());
}

template <class T>
py::array_t<T> empty(int64_t n) { return py::array_t<T>(py::ssize_t(n)); }

py::dict plan(const py::array& seq_lens, int64_t num_ranks, int64_t tokens_per_microbatch,
              std::optional<py::array> group_ids, std::optional<py::array> modes, int cost,
              int64_t flops_a, bool keep_groups, int64_t pad_to_multiple) {
  r4b::PlanArgs a;
  a.seq_lens = vec<int64_t>(seq_lens, "seq_lens");
  a.n = seq_lens.shape(0);
  if (group_ids) a.group_ids = vec<int64_t>(*group_ids, "group_ids", a.n);
  if (modes) a.modes = vec<int8_t>(*modes, "modes", a.n);
  a.num_ranks = num_ranks;
  a.tokens_per_microbatch = tokens_per_microbatch;
  a.cost = cost;
  a.flops_a = flops_a;
  a.keep_groups = keep_groups;
  a.pad_to_multiple = pad_to_multiple;
  if (num_ranks < 1) bad("num_ranks must be >= 1, got " + std::to_string(num_ranks));
  auto rank_of = empty<int32_t>(a.n), mb_of = empty<int32_t>(a.n);
  auto costs = empty<int64_t>(num_ranks), tokens = empty<int64_t>(num_ranks);
  auto counts = empty<int32_t>(num_ranks);
  r4b::PlanResult out;
  out.rank_of = rank_of.mutable_data();
  out.microbatch_of = mb_of.mutable_data();
  out.rank_costs = costs.mutable_data();
  out.rank_tokens = tokens.mutable_data();
  out.microbatch_counts = counts.mutable_data();
  {
    py::gil_scoped_release nogil;
    r4b::plan(a, out);
  }
  py::dict d;
  d["rank_of"] = rank_of;
  d["microbatch_of"] = mb_of;
  d["rank_costs"] = costs;
  d["rank_tokens"] = tokens;
  d["microbatch_counts"] = counts;
  d["max_unit_cost"] = out.max_unit_cost;
  return d;
}

py::list pack(const py::array& token_ids, const py::array& offsets, const py::array& prompt_lens,
              const py::array& seq_indices, std::optional<py::array> modes,
              std::optional<py::array> advantages, int64_t pad_to_multiple,
              int64_t pad_token_id, std::optional<py::array> bounds) {
  r4b::PackArgs a;
  if (token_ids.dtype().is(py::dtype::of<int32_t>())) {
    a.token_ids = vec<int32_t>(token_ids, "token_ids");
    a.token_itemsize = 4;
  } else {
    a.token_ids = vec<int64_t>(token_ids, "token_ids");
    a.token_itemsize = 8;
  }
  a.token_count = token_ids.shape(0);
  a.prompt_lens = vec<int64_t>(prompt_lens, "prompt_lens");
  a.n = prompt_lens.shape(0);
  const int64_t* off = vec<int64_t>(offsets, "offsets");
  if (offsets.shape(0) != a.n + 1)
    bad("offsets must have len(prompt_lens) + 1 = " + std::to_string(a.n + 1) +
        " entries, got " + std::to_string(offsets.shape(0)));
  a.offsets = off;
  a.seq_indices = vec<int64_t>(seq_indices, "seq_indices");
  a.k = seq_indices.shape(0);
  if (modes) a.modes = vec<int8_t>(*modes, "modes", a.n);
  if (advantages) a.advantages = vec<float>(*advantages, "advantages", a.n);
  a.pad_to_multiple = pad_to_multiple;
  a.pad_token_id = pad_token_id;
  if (bounds) {
    if (bounds->ndim() == 1 && bounds->shape(0) < 1) bad("bounds must have at least 1 entry, got 0");
    a.bounds = vec<int64_t>(*bounds, "bounds");
    a.num_batches = bounds->shape(0) - 1;
  }
  r4b::PackSizes z;
  {
    py::gil_scoped_release nogil;
    z = r4b::pack_sizes(a);
  }
  // One set of arrays per micro-batch: micro-batch-sized buffers are recycled by the allocator
  // from one step to the next, where one buffer per field for all micro-batches would be fresh
  // memory (page faults) every call.
  const int64_t B = int64_t(z.batch_rows.size());
  py::list result;
  std::vector<r4b::PackOut> outs(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t rows = z.batch_rows[b];
    const int64_t k_b = a.bounds ? a.bounds[b + 1] - a.bounds[b] : a.k;
    auto ids = empty<int64_t>(rows), pos = empty<int64_t>(rows), lab = empty<int64_t>(rows);
    py::array mask(py::dtype("bool"), std::vector<py::ssize_t>{py::ssize_t(rows)});
    auto mode = empty<int8_t>(rows);
    auto adv = empty<float>(rows);
    auto seg = empty<int32_t>(rows);
    auto cu = empty<int32_t>(k_b + 1);
    auto rr = empty<int64_t>(z.batch_response_rows[b]);
    r4b::PackOut& o = outs[size_t(b)];
    o.input_ids = ids.mutable_data();
    o.position_ids = pos.mutable_data();
    o.labels = lab.mutable_data();
    o.loss_mask = static_cast<uint8_t*>(mask.mutable_data());
    o.mode = mode.mutable_data();
    o.advantage = adv.mutable_data();
    o.seq_index = seg.mutable_data();
    o.cu_seqlens = cu.mutable_data();
    o.response_rows = rr.mutable_data();
    py::dict d;
    d["input_ids"] = ids;
    d["position_ids"] = pos;
    d["labels"] = lab;
    d["loss_mask"] = mask;
    d["mode"] = mode;
    d["advantage"] = adv;
    d["seq_index"] = seg;
    d["cu_seqlens"] = cu;
    d["response_rows"] = rr;
    d["max_seqlen"] = z.batch_max_seqlen[b];
    result.append(d);
  }
  {
    py::gil_scoped_release nogil;
    for (int64_t b = 0; b < B; ++b) r4b::pack_fill(a, b, outs[size_t(b)]);
  }
  return result;
}

py::array unpack_rows(const py::array& values, const py::array& cu_seqlens,
                      const py::array& seq_lens) {
  if (values.ndim() < 1) bad("values must have at least 1 dimension (rows), got a 0-d array");
  if (!(values.flags() & py::array::c_style)) bad("values must be C-contiguous");
  const int32_t* cu = vec<int32_t>(cu_seqlens, "cu_seqlens");
  const int64_t* lens = vec<int64_t>(seq_lens, "seq_lens");
  const int64_t k = seq_lens.shape(0);
  const int64_t total = r4b::unpack_check(values.shape(0), cu, cu_seqlens.shape(0), lens, k);
  std::vector<py::ssize_t> shape(values.shape(), values.shape() + values.ndim());
  shape[0] = py::ssize_t(total);
  py::array out(values.dtype(), shape);
  int64_t row_bytes = values.itemsize();
  for (py::ssize_t d = 1; d < values.ndim(); ++d) row_bytes *= values.shape(d);
  {
    py::gil_scoped_release nogil;
    r4b::unpack_rows(values.data(), row_bytes, cu, lens, k, out.mutable_data());
  }
  return out;
}

// token_ids as int32 or int64 (the core reads either).
const void* tokens(const py::array& token_ids, int& itemsize) {
  if (token_ids.dtype().is(py::dtype::of<int32_t>())) {
    itemsize = 4;
    return vec<int32_t>(token_ids, "token_ids");
  }
  itemsize = 8;
  return vec<int64_t>(token_ids, "token_ids");
}

template <class T>
py::array_t<T> to_array(const std::vector<T>& v) {
  auto a = empty<T>(int64_t(v.size()));
  if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(T));
  return a;
}

py::dict group_units(const py::array& token_ids, const py::array& offsets,
                     const py::array& prompt_lens, const py::array& group_ids,
                     const py::array& image_class, int64_t budget,
                     std::optional<int64_t> image_token_id) {
  r4b::GroupArgs a;
  a.token_ids = tokens(token_ids, a.token_itemsize);
  a.token_count = token_ids.shape(0);
  a.prompt_lens = vec<int64_t>(prompt_lens, "prompt_lens");
  a.n = prompt_lens.shape(0);
  const int64_t* off = vec<int64_t>(offsets, "offsets");
  a.group_ids = vec<int64_t>(group_ids, "group_ids", a.n);
  a.image_class = vec<int64_t>(image_class, "image_class", a.n);
  if (budget < 1) bad("budget must be >= 1 token, got " + std::to_string(budget));
  if (offsets.shape(0) != a.n + 1)
    bad("offsets must have len(prompt_lens) + 1 = " + std::to_string(a.n + 1) +
        " entries, got " + std::to_string(offsets.shape(0)));
  a.offsets = off;
  a.budget = budget;
  a.has_image_token = image_token_id.has_value();
  a.image_token_id = image_token_id.value_or(0);
  r4b::GroupUnits r;
  {
    py::gil_scoped_release nogil;
    r = r4b::group_units(a);
  }
  py::dict d;
  d["unit_seqs"] = to_array(r.unit_seqs);
  d["unit_offsets"] = to_array(r.unit_offsets);
  d["unit_shared"] = to_array(r.unit_shared);
  d["unit_length"] = to_array(r.unit_length);
  d["dense_tokens"] = r.dense_tokens;
  d["shared_tokens"] = r.shared_tokens;
  d["prefix_copies_lost"] = r.prefix_copies_lost;
  d["unshared_groups"] = r.unshared_groups;
  return d;
}

py::list pack_groups(const py::array& token_ids, const py::array& offsets,
                     const py::array& prompt_lens, const py::array& unit_seqs,
                     const py::array& unit_offsets, const py::array& unit_shared,
                     const py::array& unit_indices, std::optional<py::array> bounds) {
  r4b::GroupPackArgs a;
  a.token_ids = tokens(token_ids, a.token_itemsize);
  a.token_count = token_ids.shape(0);
  a.prompt_lens = vec<int64_t>(prompt_lens, "prompt_lens");
  a.n = prompt_lens.shape(0);
  a.offsets = vec<int64_t>(offsets, "offsets");
  a.unit_seqs = vec<int64_t>(unit_seqs, "unit_seqs");
  a.unit_seq_count = unit_seqs.shape(0);
  a.unit_offsets = vec<int64_t>(unit_offsets, "unit_offsets");
  a.unit_offsets_len = unit_offsets.shape(0);
  a.unit_shared = vec<int64_t>(unit_shared, "unit_shared");
  a.num_units = unit_shared.shape(0);
  a.unit_indices = vec<int64_t>(unit_indices, "unit_indices");
  a.k = unit_indices.shape(0);
  if (bounds) {
    a.bounds = vec<int64_t>(*bounds, "bounds");
    a.num_batches = bounds->shape(0) - 1;
  }
  if (offsets.shape(0) != a.n + 1)
    bad("offsets must have len(prompt_lens) + 1 = " + std::to_string(a.n + 1) +
        " entries, got " + std::to_string(offsets.shape(0)));
  r4b::GroupPackSizes z;
  {
    py::gil_scoped_release nogil;
    z = r4b::group_pack_sizes(a);
  }
  const int64_t B = int64_t(z.rows.size());
  py::list result;
  std::vector<r4b::GroupPackOut> outs(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    auto ids = empty<int64_t>(z.rows[b]), pos = empty<int64_t>(z.rows[b]);
    auto cu = empty<int32_t>(z.units[b] + 1);
    auto rows = empty<int64_t>(z.scored[b]), tgt = empty<int64_t>(z.scored[b]);
    auto rseq = empty<int64_t>(z.scored[b]), rtok = empty<int64_t>(z.scored[b]);
    auto pre = empty<int64_t>(z.units[b]);
    auto suf = empty<int64_t>(z.seqs[b]), seqs = empty<int64_t>(z.seqs[b]);
    r4b::GroupPackOut& o = outs[size_t(b)];
    o.input_ids = ids.mutable_data();
    o.position_ids = pos.mutable_data();
    o.cu_seqlens = cu.mutable_data();
    o.rows = rows.mutable_data();
    o.row_targets = tgt.mutable_data();
    o.row_seq = rseq.mutable_data();
    o.row_token = rtok.mutable_data();
    o.prefix_lens = pre.mutable_data();
    o.suffix_lens = suf.mutable_data();
    o.seqs = seqs.mutable_data();
    py::dict d;
    d["input_ids"] = ids;
    d["position_ids"] = pos;
    d["cu_seqlens"] = cu;
    d["rows"] = rows;
    d["row_targets"] = tgt;
    d["row_seq"] = rseq;
    d["row_token"] = rtok;
    d["prefix_lens"] = pre;
    d["suffix_lens"] = suf;
    d["seqs"] = seqs;
    d["max_seqlen"] = z.max_seqlen[b];
    result.append(d);
  }
  {
    py::gil_scoped_release nogil;
    for (int64_t b = 0; b < B; ++b) r4b::group_pack_fill(a, b, outs[size_t(b)]);
  }
  return result;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "r4b ragged packer (torch-free C++): plan, pack, unpack_rows, group_units, "
            "pack_groups";
  m.def("abi_version", [] { return kAbiVersion; }, "Version of this module's calling convention.");
  m.def("plan", &plan, py::arg("seq_lens"), py::arg("num_ranks"),
        py::arg("tokens_per_microbatch"), py::arg("group_ids") = py::none(),
        py::arg("modes") = py::none(), py::arg("cost") = 0, py::arg("flops_a") = 0,
        py::arg("keep_groups") = false, py::arg("pad_to_multiple") = 1,
        "Assign sequences to ranks and micro-batches; see r4b/packing/reference.py:plan.");
  m.def("pack", &pack, py::arg("token_ids"), py::arg("offsets"), py::arg("prompt_lens"),
        py::arg("seq_indices"), py::arg("modes") = py::none(),
        py::arg("advantages") = py::none(), py::arg("pad_to_multiple") = 1,
        py::arg("pad_token_id") = 0, py::arg("bounds") = py::none(),
        "Pack sequences seq_indices into THD micro-batches (one, or one per bounds interval); "
        "a list with one dict of arrays per micro-batch; see r4b/packing/reference.py:pack.");
  m.def("unpack_rows", &unpack_rows, py::arg("values"), py::arg("cu_seqlens"),
        py::arg("seq_lens"),
        "Unpadded rows of each packed sequence, concatenated in order.");
  m.def("group_units", &group_units, py::arg("token_ids"), py::arg("offsets"),
        py::arg("prompt_lens"), py::arg("group_ids"), py::arg("image_class"), py::arg("budget"),
        py::arg("image_token_id") = py::none(),
        "Prefix-shared units of a batch as CSR arrays and statistics; see "
        "r4b/packing/reference.py:group_units.");
  m.def("pack_groups", &pack_groups, py::arg("token_ids"), py::arg("offsets"),
        py::arg("prompt_lens"), py::arg("unit_seqs"), py::arg("unit_offsets"),
        py::arg("unit_shared"), py::arg("unit_indices"), py::arg("bounds") = py::none(),
        "Pack units unit_indices into prefix-shared THD micro-batches (one, or one per bounds "
        "interval); see r4b/packing/reference.py:pack_groups.");
}
