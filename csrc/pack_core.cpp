// Torch-free core of the r4b ragged packer; see pack_core.h and r4b/packing/reference.py (the
// reference whose algorithms and tie-breaking this file reproduces exactly).
#include "pack_core.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

namespace r4b {
namespace {

template <class... Ts>
[[noreturn]] void fail(const Ts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}

inline int64_t padded(int64_t len, int64_t m) { return (len + m - 1) / m * m; }

void check_modes(const int8_t* modes, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (modes[i] < 0 || modes[i] > kMaxMode)
      fail("modes must be in [0, ", kMaxMode, "], got ", int(modes[i]), " at index ", i);
}

// (obj, kind, x, y): obj = |2d - gap| with d the load leaving the higher rank; kind 0 = move
// of x, 1 = swap of x with y.  Smaller tuples are better; valid iff obj < gap.
using Exchange = std::tuple<int64_t, int, int64_t, int64_t>;

bool best_exchange(const std::vector<int64_t>& cost, const std::vector<int64_t>& hi_members,
                   std::vector<std::pair<int64_t, int64_t>>& lo_sorted, int64_t gap,
                   Exchange& best) {
  bool found = false;
  for (int64_t x : hi_members) {
    int64_t obj = std::llabs(2 * cost[x] - gap);
    if (obj < gap) {
      Exchange e{obj, 0, x, -1};
      if (!found || e < best) best = e, found = true;
    }
  }
  if (lo_sorted.empty()) return found;
  const int64_t none = std::numeric_limits<int64_t>::max();
  for (int64_t x : hi_members) {
    const int64_t t2 = 2 * cost[x] - gap;  // twice the ideal partner cost
    auto it = std::lower_bound(lo_sorted.begin(), lo_sorted.end(), t2,
                               [](const std::pair<int64_t, int64_t>& p, int64_t v) {
                                 return 2 * p.first < v;
                               });
    const int64_t hi = it - lo_sorted.begin();
    const int64_t n = int64_t(lo_sorted.size());
    for (int side = 0; side < 2; ++side) {
      int64_t obj = none, y = -1;
      if (side == 0 && hi < n) {
        obj = 2 * lo_sorted[hi].first - t2;
        y = lo_sorted[hi].second;
      } else if (side == 1 && hi > 0) {
        const int64_t c = lo_sorted[hi - 1].first;  // first of its equal-cost run
        auto first = std::lower_bound(lo_sorted.begin(), lo_sorted.end(),
                                      std::make_pair(c, std::numeric_limits<int64_t>::min()));
        obj = t2 - 2 * c;
        y = first->second;
      }
      if (obj < gap) {
        Exchange e{obj, 1, x, y};
        if (!found || e < best) best = e, found = true;
      }
    }
  }
  return found;
}

}  // namespace

void plan(const PlanArgs& a, PlanResult& out) {
  const int64_t n = a.n, R = a.num_ranks, B = a.tokens_per_microbatch, m = a.pad_to_multiple;
  if (R < 1) fail("num_ranks must be >= 1, got ", R);
  if (B < 1) fail("tokens_per_microbatch must be >= 1, got ", B);
  if (m < 1) fail("pad_to_multiple must be >= 1, got ", m);
  if (a.cost != kCostTokens && a.cost != kCostFlops)
    fail("cost must be ", kCostTokens, " (tokens) or ", kCostFlops, " (flops), got ", a.cost);
  if (a.flops_a < 0) fail("flops_a must be >= 0, got ", a.flops_a);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t L = a.seq_lens[i];
    if (L < 0) fail("seq_lens must be non-negative, got ", L, " at index ", i);
    if (L == 0)
      fail("seq_lens must be non-zero (zero-length sequences are not allowed), got 0 at index ", i);
  }
  if (a.modes) check_modes(a.modes, n);
  if (a.keep_groups && !a.group_ids) fail("keep_groups=True needs group_ids, got None");
  std::vector<int64_t> plen(n), c(n);
  int64_t max_plen = 0, argmax_plen = 0;
  for (int64_t i = 0; i < n; ++i) {
    plen[i] = padded(a.seq_lens[i], m);
    if (plen[i] > B)
      fail("seq_lens[", i, "] = ", a.seq_lens[i], " (padded to ", plen[i],
           ") exceeds tokens_per_microbatch = ", B, " at index ", i, "; raise the budget");
    if (plen[i] > max_plen) max_plen = plen[i], argmax_plen = i;
  }
  if (a.cost == kCostFlops && max_plen > (int64_t(1) << 20))
    fail("seq_lens must be <= ", int64_t(1) << 20, " with the flops cost (int64 overflow), got ",
         max_plen, " at index ", argmax_plen);
  for (int64_t i = 0; i < n; ++i)
    c[i] = a.cost == kCostTokens ? plen[i] : a.flops_a * plen[i] + plen[i] * plen[i];

