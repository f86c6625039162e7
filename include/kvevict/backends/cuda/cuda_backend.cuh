// CUDA backend: every primitive of core/backend.hpp as kernels (detail/*.cuh) queued on the
// stream the backend was constructed with. Results match CpuBackend: selections exactly (same
// tie rules), floats within fp32 rounding (bit for bit where the operation order is the same:
// append, column sums from probabilities, group_reduce, compaction, replacement, rotation).
// Workspace is sized once by reserve(); no primitive allocates afterwards.
//
// Synchronisation: a primitive returns once its kernels are queued, except where the host needs
// a result: all_finite (the answer), select_topk (the protected counts behind its BudgetError),
// replace_with_last (the victims, validated before anything moves, as on the CPU), head_budgets
// (the per-head counts, computed on the host once per layer), evict_one (its verdict, unless
// defer_step_errors(true)), and the two copies. Those synchronise this backend's stream only,
// never the device.
//
// Host memory: LayerView::lens, fresh_from and keep_count are host arrays, as the concept says;
// they reach the kernels by value (at most kMaxKvHeads kv-heads per layer). Every other pointer
// must be device (or managed) memory; append and all_finite check theirs and throw DeviceError.
// A backend object is not thread-safe: its workspace is shared by its calls.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvevict/backends/cuda/cuda_check.cuh"
#include "kvevict/backends/cuda/detail/append.cuh"
#include "kvevict/backends/cuda/detail/attend_evict.cuh"
#include "kvevict/backends/cuda/detail/attention.cuh"
#include "kvevict/backends/cuda/detail/column_sums.cuh"
#include "kvevict/backends/cuda/detail/decode_evict.cuh"
#include "kvevict/backends/cuda/detail/device_layer.cuh"
#include "kvevict/backends/cuda/detail/finite.cuh"
#include "kvevict/backends/cuda/detail/group_reduce.cuh"
#include "kvevict/backends/cuda/detail/move_slots.cuh"
#include "kvevict/backends/cuda/detail/rotate.cuh"
#include "kvevict/backends/cuda/detail/select.cuh"
#include "kvevict/backends/cuda/detail/window_scoring.cuh"
#include "kvevict/backends/cuda/device_buffer.cuh"
#include "kvevict/core/backend.hpp"
#include "kvevict/core/error.hpp"
#include "kvevict/core/layer_view.hpp"
#include "kvevict/core/memory_space.hpp"
#include "kvevict/core/plan.hpp"
#include "kvevict/core/rope.hpp"
#include "kvevict/core/shape.hpp"

namespace kvevict {

class CudaBackend {
 public:
  using memory_space = CudaSpace;
  template <class U>
  using Buffer = cuda::DeviceBuffer<U>;

  // Most kv-heads per layer (per-head host arrays travel by value in kernel parameters).
  static constexpr std::int64_t kMaxKvHeads = cuda::detail::kMaxKvHeads;
  // Query blocks up to this size take the per-query path of accumulate_query_column_sums
  // (warp-per-key logits + one softmax block per q-head); larger ones the tiled two-pass path.
  static constexpr std::int64_t kSmallQueryBatch = 16;
  // Floats of the bounce buffer through which copy_within moves overlapping ranges.
  static constexpr std::int64_t kCopyBounceFloats = std::int64_t{1} << 16;

  // Every kernel and copy runs on `stream` (0: the legacy default stream). Does not allocate and
  // needs no device; reserve() does both.
  explicit CudaBackend(cudaStream_t stream = nullptr) noexcept : stream_(stream) {}
  // A copy shares the stream and gets its own workspace of the same size (allocates).
  CudaBackend(const CudaBackend& other) : stream_(other.stream_) { grow_workspace(other.sizes_); }
  CudaBackend& operator=(const CudaBackend& other) {
    if (this != &other) {
      CudaBackend copy(other);
      *this = std::move(copy);
    }
    return *this;
  }
  CudaBackend(CudaBackend&&) noexcept = default;
  CudaBackend& operator=(CudaBackend&&) noexcept = default;
  ~CudaBackend() = default;

  [[nodiscard]] const char* name() const noexcept { return "cuda"; }
  [[nodiscard]] cudaStream_t stream() const noexcept { return stream_; }

  // n zeroed elements of device memory (zeroed on this backend's stream). Allocates.
  template <class U>
  [[nodiscard]] Buffer<U> allocate(std::int64_t n) const {
    return Buffer<U>(n, stream_);
  }
  // Device -> host, ordered after the work queued on the stream; returns when dst is written.
  template <class U>
  void copy_to_host(const U* src, U* dst, std::int64_t n) const {
    copy(dst, src, n, cudaMemcpyDeviceToHost, "CudaBackend::copy_to_host");
  }
  // Host -> device; returns when src may be reused.
  template <class U>
  void copy_from_host(const U* src, U* dst, std::int64_t n) const {
    copy(dst, src, n, cudaMemcpyHostToDevice, "CudaBackend::copy_from_host");
  }

  // Sizes the workspace every primitive may need for layers of this shape; grows, never
  // shrinks. Allocates; call once per shape (KVCache does, at construction).
  void reserve(const CacheShape& shape) {
    shape.check("CudaBackend::reserve");
    cuda::detail::check_kv_heads("CudaBackend::reserve", shape.num_kv_heads);
    Sizes need;
    need.compact_items = shape.num_kv_heads * shape.capacity;  // work items of one slot at the least
    need.evict_partials = shape.num_kv_heads * cuda::detail::ceil_div(shape.capacity, cuda::detail::kEvictChunk);
    need.attend_partials =
        shape.num_kv_heads * cuda::detail::ceil_div(shape.capacity, cuda::detail::kScoreChunk<cuda::detail::kAttendThreads>);
    need.logits = shape.num_q_heads * shape.capacity;
    need.stats = 2 * shape.num_q_heads * shape.capacity;
    need.partial = shape.num_q_heads * cuda::detail::ceil_div(shape.capacity, cuda::detail::kAttendChunk) * shape.head_dim;
    need.window_probs = cuda::detail::window_workspace_floats(shape.num_q_heads, shape.capacity);
    need.bounce = kCopyBounceFloats;
    need.host_layer = shape.num_kv_heads * shape.capacity;
    grow_workspace(need);
  }

