// The llama2 forward pass on the CPU (Eigen), one token per call. Keys and values live in a
// kvevict::KVCache; after each layer's attention any kvevict policy observes the step (the
// probabilities attend() already computed, or the step's query) and evicts. This is the whole
// integration.
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>

#include "kvevict/kvevict.hpp"
#include "model.hpp"

namespace llama2 {

using Cache = kvevict::KVCache<kvevict::CpuBackend>;
using Observation = kvevict::Observation<float, kvevict::HostSpace>;

// What a policy observes at each decode step. Most policies score from the step's attention
// probabilities, which attend() computes anyway; policies that keep queries for later re-scoring
// (SnapKV's decode schedule buffers the last `window` queries) need the query itself.
enum class Observe { probabilities, queries };

// Where the next token of `layer` is rotated: the policy decides when it re-indexes positions
// (StreamingLLM pos-shift); otherwise the token's own position.
template <class Policy>
std::int64_t rope_position(const Policy& policy, const Cache& cache, std::int64_t layer) {
  if constexpr (requires { policy.rope_position(cache, layer); })
    return policy.rope_position(cache, layer);
  else
    return cache.next_position(layer);
}

class Transformer {
 public:
  // Allocates the activations once; forward() allocates only the first time it meets a cache
  // with a larger capacity (for its probabilities workspace).
  explicit Transformer(const Model& model)
      : cfg_(model.config()),
        w_(model.weights()),
        x_(cfg_.dim), xb_(cfg_.dim), q_(cfg_.dim), k_(cfg_.kv_dim()), v_(cfg_.kv_dim()), att_(cfg_.dim),
        h1_(cfg_.hidden_dim), h3_(cfg_.hidden_dim), logits_(cfg_.vocab_size) {}

  [[nodiscard]] const Config& config() const noexcept { return cfg_; }

  // Appends `token` to `cache` (the next position of every layer), attends, lets `policy`
  // observe (`kObserve`: the step's probabilities [q_head, capacity] or its post-RoPE query
  // [q_head, head_dim]) and evict, and returns the next-token logits [vocab], valid until the next
  // call. `cache` needs at least one free slot per kv-head (policies.hpp's cache_capacity).
  template <Observe kObserve = Observe::probabilities, kvevict::EvictionPolicy<Cache> Policy>
  std::span<const float> forward(int token, Cache& cache, Policy& policy) {
    check(token, cache);
    const std::int64_t d = cfg_.dim, kv = cfg_.kv_dim(), hd = cfg_.hidden_dim, cap = cache.shape().capacity;
    const float scale = 1.0f / std::sqrt(static_cast<float>(cfg_.head_dim()));
    if (probs_.size() < cfg_.num_q_heads * cap) probs_.resize(cfg_.num_q_heads * cap);

    x_ = ConstVec(w_.token_embedding + token * d, d);
    for (std::int64_t l = 0; l < cfg_.num_layers; ++l) {
      rmsnorm(xb_, x_, w_.rms_att + l * d);
      q_.noalias() = mat(w_.wq + l * d * d, d, d) * xb_;
      k_.noalias() = mat(w_.wk + l * kv * d, kv, d) * xb_;
      v_.noalias() = mat(w_.wv + l * kv * d, kv, d) * xb_;
      const std::int64_t pos = rope_position(policy, cache, l);
      rope(q_, pos);
      rope(k_, pos);

      // k and v are [kv_head, head_dim], q is [q_head, head_dim]: the layouts kvevict expects.
      cache.append_token(l, {k_.data(), kv}, {v_.data(), kv});
      cache.backend().attend(cache.view(l), q_.data(), scale, probs_.data(), att_.data());
      if constexpr (kObserve == Observe::queries)
        policy.on_decode(cache, l, Observation::from_queries({q_.data(), d}, 1, scale));
      else
        policy.on_decode(cache, l, Observation::from_probs({probs_.data(), cfg_.num_q_heads * cap}, 1, cap));

      x_.noalias() += mat(w_.wo + l * d * d, d, d) * att_;
      rmsnorm(xb_, x_, w_.rms_ffn + l * d);
      h1_.noalias() = mat(w_.w1 + l * hd * d, hd, d) * xb_;
      h3_.noalias() = mat(w_.w3 + l * hd * d, hd, d) * xb_;
      h1_ = (h1_.array() / (1.0f + (-h1_.array()).exp()) * h3_.array()).matrix();  // SwiGLU
      x_.noalias() += mat(w_.w2 + l * d * hd, d, hd) * h1_;
    }
    rmsnorm(xb_, x_, w_.rms_final);
    logits_.noalias() = mat(w_.classifier, cfg_.vocab_size, d) * xb_;
    return {logits_.data(), static_cast<std::size_t>(cfg_.vocab_size)};
  }

 private:
  using Vec = Eigen::VectorXf;
  using ConstVec = Eigen::Map<const Eigen::VectorXf>;
  using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  static Eigen::Map<const RowMatrix> mat(const float* p, std::int64_t rows, std::int64_t cols) { return {p, rows, cols}; }

  void check(int token, const Cache& cache) const {
    if (token < 0 || token >= cfg_.vocab_size)
      throw kvevict::ArgumentError("llama2::Transformer::forward: token " + std::to_string(token) + " is outside the vocabulary");
    const kvevict::CacheShape& s = cache.shape();
    if (s.num_layers != cfg_.num_layers || s.num_kv_heads != cfg_.num_kv_heads || s.num_q_heads != cfg_.num_q_heads ||
        s.head_dim != cfg_.head_dim())
      throw kvevict::ShapeError("llama2::Transformer::forward: the cache's shape does not match the model (use Config::cache_shape)");
  }

  // out = weight * x / sqrt(mean(x^2) + 1e-5), as llama2.c.
  void rmsnorm(Vec& out, const Vec& x, const float* weight) const {
    const float inv = 1.0f / std::sqrt(x.squaredNorm() / static_cast<float>(x.size()) + 1e-5f);
    out = ConstVec(weight, x.size()).cwiseProduct(x) * inv;
  }

  // RoPE on interleaved pairs (2i, 2i+1) of every head, frequency 10000^(-2i / head_dim).
  void rope(Vec& v, std::int64_t pos) const {
    const std::int64_t hdim = cfg_.head_dim();
    for (std::int64_t i = 0; i < hdim / 2; ++i) {
      const float freq = 1.0f / std::pow(10000.0f, static_cast<float>(2 * i) / static_cast<float>(hdim));
      const float angle = static_cast<float>(pos) * freq;
      const float c = std::cos(angle), s = std::sin(angle);
      for (std::int64_t h = 0; h < v.size() / hdim; ++h) {
        float& a = v[h * hdim + 2 * i];
        float& b = v[h * hdim + 2 * i + 1];
        const float a0 = a, b0 = b;
        a = a0 * c - b0 * s;
        b = a0 * s + b0 * c;
      }
    }
  }

  Config cfg_;
  Weights w_;
  Vec x_, xb_;      // [dim] residual stream, normalised copy
  Vec q_, k_, v_;   // [q_head, head_dim], [kv_head, head_dim], [kv_head, head_dim]
  Vec att_;         // [q_head, head_dim] attention output
  Vec h1_, h3_;     // [hidden] SwiGLU branches
  Vec logits_;      // [vocab]
  Vec probs_;       // [q_head, capacity] attention probabilities, slot-aligned with the cache
};

}  // namespace llama2