  // Units: sequences, or groups numbered by first appearance.
  std::vector<int64_t> unit_of_seq(n), unit_first;
  if (a.keep_groups) {
    std::unordered_map<int64_t, int64_t> ids;
    ids.reserve(size_t(n) * 2);
    for (int64_t i = 0; i < n; ++i) {
      auto [it, fresh] = ids.try_emplace(a.group_ids[i], int64_t(unit_first.size()));
      if (fresh) unit_first.push_back(i);
      unit_of_seq[i] = it->second;
    }
  } else {
    unit_first.resize(n);
    for (int64_t i = 0; i < n; ++i) unit_of_seq[i] = unit_first[i] = i;
  }
  const int64_t U = int64_t(unit_first.size());
  std::vector<int64_t> ucost(U, 0), umode(U, 0);
  for (int64_t i = 0; i < n; ++i) ucost[unit_of_seq[i]] += c[i];
  if (a.modes)
    for (int64_t u = 0; u < U; ++u) umode[u] = a.modes[unit_first[u]];

  // LPT greedy: (cost desc, id asc) → rank with min (load, same-mode units, rank id).
  std::vector<int64_t> order(U);
  for (int64_t u = 0; u < U; ++u) order[u] = u;
  std::sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    return ucost[x] != ucost[y] ? ucost[x] > ucost[y] : x < y;
  });
  std::vector<int64_t> load(R, 0), mcount(size_t(R) * (kMaxMode + 1), 0), urank(U);
  for (int64_t u : order) {
    int64_t r = 0;
    for (int64_t q = 1; q < R; ++q) {
      if (load[q] < load[r] ||
          (load[q] == load[r] &&
           mcount[q * (kMaxMode + 1) + umode[u]] < mcount[r * (kMaxMode + 1) + umode[u]]))
        r = q;
    }
    urank[u] = r;
    load[r] += ucost[u];
    mcount[r * (kMaxMode + 1) + umode[u]] += 1;
  }

  // Refinement: best move / pairwise swap out of the most loaded rank.
  std::vector<int64_t> rorder(R), hi_members;
  std::vector<std::pair<int64_t, int64_t>> lo_sorted;
  for (int64_t it = 0; it < 4 * U + 16; ++it) {
    const int64_t M = std::max_element(load.begin(), load.end()) - load.begin();
    for (int64_t q = 0; q < R; ++q) rorder[q] = q;
    std::stable_sort(rorder.begin(), rorder.end(),
                     [&](int64_t x, int64_t y) { return load[x] < load[y]; });
    hi_members.clear();
    for (int64_t u = 0; u < U; ++u)
      if (urank[u] == M) hi_members.push_back(u);
    bool applied = false;
    for (int64_t mm : rorder) {
      if (mm == M) continue;
      const int64_t gap = load[M] - load[mm];
      if (gap <= 1) break;
      lo_sorted.clear();
      for (int64_t u = 0; u < U; ++u)
        if (urank[u] == mm) lo_sorted.emplace_back(ucost[u], u);
      std::sort(lo_sorted.begin(), lo_sorted.end());
      Exchange ex;
      if (!best_exchange(ucost, hi_members, lo_sorted, gap, ex)) continue;
      const int64_t x = std::get<2>(ex), y = std::get<3>(ex);
      urank[x] = mm;
      load[M] -= ucost[x];
      load[mm] += ucost[x];
      if (std::get<1>(ex) == 1) {
        urank[y] = M;
        load[mm] -= ucost[y];
        load[M] += ucost[y];
      }
      applied = true;
      break;
    }
    if (!applied) break;
  }

  // First-fit-decreasing into micro-batches, per rank.
  std::vector<std::vector<int64_t>> members(R);
  for (int64_t i = 0; i < n; ++i) {
    out.rank_of[i] = int32_t(urank[unit_of_seq[i]]);
    members[out.rank_of[i]].push_back(i);
  }
  std::vector<int64_t> fill;
  for (int64_t r = 0; r < R; ++r) {
    auto& mem = members[r];
    std::stable_sort(mem.begin(), mem.end(),
                     [&](int64_t x, int64_t y) { return plen[x] > plen[y]; });
    fill.clear();
    int64_t tokens = 0;
    for (int64_t i : mem) {
      const int64_t L = plen[i];
      size_t b = 0;
      while (b < fill.size() && fill[b] > B - L) ++b;
      if (b == fill.size()) fill.push_back(0);
      fill[b] += L;
      out.microbatch_of[i] = int32_t(b);
      tokens += L;
    }
    out.microbatch_counts[r] = int32_t(fill.size());
    out.rank_tokens[r] = tokens;
    out.rank_costs[r] = load[r];
  }
  out.max_unit_cost = U ? *std::max_element(ucost.begin(), ucost.end()) : 0;
}