  // True when none of the n floats at p (device memory) is NaN or +-Inf. Synchronises the stream:
  // the answer is a host value. Throws DeviceError for a host pointer.
  [[nodiscard]] bool all_finite(const float* p, std::int64_t n) {
    constexpr const char* where = "CudaBackend::all_finite";
    if (n <= 0) return true;
    cuda::require_device_pointer(where, "p", p);
    ensure_status();
    cuda::detail::launch_all_finite({p, n, status_.data()}, stream_);
    read_status(1, where);
    return host_status_.data()[0] == 0;
  }

  // Writes [kv_head, token, head_dim] source rows (device memory) to slots lens[h] ..
  // lens[h]+num_tokens-1 with positions first_pos ... Precondition: they fit the capacity
  // (KVCache checks). Throws DeviceError for host sources, before anything is written.
  void append(const LayerView<float>& v, const float* keys, const float* values, std::int64_t num_tokens,
              std::int64_t first_pos) const {
    constexpr const char* where = "CudaBackend::append";
    if (num_tokens <= 0) return;
    cuda::require_device_pointer(where, "keys", keys);
    cuda::require_device_pointer(where, "values", values);
    cuda::detail::launch_append({cuda::detail::make_device_layer(where, v), keys, values, num_tokens, first_pos}, stream_);
  }

  // probs[qh, j] = softmax_j(q[qh] . K[qh/G, j] * scale) over the live slots, fp32. q: [q_head,
  // head_dim]; probs: [q_head, capacity]; slots >= len are untouched.
  void attention_probs(const LayerView<float>& v, const float* q, float scale, float* probs) const {
    constexpr const char* where = "CudaBackend::attention_probs";
    const auto layer = cuda::detail::make_device_layer(where, v);
    cuda::detail::launch_group_logits({layer, q, v.head_dim, scale, INT64_MAX, probs, v.capacity}, stream_, where);
    cuda::detail::launch_softmax_rows({layer, probs, v.capacity, nullptr, 0, {}, false, nullptr, 0}, stream_, where);
  }

  // Reference attention: out[qh] = sum_j probs[qh, j] V[qh/G, j]; probs_ws receives the
  // probabilities. out: [q_head, head_dim] (zero for an empty head). Precondition: reserve()
  // covered this capacity and head_dim.
  void attend(const LayerView<float>& v, const float* q, float scale, float* probs_ws, float* out) {
    constexpr const char* where = "CudaBackend::attend";
    const auto layer = cuda::detail::make_device_layer(where, v);
    const std::int64_t max_chunks = partial_.size() / (v.num_q_heads * v.head_dim);
    require_workspace(where, "attend partial sums", cuda::detail::ceil_div(layer.max_len, cuda::detail::kAttendChunk),
                      max_chunks);
    attention_probs(v, q, scale, probs_ws);
    cuda::detail::launch_attend({layer, probs_ws, v.capacity, partial_.data(), max_chunks, out},
                                stream_);
  }

  // scores[qh, j] = (j < fresh_from[kv] ? scores[qh, j] : 0) + sum_i probs[qh, i, j] for the live
  // slots, summed in query order (bit-identical to the CPU backend). probs: [q_head, num_queries,
  // probs_stride]; scores: [q_head, capacity]; fresh_from: host [kv_head].
  void accumulate_column_sums(const LayerView<float>& v, const float* probs, std::int64_t num_queries,
                              std::int64_t probs_stride, float* scores, const std::int64_t* fresh_from) const {
    constexpr const char* where = "CudaBackend::accumulate_column_sums";
    const auto layer = cuda::detail::make_device_layer(where, v);
    cuda::detail::launch_prob_column_sums(
        {layer, probs, std::max<std::int64_t>(num_queries, 0), probs_stride, scores, clamp_fresh(v, fresh_from)}, stream_,
        where);
  }

  // The same accumulation from queries [q_head, num_queries, head_dim]: query i (position
  // first_pos + i) sees the keys whose position <= first_pos + i; a query that sees no key adds
  // nothing. Never materialises num_queries x len: small blocks go query by query through a
  // [q_head, capacity] logits workspace, larger ones through the tiled two-pass kernels.
  void accumulate_query_column_sums(const LayerView<float>& v, const float* queries, std::int64_t num_queries,
                                    std::int64_t first_pos, float scale, float* scores,
                                    const std::int64_t* fresh_from) {
    constexpr const char* where = "CudaBackend::accumulate_query_column_sums";
    const auto layer = cuda::detail::make_device_layer(where, v);
    const auto fresh = clamp_fresh(v, fresh_from);
    if (num_queries <= 0) {  // only the fresh slots are reset
      cuda::detail::launch_prob_column_sums({layer, nullptr, 0, 0, scores, fresh}, stream_, where);
      return;
    }
    if (num_queries <= kSmallQueryBatch) {
      require_workspace(where, "logits", v.num_q_heads * v.capacity, logits_.size());
      for (std::int64_t i = 0; i < num_queries; ++i) {
        cuda::detail::launch_group_logits({layer, queries + i * v.head_dim, num_queries * v.head_dim, scale,
                                           first_pos + i, logits_.data(), v.capacity},
                                          stream_, where);
        cuda::detail::launch_softmax_rows({layer, logits_.data(), v.capacity, scores, v.capacity, fresh, i == 0, nullptr, 0},
                                          stream_, where);
      }
      return;
    }
    const std::int64_t stats_rows = row_stats_.size() / (2 * v.num_q_heads);
    require_workspace(where, "query statistics", 1, stats_rows);
    float* row_max = row_stats_.data();
    float* row_inv = row_stats_.data() + v.num_q_heads * stats_rows;
    for (std::int64_t c0 = 0; c0 < num_queries; c0 += stats_rows) {
      const std::int64_t rows = std::min(stats_rows, num_queries - c0);
      cuda::detail::launch_query_column_sums_tiled({layer, queries, num_queries, c0, rows, first_pos, scale, row_max,
                                                    row_inv, stats_rows, scores, fresh, c0 == 0},
                                                   stream_, where);
    }
  }

  // out[kv, j] = mean / max / sum over the group's q-heads of in[qh, j], live slots only
  // (bit-identical to the CPU backend).
  void group_reduce(const LayerView<float>& v, const float* in, float* out, GroupAgg agg) const {
    constexpr const char* where = "CudaBackend::group_reduce";
    cuda::detail::launch_group_reduce({cuda::detail::make_device_layer(where, v), in, out, agg}, stream_);
  }

