// Torch-free core of the r4b ragged packer: plan (rank balancing + micro-batch filling),
// THD pack of one or many micro-batches, unpack, and the prefix-shared group units (units
// and their THD pack).  Plain pointers and sizes; errors are thrown as std::invalid_argument
// with a message naming the argument, the index and the constraint.  The algorithms and their
// tie-breaking mirror r4b/packing/reference.py and r4b/packing/python_ref.py exactly (tests
// compare all three).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace r4b {

constexpr int64_t kIgnoreIndex = -100;
constexpr int kCostTokens = 0;
constexpr int kCostFlops = 1;
constexpr int kMaxMode = 127;

struct PlanArgs {
  const int64_t* seq_lens = nullptr;  // [n]
  int64_t n = 0;
  const int64_t* group_ids = nullptr;  // [n] or null
  const int8_t* modes = nullptr;       // [n] or null
  int64_t num_ranks = 1;
  int64_t tokens_per_microbatch = 1;
  int cost = kCostTokens;
  int64_t flops_a = 0;
  bool keep_groups = false;
  int64_t pad_to_multiple = 1;
};

struct PlanResult {
  int32_t* rank_of = nullptr;            // [n]
  int32_t* microbatch_of = nullptr;      // [n]
  int64_t* rank_costs = nullptr;         // [num_ranks]
  int64_t* rank_tokens = nullptr;        // [num_ranks]
  int32_t* microbatch_counts = nullptr;  // [num_ranks]
  int64_t max_unit_cost = 0;
};

// Validates `a` and fills `out` (all buffers preallocated by the caller).
void plan(const PlanArgs& a, PlanResult& out);

struct PackArgs {
  const void* token_ids = nullptr;  // [token_count], int32 or int64 (token_itemsize 4 or 8)
  int token_itemsize = 8;
  int64_t token_count = 0;
  const int64_t* offsets = nullptr;      // [n + 1]
  const int64_t* prompt_lens = nullptr;  // [n]
  int64_t n = 0;
  const int64_t* seq_indices = nullptr;  // [k]: the micro-batches' sequences, back to back
  int64_t k = 0;
  // [num_batches + 1]: micro-batch b packs seq_indices[bounds[b] .. bounds[b+1]); null means
  // one micro-batch of all k sequences.  No sequence may appear twice in the whole call.
  const int64_t* bounds = nullptr;
  int64_t num_batches = 1;
  const int8_t* modes = nullptr;       // [n] or null
  const float* advantages = nullptr;   // [n] or null
  int64_t pad_to_multiple = 1;
  int64_t pad_token_id = 0;
};

struct PackSizes {
  std::vector<int64_t> batch_rows;           // [num_batches]: rows per micro-batch
  std::vector<int64_t> batch_response_rows;  // [num_batches]: scored rows per micro-batch
  std::vector<int64_t> batch_max_seqlen;     // [num_batches]: longest padded sequence (0 if empty)
};

// Validates `a` (every sequence once; micro-batch bounds) and returns the output sizes.
PackSizes pack_sizes(const PackArgs& a);

// Outputs of one micro-batch: cu_seqlens start at 0, seq_index counts its own sequences and
// response_rows are its own row numbers.
struct PackOut {
  int64_t* input_ids = nullptr;     // [rows] (of this batch)
  int64_t* position_ids = nullptr;  // [rows]
  int64_t* labels = nullptr;        // [rows]
  uint8_t* loss_mask = nullptr;     // [rows]
  int8_t* mode = nullptr;           // [rows]
  float* advantage = nullptr;       // [rows]
  int32_t* seq_index = nullptr;     // [rows]
  int32_t* cu_seqlens = nullptr;    // [k_b + 1]
  int64_t* response_rows = nullptr; // [response_rows]
};

// Fills the outputs of micro-batch `batch` (sized by pack_sizes, which validates; this does
// not).  Batches are independent: callers give each its own buffers.
void pack_fill(const PackArgs& a, int64_t batch, const PackOut& out);

// Validates an unpack request: `rows` packed rows, cu_seqlens [k+1], seq_lens [k].
// Returns the number of unpadded rows (sum of seq_lens).
int64_t unpack_check(int64_t rows, const int32_t* cu_seqlens, int64_t cu_len,
                     const int64_t* seq_lens, int64_t k);