PackSizes pack_sizes(const PackArgs& a) {
  const int64_t n = a.n, m = a.pad_to_multiple;
  const int64_t* off = a.offsets;
  if (m < 1) fail("pad_to_multiple must be >= 1, got ", m);
  if (off[0] < 0) fail("offsets must be non-negative, got ", off[0], " at index 0");
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len = off[i + 1] - off[i];
    if (len < 0)
      fail("offsets must be non-decreasing: sequence ", i, " has length ", len, " (offsets[", i,
           "] = ", off[i], ", offsets[", i + 1, "] = ", off[i + 1], ")");
    if (len == 0)
      fail("offsets must be strictly increasing (zero-length sequences are not allowed): "
           "sequence ", i, " has length 0 (offsets[", i, "] = ", off[i], ", offsets[", i + 1,
           "] = ", off[i + 1], ")");
  }
  if (off[n] > a.token_count)
    fail("offsets[", n, "] = ", off[n], " exceeds len(token_ids) = ", a.token_count);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t P = a.prompt_lens[i], len = off[i + 1] - off[i];
    if (P < 1 || P > len)
      fail("prompt_lens must be in [1, seq_len] per sequence, got ", P, " at index ", i,
           " (seq_len ", len, ")");
  }
  if (a.modes) check_modes(a.modes, n);
  const int64_t B = a.bounds ? a.num_batches : 1;
  if (a.bounds) {
    if (B < 0) fail("bounds must have at least 1 entry, got ", B + 1);
    if (a.bounds[0] != 0) fail("bounds must start at 0, got ", a.bounds[0], " at index 0");
    for (int64_t b = 0; b < B; ++b)
      if (a.bounds[b + 1] < a.bounds[b])
        fail("bounds must be non-decreasing, got ", a.bounds[b + 1], " at index ", b + 1,
             " after ", a.bounds[b]);
    if (a.bounds[B] != a.k)
      fail("bounds must end at len(seq_indices) = ", a.k, ", got ", a.bounds[B], " at index ", B);
  }
  for (int64_t j = 0; j < a.k; ++j) {
    const int64_t s = a.seq_indices[j];
    if (s < 0 || s >= n) fail("seq_indices must be in [0, ", n, "), got ", s, " at index ", j);
  }
  if (a.k > 1) {
    std::vector<std::pair<int64_t, int64_t>> sorted(a.k);
    for (int64_t j = 0; j < a.k; ++j) sorted[j] = {a.seq_indices[j], j};
    std::sort(sorted.begin(), sorted.end());
    for (int64_t j = 0; j + 1 < a.k; ++j)
      if (sorted[j].first == sorted[j + 1].first)
        fail("seq_indices must not repeat a sequence, got ", sorted[j].first, " at indices ",
             sorted[j].second, " and ", sorted[j + 1].second);
  }
  if (a.advantages)
    for (int64_t j = 0; j < a.k; ++j) {
      const int64_t s = a.seq_indices[j];
      if (!std::isfinite(a.advantages[s]))
        fail("advantages must be finite, got ", a.advantages[s], " at index ", s);
    }
  PackSizes z;
  z.batch_rows.assign(size_t(B), 0);
  z.batch_response_rows.assign(size_t(B), 0);
  z.batch_max_seqlen.assign(size_t(B), 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t lo = a.bounds ? a.bounds[b] : 0, hi = a.bounds ? a.bounds[b + 1] : a.k;
    for (int64_t j = lo; j < hi; ++j) {
      const int64_t s = a.seq_indices[j], len = off[s + 1] - off[s];
      const int64_t p = padded(len, m);
      z.batch_rows[b] += p;
      z.batch_response_rows[b] += len - a.prompt_lens[s];
      z.batch_max_seqlen[b] = std::max(z.batch_max_seqlen[b], p);
    }
    if (z.batch_rows[b] > int64_t(std::numeric_limits<int32_t>::max()))
      fail("the micro-batch holds ", z.batch_rows[b], " rows; cu_seqlens is int32, so at most ",
           std::numeric_limits<int32_t>::max());
  }
  return z;
}