  // victims[h] (device [kv_head]) = the unprotected slot that ranks last by (score desc,
  // position asc): the lowest score, ties to the newest position. With scores == nullptr: the
  // oldest unprotected entry. -1 where a head has no unprotected entry. NaN scores as on the CPU:
  // a NaN in the first unprotected slot makes it the victim; other NaNs are never chosen.
  void select_victims(const LayerView<float>& v, const float* scores, ProtectRule rule, std::int32_t* victims) const {
    constexpr const char* where = "CudaBackend::select_victims";
    cuda::detail::SelectParams p{};
    p.layer = cuda::detail::make_device_layer(where, v);
    p.scores = scores;
    p.sink_end = rule.sink_end;
    p.recent_begin = rule.recent_begin;
    p.victims = victims;
    cuda::detail::launch_select_victims(p, stream_);
  }

  // Moves slot lens[h]-1 into victims[h] (K, V, position, extras). Synchronises to read the
  // kv_head victims back and validate them first, so a bad plan throws ArgumentError before
  // anything moves (as on the CPU).
  void replace_with_last(const LayerView<float>& v, const std::int32_t* victims, std::span<const SlotExtra> extras) {
    constexpr const char* where = "CudaBackend::replace_with_last";
    const auto layer = cuda::detail::make_device_layer(where, v);
    ensure_status();
    check(cudaMemcpyAsync(host_status_.data(), victims, static_cast<std::size_t>(v.num_kv_heads) * sizeof(std::int32_t),
                          cudaMemcpyDeviceToHost, stream_),
          where, "cudaMemcpyAsync(victims)");
    check(cudaStreamSynchronize(stream_), where, "cudaStreamSynchronize");
    for (std::int64_t h = 0; h < v.num_kv_heads; ++h) {
      const std::int32_t victim = host_status_.data()[h];
      if (victim < 0 || victim >= v.lens[h])
        kvevict::detail::fail<ArgumentError>(where, "victims[" + std::to_string(h) + "]", victim,
                                             "must be a live slot in [0, " + std::to_string(v.lens[h]) + ")");
    }
    cuda::detail::MoveParams p{};
    p.num_kv_heads = layer.num_kv_heads;
    p.capacity = v.capacity;
    p.victims = victims;
    p.lens = layer.lens;
    for_each_array_group(v, extras, p, [&](cuda::detail::MoveParams& group, std::int64_t /*words_per_slot*/) {
      cuda::detail::launch_replace_with_last(group, stream_);
    });
  }

  // keep_slots[h, :keep_count[h]] (device [kv_head, capacity]) = every protected slot plus the
  // best unprotected ones by (score desc, position asc), in ascending slot order; scores ==
  // nullptr ranks by recency (newest first). keep_count: host [kv_head]. Exact radix select.
  // Synchronises to read the protected counts: throws BudgetError if the protected entries
  // alone exceed keep_count (keep_slots may then hold partial output; the cache is untouched).
  void select_topk(const LayerView<float>& v, const float* scores, ProtectRule rule, const std::int64_t* keep_count,
                   std::int32_t* keep_slots) {
    constexpr const char* where = "CudaBackend::select_topk";
    cuda::detail::SelectParams p{};
    p.layer = cuda::detail::make_device_layer(where, v);
    p.scores = scores;
    p.sink_end = rule.sink_end;
    p.recent_begin = rule.recent_begin;
    for (std::int64_t h = 0; h < v.num_kv_heads; ++h)
      p.keep_count.v[h] = static_cast<std::int32_t>(std::max<std::int64_t>(std::min(keep_count[h], v.lens[h]), -1));
    p.keep_slots = keep_slots;
    ensure_status();
    p.num_protected = status_.data();
    cuda::detail::launch_select_topk(p, stream_);
    read_status(v.num_kv_heads, where);
    for (std::int64_t h = 0; h < v.num_kv_heads; ++h) {
      const std::int64_t k = std::min(keep_count[h], v.lens[h]);
      const std::int64_t num_protected = host_status_.data()[h];
      if (k < num_protected)
        kvevict::detail::fail<BudgetError>("select_topk", "keep_count[" + std::to_string(h) + "]", k,
                                           "is smaller than the " + std::to_string(num_protected) + " protected entries");
    }
  }

  // Stable gather: slot keep_slots[h, i] moves to slot i for i < keep_count[h] (K, V, position,
  // extras). Precondition: keep slots ascending per head (select_topk's output). In place, one
  // launch per group of kMaxSlotArrays arrays, every moving row read and written once.
  void compact(const LayerView<float>& v, const std::int32_t* keep_slots, const std::int64_t* keep_count,
               std::span<const SlotExtra> extras) {
    constexpr const char* where = "CudaBackend::compact";
    const auto layer = cuda::detail::make_device_layer(where, v);
    cuda::detail::MoveParams p{};
    p.num_kv_heads = layer.num_kv_heads;
    p.capacity = v.capacity;
    p.keep_slots = keep_slots;
    std::int64_t max_keep = 0;
    for (std::int64_t h = 0; h < v.num_kv_heads; ++h) {
      if (keep_count[h] < 0 || keep_count[h] > v.lens[h])
        kvevict::detail::fail<ArgumentError>(where, "keep_count[" + std::to_string(h) + "]", keep_count[h],
                                             "must be in [0, len = " + std::to_string(v.lens[h]) + "]");
      p.keep_count.v[h] = static_cast<std::int32_t>(keep_count[h]);
      max_keep = std::max(max_keep, keep_count[h]);
    }
    if (max_keep == 0) return;
    for_each_array_group(v, extras, p, [&](cuda::detail::MoveParams& group, std::int64_t /*words_per_slot*/) {
      const std::int64_t items = cuda::detail::plan_compaction(group, max_keep);
      require_workspace(where, "compaction work items", items, sizes_.compact_items);
      group.ticket = compact_ticket_.data();
      group.read_done = compact_read_done_.data();
      group.epoch = next_compact_epoch();
      cuda::detail::launch_compact(group, items, stream_);
    });
  }

