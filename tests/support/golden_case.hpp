// Access to the golden case sets (golden/<set>/<case>/params.json + *.npy) and the tie-aware top-k
// acceptance rule of golden/README.md §5.7.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "npy.hpp"  // same directory: works whatever the include path

namespace kvevict::test {

using json = nlohmann::json;

// Root of the golden sets: $KVEVICT_GOLDEN_DIR, else $KVEVICT_SHARED_DIR/golden, else the build's
// KVEVICT_DEFAULT_GOLDEN_DIR, else empty (= not configured; callers decide whether to skip).
inline std::filesystem::path golden_root() {
  if (const char* d = std::getenv("KVEVICT_GOLDEN_DIR"); d && *d) return d;
  if (const char* s = std::getenv("KVEVICT_SHARED_DIR"); s && *s) return std::filesystem::path(s) / "golden";
#ifdef KVEVICT_DEFAULT_GOLDEN_DIR
  return KVEVICT_DEFAULT_GOLDEN_DIR;
#else
  return {};
#endif
}

// Case directories (those holding a params.json) of one set, sorted by name; empty if the set is absent.
inline std::vector<std::filesystem::path> list_cases(const std::string& set) {
  std::vector<std::filesystem::path> out;
  const std::filesystem::path root = golden_root();
  if (root.empty()) return out;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(root / set, ec))
    if (e.is_directory() && std::filesystem::exists(e.path() / "params.json")) out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

class GoldenCase {
 public:
  std::filesystem::path dir;
  json params;
  std::string policy;  // params["policy"], else the set directory's name

  explicit GoldenCase(std::filesystem::path case_dir) : dir(std::move(case_dir)) {
    const auto file = dir / "params.json";
    std::ifstream f(file);
    if (!f) throw std::runtime_error("golden case: cannot open '" + file.string() + "'");
    try {
      params = json::parse(f);
    } catch (const json::exception& e) {
      throw std::runtime_error("golden case: cannot parse '" + file.string() + "': " + e.what());
    }
    policy = params.contains("policy") ? params["policy"].get<std::string>() : dir.parent_path().filename().string();
  }

  std::string id() const { return policy + "/" + dir.filename().string(); }

  // name without ".npy"
  bool has(const std::string& name) const { return std::filesystem::exists(dir / (name + ".npy")); }

  // Loads <name>.npy and, where params["files"] describes it, checks that dtype and shape agree, so a
  // replay never silently indexes a tensor with the wrong layout.
  NpyArray load(const std::string& name) const {
    const auto file = dir / (name + ".npy");
    NpyArray a = load_npy(file);
    const auto files = params.find("files");
    if (files == params.end() || !files->contains(name + ".npy")) return a;
    const json& entry = (*files)[name + ".npy"];
    if (entry.contains("shape") && entry["shape"].get<std::vector<int64_t>>() != a.shape)
      throw std::runtime_error("golden case: '" + file.string() + "' shape differs from params.json: " +
                               entry["shape"].dump());
    if (entry.contains("dtype")) {
      static const std::pair<const char*, const char*> names[] = {
          {"float32", "<f4"}, {"float64", "<f8"}, {"int64", "<i8"},
          {"int32", "<i4"},   {"uint8", "|u1"},   {"float16", "<f2"}};
      const std::string want = entry["dtype"].get<std::string>();
      for (const auto& [np_name, descr] : names)
        if (want == np_name && a.dtype != descr)
          throw std::runtime_error("golden case: '" + file.string() + "' has dtype " + a.dtype +
                                   ", params.json says " + want);
    }
    return a;
  }
};

// Tie-aware acceptance of a top-k selection (golden/README.md §5.7): `chosen` (indices into `scores`,
// any order) is valid iff it holds k distinct in-range indices and min(score[chosen]) >= max(score[rest]),
// i.e. it contains everything above the k-th score and fills up only with entries tied at it.
// NaN scores make every selection invalid.
template <class T>
bool keep_sets_equal_tie_aware(const std::vector<T>& scores, const std::vector<int64_t>& chosen, int64_t k) {
  if (static_cast<int64_t>(chosen.size()) != k) return false;
  std::vector<char> in(scores.size(), 0);
  for (int64_t i : chosen) {
    if (i < 0 || i >= static_cast<int64_t>(scores.size()) || in[static_cast<size_t>(i)]) return false;
    in[static_cast<size_t>(i)] = 1;
  }
  double min_in = std::numeric_limits<double>::infinity();
  double max_out = -std::numeric_limits<double>::infinity();
  for (size_t i = 0; i < scores.size(); ++i) {
    const double s = static_cast<double>(scores[i]);
    if (std::isnan(s)) return false;
    if (in[i]) min_in = std::min(min_in, s);
    else max_out = std::max(max_out, s);
  }
  return min_in >= max_out;
}

}  // namespace kvevict::test