namespace {
// Packs sequences seq_indices[lo, hi) as one micro-batch whose outputs start at `o`.
template <class Tok>
void fill_batch(const PackArgs& a, int64_t lo, int64_t hi, const PackOut& o) {
  const Tok* tok = static_cast<const Tok*>(a.token_ids);
  int64_t row = 0, rr = 0;
  o.cu_seqlens[0] = 0;
  for (int64_t j = 0; j < hi - lo; ++j) {
    const int64_t s = a.seq_indices[lo + j], start = a.offsets[s];
    const int64_t L = a.offsets[s + 1] - start, P = a.prompt_lens[s];
    const int64_t Lp = padded(L, a.pad_to_multiple);
    const int8_t md = a.modes ? a.modes[s] : int8_t(0);
    const float adv = a.advantages ? a.advantages[s] : 0.0f;
    const Tok* t = tok + start;
    // Distinct outputs never alias: restrict lets each loop below compile to plain vector
    // stores (this loop is bound by memory writes, about 42 bytes per row).
    int64_t* __restrict ids = o.input_ids + row;
    int64_t* __restrict pos = o.position_ids + row;
    int64_t* __restrict lab = o.labels + row;
    uint8_t* __restrict msk = o.loss_mask + row;
    float* __restrict av = o.advantage + row;
    int32_t* __restrict sid = o.seq_index + row;
    int64_t* __restrict resp = o.response_rows + rr;
    for (int64_t p = 0; p < L; ++p) ids[p] = int64_t(t[p]);
    for (int64_t p = L; p < Lp; ++p) ids[p] = a.pad_token_id;
    for (int64_t p = 0; p < Lp; ++p) pos[p] = p;
    // Row p is scored iff P-1 <= p < L-1; its label is the next token of the same sequence.
    const int64_t s0 = P - 1, s1 = L - 1;
    for (int64_t p = 0; p < s0; ++p) lab[p] = kIgnoreIndex;
    for (int64_t p = s0; p < s1; ++p) lab[p] = int64_t(t[p + 1]);
    for (int64_t p = s1; p < Lp; ++p) lab[p] = kIgnoreIndex;
    std::memset(msk, 0, size_t(s0));
    std::memset(msk + s0, 1, size_t(s1 - s0));
    std::memset(msk + s1, 0, size_t(Lp - s1));
    for (int64_t p = 0; p < s0; ++p) av[p] = 0.0f;
    for (int64_t p = s0; p < s1; ++p) av[p] = adv;
    for (int64_t p = s1; p < Lp; ++p) av[p] = 0.0f;
    for (int64_t p = s0; p < s1; ++p) resp[p - s0] = row + p;
    rr += s1 - s0;
    std::memset(o.mode + row, md, size_t(Lp));
    for (int64_t p = 0; p < Lp; ++p) sid[p] = int32_t(j);
    row += Lp;
    o.cu_seqlens[j + 1] = int32_t(row);
  }
}

}  // namespace