  // One decode step's scoring and eviction (DecodeEviction) as one cooperative kernel, validated
  // as a whole before anything is written: NonFiniteError for a NaN/Inf anywhere in the step's
  // [q_head, probs_stride] probabilities, InvariantError for a head whose entries are all
  // protected; either leaves the cache and the scores unchanged. Synchronises the stream once, to
  // read that verdict. Results are bit-identical to the four primitives it replaces.
  // With defer_step_errors(true) it does not wait: a rejected step still changes no entry and no
  // score, and its slot count still drops by one (KVCache's), so the step's newest entry (the
  // token just appended) is the one left out; the error is thrown by the first evict_one or
  // check_step_errors() that finds the step finished.
  void evict_one(const LayerView<float>& v, const DecodeEviction& step, std::span<const SlotExtra> extras) {
    constexpr const char* where = "CudaBackend::evict_one";
    if (defer_) throw_deferred(where);  // an earlier step's rejection, if its kernel has finished
    cuda::detail::DecodeEvictParams p{};
    p.layer = cuda::detail::make_device_layer(where, v);
    if (step.probs != nullptr) cuda::require_device_pointer(where, "step.probs", step.probs);
    set_step_fields(where, v, step, p);
    if (max_evict_blocks_ < 0) max_evict_blocks_ = cuda::detail::max_decode_evict_blocks(&num_sms_);
    if (max_evict_blocks_ == 0)
      kvevict::detail::fail<UnsupportedError>(where, "device", "no cooperative launch",
                                              "evict_one needs a device that supports cooperative launches");
    p.probs = step.probs;
    p.probs_stride = step.probs_stride;
    p.probs_count = step.probs != nullptr ? v.num_q_heads * step.probs_stride : 0;
    p.chunks_per_head = static_cast<std::int32_t>(
        cuda::detail::ceil_div(std::max<std::int64_t>(p.layer.max_len, 1), cuda::detail::kEvictChunk));
    const std::int64_t items = v.num_kv_heads * p.chunks_per_head;
    require_workspace(where, "eviction partials", items, sizes_.evict_partials);
    p.partials = evict_partials_.data();
    p.flags = evict_flags_.data();
    // At least one block per multiprocessor: the NaN/Inf scan covers all q_head x probs_stride
    // floats, however few chunks the heads have.
    const int blocks = static_cast<int>(
        std::min<std::int64_t>(max_evict_blocks_, std::max<std::int64_t>({items, v.num_kv_heads, num_sms_})));
    queue_step_moves(v, extras, p.layer, p, [&] {
      if (defer_) p.step_id = static_cast<std::int32_t>(++deferred_steps_ & 0x7fffffff);
      cuda::detail::launch_decode_evict(p, blocks, stream_);
      if (defer_) return;
      read_status(2, where);
      if (host_status_.data()[0] != 0)
        kvevict::detail::fail<NonFiniteError>(where, "probs", "NaN/Inf", "every probability must be finite");
      if (host_status_.data()[1] >= 0)
        kvevict::detail::fail<InvariantError>(where, "kv_head", host_status_.data()[1],
                                              "has no unprotected entry to evict");
    });
  }

  // attend followed by evict_one, the step folded into the attention's launches (no launch, no
  // pass over the cache of its own): results, errors and deferred verdicts are evict_one's, and
  // probs/out are attend's, bit for bit. The step scores with the attention's probabilities
  // (step.probs == att.probs, stride capacity) or by recency (step.probs == nullptr). A group of
  // more than kGroupBatch q-heads, or a step scoring other probabilities, runs the two calls.
  // Not finite: a NaN/Inf in the attention's logits or no finite logit (NonFiniteError, nothing
  // of the step written). Precondition (KVCache::apply checks): every head holds an entry; every
  // head holds an unprotected one when positions are unique and below the next position (a head
  // without one moves nothing and reports InvariantError, its sums added).
  void attend_evict_one(const LayerView<float>& v, const DecodeAttention& att, const DecodeEviction& step,
                        std::span<const SlotExtra> extras) {
    constexpr const char* where = "CudaBackend::attend_evict_one";
    const auto layer = cuda::detail::make_device_layer(where, v);
    const bool scores_these = step.probs == nullptr || (step.probs == att.probs && step.probs_stride == v.capacity);
    if (layer.group_size > cuda::detail::kGroupBatch || !scores_these || layer.max_len == 0) {
      attend(v, att.q, att.scale, att.probs, att.out);
      evict_one(v, step, extras);
      return;
    }
    if (defer_) throw_deferred(where);  // an earlier step's rejection, if its kernel has finished
    cuda::detail::AttendEvictParams p{};
    set_step_fields(where, v, step, p);
    const std::int64_t max_chunks = partial_.size() / (v.num_q_heads * v.head_dim);
    const std::int64_t chunks = cuda::detail::ceil_div(layer.max_len, cuda::detail::kAttendChunk);
    require_workspace(where, "attend partial sums", chunks, max_chunks);
    p.chunks_per_head = static_cast<std::int32_t>(
        cuda::detail::ceil_div(v.capacity, cuda::detail::kScoreChunk<cuda::detail::kAttendThreads>));
    require_workspace(where, "attention eviction candidates", v.num_kv_heads * p.chunks_per_head, sizes_.attend_partials);
    attend_steps_ = attend_steps_ == INT32_MAX ? 1 : attend_steps_ + 1;  // an id the flag does not hold
    p.attend = {layer, att.probs, v.capacity, partial_.data(), max_chunks, att.out};
    p.partials = attend_partials_.data();
    p.nonfinite = attend_nonfinite_.data();
    p.step_id = attend_steps_;
    if (defer_) p.deferred_step = static_cast<std::int32_t>(++deferred_steps_ & 0x7fffffff);
    cuda::detail::launch_group_logits({layer, att.q, v.head_dim, att.scale, INT64_MAX, att.probs, v.capacity}, stream_, where);
    cuda::detail::launch_softmax_rows({layer, att.probs, v.capacity, nullptr, 0, {}, false, attend_nonfinite_.data(), attend_steps_},
                                      stream_, where);
    queue_step_moves(v, extras, layer, p, [&] { cuda::detail::launch_attend_evict(p, stream_); });
    if (defer_) return;
    read_status(2, where);
    if (host_status_.data()[0] != 0)
      kvevict::detail::fail<NonFiniteError>(where, "q", "NaN/Inf",
                                            "the step's attention logits must be finite (nothing of the step was written)");
    if (host_status_.data()[1] != INT32_MAX)
      kvevict::detail::fail<InvariantError>(where, "kv_head", host_status_.data()[1],
                                            "has no unprotected entry to evict (positions not unique or past the next position?)");
  }

