// Golden replay of the `lazyeviction` set (golden/README.md §6.8; official Window_LAZYKVCluster +
// TempCache.record_recurrence): kvevict's LazyEviction runs every decode step of a case as an engine
// would, with its trace on, and every official per-step record is checked on the way:
//   - the importance mask of every step, slot by slot (step_important);
//   - the resident length after every step (step_len);
//   - last / mri after every step where the case stores them (step_last, step_mri), before every
//     eviction (evict_pre_last, evict_pre_mri) and at the end (out_last_l*, out_mri_l*);
//   - the eviction steps (evict_steps), the scores the official top-k ranked (evict_scores) and the
//     kept set: identical, or valid under the tie-aware rule of README §5.7 when the official
//     top-k broke an exact tie at the k-th score.
// Teacher forcing (README §5.7 recipe): after a tie-valid selection that differs from the official
// one, the tied entries are swapped for the official choice (K/V rows, position and state written
// through the backend), so one arbitrary tie does not make the rest of the trace diverge.
//
// fp32 cases observe the stored queries (kvevict computes the probabilities). fp16 cases
// (fp16_compat) observe probabilities this replay computes with the case's bit-exact recipe
// (fp16 logits, fp32 softmax), as an fp16 engine would hand them over; the policy then rounds
// them to fp16 and keeps its state in fp16 (LazyEvictionConfig::fp16_compat).
#pragma once

// replay.hpp declares replay_lazyeviction for its dispatch table and includes this file at its end;
// including this file first works too (replay.hpp's own include of it is then a no-op).
#include "golden/replay.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "kvevict/core/recurrence.hpp"
#include "kvevict/policies/lazy_eviction.hpp"

namespace kvevict::golden {

// What the replay compared, and how much of it matched.
struct LazyEvictionParity {
  std::int64_t steps = 0;  // decode steps replayed (each over every layer)
  std::int64_t event_checks = 0, event_mismatches = 0;  // (step, layer, head, slot) importance decisions
  std::int64_t state_checks = 0, state_mismatches = 0;  // last and mri values (per step, pre-eviction, final)
  std::int64_t len_checks = 0, len_mismatches = 0;      // resident length after each step
  std::int64_t official_evictions = 0;                  // (step, layer) evictions of the official run
  std::int64_t eviction_step_mismatches = 0;            // an eviction on one side only
  std::int64_t score_checks = 0, score_mismatches = 0;  // scores the official top-k ranked
  double max_score_rel_error = 0.0;
  std::int64_t selections = 0;            // (eviction, layer, head) selections
  std::int64_t selections_identical = 0;  // kept set == official kept set
  std::int64_t selections_tie_valid = 0;  // a different choice among entries tied at the k-th score
  std::int64_t selections_invalid = 0;
  std::int64_t boundary_ties = 0;   // official selections with more tied entries than places
  std::int64_t teacher_forced = 0;  // selections replaced by the official one to continue
  std::int64_t final_checks = 0, final_mismatches = 0;  // final keep set and K/V rows
  std::vector<std::string> messages;                    // the first mismatches, for diagnostics