void pack_fill(const PackArgs& a, int64_t batch, const PackOut& o) {
  const int64_t lo = a.bounds ? a.bounds[batch] : 0, hi = a.bounds ? a.bounds[batch + 1] : a.k;
  if (a.token_itemsize == 4)
    fill_batch<int32_t>(a, lo, hi, o);
  else
    fill_batch<int64_t>(a, lo, hi, o);
}

int64_t unpack_check(int64_t rows, const int32_t* cu, int64_t cu_len, const int64_t* seq_lens,
                     int64_t k) {
  if (cu_len != k + 1)
    fail("cu_seqlens must have len(seq_lens) + 1 = ", k + 1, " entries, got ", cu_len);
  if (cu[0] != 0) fail("cu_seqlens must start at 0, got ", cu[0], " at index 0");
  int64_t total = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t span = int64_t(cu[j + 1]) - int64_t(cu[j]);
    if (seq_lens[j] < 0 || seq_lens[j] > span)
      fail("seq_lens must be in [0, cu_seqlens[j+1] - cu_seqlens[j]], got ", seq_lens[j],
           " at index ", j, " (span ", span, ")");
    total += seq_lens[j];
  }
  if (int64_t(cu[k]) != rows)
    fail("values must have cu_seqlens[-1] = ", cu[k], " rows, got ", rows);
  return total;
}

void unpack_rows(const void* values, int64_t row_bytes, const int32_t* cu,
                 const int64_t* seq_lens, int64_t k, void* dst) {
  const char* src = static_cast<const char*>(values);
  char* out = static_cast<char*>(dst);
  for (int64_t j = 0; j < k; ++j) {
    const size_t nbytes = size_t(seq_lens[j]) * size_t(row_bytes);
    if (nbytes) std::memcpy(out, src + int64_t(cu[j]) * row_bytes, nbytes);
    out += nbytes;
  }
}

// ------------------------------------------------------------ prefix-shared group units
namespace {

// Validates the flat sequences of a group request (the offsets' length is checked by the
// caller, which knows it); messages as r4b/packing/reference.py, check_sequences.
void check_group_sequences(int64_t token_count, const int64_t* off, const int64_t* plens,
                           int64_t n) {
  if (off[0] < 0) fail("offsets must be non-negative, got ", off[0], " at index 0");
  for (int64_t i = 0; i < n; ++i)
    if (off[i + 1] < off[i])
      fail("offsets must be non-decreasing: sequence ", i, " has length ", off[i + 1] - off[i],
           " (offsets[", i, "] = ", off[i], ", offsets[", i + 1, "] = ", off[i + 1], ")");
  if (off[n] > token_count)
    fail("offsets[", n, "] = ", off[n], " exceeds len(token_ids) = ", token_count);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t L = off[j + 1] - off[j];
    if (plens[j] < 1 || plens[j] > L)
      fail("prompt_lens[", j, "] = ", plens[j],
           ": expected 1 <= prompt length <= sequence length ", L);
  }
}

// First t < limit with a[t] != b[t], else limit.
template <class Tok>
int64_t first_mismatch(const Tok* a, const Tok* b, int64_t limit) {
  int64_t t = 0;
  while (t < limit && a[t] == b[t]) ++t;
  return t;
}