  // Deferred decode-step verdicts: evict_one queues its kernel and returns without reading the
  // verdict, so an engine's host loop never waits on the GPU for the policy (one stream
  // synchronisation per layer and token otherwise). Off by default.
  void defer_step_errors(bool on) {
    if (on && deferred_.size() == 0) {
      deferred_ = cuda::PinnedBuffer<std::int32_t>(4);
      void* device = nullptr;
      check(cudaHostGetDevicePointer(&device, deferred_.data(), 0), "CudaBackend::defer_step_errors",
            "cudaHostGetDevicePointer");
      deferred_device_ = static_cast<std::int32_t*>(device);
    }
    defer_ = on;
  }
  [[nodiscard]] bool defers_step_errors() const noexcept { return defer_; }
  // Waits for this backend's stream, then throws the earliest deferred rejection not yet thrown.
  void check_step_errors() {
    constexpr const char* where = "CudaBackend::check_step_errors";
    check(cudaStreamSynchronize(stream_), where, "cudaStreamSynchronize");
    throw_deferred(where);
  }

  // Rotates every live key whose position >= min_position by `delta` positions (RoPE(p) then
  // this equals RoPE(p + delta)); bit-identical to the CPU backend. rotary_dim <= 512.
  void rotate_keys(const LayerView<float>& v, std::int64_t min_position, std::int64_t delta, const RopeSpec& rope) const {
    constexpr const char* where = "CudaBackend::rotate_keys";
    if (delta == 0) return;
    rope.check(where, v.head_dim);
    const std::int64_t half = rope.rotary_dim / 2;
    if (half > cuda::detail::kMaxRotaryPairs)
      kvevict::detail::fail<UnsupportedError>(where, "rope.rotary_dim", rope.rotary_dim,
                                              "the CUDA backend rotates at most " +
                                                  std::to_string(2 * cuda::detail::kMaxRotaryPairs) + " dims");
    cuda::detail::RotateParams p{};
    p.layer = cuda::detail::make_device_layer(where, v);
    p.min_position = min_position;
    p.half = static_cast<std::int32_t>(half);
    p.interleaved = rope.layout == RopeLayout::interleaved_pairs;
    for (std::int64_t i = 0; i < half; ++i) {  // the CPU backend's expressions, term for term
      const double inv_freq = std::pow(rope.base, -2.0 * static_cast<double>(i) / static_cast<double>(rope.rotary_dim));
      const double angle = static_cast<double>(delta) * inv_freq;
      p.cos[i] = std::cos(angle);
      p.sin[i] = std::sin(angle);
    }
    cuda::detail::launch_rotate_keys(p, stream_);
  }

  // ---- Observation-window primitives (WindowScoringBackend) ----

  // Copies n floats within device memory; the ranges may overlap (memmove semantics: disjoint
  // ranges take one device-to-device copy, overlapping ones go through the reserved bounce
  // buffer piece by piece, front to back or back to front). Queued on the stream, no sync.
  void copy_within(const float* src, float* dst, std::int64_t n) {
    constexpr const char* where = "CudaBackend::copy_within";
    if (n <= 0 || src == dst) return;
    const bool overlap = src < dst + n && dst < src + n;
    if (!overlap) {
      check(cudaMemcpyAsync(dst, src, static_cast<std::size_t>(n) * sizeof(float), cudaMemcpyDeviceToDevice, stream_),
            where, "cudaMemcpyAsync");
      return;
    }
    if (bounce_.size() == 0) {
      bounce_ = cuda::DeviceBuffer<float>(kCopyBounceFloats, stream_);
      sizes_.bounce = kCopyBounceFloats;
    }
    const std::int64_t piece = bounce_.size();
    const std::int64_t pieces = cuda::detail::ceil_div(n, piece);
    for (std::int64_t k = 0; k < pieces; ++k) {
      // dst below src: front to back (a piece only overwrites source already read); else back to front.
      const std::int64_t idx = dst < src ? k : pieces - 1 - k;
      const std::int64_t off = idx * piece;
      const auto bytes = static_cast<std::size_t>(std::min(piece, n - off)) * sizeof(float);
      check(cudaMemcpyAsync(bounce_.data(), src + off, bytes, cudaMemcpyDeviceToDevice, stream_), where, "cudaMemcpyAsync(in)");
      check(cudaMemcpyAsync(dst + off, bounce_.data(), bytes, cudaMemcpyDeviceToDevice, stream_), where, "cudaMemcpyAsync(out)");
    }
  }

  // Window statistics from queries [q_head, num_queries, head_dim]: sums[qh, j] = sum_i p_i(j)
  // and, when sumsq != nullptr, sumsq[qh, j] = sum_i p_i(j)^2, with p_i query i's fp32 softmax
  // over the keys whose position <= first_pos + i (a query seeing none adds nothing). Overwrites
  // both for the live slots. Two tiled passes (window_stats_tiled.cuh): each query's softmax max
  // and sum into the reserved workspace, then per key tile the probabilities recomputed and added
  // in query order (deterministic; no atomics). Queued on the stream; no allocation, no sync.
  void window_column_stats(const LayerView<float>& v, const float* queries, std::int64_t num_queries,
                           std::int64_t first_pos, float scale, float* sums, float* sumsq) {
    constexpr const char* where = "CudaBackend::window_column_stats";
    const auto layer = cuda::detail::make_device_layer(where, v);
    if (num_queries > 0)
      require_workspace(where, "window row statistics", cuda::detail::window_workspace_floats(v.num_q_heads, v.capacity),
                        window_ws_.size());
    cuda::detail::launch_window_column_stats(layer, queries, std::max<std::int64_t>(num_queries, 0), first_pos, scale,
                                             sums, sumsq, window_ws_.data(), stream_, where);
  }

  // The same statistics from probabilities [q_head, num_queries, probs_stride], summed in query
  // order (bit-identical to the CPU backend).
  void window_column_stats_from_probs(const LayerView<float>& v, const float* probs, std::int64_t num_queries,
                                      std::int64_t probs_stride, float* sums, float* sumsq) const {
    constexpr const char* where = "CudaBackend::window_column_stats_from_probs";
    const auto layer = cuda::detail::make_device_layer(where, v);
    if (num_queries <= 0) {
      cuda::detail::launch_zero_live({layer, sums, sumsq}, stream_, where);
      return;
    }
    cuda::detail::launch_column_stats(
        {layer, probs, num_queries, probs_stride, 0, v.num_q_heads * num_queries, false, sums, sumsq}, stream_, where);
  }

