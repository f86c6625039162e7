// Cross-backend parity of the data-path primitives: append, attention_probs, attend, the two
// column-sum accumulations, group_reduce and rotate_keys. Every case runs the CpuBackend (the
// reference) and the CudaBackend on the same seeded inputs; outputs are compared over whole
// buffers (dead slots included), bit for bit where the CUDA backend claims it, otherwise within
// 1e-5 relative / 1e-6 absolute.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda_test_support.cuh"

namespace kvevict::cuda_test {
namespace {

TEST_CASE("append writes the same rows and positions on CUDA as on the CPU", "[cuda][parity]") {
  if (!device_available()) return;
  for (const LayerCase& c : parity_cases()) {
    CAPTURE(c);
    TwinLayer t(c);
    BackendPair b(c.shape());
    const std::int64_t tokens = std::max<std::int64_t>(1, std::min<std::int64_t>(c.capacity / 3, 100));
    for (auto& n : t.lens) n = std::min(n, c.capacity - tokens);
    const auto src_k = random_floats(t.rng(), c.num_kv_heads * tokens * c.head_dim);
    const auto src_v = random_floats(t.rng(), c.num_kv_heads * tokens * c.head_dim);
    const auto d_k = to_device(src_k);
    const auto d_v = to_device(src_v);
    const std::int64_t first = t.max_position() + 1;
    b.cpu.append(t.cpu_view(), src_k.data(), src_v.data(), tokens, first);
    b.gpu.append(t.gpu_view(), d_k.data(), d_v.data(), tokens, first);
    t.require_same_state("append");
  }
}

TEST_CASE("attention_probs and attend on CUDA match the CPU within fp32 tolerance", "[cuda][parity]") {
  if (!device_available()) return;
  for (const LayerCase& c : parity_cases()) {
    for (const float q_gain : {1.0f, 6.0f}) {  // flat and peaked distributions
      CAPTURE(c, q_gain);
      TwinLayer t(c);
      BackendPair b(c.shape());
      const auto q = random_floats(t.rng(), c.num_q_heads * c.head_dim, -q_gain, q_gain);
      const auto d_q = to_device(q);
      const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
      // Identical sentinels in both outputs: slots past a head's length must stay untouched.
      const auto sentinel = random_floats(t.rng(), c.num_q_heads * c.capacity, 5.0f, 6.0f);
      auto probs = sentinel;
      auto d_probs = to_device(sentinel);
      b.cpu.attention_probs(t.cpu_view(), q.data(), scale, probs.data());
      b.gpu.attention_probs(t.gpu_view(), d_q.data(), scale, d_probs.data());
      require_close(to_host(d_probs), probs, "attention_probs");

      auto probs_ws = sentinel;
      auto d_probs_ws = to_device(sentinel);
      std::vector<float> out(static_cast<std::size_t>(c.num_q_heads * c.head_dim), 7.0f);
      auto d_out = to_device(out);
      b.cpu.attend(t.cpu_view(), q.data(), scale, probs_ws.data(), out.data());
      b.gpu.attend(t.gpu_view(), d_q.data(), scale, d_probs_ws.data(), d_out.data());
      require_close(to_host(d_probs_ws), probs_ws, "attend probabilities");
      require_close(to_host(d_out), out, "attend output");
      t.require_same_state("attend (read-only)");
    }
  }
}

// fresh_from values that exercise the clamp and both sides of the fresh boundary.
std::vector<std::int64_t> random_fresh(TwinLayer& t) {
  std::vector<std::int64_t> fresh;
  for (const std::int64_t n : t.lens) {
    switch (t.rng().uniform_int(0, 4)) {
      case 0: fresh.push_back(-5); break;
      case 1: fresh.push_back(0); break;
      case 2: fresh.push_back(n / 2); break;
      case 3: fresh.push_back(n); break;
      default: fresh.push_back(n + 10); break;
    }
  }
  return fresh;
}

TEST_CASE("accumulate_column_sums on CUDA equals the CPU bit for bit", "[cuda][parity]") {
  if (!device_available()) return;
  for (const LayerCase& c : parity_cases()) {
    for (const std::int64_t num_queries : {1, 7}) {
      CAPTURE(c, num_queries);
      TwinLayer t(c);
      BackendPair b(c.shape());
      const std::int64_t stride = c.capacity + 5;
      const auto probs = random_floats(t.rng(), c.num_q_heads * num_queries * stride, 0.0f, 1.0f);
      const auto d_probs = to_device(probs);
      auto scores = random_floats(t.rng(), c.num_q_heads * c.capacity, 0.0f, 3.0f);
      auto d_scores = to_device(scores);
      const auto fresh = random_fresh(t);
      CAPTURE(fresh);
      b.cpu.accumulate_column_sums(t.cpu_view(), probs.data(), num_queries, stride, scores.data(), fresh.data());
      b.gpu.accumulate_column_sums(t.gpu_view(), d_probs.data(), num_queries, stride, d_scores.data(), fresh.data());
      require_identical(to_host(d_scores), scores, "accumulate_column_sums");
    }
  }
}

TEST_CASE("accumulate_query_column_sums on CUDA matches the CPU for single queries, small blocks and tiled blocks",
          "[cuda][parity]") {
  if (!device_available()) return;
  for (const LayerCase& c : parity_cases()) {
    // 1..16 take the per-query path, 17+ the tiled path; capacity + 77 exceeds the reserved
    // query statistics (capacity rows) and so runs the tiled path in two chunks.
    std::vector<std::int64_t> query_counts = {1, 3, 16, 17, 100};
    if (c.capacity <= 300) query_counts.push_back(c.capacity + 77);
    for (const std::int64_t num_queries : query_counts) {
      for (const bool all_visible : {false, true}) {
        CAPTURE(c, num_queries, all_visible);
        TwinLayer t(c);
        BackendPair b(c.shape());
        const auto q = random_floats(t.rng(), c.num_q_heads * num_queries * c.head_dim, -2.0f, 2.0f);
        const auto d_q = to_device(q);
        const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
        // Partly causal: early queries see few keys or none, later ones most of them.
        const std::int64_t max_pos = t.max_position();
        const std::int64_t first = all_visible ? max_pos + 1 : t.rng().uniform_int(-num_queries / 4 - 1, max_pos / 2);
        CAPTURE(first);
        auto scores = random_floats(t.rng(), c.num_q_heads * c.capacity, 0.0f, 3.0f);
        auto d_scores = to_device(scores);
        const auto fresh = random_fresh(t);
        b.cpu.accumulate_query_column_sums(t.cpu_view(), q.data(), num_queries, first, scale, scores.data(), fresh.data());
        b.gpu.accumulate_query_column_sums(t.gpu_view(), d_q.data(), num_queries, first, scale, d_scores.data(),
                                           fresh.data());
        require_close(to_host(d_scores), scores, "accumulate_query_column_sums");
      }
    }
  }
}

TEST_CASE("group_reduce on CUDA equals the CPU bit for bit for mean, max and sum", "[cuda][parity]") {
  if (!device_available()) return;
  for (const LayerCase& c : parity_cases()) {
    for (const GroupAgg agg : {GroupAgg::mean, GroupAgg::max, GroupAgg::sum}) {
      CAPTURE(c, to_string(agg));
      TwinLayer t(c);
      BackendPair b(c.shape());
      // Quarter steps in [-1, 1] with signed zeros: ties and +-0 exercise max's choice.
      std::vector<float> in(static_cast<std::size_t>(c.num_q_heads * c.capacity));
      for (auto& x : in) {
        const auto k = t.rng().uniform_int(-4, 4);
        const bool exact = t.rng().uniform_int(0, 3) == 0;  // exact quarter steps tie across the group
        x = k == 0 ? (t.rng().uniform_int(0, 1) != 0 ? -0.0f : 0.0f)
                   : 0.25f * static_cast<float>(k) + (exact ? 0.0f : t.rng().uniform(0.0f, 1e-3f));
      }
      const auto d_in = to_device(in);
      auto out = random_floats(t.rng(), c.num_kv_heads * c.capacity, 8.0f, 9.0f);
      auto d_out = to_device(out);
      b.cpu.group_reduce(t.cpu_view(), in.data(), out.data(), agg);
      b.gpu.group_reduce(t.gpu_view(), d_in.data(), d_out.data(), agg);
      require_identical(to_host(d_out), out, "group_reduce");
    }
  }
}

TEST_CASE("rotate_keys on CUDA equals the CPU bit for bit in both RoPE layouts", "[cuda][parity]") {
  if (!device_available()) return;
  for (const LayerCase& c : parity_cases()) {
    for (const RopeLayout layout : {RopeLayout::interleaved_pairs, RopeLayout::halves}) {
      for (const std::int64_t rotary_dim : {c.head_dim, (c.head_dim / 4) * 2}) {
        for (const std::int64_t delta : {-7, 13}) {
          CAPTURE(c, layout == RopeLayout::halves, rotary_dim, delta);
          TwinLayer t(c);
          BackendPair b(c.shape());
          const RopeSpec rope{10000.0, rotary_dim, layout};
          const std::int64_t min_position = t.max_position() / 3;
          b.cpu.rotate_keys(t.cpu_view(), min_position, delta, rope);
          b.gpu.rotate_keys(t.gpu_view(), min_position, delta, rope);
          t.require_same_state("rotate_keys");
        }
      }
    }
  }
}

}  // namespace
}  // namespace kvevict::cuda_test