template <class Tok>
GroupUnits form_units(const GroupArgs& a) {
  const Tok* tok = static_cast<const Tok*>(a.token_ids);
  const int64_t n = a.n;
  const int64_t* off = a.offsets;
  GroupUnits r;
  r.unit_offsets.push_back(0);
  // Groups by first appearance; members ascending.
  std::unordered_map<int64_t, int64_t> gid;
  gid.reserve(size_t(n) * 2);
  std::vector<std::vector<int64_t>> groups;
  for (int64_t j = 0; j < n; ++j) {
    auto [it, fresh] = gid.try_emplace(a.group_ids[j], int64_t(groups.size()));
    if (fresh) groups.emplace_back();
    groups[size_t(it->second)].push_back(j);
    r.dense_tokens += off[j + 1] - off[j];
  }
  auto emit = [&r](const int64_t* seqs, size_t count, int64_t shared, int64_t length) {
    r.unit_seqs.insert(r.unit_seqs.end(), seqs, seqs + count);
    r.unit_offsets.push_back(int64_t(r.unit_seqs.size()));
    r.unit_shared.push_back(shared);
    r.unit_length.push_back(length);
    r.shared_tokens += length;
  };
  std::vector<int64_t> order, fill;
  std::vector<std::vector<int64_t>> bins;
  for (const auto& mem : groups) {
    const int64_t head = mem[0];
    int64_t shared = a.prompt_lens[head];
    for (int64_t j : mem) shared = std::min(shared, a.prompt_lens[j]);
    for (size_t i = 1; i < mem.size() && shared > 0; ++i)
      shared = first_mismatch(tok + off[mem[i]], tok + off[head], shared);
    bool ok = shared >= 1;
    for (int64_t j : mem) ok = ok && a.image_class[j] == a.image_class[head];
    if (ok && a.has_image_token && a.image_class[head] != 0) {
      for (size_t i = 0; ok && i < mem.size(); ++i) {
        const int64_t j = mem[i];
        const Tok* end = tok + off[j + 1];
        for (const Tok* t = tok + off[j] + shared; t < end; ++t)
          if (int64_t(*t) == a.image_token_id) {
            ok = false;
            break;
          }
      }
    }
    if (!ok || mem.size() == 1) {
      r.unshared_groups += mem.size() > 1;
      for (int64_t j : mem) emit(&j, 1, a.prompt_lens[j], off[j + 1] - off[j]);
      continue;
    }
    // First-fit decreasing of the suffixes (length desc, index asc) into units of
    // budget - shared suffix tokens.
    order.assign(mem.begin(), mem.end());
    std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
      return off[x + 1] - off[x] > off[y + 1] - off[y];
    });
    const int64_t room = a.budget - shared;
    bins.clear();
    fill.clear();
    for (int64_t j : order) {
      const int64_t s = off[j + 1] - off[j] - shared;
      size_t b = 0;
      while (b < fill.size() && fill[b] > room - s) ++b;
      if (b == fill.size()) {
        bins.emplace_back();
        fill.push_back(0);
      }
      bins[b].push_back(j);
      fill[b] += s;
    }
    r.prefix_copies_lost += int64_t(bins.size() - 1) * shared;
    for (size_t b = 0; b < bins.size(); ++b) {
      std::sort(bins[b].begin(), bins[b].end());
      emit(bins[b].data(), bins[b].size(), shared, shared + fill[b]);
    }
  }
  return r;
}

}  // namespace

GroupUnits group_units(const GroupArgs& a) {
  if (a.budget < 1) fail("budget must be >= 1 token, got ", a.budget);
  check_group_sequences(a.token_count, a.offsets, a.prompt_lens, a.n);
  return a.token_itemsize == 4 ? form_units<int32_t>(a) : form_units<int64_t>(a);
}