  // out[r, j] = pool over in[r, j - k/2 .. j + k/2] within slots [0, span[h]) (avg zero-pads and
  // divides by the kernel; max ignores padding); slots in [span[h], lens[h]) are copied through.
  // span: host [kv_head]. Bit-identical to the CPU backend.
  void pool_tokens(const LayerView<float>& v, const float* in, float* out, std::int64_t rows_per_kv_head,
                   const std::int64_t* span, std::int64_t kernel, PoolKind kind) const {
    constexpr const char* where = "CudaBackend::pool_tokens";
    cuda::detail::PoolParams p{};
    p.layer = cuda::detail::make_device_layer(where, v);
    p.in = in;
    p.out = out;
    p.rows_per_kv_head = rows_per_kv_head;
    for (std::int64_t h = 0; h < v.num_kv_heads; ++h)
      p.span.v[h] = static_cast<std::int32_t>(std::clamp<std::int64_t>(span[h], 0, v.lens[h]));
    p.radius = static_cast<std::int32_t>(kernel / 2);
    p.inv_kernel = 1.0f / static_cast<float>(kernel);
    p.max = kind == PoolKind::max;
    cuda::detail::launch_pool_tokens(p, stream_, where);
  }

  // out[h, j] = mean over all q-heads of in[qh, j] for j < lens[0], written to every kv-head row
  // (bit-identical to the CPU backend).
  void layer_mean(const LayerView<float>& v, const float* in, float* out) const {
    constexpr const char* where = "CudaBackend::layer_mean";
    cuda::detail::launch_layer_mean({cuda::detail::make_device_layer(where, v), in, out}, stream_, where);
  }

  // out[h, j] = -||k_j||_2.
  void key_norm_scores(const LayerView<float>& v, float* out) const {
    constexpr const char* where = "CudaBackend::key_norm_scores";
    cuda::detail::launch_key_norm_scores({cuda::detail::make_device_layer(where, v), out}, stream_, where);
  }

  // out[h, j] = -cos(k_j, a), a = mean_j k_j / max(||k_j||, 1e-12) (KeyDiff). One block per kv-head.
  void key_diff_scores(const LayerView<float>& v, float* out) const {
    constexpr const char* where = "CudaBackend::key_diff_scores";
    cuda::detail::launch_key_diff_scores({cuda::detail::make_device_layer(where, v), out}, stream_, where);
  }

  // Every protected entry's score becomes max(unprotected of its head) + 1 (0 + 1 if none).
  void raise_protected(const LayerView<float>& v, float* scores, ProtectRule rule) const {
    constexpr const char* where = "CudaBackend::raise_protected";
    cuda::detail::launch_raise_protected({cuda::detail::make_device_layer(where, v), scores, rule.sink_end, rule.recent_begin},
                                         stream_, where);
  }

  // AdaKV-style per-head budgets (CpuBackend::head_budgets' rule; counts: host [kv_head]).
  // Synchronises the stream once: the layer's scores and positions are copied to pinned host
  // memory and the allocation runs on the host (a prefill-time, once-per-layer decision).
  void head_budgets(const LayerView<float>& v, const float* scores, ProtectRule rule, std::int64_t total,
                    std::int64_t floor, std::int64_t* counts) {
    constexpr const char* where = "CudaBackend::head_budgets";
    (void)cuda::detail::make_device_layer(where, v);
    const std::int64_t entries = v.num_kv_heads * v.capacity;
    require_workspace(where, "head_budgets host mirror", entries, sizes_.host_layer);
    check(cudaMemcpyAsync(host_scores_.data(), scores, static_cast<std::size_t>(entries) * sizeof(float),
                          cudaMemcpyDeviceToHost, stream_),
          where, "cudaMemcpyAsync(scores)");
    check(cudaMemcpyAsync(host_positions_.data(), v.positions, static_cast<std::size_t>(entries) * sizeof(std::int32_t),
                          cudaMemcpyDeviceToHost, stream_),
          where, "cudaMemcpyAsync(positions)");
    check(cudaStreamSynchronize(stream_), where, "cudaStreamSynchronize");
    std::int64_t pool_size = 0, assigned = 0;
    std::int32_t* order = host_order_.data();
    for (std::int64_t h = 0; h < v.num_kv_heads; ++h) {
      const std::int64_t n = v.lens[h];
      const std::int32_t* pos = host_positions_.data() + h * v.capacity;
      const float* s = host_scores_.data() + h * v.capacity;
      std::int64_t c = 0;
      for (std::int64_t j = 0; j < n; ++j)
        if (!rule.protects(pos[j])) order[c++] = static_cast<std::int32_t>(j);
      const std::int64_t num_protected = n - c;
      const std::int64_t f = std::min(floor, c);
      auto before = [&](std::int32_t a, std::int32_t b) { return s[a] > s[b] || (s[a] == s[b] && pos[a] < pos[b]); };
      if (f < c) std::nth_element(order, order + f, order + c, before);
      counts[h] = num_protected + f;
      assigned += f;
      for (std::int64_t i = f; i < c; ++i) {
        const std::int32_t j = order[i];
        host_pool_[static_cast<std::size_t>(pool_size++)] = {s[j], pos[j], static_cast<std::int32_t>(h)};
      }
    }
    const std::int64_t rest = std::clamp<std::int64_t>(total - assigned, 0, pool_size);
    auto first = host_pool_.begin();
    auto before = [](const BudgetEntry& a, const BudgetEntry& b) {
      if (a.score != b.score) return a.score > b.score;
      if (a.pos != b.pos) return a.pos < b.pos;
      return a.head < b.head;
    };
    if (rest < pool_size) std::nth_element(first, first + rest, first + pool_size, before);
    for (std::int64_t i = 0; i < rest; ++i) counts[host_pool_[static_cast<std::size_t>(i)].head] += 1;
  }

 private:
  struct BudgetEntry {
    float score;
    std::int32_t pos;
    std::int32_t head;
  };
  struct Sizes {
    std::int64_t compact_items = 0;   // compaction work items (read-done flags)
    std::int64_t evict_partials = 0;  // evict_one per-chunk candidates
    std::int64_t attend_partials = 0;  // attend_evict_one per-chunk candidates
    std::int64_t logits = 0;      // [q_head, capacity]
    std::int64_t stats = 0;       // 2 x [q_head, rows]
    std::int64_t partial = 0;     // [q_head, chunk, head_dim]
    std::int64_t window_probs = 0;  // window_workspace_floats: 2 x [q_head, max(capacity, 64)]
    std::int64_t bounce = 0;        // copy_within bounce floats
    std::int64_t host_layer = 0;    // [kv_head, capacity] host mirror of head_budgets
  };

