// The llama2.c tokenizer: run.c's encode and decode.
#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "model_files.hpp"
#include "tokenizer.hpp"

namespace {
const llama2::Tokenizer& tokenizer() {
  static const llama2::Tokenizer tok(llama2::model_dir() / "tok512.bin", 512);
  return tok;
}
}  // namespace

TEST_CASE("encoding a sentence and decoding it gives the sentence back", "[tokenizer]") {
  std::string reason;
  if (!llama2::test::have_model_files(reason)) {
    WARN(reason);
    return;
  }
  const std::string text = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.";
  const std::vector<int> t = tokenizer().encode(text, /*bos=*/true, /*eos=*/false);
  REQUIRE(t.size() > 1);
  CHECK(t.front() == llama2::Tokenizer::kBos);
  CHECK(t.size() < text.size() / 2);  // merges happened
  CHECK(tokenizer().decode(std::vector<int>(t.begin() + 1, t.end())) == text);
  CHECK(tokenizer().encode(text, true, true).back() == llama2::Tokenizer::kEos);
}

TEST_CASE("characters outside the vocabulary fall back to byte tokens and decode back", "[tokenizer]") {
  std::string reason;
  if (!llama2::test::have_model_files(reason)) {
    WARN(reason);
    return;
  }
  const std::string text = "Zo\xc3\xab saw a \xf0\x9f\x90\xb8.\nThe end.";  // "Zoë saw a 🐸.\nThe end."
  const std::vector<int> t = tokenizer().encode(text, true, false);
  const std::vector<int> frog = {0xf0 + 3, 0x9f + 3, 0x90 + 3, 0xb8 + 3};  // byte fallback: byte + 3
  CHECK(std::search(t.begin(), t.end(), frog.begin(), frog.end()) != t.end());
  CHECK(tokenizer().decode(std::vector<int>(t.begin() + 1, t.end())) == text);
}

TEST_CASE("the empty string encodes to BOS alone, without the dummy prefix", "[tokenizer]") {
  std::string reason;
  if (!llama2::test::have_model_files(reason)) {
    WARN(reason);
    return;
  }
  CHECK(tokenizer().encode("", true, false) == std::vector<int>{llama2::Tokenizer::kBos});
  CHECK(tokenizer().encode("", false, false).empty());
}