namespace {

template <class Tok>
void check_shared_prefixes(const GroupPackArgs& a, const std::vector<int64_t>& q,
                           const std::vector<int64_t>& unit_of) {
  const Tok* tok = static_cast<const Tok*>(a.token_ids);
  for (size_t p = 0; p < q.size(); ++p) {
    const int64_t u = unit_of[p], c = a.unit_shared[u], j = q[p];
    if (c < 1 || c > a.prompt_lens[j])
      fail("unit_shared[", u, "] = ", c, ": expected 1 <= shared prefix <= prompt length ",
           a.prompt_lens[j], " of its sequence ", j);
  }
  for (size_t p = 0; p < q.size(); ++p) {
    const int64_t u = unit_of[p], c = a.unit_shared[u], j = q[p];
    const int64_t h = a.unit_seqs[a.unit_offsets[u]];
    if (j == h) continue;
    const int64_t t = first_mismatch(tok + a.offsets[j], tok + a.offsets[h], c);
    if (t < c)
      fail("unit_shared[", u, "] = ", c, ": the unit's sequence ", j,
           " differs from its first sequence ", h, " at token ", t,
           " (the shared prefix must be common to all of them)");
  }
}

}  // namespace

GroupPackSizes group_pack_sizes(const GroupPackArgs& a) {
  const int64_t n = a.n, U = a.num_units, k = a.k;
  const int64_t* off = a.offsets;
  check_group_sequences(a.token_count, off, a.prompt_lens, n);
  if (a.unit_offsets_len != U + 1)
    fail("unit_offsets must have len(unit_shared) + 1 = ", U + 1, " entries, got ",
         a.unit_offsets_len);
  const int64_t* uo = a.unit_offsets;
  if (uo[0] != 0) fail("unit_offsets must start at 0, got ", uo[0], " at index 0");
  for (int64_t u = 0; u < U; ++u)
    if (uo[u + 1] - uo[u] < 1)
      fail("unit_offsets must be strictly increasing (every unit holds at least one sequence): "
           "unit ", u, " has ", uo[u + 1] - uo[u]);
  if (uo[U] != a.unit_seq_count)
    fail("unit_offsets must end at len(unit_seqs) = ", a.unit_seq_count, ", got ", uo[U],
         " at index ", U);
  for (int64_t i = 0; i < a.unit_seq_count; ++i)
    if (a.unit_seqs[i] < 0 || a.unit_seqs[i] >= n)
      fail("unit_seqs must be sequence indices in [0, ", n, "), got ", a.unit_seqs[i],
           " at index ", i);
  const int64_t B = a.bounds ? a.num_batches : 1;
  if (a.bounds) {
    if (B < 0) fail("bounds must have at least 1 entry, got ", B + 1);
    if (a.bounds[0] != 0) fail("bounds must start at 0, got ", a.bounds[0], " at index 0");
    for (int64_t b = 0; b < B; ++b)
      if (a.bounds[b + 1] < a.bounds[b])
        fail("bounds must be non-decreasing, got ", a.bounds[b + 1], " at index ", b + 1,
             " after ", a.bounds[b]);
    if (a.bounds[B] != k)
      fail("bounds must end at len(unit_indices) = ", k, ", got ", a.bounds[B], " at index ", B);
  }
  for (int64_t j = 0; j < k; ++j)
    if (a.unit_indices[j] < 0 || a.unit_indices[j] >= U)
      fail("unit_indices must be in [0, ", U, "), got ", a.unit_indices[j], " at index ", j);
  if (k > 1) {
    std::vector<std::pair<int64_t, int64_t>> sorted(static_cast<size_t>(k));
    for (int64_t j = 0; j < k; ++j) sorted[size_t(j)] = {a.unit_indices[j], j};
    std::sort(sorted.begin(), sorted.end());
    for (size_t j = 0; j + 1 < sorted.size(); ++j)
      if (sorted[j].first == sorted[j + 1].first)
        fail("unit_indices must not repeat a unit, got ", sorted[j].first, " at indices ",
             sorted[j].second, " and ", sorted[j + 1].second);
  }
  // The packed sequences in packed order, each once.
  std::vector<int64_t> q, unit_of, seen(size_t(n), -1);
  for (int64_t i = 0; i < k; ++i) {
    const int64_t u = a.unit_indices[i];
    for (int64_t m = uo[u]; m < uo[u + 1]; ++m) {
      const int64_t j = a.unit_seqs[m];
      if (seen[size_t(j)] >= 0)
        fail("every sequence must be in at most one packed unit, but sequence ", j,
             " is in units ", seen[size_t(j)], " and ", u);
      seen[size_t(j)] = u;
      q.push_back(j);
      unit_of.push_back(u);
    }
  }
  if (a.token_itemsize == 4)
    check_shared_prefixes<int32_t>(a, q, unit_of);
  else
    check_shared_prefixes<int64_t>(a, q, unit_of);
  GroupPackSizes z;
  z.rows.assign(size_t(B), 0);
  z.scored.assign(size_t(B), 0);
  z.units.assign(size_t(B), 0);
  z.seqs.assign(size_t(B), 0);
  z.max_seqlen.assign(size_t(B), 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t lo = a.bounds ? a.bounds[b] : 0, hi = a.bounds ? a.bounds[b + 1] : k;
    z.units[b] = hi - lo;
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t u = a.unit_indices[i], c = a.unit_shared[u];
      int64_t len = c;
      for (int64_t m = uo[u]; m < uo[u + 1]; ++m) {
        const int64_t j = a.unit_seqs[m], L = off[j + 1] - off[j];
        len += L - c;
        z.scored[b] += L - a.prompt_lens[j];
      }
      z.seqs[b] += uo[u + 1] - uo[u];
      z.rows[b] += len;
      z.max_seqlen[b] = std::max(z.max_seqlen[b], len);
    }
  }
  for (int64_t b = 0; b < B; ++b)
    if (z.rows[b] > int64_t(std::numeric_limits<int32_t>::max()))
      fail("the micro-batch holds ", z.rows[b], " rows; cu_seqlens is int32, so at most ",
           std::numeric_limits<int32_t>::max());
  return z;
}