  template <class T>
  void copy(T* dst, const T* src, std::int64_t n, cudaMemcpyKind kind, const char* where) const {
    if (n <= 0) return;
    check(cudaMemcpyAsync(dst, src, static_cast<std::size_t>(n) * sizeof(T), kind, stream_), where, "cudaMemcpyAsync");
    check(cudaStreamSynchronize(stream_), where, "cudaStreamSynchronize");
  }
  static void check(cudaError_t status, const char* where, const char* what) { cuda::check(status, where, what); }

  static void require_workspace(const char* where, const char* what, std::int64_t need, std::int64_t have) {
    if (have < need)
      kvevict::detail::fail<ShapeError>(where, "workspace", what,
                                        "needs " + std::to_string(need) + " but reserve() provided " + std::to_string(have) +
                                            ": call reserve(shape) with a shape covering this layer");
  }

  static cuda::detail::PerHead clamp_fresh(const LayerView<float>& v, const std::int64_t* fresh_from) {
    cuda::detail::PerHead f{};
    for (std::int64_t h = 0; h < v.num_kv_heads; ++h)
      f.v[h] = static_cast<std::int32_t>(std::clamp<std::int64_t>(fresh_from[h], 0, v.capacity));
    return f;
  }

  // Calls fn(params, words_per_slot) for groups of at most kMaxSlotArrays per-slot arrays: K, V,
  // positions, then each extra (rows_per_kv_head rows of one float per slot).
  template <class Fn>
  static void for_each_array_group(const LayerView<float>& v, std::span<const SlotExtra> extras,
                                   cuda::detail::MoveParams& p, Fn&& fn) {
    using cuda::detail::SlotArray;
    const std::int64_t total = 3 + static_cast<std::int64_t>(extras.size());
    auto array_at = [&](std::int64_t a) -> SlotArray {
      if (a == 0) return {reinterpret_cast<std::uint32_t*>(v.keys), v.head_stride, v.slot_stride, 1,
                          static_cast<std::int32_t>(v.head_dim)};
      if (a == 1) return {reinterpret_cast<std::uint32_t*>(v.values), v.head_stride, v.slot_stride, 1,
                          static_cast<std::int32_t>(v.head_dim)};
      if (a == 2) return {reinterpret_cast<std::uint32_t*>(v.positions), v.capacity, 1, 1, 1};
      const SlotExtra& e = extras[static_cast<std::size_t>(a - 3)];
      return {reinterpret_cast<std::uint32_t*>(e.data), v.capacity, 1, static_cast<std::int32_t>(e.rows_per_kv_head), 1};
    };
    for (std::int64_t first = 0; first < total; first += cuda::detail::kMaxSlotArrays) {
      const std::int64_t count = std::min<std::int64_t>(cuda::detail::kMaxSlotArrays, total - first);
      std::int64_t words_per_slot = 0;
      for (std::int64_t a = 0; a < count; ++a) {
        p.arrays[a] = array_at(first + a);
        words_per_slot += static_cast<std::int64_t>(p.arrays[a].rows) * p.arrays[a].width;
      }
      p.num_arrays = static_cast<std::int32_t>(count);
      fn(p, words_per_slot);
    }
  }

  // The fields evict_one and attend_evict_one fill alike from the step (their checks included);
  // with probabilities the step scores into step.q_scores, without it ranks by recency.
  void set_step_fields(const char* where, const LayerView<float>& v, const DecodeEviction& step,
                       cuda::detail::StepEvictFields& f) {
    if (step.probs != nullptr) {
      cuda::require_device_pointer(where, "step.q_scores", step.q_scores);
      if (step.fresh_from == nullptr)
        kvevict::detail::fail<ArgumentError>(where, "step.fresh_from", "null", "must point at [kv_head] host counts");
      f.q_scores = step.q_scores;
      f.fresh_from = clamp_fresh(v, step.fresh_from);
    }
    f.agg = step.agg;
    f.sink_end = step.rule.sink_end;
    f.recent_begin = step.rule.recent_begin;
    ensure_status();
    f.victims = evict_victims_.data();
    f.status = status_.data();
    if (defer_) f.deferred = deferred_device_;
  }

  // The moves of a single-eviction step, in groups of kMaxSlotArrays arrays (K, V, positions, then
  // the extras): the first group goes into f.arrays and `first()` queues the kernel that picks the
  // victims into evict_victims_ and moves it; the plain replacement kernel moves each later group
  // from those victims.
  template <class First>
  void queue_step_moves(const LayerView<float>& v, std::span<const SlotExtra> extras, const cuda::detail::DeviceLayer& layer,
                        cuda::detail::StepEvictFields& f, First&& first) {
    cuda::detail::MoveParams moves{};
    moves.num_kv_heads = layer.num_kv_heads;
    moves.capacity = v.capacity;
    moves.victims = evict_victims_.data();
    moves.lens = layer.lens;
    bool is_first = true;
    for_each_array_group(v, extras, moves, [&](cuda::detail::MoveParams& group, std::int64_t /*words_per_slot*/) {
      if (is_first) {
        is_first = false;
        for (std::int32_t a = 0; a < group.num_arrays; ++a) f.arrays[a] = group.arrays[a];
        f.num_arrays = group.num_arrays;
        first();
      } else {
        cuda::detail::launch_replace_with_last(group, stream_);
      }
    });
  }

  void grow_workspace(const Sizes& need) {
    auto grow = [&](auto& buffer, std::int64_t& have, std::int64_t want) {
      if (want <= have) return;
      buffer = std::remove_reference_t<decltype(buffer)>(want, stream_);
      have = want;
    };
    grow(compact_read_done_, sizes_.compact_items, need.compact_items);
    grow(evict_partials_, sizes_.evict_partials, need.evict_partials);
    grow(attend_partials_, sizes_.attend_partials, need.attend_partials);
    if (attend_nonfinite_.size() == 0) attend_nonfinite_ = cuda::DeviceBuffer<std::int32_t>(1, stream_);
    if (compact_ticket_.size() == 0) compact_ticket_ = cuda::DeviceBuffer<unsigned long long>(1, stream_);
    if (evict_flags_.size() == 0) evict_flags_ = cuda::DeviceBuffer<std::int32_t>(1 + kMaxKvHeads, stream_);
    if (evict_victims_.size() == 0) evict_victims_ = cuda::DeviceBuffer<std::int32_t>(kMaxKvHeads, stream_);
    grow(logits_, sizes_.logits, need.logits);
    grow(row_stats_, sizes_.stats, need.stats);
    grow(partial_, sizes_.partial, need.partial);
    grow(window_ws_, sizes_.window_probs, need.window_probs);
    grow(bounce_, sizes_.bounce, need.bounce);
    if (need.host_layer > sizes_.host_layer) {
      host_scores_ = cuda::PinnedBuffer<float>(need.host_layer);
      host_positions_ = cuda::PinnedBuffer<std::int32_t>(need.host_layer);
      host_order_.assign(static_cast<std::size_t>(need.host_layer), 0);
      host_pool_.assign(static_cast<std::size_t>(need.host_layer), BudgetEntry{});
      sizes_.host_layer = need.host_layer;
    }
    if (need.compact_items > 0) ensure_status();
  }

