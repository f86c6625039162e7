// llama2.c tokenizer: pieces and merge scores from tok*.bin, encode as run.c does (dummy-prefix
// space, UTF-8 code points or byte fallback, greedy best-score merges) and decode piece by piece.
#pragma once

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "model.hpp"

namespace llama2 {

class Tokenizer {
 public:
  static constexpr int kBos = 1;  // "\n<s>\n": starts every story
  static constexpr int kEos = 2;
  static constexpr int kFirstByteToken = 3;  // tokens 3..258 are the bytes <0x00>..<0xFF>

  // File layout: int32 max_token_length, then vocab_size x {float32 score, int32 length, bytes}.
  Tokenizer(const std::filesystem::path& path, std::int64_t vocab_size) {
    const std::vector<char> bytes = read_file(path);
    std::size_t off = sizeof(std::int32_t);  // max_token_length: not needed with std::string
    auto read = [&](void* dst, std::size_t n) {
      if (off + n > bytes.size()) throw kvevict::IoError("llama2: tokenizer '" + path.string() + "' is truncated");
      std::memcpy(dst, bytes.data() + off, n);
      off += n;
    };
    for (std::int64_t i = 0; i < vocab_size; ++i) {
      float score = 0.0f;
      std::int32_t len = 0;
      read(&score, sizeof score);
      read(&len, sizeof len);
      if (len < 0) throw kvevict::IoError("llama2: tokenizer '" + path.string() + "' has a negative piece length");
      std::string piece(static_cast<std::size_t>(len), '\0');
      read(piece.data(), piece.size());
      index_.emplace(piece, static_cast<int>(i));  // the first of duplicate pieces wins
      pieces_.push_back(std::move(piece));
      scores_.push_back(score);
    }
  }

  [[nodiscard]] std::int64_t vocab_size() const noexcept { return static_cast<std::int64_t>(pieces_.size()); }
  // Token id of a piece, or -1.
  [[nodiscard]] int lookup(const std::string& piece) const {
    auto it = index_.find(piece);
    return it == index_.end() ? -1 : it->second;
  }

  // run.c's encode. Merges repeatedly the adjacent pair whose concatenation is the piece with
  // the highest score (ties: the leftmost pair); pair lookups are cached and only the two pairs
  // next to a merge are recomputed, which keeps run.c's result at a fraction of its cost.
  [[nodiscard]] std::vector<int> encode(std::string_view text, bool bos, bool eos) const {
    std::vector<int> t;
    if (bos) t.push_back(kBos);
    if (const int space = lookup(" "); space >= 0 && !text.empty()) t.push_back(space);  // sentencepiece's add_dummy_prefix
    for (std::size_t i = 0; i < text.size();) {
      std::size_t n = 1;  // one UTF-8 code point: a lead byte and up to 3 continuation bytes
      while (i + n < text.size() && n < 4 && (static_cast<unsigned char>(text[i + n]) & 0xC0) == 0x80) ++n;
      const int id = lookup(std::string(text.substr(i, n)));
      if (id >= 0) {
        t.push_back(id);
      } else {
        for (std::size_t b = i; b < i + n; ++b) t.push_back(static_cast<unsigned char>(text[b]) + kFirstByteToken);
      }
      i += n;
    }
    std::string buf;
    auto merged = [&](std::size_t k) {
      buf.assign(pieces_[static_cast<std::size_t>(t[k])]);
      buf += pieces_[static_cast<std::size_t>(t[k + 1])];
      return lookup(buf);
    };
    std::vector<int> pair(t.size() > 1 ? t.size() - 1 : 0);  // pair[k]: the merge of t[k], t[k+1], or -1
    for (std::size_t k = 0; k < pair.size(); ++k) pair[k] = merged(k);
    for (;;) {
      float best_score = -1e10f;
      std::size_t best = pair.size();
      for (std::size_t k = 0; k < pair.size(); ++k)
        if (pair[k] >= 0 && scores_[static_cast<std::size_t>(pair[k])] > best_score) {
          best_score = scores_[static_cast<std::size_t>(pair[k])];
          best = k;
        }
      if (best == pair.size()) break;
      t[best] = pair[best];
      t.erase(t.begin() + static_cast<std::ptrdiff_t>(best) + 1);
      pair.erase(pair.begin() + static_cast<std::ptrdiff_t>(best));
      if (best > 0) pair[best - 1] = merged(best - 1);
      if (best < pair.size()) pair[best] = merged(best);
    }
    if (eos) t.push_back(kEos);
    return t;
  }

  // The text of `token` after `prev`, as run.c prints it: the leading space of the first piece
  // after BOS is dropped, byte tokens <0xHH> become their byte.
  [[nodiscard]] std::string decode(int prev, int token) const {
    std::string_view p = pieces_.at(static_cast<std::size_t>(token));
    if (prev == kBos && !p.empty() && p.front() == ' ') p.remove_prefix(1);
    if (token >= kFirstByteToken && token < kFirstByteToken + 256 && p.size() == 6 && p.starts_with("<0x"))
      return std::string(1, static_cast<char>(token - kFirstByteToken));
    return std::string(p);
  }
  // Decodes a run of tokens that followed `prev`.
  [[nodiscard]] std::string decode(std::span<const int> tokens, int prev = kBos) const {
    std::string out;
    for (int tok : tokens) {
      out += decode(prev, tok);
      prev = tok;
    }
    return out;
  }

 private:
  std::vector<std::string> pieces_;  // [vocab]
  std::vector<float> scores_;        // [vocab] merge priority
  std::unordered_map<std::string, int> index_;
};

}  // namespace llama2