namespace {

template <class Tok>
void fill_groups(const GroupPackArgs& a, int64_t lo, int64_t hi, const GroupPackOut& o) {
  const Tok* tok = static_cast<const Tok*>(a.token_ids);
  const int64_t* off = a.offsets;
  int64_t row = 0, sc = 0, ns = 0;
  o.cu_seqlens[0] = 0;
  for (int64_t i = lo; i < hi; ++i) {
    const int64_t u = a.unit_indices[i], c = a.unit_shared[u], start = row;
    const Tok* head = tok + off[a.unit_seqs[a.unit_offsets[u]]];
    for (int64_t p = 0; p < c; ++p) {
      o.input_ids[row + p] = int64_t(head[p]);
      o.position_ids[row + p] = p;
    }
    row += c;
    for (int64_t m = a.unit_offsets[u]; m < a.unit_offsets[u + 1]; ++m) {
      const int64_t j = a.unit_seqs[m], L = off[j + 1] - off[j], P = a.prompt_lens[j];
      const Tok* t = tok + off[j];
      for (int64_t p = c; p < L; ++p) {
        o.input_ids[row + p - c] = int64_t(t[p]);
        o.position_ids[row + p - c] = p;
      }
      // Position v predicts token v + 1: the last prefix row when v < c (then v = c - 1),
      // else the sequence's own suffix row.
      for (int64_t v = P - 1; v < L - 1; ++v, ++sc) {
        o.rows[sc] = v < c ? start + v : row + (v - c);
        o.row_targets[sc] = int64_t(t[v + 1]);
        o.row_seq[sc] = ns;
        o.row_token[sc] = v + 1 - P;
      }
      o.seqs[ns] = j;
      o.suffix_lens[ns] = L - c;
      ++ns;
      row += L - c;
    }
    o.prefix_lens[i - lo] = c;
    o.cu_seqlens[i - lo + 1] = int32_t(row);
  }
}

}  // namespace

void group_pack_fill(const GroupPackArgs& a, int64_t batch, const GroupPackOut& o) {
  const int64_t lo = a.bounds ? a.bounds[batch] : 0, hi = a.bounds ? a.bounds[batch + 1] : a.k;
  if (a.token_itemsize == 4)
    fill_groups<int32_t>(a, lo, hi, o);
  else
    fill_groups<int64_t>(a, lo, hi, o);
}

}  // namespace r4b