  // A compaction epoch never used before (flags from earlier launches never match it).
  unsigned int next_compact_epoch() {
    if (++compact_epoch_ == 0) {  // 2^32 launches later: forget every old mark
      check(cudaMemsetAsync(compact_read_done_.data(), 0, static_cast<std::size_t>(compact_read_done_.size()) * sizeof(unsigned int),
                            stream_),
            "CudaBackend::compact", "cudaMemsetAsync(read_done)");
      compact_epoch_ = 1;
    }
    return compact_epoch_;
  }

  // The few int32 a host decision reads back; allocated by reserve() or on first use.
  // Throws the rejection a finished deferred step left in deferred_ (and clears it).
  void throw_deferred(const char* where) {
    if (deferred_.size() == 0) return;
    auto* flag = static_cast<volatile std::int32_t*>(deferred_.data());
    const std::int32_t kind = flag[0];
    if (kind == 0) return;
    std::atomic_thread_fence(std::memory_order_acquire);
    const std::int32_t head = flag[1], step = flag[2];
    flag[0] = 0;
    const std::string when = "deferred decode step " + std::to_string(step) + " of this backend";
    if (kind == 1)
      kvevict::detail::fail<NonFiniteError>(where, "probs", "NaN/Inf",
                                            "every probability must be finite (" + when +
                                                "; it changed no entry or score and left out its newest entry)");
    kvevict::detail::fail<InvariantError>(where, "kv_head", head,
                                          "has no unprotected entry to evict (" + when +
                                              "; it changed no entry or score and left out its newest entry)");
  }
  void ensure_status() {
    if (status_.size() == 0) status_ = cuda::DeviceBuffer<std::int32_t>(kMaxKvHeads, stream_);
    if (host_status_.size() == 0) host_status_ = cuda::PinnedBuffer<std::int32_t>(kMaxKvHeads);
  }
  // Copies status_[0, n) to host_status_ and waits for it.
  void read_status(std::int64_t n, const char* where) {
    check(cudaMemcpyAsync(host_status_.data(), status_.data(), static_cast<std::size_t>(n) * sizeof(std::int32_t),
                          cudaMemcpyDeviceToHost, stream_),
          where, "cudaMemcpyAsync(status)");
    check(cudaStreamSynchronize(stream_), where, "cudaStreamSynchronize");
  }

  cudaStream_t stream_ = nullptr;
  Sizes sizes_{};
  cuda::DeviceBuffer<unsigned int> compact_read_done_;  // [work item] epoch of the compaction that staged it
  cuda::DeviceBuffer<unsigned long long> compact_ticket_;  // work-item counter, 0 between compactions
  unsigned int compact_epoch_ = 0;                      // last epoch used
  cuda::DeviceBuffer<cuda::detail::EvictPartial> evict_partials_;  // [kv_head, chunk] evict_one candidates
  cuda::DeviceBuffer<std::int32_t> evict_flags_;        // [1 + kMaxKvHeads] evict_one verdict, 0 between calls
  cuda::DeviceBuffer<std::int32_t> evict_victims_;      // [kMaxKvHeads] evict_one victims
  cuda::DeviceBuffer<cuda::detail::EvictPartial> attend_partials_;  // [kv_head, chunk] attend_evict_one candidates
  cuda::DeviceBuffer<std::int32_t> attend_nonfinite_;   // [1] id of the last attend_evict_one step found not finite
  std::int32_t attend_steps_ = 0;                       // attend_evict_one steps queued (the id of the last)
  int max_evict_blocks_ = -1;                           // co-resident decode_evict blocks (-1: not asked yet)
  int num_sms_ = 0;                                     // multiprocessors of the device
  cuda::DeviceBuffer<float> logits_;               // [q_head, capacity] per-query logits
  cuda::DeviceBuffer<float> row_stats_;            // [2][q_head, rows] row max and 1/sum
  cuda::DeviceBuffer<float> partial_;              // [q_head, chunk, head_dim] attend partial sums
  cuda::DeviceBuffer<std::int32_t> status_;        // [kMaxKvHeads] device results the host reads
  cuda::PinnedBuffer<std::int32_t> host_status_;   // [kMaxKvHeads] their landing place
  bool defer_ = false;                             // evict_one leaves its verdict in deferred_
  cuda::PinnedBuffer<std::int32_t> deferred_;      // [4] host-mapped {kind, kv_head, step}: earliest rejection
  std::int32_t* deferred_device_ = nullptr;        // deferred_ as the kernels address it
  std::uint64_t deferred_steps_ = 0;
  cuda::DeviceBuffer<float> window_ws_;            // window_column_stats row statistics (window_workspace_floats)
  cuda::DeviceBuffer<float> bounce_;               // [kCopyBounceFloats] copy_within overlap bounce
  cuda::PinnedBuffer<float> host_scores_;          // [kv_head, capacity] head_budgets scores
  cuda::PinnedBuffer<std::int32_t> host_positions_;  // [kv_head, capacity] head_budgets positions
  std::vector<std::int32_t> host_order_;           // head_budgets candidates of one head
  std::vector<BudgetEntry> host_pool_;             // head_budgets candidates of the layer
};

static_assert(Backend<CudaBackend>, "CudaBackend must satisfy the kvevict::Backend concept");
static_assert(WindowScoringBackend<CudaBackend>, "CudaBackend must satisfy kvevict::WindowScoringBackend");
static_assert(DecodeEvictionBackend<CudaBackend>, "CudaBackend must satisfy kvevict::DecodeEvictionBackend");
static_assert(AttentionEvictionBackend<CudaBackend>, "CudaBackend must satisfy kvevict::AttentionEvictionBackend");

}  // namespace kvevict