// Copies each sequence's first seq_lens[j] rows (row_bytes each) to dst, in order.
void unpack_rows(const void* values, int64_t row_bytes, const int32_t* cu_seqlens,
                 const int64_t* seq_lens, int64_t k, void* dst);

// ------------------------------------------------------------ prefix-shared group units
// Sequence j is token_ids[offsets[j] .. offsets[j+1]) with prompt length prompt_lens[j].  A
// unit set is CSR: unit u holds sequences unit_seqs[unit_offsets[u] .. unit_offsets[u+1]) after
// a shared prefix of unit_shared[u] tokens (its first sequence's).  Rules and tie-breaking:
// r4b/packing/reference.py, group_units.

struct GroupArgs {
  const void* token_ids = nullptr;  // int32 or int64 (token_itemsize 4 or 8)
  int token_itemsize = 8;
  int64_t token_count = 0;
  const int64_t* offsets = nullptr;      // [n + 1]
  const int64_t* prompt_lens = nullptr;  // [n]
  int64_t n = 0;
  const int64_t* group_ids = nullptr;    // [n]
  const int64_t* image_class = nullptr;  // [n]: equal classes = same images; 0 = no images
  bool has_image_token = false;          // check for image_token_id after the shared prefix
  int64_t image_token_id = 0;
  int64_t budget = 1;                    // tokens per micro-batch
};

struct GroupUnits {
  std::vector<int64_t> unit_seqs, unit_offsets, unit_shared, unit_length;
  int64_t dense_tokens = 0, shared_tokens = 0, prefix_copies_lost = 0, unshared_groups = 0;
};

// Validates `a` and forms the units (same order and statistics as the references).
GroupUnits group_units(const GroupArgs& a);

struct GroupPackArgs {
  const void* token_ids = nullptr;
  int token_itemsize = 8;
  int64_t token_count = 0;
  const int64_t* offsets = nullptr;      // [n + 1]
  const int64_t* prompt_lens = nullptr;  // [n]
  int64_t n = 0;
  const int64_t* unit_seqs = nullptr;     // [m]
  int64_t unit_seq_count = 0;
  const int64_t* unit_offsets = nullptr;  // [unit_offsets_len], must be num_units + 1
  int64_t unit_offsets_len = 0;
  const int64_t* unit_shared = nullptr;   // [num_units]
  int64_t num_units = 0;
  const int64_t* unit_indices = nullptr;  // [k]: the micro-batches' units, back to back
  int64_t k = 0;
  const int64_t* bounds = nullptr;        // [num_batches + 1] or null (one micro-batch)
  int64_t num_batches = 1;
};

struct GroupPackSizes {
  std::vector<int64_t> rows;        // [num_batches]: packed rows
  std::vector<int64_t> scored;      // [num_batches]: scored rows
  std::vector<int64_t> units;       // [num_batches]
  std::vector<int64_t> seqs;        // [num_batches]
  std::vector<int64_t> max_seqlen;  // [num_batches]: longest unit (0 if empty)
};

// Validates `a` (see r4b/packing/reference.py, check_group_pack, for the checks and their
// order) and returns the output sizes.
GroupPackSizes group_pack_sizes(const GroupPackArgs& a);

struct GroupPackOut {
  int64_t* input_ids = nullptr;     // [rows]
  int64_t* position_ids = nullptr;  // [rows]
  int32_t* cu_seqlens = nullptr;    // [units + 1]
  int64_t* rows = nullptr;          // [scored]
  int64_t* row_targets = nullptr;   // [scored]
  int64_t* row_seq = nullptr;       // [scored]
  int64_t* row_token = nullptr;     // [scored]
  int64_t* prefix_lens = nullptr;   // [units]
  int64_t* suffix_lens = nullptr;   // [seqs]
  int64_t* seqs = nullptr;          // [seqs]
};

// Fills micro-batch `batch` (sized by group_pack_sizes, which validates; this does not).
void group_pack_fill(const GroupPackArgs& a, int64_t batch, const GroupPackOut& out);

}  // namespace r4b
