// Locating the model files for tests; a test returns early (after WARN("SKIPPED: ...")) without them.
#pragma once

#include <filesystem>
#include <string>

#include "model.hpp"

namespace llama2::test {

inline bool have_model_files(std::string& reason) {
  const std::filesystem::path dir = model_dir();
  for (const char* f : {"stories260K.bin", "tok512.bin", "tinystories_sample.txt"})
    if (!std::filesystem::exists(dir / f)) {
      reason = "SKIPPED: " + (dir / f).string() + " not found (set KVEVICT_MODEL_DIR or run scripts/download_model.sh)";
      return false;
    }
  return true;
}

// The text PROVENANCE.md gives for greedy decoding from BOS with the full cache (run.c's output).
inline constexpr const char* kGreedyStory =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a "
    "big, red ball. She wanted to play with it, but it was too high.";

}  // namespace llama2::test
