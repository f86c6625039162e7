// llama2.c checkpoints (legacy v0 format): a 7-int header, then float32 weights. Loads the whole
// file once; the weights are read-only row-major matrices the forward pass maps with Eigen.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "kvevict/kvevict.hpp"

#ifndef KVEVICT_LLAMA2_DEFAULT_MODEL_DIR
#define KVEVICT_LLAMA2_DEFAULT_MODEL_DIR ""
#endif

namespace llama2 {

struct Config {
  std::int64_t dim = 0;         // residual stream width
  std::int64_t hidden_dim = 0;  // SwiGLU width
  std::int64_t num_layers = 0;
  std::int64_t num_q_heads = 0;
  std::int64_t num_kv_heads = 0;  // < num_q_heads for GQA
  std::int64_t vocab_size = 0;
  std::int64_t seq_len = 0;  // context length the model was trained with
  bool shared_classifier = true;

  [[nodiscard]] std::int64_t head_dim() const { return dim / num_q_heads; }
  [[nodiscard]] std::int64_t kv_dim() const { return num_kv_heads * head_dim(); }
  // The kvevict cache geometry for this model with `capacity` slots per (layer, kv_head).
  [[nodiscard]] kvevict::CacheShape cache_shape(std::int64_t capacity) const {
    return {num_layers, num_kv_heads, num_q_heads, head_dim(), capacity};
  }
};

// Offsets into one float array; every matrix is [out, in] row-major, per-layer ones stacked.
struct Weights {
  const float* token_embedding = nullptr;  // [vocab, dim]
  const float* rms_att = nullptr;          // [layer, dim]
  const float* wq = nullptr;               // [layer, q_heads * head_dim, dim]
  const float* wk = nullptr;               // [layer, kv_dim, dim]
  const float* wv = nullptr;               // [layer, kv_dim, dim]
  const float* wo = nullptr;               // [layer, dim, q_heads * head_dim]
  const float* rms_ffn = nullptr;          // [layer, dim]
  const float* w1 = nullptr;               // [layer, hidden, dim]
  const float* w2 = nullptr;               // [layer, dim, hidden]
  const float* w3 = nullptr;               // [layer, hidden, dim]
  const float* rms_final = nullptr;        // [dim]
  const float* classifier = nullptr;       // [vocab, dim]
};

// $KVEVICT_MODEL_DIR, else the directory CMake was configured with (KVEVICT_MODEL_DIR).
inline std::filesystem::path model_dir() {
  const char* env = std::getenv("KVEVICT_MODEL_DIR");
  return (env != nullptr && *env != '\0') ? std::filesystem::path(env) : std::filesystem::path(KVEVICT_LLAMA2_DEFAULT_MODEL_DIR);
}

inline std::vector<char> read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw kvevict::IoError("llama2: cannot open '" + path.string() + "'");
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

class Model {
 public:
  explicit Model(const std::filesystem::path& path) {
    const std::vector<char> bytes = read_file(path);
    std::int32_t header[7];
    if (bytes.size() < sizeof header) fail(path, "is shorter than the 28-byte header");
    std::memcpy(header, bytes.data(), sizeof header);
    cfg_ = {header[0], header[1], header[2], header[3], header[4], header[5], header[6], header[5] > 0};
    cfg_.vocab_size = cfg_.vocab_size < 0 ? -cfg_.vocab_size : cfg_.vocab_size;  // negative: separate classifier
    if (cfg_.dim <= 0 || cfg_.hidden_dim <= 0 || cfg_.num_layers <= 0 || cfg_.num_q_heads <= 0 || cfg_.num_kv_heads <= 0 ||
        cfg_.vocab_size <= 0 || cfg_.seq_len <= 0 || cfg_.dim % cfg_.num_q_heads != 0 ||
        cfg_.num_q_heads % cfg_.num_kv_heads != 0 || cfg_.head_dim() % 2 != 0)
      fail(path, "has an inconsistent header (not a legacy llama2.c checkpoint?)");

    data_.resize((bytes.size() - sizeof header) / sizeof(float));
    std::memcpy(data_.data(), bytes.data() + sizeof header, data_.size() * sizeof(float));
    const std::int64_t d = cfg_.dim, l = cfg_.num_layers, hd = cfg_.hidden_dim, kv = cfg_.kv_dim();
    std::int64_t off = 0;
    auto take = [&](std::int64_t n) {
      if (off + n > static_cast<std::int64_t>(data_.size())) fail(path, "is shorter than its header says");
      const float* p = data_.data() + off;
      off += n;
      return p;
    };
    w_.token_embedding = take(cfg_.vocab_size * d);
    w_.rms_att = take(l * d);
    w_.wq = take(l * d * d);
    w_.wk = take(l * kv * d);
    w_.wv = take(l * kv * d);
    w_.wo = take(l * d * d);
    w_.rms_ffn = take(l * d);
    w_.w1 = take(l * hd * d);
    w_.w2 = take(l * d * hd);
    w_.w3 = take(l * hd * d);
    w_.rms_final = take(d);
    take(cfg_.seq_len * cfg_.head_dim());  // legacy freq_cis_real and freq_cis_imag, unused
    w_.classifier = cfg_.shared_classifier ? w_.token_embedding : take(cfg_.vocab_size * d);
  }
  Model(const Model&) = delete;  // Weights point into data_
  Model& operator=(const Model&) = delete;

  [[nodiscard]] const Config& config() const noexcept { return cfg_; }
  [[nodiscard]] const Weights& weights() const noexcept { return w_; }

 private:
  [[noreturn]] static void fail(const std::filesystem::path& path, const std::string& what) {
    throw kvevict::IoError("llama2: checkpoint '" + path.string() + "' " + what);
  }

  Config cfg_;
  std::vector<float> data_;
  Weights w_;
};

}  // namespace llama2