  [[nodiscard]] bool ok() const noexcept {
    return event_mismatches == 0 && state_mismatches == 0 && len_mismatches == 0 && eviction_step_mismatches == 0 &&
           score_mismatches == 0 && selections_invalid == 0 && final_mismatches == 0;
  }
  [[nodiscard]] std::string summary() const {
    std::ostringstream os;
    os << steps << " steps; events " << event_checks - event_mismatches << "/" << event_checks << "; last/mri "
       << state_checks - state_mismatches << "/" << state_checks << "; lengths " << len_checks - len_mismatches << "/"
       << len_checks << "; evictions " << official_evictions << " (step mismatches " << eviction_step_mismatches
       << "); scores " << score_checks - score_mismatches << "/" << score_checks << " (max rel err "
       << max_score_rel_error << "); selections " << selections << ": identical " << selections_identical
       << ", tie-valid " << selections_tie_valid << ", invalid " << selections_invalid << "; boundary ties "
       << boundary_ties << ", teacher-forced " << teacher_forced << "; final " << final_checks - final_mismatches
       << "/" << final_checks;
    return os.str();
  }
};

struct LazyEvictionReplay {
  ReplayResult result;
  LazyEvictionParity parity;
};

namespace lazy_impl {

using impl::Obs;

constexpr double kScoreRelTolerance = 1e-5;  // README §5.8: fp32 reductions in another order
constexpr std::size_t kMaxMessages = 20;

inline void note(LazyEvictionParity& p, const std::string& what) {
  if (p.messages.size() < kMaxMessages) p.messages.push_back(what);
}

inline bool close(double ours, double official) {
  if (ours == official) return true;  // also equal infinities
  return std::abs(ours - official) <= kScoreRelTolerance * std::max(std::abs(ours), std::abs(official));
}

// A [.., width] array's row as a list, -1 padding dropped.
template <class T>
std::vector<T> row(const std::vector<T>& data, std::int64_t width, std::int64_t index, std::int64_t count = -1) {
  std::vector<T> out;
  const std::int64_t n = count >= 0 ? count : width;
  for (std::int64_t i = 0; i < n; ++i) out.push_back(data[static_cast<std::size_t>(index * width + i)]);
  return out;
}
inline std::vector<std::int64_t> unpadded(const std::vector<std::int64_t>& data, std::int64_t width,
                                          std::int64_t index) {
  std::vector<std::int64_t> out;
  for (std::int64_t i = 0; i < width; ++i) {
    const std::int64_t v = data[static_cast<std::size_t>(index * width + i)];
    if (v >= 0) out.push_back(v);
  }
  return out;
}

// The official fp16 probabilities of one query over the cache's keys in slot order (README §6.8
// recipe): logit = f16(f16(dot_f32(q, k)) * f32(1/sqrt(D))), p = softmax_f32(logit).
inline void fp16_probs(const float* q, const std::vector<float>& keys, std::int64_t n, std::int64_t d, float* out) {
  const auto inv_sqrt_d = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  float mx = -std::numeric_limits<float>::infinity();
  for (std::int64_t j = 0; j < n; ++j) {
    float dot = 0.0f;
    for (std::int64_t e = 0; e < d; ++e) dot += q[e] * keys[static_cast<std::size_t>(j * d + e)];
    out[j] = round_to_fp16(round_to_fp16(dot) * inv_sqrt_d);
    mx = std::max(mx, out[j]);
  }
  float sum = 0.0f;
  for (std::int64_t j = 0; j < n; ++j) sum += (out[j] = std::exp(out[j] - mx));
  const float inv = 1.0f / sum;
  for (std::int64_t j = 0; j < n; ++j) out[j] *= inv;
}

// The case's official per-step and per-eviction records.
struct Records {
  std::int64_t L = 0, H = 0, P = 0, T = 0, B = 0, W = 0, D = 0;
  bool fp16 = false, per_step_state = false;
  std::vector<std::uint8_t> important;  // [T, L, H, imp_w]
  std::int64_t imp_w = 0;
  std::vector<std::int64_t> step_len;  // [T, L]
  std::vector<float> step_last, step_mri;  // [T, L, H, st_w]
  std::vector<std::int64_t> step_tokens;   // [T, L, H, st_w]
  std::int64_t st_w = 0;
  std::vector<std::int64_t> evict_steps;  // [E]
  std::vector<std::int64_t> pre_tokens;   // [E, L, H, pre_w]
  std::vector<float> pre_last, pre_mri;   // [E, L, H, pre_w]
  std::int64_t pre_w = 0;
  std::vector<float> scores;  // [E, L, H, pre_w - W]
  std::int64_t score_w = 0;
  std::vector<std::int64_t> keep_tokens;  // [E, L, H, B] official order
  std::vector<std::int64_t> tie_info;     // [E, L, H, 3]
};

inline Records load_records(const GoldenCase& c, const impl::Shapes& s) {
  using namespace impl;
  Records r;
  r.L = s.layers;
  r.H = s.q_heads;
  r.D = s.head_dim;
  r.P = get_int(c, "hyperparameters", "prompt_len");
  r.T = get_int(c, "hyperparameters", "decode_steps");
  r.B = get_int(c, "hyperparameters", "max_kv_capacity");
  r.W = get_int(c, "hyperparameters", "obs_size");
  if (r.P <= 0 || r.T <= 0 || r.P + r.T != s.seq_len) io_fail(c, "needs prompt_len + decode_steps == seq_len");
  if (get_int(c, "hyperparameters", "decoding_recent_size") != r.W)
    unsupported(c, "decoding_recent_size != obs_size (evaluation.py always sets them equal)");
  const auto fp16 = c.params.find("fp16_compat");
  r.fp16 = fp16 != c.params.end() && fp16->is_boolean() && fp16->get<bool>();
  const auto pss = c.params.find("per_step_state");
  r.per_step_state = pss != c.params.end() && pss->is_boolean() && pss->get<bool>();

  const NpyArray imp = load(c, "step_important");
  if (imp.dtype != "|u1" || imp.shape.size() != 4 || imp.shape[0] != r.T || imp.shape[1] != r.L || imp.shape[2] != r.H)
    io_fail(c, "step_important.npy must be uint8 [T, layers, q_heads, n]");
  r.imp_w = imp.shape[3];
  r.important = imp.as<std::uint8_t>();
  r.step_len = load_i64(c, "step_len", {r.T, r.L});
  if (r.per_step_state) {
    const auto shape = file_shape(c, "step_last");
    if (!shape || shape->size() != 4) io_fail(c, "per_step_state without a step_last shape in params.json");
    r.st_w = (*shape)[3];
    r.step_last = load_f32(c, "step_last", *shape);
    r.step_mri = load_f32(c, "step_mri", *shape);
    r.step_tokens = load_i64(c, "step_slot_tokens", *shape);
  }
  if (c.has("evict_steps")) {
    const NpyArray e = load(c, "evict_steps");
    if (e.dtype != "<i8" || e.shape.size() != 1) io_fail(c, "evict_steps.npy must be int64 [E]");
    const std::int64_t E = e.shape[0];
    r.evict_steps = e.as<std::int64_t>();
    const auto pre = file_shape(c, "evict_pre_tokens");
    const auto sc = file_shape(c, "evict_scores");
    if (!pre || pre->size() != 4 || !sc || sc->size() != 4) io_fail(c, "eviction records lack their shapes");
    r.pre_w = (*pre)[3];
    r.score_w = (*sc)[3];
    r.pre_tokens = load_i64(c, "evict_pre_tokens", {E, r.L, r.H, r.pre_w});
    r.pre_last = load_f32(c, "evict_pre_last", {E, r.L, r.H, r.pre_w});
    r.pre_mri = load_f32(c, "evict_pre_mri", {E, r.L, r.H, r.pre_w});
    r.scores = load_f32(c, "evict_scores", {E, r.L, r.H, r.score_w});
    r.keep_tokens = load_i64(c, "evict_keep_tokens", {E, r.L, r.H, r.B});
    r.tie_info = load_i64(c, "evict_tie_info", {E, r.L, r.H, 3});
  }
  return r;
}

// Per-position view of one snapshot.
struct ByPosition {
  std::map<std::int64_t, std::size_t> slot;  // position -> index into the snapshot
};
inline ByPosition index_positions(const std::vector<std::int32_t>& positions) {
  ByPosition b;
  for (std::size_t i = 0; i < positions.size(); ++i) b.slot[positions[i]] = i;
  return b;
}

// Compares last/mri of the entries at `official_positions` with kvevict's snapshot.
inline void compare_state(LazyEvictionParity& p, const std::string& where, const RecurrenceSnapshot& ours,
                          const std::vector<std::int64_t>& official_positions, const std::vector<float>& last,
                          const std::vector<float>& mri) {
  const ByPosition at = index_positions(ours.positions);
  for (std::size_t i = 0; i < official_positions.size(); ++i) {
    p.state_checks += 2;
    const auto it = at.slot.find(official_positions[i]);
    if (it == at.slot.end()) {
      p.state_mismatches += 2;
      note(p, where + ": position " + std::to_string(official_positions[i]) + " is not resident in kvevict");
      continue;
    }
    const float ol = ours.last[it->second], om = ours.mri[it->second];
    if (ol != last[i] || om != mri[i]) {
      p.state_mismatches += (ol != last[i]) + (om != mri[i]);
      note(p, where + ": position " + std::to_string(official_positions[i]) + " last/mri " + std::to_string(ol) + "/" +
                  std::to_string(om) + ", official " + std::to_string(last[i]) + "/" + std::to_string(mri[i]));
    }
  }
}

// Writes token `pos` (K/V from the inputs, state from the official records) into `slot` of
// (layer, head): the teacher-forcing swap. Goes through the backend, so it works on any.
template <class Cache, class Policy>
void force_slot(Cache& cache, Policy& policy, const impl::KVInputs& in, std::int64_t layer, std::int64_t head,
                std::int64_t slot, std::int64_t pos, float last, float mri) {
  auto v = cache.view(layer);
  auto& b = cache.backend();
  const std::int64_t d = v.head_dim;
  b.copy_from_host(in.key(layer, head, pos), v.key(head, slot), d);
  b.copy_from_host(in.value(layer, head, pos), v.value(head, slot), d);
  const auto p32 = static_cast<std::int32_t>(pos);
  b.copy_from_host(&p32, v.head_positions(head) + slot, 1);
  const auto extras = policy.scorer().extras(layer);  // [0] = last, [1] = mri
  b.copy_from_host(&last, extras[0].data + head * v.capacity + slot, 1);
  b.copy_from_host(&mri, extras[1].data + head * v.capacity + slot, 1);
}

}  // namespace lazy_impl

// Replays one lazyeviction case, checking every official record on the way (see the file header).
template <class Cache>
LazyEvictionReplay replay_lazyeviction_checked(const GoldenCase& c) {
  using namespace impl;
  using namespace lazy_impl;
  LazyEvictionReplay out;
  out.result = new_result(c, "lazyeviction");
  ReplayResult& res = out.result;
  LazyEvictionParity& par = out.parity;

  Shapes s = read_shapes(c);
  // The official forwards repeat_kv before the cache update, so the inputs hold one row set per
  // query head: the faithful layout is a cache with one kv-head per q-head (decision 3).
  Shapes qs = s;
  qs.kv_heads = s.q_heads;
  qs.groups = 1;
  const Records rec = load_records(c, s);
  const std::int64_t L = rec.L, H = rec.H, P = rec.P, T = rec.T, B = rec.B, W = rec.W, D = rec.D;
  const KVInputs in = load_kv(c, qs, false);
  const auto head_map = cache_head_map(c, qs, false);
  const auto queries = load_f32(c, "queries", {L, 1, H, T, D});

  Cache cache(CacheShape{L, H, H, D, std::max(P + T, B + W)});
  LazyEviction<Cache> policy(cache,
                             LazyEvictionConfig{.budget = B,
                                                .window = W,
                                                .alpha = static_cast<float>(get_double(c, "hyperparameters", "alpha")),
                                                .group_event = GroupEventRule::any,
                                                .fp16_compat = rec.fp16,
                                                .trace = true});
  for (std::int64_t l = 0; l < L; ++l) {
    append_tokens(cache, l, in, head_map, 0, P);
    policy.on_prefill(cache, l, Obs<Cache>::none());
  }

  // The official cache's slot order per (layer, head): the previous step's order plus the new
  // token, replaced by evict_keep_tokens at an eviction. step_important and the per-step state
  // are indexed by it.
  std::vector<std::vector<std::vector<std::int64_t>>> order(
      static_cast<std::size_t>(L), std::vector<std::vector<std::int64_t>>(static_cast<std::size_t>(H)));
  for (auto& layer : order)
    for (auto& head : layer)
      for (std::int64_t p = 0; p < P; ++p) head.push_back(p);

  std::size_t next_eviction = 0;
  std::vector<float> probs;
  for (std::int64_t t = 1; t <= T; ++t) {
    ++par.steps;
    const std::int64_t new_pos = P + t - 1;
    const bool official_evicts = next_eviction < rec.evict_steps.size() && rec.evict_steps[next_eviction] == t;
    const auto e = static_cast<std::int64_t>(next_eviction);
    for (std::int64_t l = 0; l < L; ++l) {
      const std::string at = "step " + std::to_string(t) + " layer " + std::to_string(l);
      append_tokens(cache, l, in, head_map, new_pos, 1);
      std::vector<float> q(static_cast<std::size_t>(H * D));
      for (std::int64_t h = 0; h < H; ++h)
        std::copy_n(queries.begin() + ((l * H + h) * T + (t - 1)) * D, D, q.begin() + h * D);
      if (rec.fp16) {
        const std::int64_t n = cache.len(l, 0);
        probs.assign(static_cast<std::size_t>(H * n), 0.0f);
        for (std::int64_t h = 0; h < H; ++h)
          fp16_probs(q.data() + h * D, cache.keys(l, h), n, D, probs.data() + h * n);
        Uploaded<Cache> dp(cache, probs);
        policy.on_decode(cache, l, Obs<Cache>::from_probs(dp.span(), 1, n));
      } else {
        Uploaded<Cache> dq(cache, q);
        policy.on_decode(cache, l, Obs<Cache>::from_queries(dq.span(), 1));
      }

      // Importance events, compared through positions (the slot orders differ).
      for (std::int64_t h = 0; h < H; ++h) {
        auto& off = order[static_cast<std::size_t>(l)][static_cast<std::size_t>(h)];
        off.push_back(new_pos);
        const RecurrenceSnapshot ev = policy.scorer().last_events(l, h);
        const ByPosition ours = index_positions(ev.positions);
        if (ev.step != t || ours.slot.size() != off.size()) {
          par.event_mismatches += static_cast<std::int64_t>(off.size());
          note(par, at + " head " + std::to_string(h) + ": kvevict tracked " + std::to_string(ours.slot.size()) +
                        " entries at step " + std::to_string(ev.step) + ", the official code " +
                        std::to_string(off.size()));
          continue;
        }
        for (std::size_t i = 0; i < off.size(); ++i) {
          ++par.event_checks;
          const auto it = ours.slot.find(off[i]);
          const std::uint8_t want =
              rec.important[static_cast<std::size_t>(((t - 1) * L + l) * H + h) * static_cast<std::size_t>(rec.imp_w) +
                            i];
          if (it == ours.slot.end() || ev.events[it->second] != want) {
            ++par.event_mismatches;
            note(par, at + " head " + std::to_string(h) + ": event of position " + std::to_string(off[i]) +
                          (it == ours.slot.end() ? " missing" : " differs (official " + std::to_string(want) + ")"));
          }
        }
      }

      // Eviction: the step, the inputs of the selection, the kept set; then teacher forcing.
      const bool ours_evicts = policy.scorer().last_eviction(l, 0).step == t;
      if (ours_evicts != official_evicts) {
        ++par.eviction_step_mismatches;
        note(par, at + ": kvevict " + (ours_evicts ? "evicted" : "did not evict") + ", the official code " +
                      (official_evicts ? "did" : "did not"));
      }
      if (official_evicts) {
        ++par.official_evictions;
        for (std::int64_t h = 0; h < H; ++h) {
          const std::string ah = at + " head " + std::to_string(h);
          const std::int64_t ix = (e * L + l) * H + h;
          const auto pre = unpadded(rec.pre_tokens, rec.pre_w, ix);
          const auto n_pre = static_cast<std::int64_t>(pre.size());
          const auto off_last = row(rec.pre_last, rec.pre_w, ix, n_pre);
          const auto off_mri = row(rec.pre_mri, rec.pre_w, ix, n_pre);
          const auto off_scores = row(rec.scores, rec.score_w, ix, n_pre - W);
          const auto want_keep = row(rec.keep_tokens, B, ix);
          const auto tie = row(rec.tie_info, 3, ix);
          if (tie[1] > tie[2]) ++par.boundary_ties;
          if (ours_evicts) {
            const RecurrenceSnapshot snap = policy.scorer().last_eviction(l, h);
            compare_state(par, ah + " before eviction", snap, pre, off_last, off_mri);
            const ByPosition sp = index_positions(snap.positions);
            for (std::int64_t i = 0; i < n_pre - W; ++i) {
              ++par.score_checks;
              const auto it = sp.slot.find(pre[static_cast<std::size_t>(i)]);
              const double official = off_scores[static_cast<std::size_t>(i)];
              const double ours = it == sp.slot.end() ? std::nan("") : snap.scores[it->second];
              if (!close(ours, official)) {
                ++par.score_mismatches;
                note(par, ah + ": score of position " + std::to_string(pre[static_cast<std::size_t>(i)]) + " " +
                              std::to_string(ours) + ", official " + std::to_string(official));
              } else if (ours != official) {
                par.max_score_rel_error = std::max(
                    par.max_score_rel_error, std::abs(ours - official) / std::max(std::abs(ours), std::abs(official)));
              }
            }
          }
          // kvevict's kept set against the official one, tie-aware on the official scores.
          ++par.selections;
          const auto kept32 = cache.kept_positions(l, h);
          const std::set<std::int64_t> ours_kept(kept32.begin(), kept32.end());
          const std::set<std::int64_t> official_kept(want_keep.begin(), want_keep.end());
          if (ours_kept == official_kept) {
            ++par.selections_identical;
          } else {
            std::map<std::int64_t, std::int64_t> pre_index;
            for (std::int64_t i = 0; i < n_pre; ++i) pre_index[pre[static_cast<std::size_t>(i)]] = i;
            std::vector<std::int64_t> chosen;
            bool recent_kept = true, known = true;
            for (std::int64_t i = n_pre - W; i < n_pre; ++i)
              recent_kept &= ours_kept.count(pre[static_cast<std::size_t>(i)]) == 1;
            for (std::int64_t p : ours_kept) {
              const auto it = pre_index.find(p);
              if (it == pre_index.end()) known = false;
              else if (it->second < n_pre - W) chosen.push_back(it->second);
            }
            if (known && recent_kept && test::keep_sets_equal_tie_aware(off_scores, chosen, B - W)) {
              ++par.selections_tie_valid;
            } else {
              ++par.selections_invalid;
              note(par, ah + ": kvevict's kept set is not a valid top-(B - W) of the official scores");
            }
            // Teacher forcing: official-only tokens take the slots of kvevict-only tokens.
            const auto slots = cache.positions(l, h);
            std::vector<std::int64_t> ours_only, official_only;
            std::set_difference(ours_kept.begin(), ours_kept.end(), official_kept.begin(), official_kept.end(),
                                std::back_inserter(ours_only));
            std::set_difference(official_kept.begin(), official_kept.end(), ours_kept.begin(), ours_kept.end(),
                                std::back_inserter(official_only));
            if (ours_only.size() != official_only.size()) io_fail(c, ah + ": kept counts differ; cannot teacher-force");
            for (std::size_t k = 0; k < ours_only.size(); ++k) {
              const auto slot =
                  std::find(slots.begin(), slots.end(), static_cast<std::int32_t>(ours_only[k])) - slots.begin();
              const auto i = static_cast<std::size_t>(pre_index.at(official_only[k]));
              force_slot(cache, policy, in, l, h, slot, official_only[k], off_last[i], off_mri[i]);
            }
            ++par.teacher_forced;
          }
          order[static_cast<std::size_t>(l)][static_cast<std::size_t>(h)] = want_keep;
        }
      }

      // Resident length, and the full per-step state where the case stores it.
      for (std::int64_t h = 0; h < H; ++h) {
        ++par.len_checks;
        if (cache.len(l, h) != rec.step_len[static_cast<std::size_t>((t - 1) * L + l)]) {
          ++par.len_mismatches;
          note(par, at + " head " + std::to_string(h) + ": " + std::to_string(cache.len(l, h)) +
                        " resident entries, official " +
                        std::to_string(rec.step_len[static_cast<std::size_t>((t - 1) * L + l)]));
        }
        if (rec.per_step_state) {
          const std::int64_t ix = ((t - 1) * L + l) * H + h;
          const auto tokens = unpadded(rec.step_tokens, rec.st_w, ix);
          const auto n = static_cast<std::int64_t>(tokens.size());
          compare_state(par, at + " head " + std::to_string(h) + " after the step", policy.scorer().state(cache, l, h),
                        tokens, row(rec.step_last, rec.st_w, ix, n), row(rec.step_mri, rec.st_w, ix, n));
        }
      }
    }
    if (official_evicts) ++next_eviction;
  }

  record_keep(cache, res);
  record_kv(c, cache, res, false);
  // Final kept sets against keep_indices.npy [layer, head, n] (ascending, -1 padded).
  if (const auto ks = file_shape(c, "keep_indices"); ks && ks->size() == 3) {
    const auto official = load_i64(c, "keep_indices", *ks);
    for (std::int64_t l = 0; l < L; ++l)
      for (std::int64_t h = 0; h < H; ++h) {
        ++par.final_checks;
        if (unpadded(official, (*ks)[2], l * H + h) !=
            res.keep[static_cast<std::size_t>(l)][static_cast<std::size_t>(h)]) {
          ++par.final_mismatches;
          note(par, "final layer " + std::to_string(l) + " head " + std::to_string(h) +
                        ": kept set differs from keep_indices");
        }
      }
  } else {
    io_fail(c, "keep_indices.npy must be [layers, heads, n]");
  }
  // Final state: out_last_l{l} / out_mri_l{l} [1, heads, n] in ascending position order, and the
  // official final state (official slot order, out_positions) compared through positions.
  const auto out_pos_shape = file_shape(c, "out_positions");
  const auto out_pos = out_pos_shape ? load_i64(c, "out_positions", *out_pos_shape) : std::vector<std::int64_t>{};
  for (std::int64_t l = 0; l < L; ++l) {
    const std::int64_t n = cache.len(l, 0);
    OutputTensor last{{1, H, n}, std::vector<float>(static_cast<std::size_t>(H * n))};
    OutputTensor mri{{1, H, n}, std::vector<float>(static_cast<std::size_t>(H * n))};
    const std::string ls = std::to_string(l);
    const auto off_last = load_f32(c, "out_last_l" + ls, *file_shape(c, "out_last_l" + ls));
    const auto off_mri = load_f32(c, "out_mri_l" + ls, *file_shape(c, "out_mri_l" + ls));
    const std::int64_t off_n = (*file_shape(c, "out_last_l" + ls))[2];
    for (std::int64_t h = 0; h < H; ++h) {
      const RecurrenceSnapshot st = policy.scorer().state(cache, l, h);
      const auto ord = positional_order(st.positions);
      for (std::int64_t i = 0; i < n; ++i) {
        last.data[static_cast<std::size_t>(h * n + i)] = st.last[ord[static_cast<std::size_t>(i)]];
        mri.data[static_cast<std::size_t>(h * n + i)] = st.mri[ord[static_cast<std::size_t>(i)]];
      }
      if (!out_pos_shape || (*out_pos_shape)[2] != off_n) io_fail(c, "out_positions disagrees with out_last_l" + ls);
      const std::int64_t ix = l * H + h;
      const auto positions = unpadded(out_pos, off_n, ix);
      compare_state(par, "final layer " + ls + " head " + std::to_string(h), st, positions,
                    row(off_last, off_n, h, static_cast<std::int64_t>(positions.size())),
                    row(off_mri, off_n, h, static_cast<std::int64_t>(positions.size())));
    }
    res.tensors["out_last_l" + ls] = std::move(last);
    res.tensors["out_mri_l" + ls] = std::move(mri);
  }
  return out;
}

// The dispatcher's entry: the checked replay, which throws InvariantError when any official record
// disagrees beyond exact ties (the message lists the first disagreements).
template <class Cache>
ReplayResult replay_lazyeviction(const GoldenCase& c) {
  LazyEvictionReplay r = replay_lazyeviction_checked<Cache>(c);
  if (!r.parity.ok()) {
    std::string msg = "kvevict-replay: " + r.result.case_id + ": parity failed: " + r.parity.summary();
    for (const auto& m : r.parity.messages) msg += "\n  " + m;
    throw InvariantError(msg);
  }
  return std::move(r.result);
}

}  // namespace kvevict::golden
