// Self-tests of the test-support layer: npy I/O, golden-case access, the tie-aware rule and the naive
// references (hand-computed cases, then replays of the StreamingLLM and H2O golden sets).
#include <catch2/catch.hpp>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <numbers>
#include <string>
#include <vector>

#include "support/golden_case.hpp"
#include "support/npy.hpp"
#include "support/reference.hpp"

namespace fs = std::filesystem;
using kvevict::test::GoldenCase;
using kvevict::test::NpyArray;
using kvevict::ref::Mat;
using kvevict::ref::Positions;
using kvevict::ref::Vec;

namespace {

// Per-test scratch directory, removed afterwards.
struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() /
           ("kvevict_selftest_" + std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path operator/(const std::string& name) const { return path / name; }
};

void write_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream f(p, std::ios::binary);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// The contiguous sub-tensor of a C-order array selected by fixing its leading indices.
template <class T>
std::vector<T> slice(const std::vector<T>& flat, const std::vector<int64_t>& shape, const std::vector<int64_t>& lead) {
  int64_t offset = 0, inner = 1;
  for (size_t a = 0; a < shape.size(); ++a) {
    if (a < lead.size()) offset = offset * shape[a] + lead[a];
    else {
      offset *= shape[a];
      inner *= shape[a];
    }
  }
  return {flat.begin() + offset, flat.begin() + offset + inner};
}

// Reshapes a flat [rows * cols] vector into a Mat with `cols` columns.
Mat to_mat(const Vec& flat, int64_t cols) {
  Mat m;
  for (size_t i = 0; i < flat.size(); i += static_cast<size_t>(cols))
    m.emplace_back(flat.begin() + static_cast<std::ptrdiff_t>(i), flat.begin() + static_cast<std::ptrdiff_t>(i) + cols);
  return m;
}

// Non-padding (-1) entries of an index row.
Positions unpad(const std::vector<int64_t>& row) {
  Positions out;
  for (int64_t v : row)
    if (v >= 0) out.push_back(v);
  return out;
}

// Skips (with a warning) only when no golden root is configured; a configured but missing set fails.
std::vector<fs::path> golden_cases_or_skip(const std::string& set) {
  if (kvevict::test::golden_root().empty()) {
    WARN("golden root not configured (KVEVICT_GOLDEN_DIR / KVEVICT_SHARED_DIR); skipping " << set);
    return {};
  }
  auto cases = kvevict::test::list_cases(set);
  INFO("golden root " << kvevict::test::golden_root() << ", set " << set);
  REQUIRE(!cases.empty());
  return cases;
}

double rel_gap(double a, double b) { return std::abs(a - b) / std::max(1.0, std::max(std::abs(a), std::abs(b))); }

}  // namespace

// ---------------------------------------------------------------------------------------------- npy

TEST_CASE("npy round-trips every writable dtype", "[support][npy]") {
  TempDir tmp;
  const std::vector<int64_t> shape{2, 3};

  const std::vector<float> f{1.5f, -2.25f, 0.0f, 3e-8f, 1e30f, -0.0f};
  kvevict::test::save_npy(tmp / "f4.npy", f, shape);
  const NpyArray af = kvevict::test::load_npy(tmp / "f4.npy");
  CHECK(af.dtype == "<f4");
  CHECK(af.shape == shape);
  CHECK(af.numel() == 6);
  CHECK(af.bytes.size() == 24);
  CHECK(af.as<float>() == f);
  CHECK(af.as<double>()[1] == -2.25);

  const std::vector<double> d{1.0 / 3.0, -1e300, 2.0, 0.5, -7.0, 1e-300};
  kvevict::test::save_npy(tmp / "f8.npy", d, shape);
  const NpyArray ad = kvevict::test::load_npy(tmp / "f8.npy");
  CHECK(ad.dtype == "<f8");
  CHECK(ad.as<double>() == d);

  const std::vector<int64_t> i8{-1, 0, 1, (int64_t{1} << 40), -(int64_t{1} << 50), 7};
  kvevict::test::save_npy(tmp / "i8.npy", i8, shape);
  const NpyArray ai8 = kvevict::test::load_npy(tmp / "i8.npy");
  CHECK(ai8.dtype == "<i8");
  CHECK(ai8.as<int64_t>() == i8);
  CHECK(ai8.as<double>()[3] == 1099511627776.0);

  const std::vector<int32_t> i4{-5, 4, 3, 2, 1, 2147483647};
  kvevict::test::save_npy(tmp / "i4.npy", i4, shape);
  const NpyArray ai4 = kvevict::test::load_npy(tmp / "i4.npy");
  CHECK(ai4.dtype == "<i4");
  CHECK(ai4.as<int32_t>() == i4);
  CHECK(ai4.as<int64_t>()[0] == -5);

  const std::vector<uint8_t> u1{0, 1, 2, 128, 254, 255};
  kvevict::test::save_npy(tmp / "u1.npy", u1.data(), shape);
  const NpyArray au1 = kvevict::test::load_npy(tmp / "u1.npy");
  CHECK(au1.dtype == "|u1");
  CHECK(au1.as<uint8_t>() == u1);
  CHECK(au1.as<float>()[3] == 128.0f);

  // The header is a 64-byte multiple, as numpy writes it, and the magic/version are 1.0.
  const std::string raw = read_bytes(tmp / "u1.npy");
  CHECK(raw.substr(0, 8) == std::string("\x93NUMPY\x01\x00", 8));
  CHECK((raw.size() - u1.size()) % 64 == 0);
  CHECK(raw.find("'shape': (2, 3)") != std::string::npos);
}

TEST_CASE("npy shapes: scalar, 1-D, empty, 4-D", "[support][npy]") {
  TempDir tmp;
  const float s = 4.0f;
  kvevict::test::save_npy(tmp / "s.npy", &s, {});
  const NpyArray as = kvevict::test::load_npy(tmp / "s.npy");
  CHECK(as.shape.empty());
  CHECK(as.numel() == 1);
  CHECK(as.as<float>() == std::vector<float>{4.0f});

  const std::vector<int64_t> one{9, 8, 7};
  kvevict::test::save_npy(tmp / "one.npy", one, {3});
  CHECK(read_bytes(tmp / "one.npy").find("(3,)") != std::string::npos);
  CHECK(kvevict::test::load_npy(tmp / "one.npy").shape == std::vector<int64_t>{3});

  kvevict::test::save_npy(tmp / "empty.npy", std::vector<float>{}, {0, 5});
  const NpyArray ae = kvevict::test::load_npy(tmp / "empty.npy");
  CHECK(ae.shape == std::vector<int64_t>{0, 5});
  CHECK(ae.numel() == 0);
  CHECK(ae.as<float>().empty());

  std::vector<int32_t> four(2 * 1 * 3 * 4);
  for (size_t i = 0; i < four.size(); ++i) four[i] = static_cast<int32_t>(i) - 10;
  kvevict::test::save_npy(tmp / "four.npy", four, {2, 1, 3, 4});
  const NpyArray a4 = kvevict::test::load_npy(tmp / "four.npy");
  CHECK(a4.shape == std::vector<int64_t>{2, 1, 3, 4});
  CHECK(slice(a4.as<int32_t>(), a4.shape, {1, 0, 2}) == std::vector<int32_t>{10, 11, 12, 13});

  CHECK_THROWS_AS(kvevict::test::save_npy(tmp / "bad.npy", one, {4}), std::runtime_error);
}

TEST_CASE("npy reads float16 and format 2.0", "[support][npy]") {
  TempDir tmp;
  // 1, -2, +inf, smallest subnormal 2^-24, largest normal 65504, 1/3 rounded (0x3555), -0.
  const std::vector<uint16_t> h{0x3C00, 0xC000, 0x7C00, 0x0001, 0x7BFF, 0x3555, 0x8000};
  kvevict::test::detail::write_npy_raw(tmp / "f2.npy", "<f2", {7}, h.data(), h.size() * 2);
  const NpyArray a = kvevict::test::load_npy(tmp / "f2.npy");
  CHECK(a.dtype == "<f2");
  const std::vector<float> v = a.as<float>();
  CHECK(v[0] == 1.0f);
  CHECK(v[1] == -2.0f);
  CHECK(std::isinf(v[2]));
  CHECK(v[2] > 0);
  CHECK(v[3] == std::ldexp(1.0f, -24));
  CHECK(v[4] == 65504.0f);
  CHECK(v[5] == 0.333251953125f);
  CHECK(v[6] == 0.0f);
  CHECK(std::signbit(v[6]));
  CHECK(std::isnan(kvevict::test::detail::half_to_float(0x7E00)));

  const std::vector<double> d{1.0, 2.0};
  kvevict::test::detail::write_npy_raw(tmp / "v2.npy", "<f8", {1, 2}, d.data(), 16, 2);
  const std::string raw = read_bytes(tmp / "v2.npy");
  REQUIRE(raw[6] == 2);
  const NpyArray a2 = kvevict::test::load_npy(tmp / "v2.npy");
  CHECK(a2.shape == std::vector<int64_t>{1, 2});
  CHECK(a2.as<double>() == d);
}

TEST_CASE("npy rejects bad files with the file name in the message", "[support][npy]") {
  TempDir tmp;
  using Catch::Matchers::Contains;
  auto header_file = [&](const std::string& name, const std::string& dict, size_t payload) {
    std::string h = dict;
    h.append((10 + h.size() + 1 + 63) / 64 * 64 - 10 - h.size() - 1, ' ');  // pad to a 64-byte multiple
    h += '\n';
    std::string out = std::string("\x93NUMPY\x01\x00", 8);
    out += static_cast<char>(h.size() & 0xff);
    out += static_cast<char>(h.size() >> 8);
    write_bytes(tmp / name, out + h + std::string(payload, '\0'));
    return (tmp / name).string();
  };

  const auto fortran = header_file("fortran.npy", "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", 16);
  CHECK_THROWS_WITH(kvevict::test::load_npy(fortran), Contains("fortran.npy") && Contains("fortran_order"));
  const auto big = header_file("big.npy", "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", 8);
  CHECK_THROWS_WITH(kvevict::test::load_npy(big), Contains("big.npy") && Contains(">f4"));
  const auto u2 = header_file("u2.npy", "{'descr': '<u2', 'fortran_order': False, 'shape': (2,), }", 4);
  CHECK_THROWS_WITH(kvevict::test::load_npy(u2), Contains("unsupported dtype"));
  const auto shortf = header_file("short.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", 8);
  CHECK_THROWS_WITH(kvevict::test::load_npy(shortf), Contains("short.npy") && Contains("payload"));
  const auto longf = header_file("long.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", 8);
  CHECK_THROWS_WITH(kvevict::test::load_npy(longf), Contains("payload"));
  // The hand-built header itself is valid: the same layout with the right payload loads.
  const auto ok = header_file("ok.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", 8);
  CHECK(kvevict::test::load_npy(ok).as<float>() == std::vector<float>{0.0f, 0.0f});

  write_bytes(tmp / "magic.npy", "NOTNUMPYATALL");
  CHECK_THROWS_WITH(kvevict::test::load_npy(tmp / "magic.npy"), Contains("magic.npy") && Contains("magic"));
  CHECK_THROWS_WITH(kvevict::test::load_npy(tmp / "missing.npy"), Contains("missing.npy"));
}

// ------------------------------------------------------------------------------------- golden access

TEST_CASE("golden_root honours the environment in order", "[support][golden]") {
  const char* g = std::getenv("KVEVICT_GOLDEN_DIR");
  const char* s = std::getenv("KVEVICT_SHARED_DIR");
  const std::string saved_g = g ? g : "", saved_s = s ? s : "";
  setenv("KVEVICT_GOLDEN_DIR", "/x/golden", 1);
  setenv("KVEVICT_SHARED_DIR", "/y", 1);
  CHECK(kvevict::test::golden_root() == fs::path("/x/golden"));
  unsetenv("KVEVICT_GOLDEN_DIR");
  CHECK(kvevict::test::golden_root() == fs::path("/y/golden"));
  unsetenv("KVEVICT_SHARED_DIR");
#ifdef KVEVICT_DEFAULT_GOLDEN_DIR
  CHECK(kvevict::test::golden_root() == fs::path(KVEVICT_DEFAULT_GOLDEN_DIR));
#else
  CHECK(kvevict::test::golden_root().empty());
#endif
  if (g) setenv("KVEVICT_GOLDEN_DIR", saved_g.c_str(), 1);
  if (s) setenv("KVEVICT_SHARED_DIR", saved_s.c_str(), 1);
}

TEST_CASE("a real golden keep_indices.npy matches its params.json entry", "[support][golden][npy]") {
  const auto cases = golden_cases_or_skip("streaming_llm");
  if (cases.empty()) return;
  const GoldenCase c(cases.front());
  CHECK(c.policy == "streaming_llm");
  CHECK(c.dir == cases.front());
  REQUIRE(c.has("keep_indices"));
  CHECK_FALSE(c.has("no_such_tensor"));

  // Read with the raw reader, independently of GoldenCase::load's own check.
  const NpyArray a = kvevict::test::load_npy(c.dir / "keep_indices.npy");
  const auto& entry = c.params["files"]["keep_indices.npy"];
  CHECK(a.dtype == "<i8");
  CHECK(entry["dtype"] == "int64");
  CHECK(a.shape == entry["shape"].get<std::vector<int64_t>>());
  CHECK(c.load("keep_indices").shape == a.shape);
  CHECK_THROWS_AS(c.load("no_such_tensor"), std::runtime_error);

  const auto names = [] {
    std::vector<std::string> v;
    for (const auto& p : kvevict::test::list_cases("streaming_llm")) v.push_back(p.filename().string());
    return v;
  }();
  CHECK(std::is_sorted(names.begin(), names.end()));
  CHECK(kvevict::test::list_cases("no_such_set").empty());
}

TEST_CASE("GoldenCase::load checks shape against params.json", "[support][golden]") {
  TempDir tmp;
  std::ofstream(tmp / "params.json") << R"({"policy": "fake", "files": {"a.npy": {"dtype": "int64", "shape": [3]},
                                            "b.npy": {"dtype": "float32", "shape": [2]}}})";
  kvevict::test::save_npy(tmp / "a.npy", std::vector<int64_t>{1, 2}, {2});
  kvevict::test::save_npy(tmp / "b.npy", std::vector<int64_t>{1, 2}, {2});
  const GoldenCase c(tmp.path);
  CHECK(c.policy == "fake");
  CHECK_THROWS_WITH(c.load("a"), Catch::Matchers::Contains("shape"));
  CHECK_THROWS_WITH(c.load("b"), Catch::Matchers::Contains("dtype"));
}

TEST_CASE("tie-aware top-k acceptance rule", "[support][golden]") {
  using kvevict::test::keep_sets_equal_tie_aware;
  const std::vector<float> s{5, 1, 3, 3, 9, 0};
  CHECK(keep_sets_equal_tie_aware(s, {4, 0}, 2));
  CHECK(keep_sets_equal_tie_aware(s, {0, 4}, 2));         // order does not matter
  CHECK(keep_sets_equal_tie_aware(s, {4, 0, 2}, 3));      // either tied 3 is fine
  CHECK(keep_sets_equal_tie_aware(s, {3, 0, 4}, 3));
  CHECK_FALSE(keep_sets_equal_tie_aware(s, {4, 2}, 2));   // skips 5 for a 3
  CHECK_FALSE(keep_sets_equal_tie_aware(s, {4, 0}, 3));   // wrong size
  CHECK_FALSE(keep_sets_equal_tie_aware(s, {4, 4}, 2));   // duplicate
  CHECK_FALSE(keep_sets_equal_tie_aware(s, {4, 6}, 2));   // out of range
  CHECK(keep_sets_equal_tie_aware(s, {}, 0));
  CHECK(keep_sets_equal_tie_aware(s, {0, 1, 2, 3, 4, 5}, 6));
  const std::vector<double> inf{INFINITY, INFINITY, INFINITY, 1.0};
  CHECK(keep_sets_equal_tie_aware(inf, {2, 0}, 2));
  CHECK_FALSE(keep_sets_equal_tie_aware(inf, {3, 0}, 2));
  CHECK_FALSE(keep_sets_equal_tie_aware(std::vector<double>{NAN, 1.0}, {1}, 1));
}

// --------------------------------------------------------------------------------------- references

TEST_CASE("softmax_row", "[support][ref]") {
  for (double p : kvevict::ref::softmax_row({2.0, 2.0, 2.0, 2.0})) CHECK(p == Approx(0.25));
  const Vec p = kvevict::ref::softmax_row({0.0, std::log(3.0)});
  CHECK(p[0] == Approx(0.25));
  CHECK(p[1] == Approx(0.75));
  const Vec big = kvevict::ref::softmax_row({1000.0, 1000.0 + std::log(3.0)});  // no overflow
  CHECK(big[0] == Approx(0.25));
  const Vec masked = kvevict::ref::softmax_row({1.0, -INFINITY, 1.0});
  CHECK(masked == Vec{0.5, 0.0, 0.5});
  CHECK_THROWS(kvevict::ref::softmax_row({-INFINITY}));
}

TEST_CASE("attention_probs and attend", "[support][ref]") {
  // logits q·k * scale: head 0 -> {0, ln 3}; head 1 -> {0, 2 ln 3} = {1, 9} after exp.
  const double l3 = std::log(3.0);
  const Mat probs = kvevict::ref::attention_probs({{1.0, 0.0}, {2.0, 0.0}}, {{0.0, 5.0}, {l3 / 2, 0.0}}, 2.0);
  REQUIRE(probs.size() == 2);
  CHECK(probs[0][0] == Approx(0.25));
  CHECK(probs[0][1] == Approx(0.75));
  CHECK(probs[1][0] == Approx(0.1));
  CHECK(probs[1][1] == Approx(0.9));

  const Vec out = kvevict::ref::attend({1.0}, {{0.0}, {l3}}, {{4.0, 0.0}, {0.0, 4.0}}, 1.0);
  CHECK(out[0] == Approx(1.0));
  CHECK(out[1] == Approx(3.0));
  const Vec mean = kvevict::ref::attend({0.0, 0.0}, {{1.0, 2.0}, {3.0, 4.0}, {5.0, 6.0}}, {{3.0}, {6.0}, {0.0}}, 1.0);
  CHECK(mean[0] == Approx(3.0));
}

TEST_CASE("column_sums masks by original position", "[support][ref]") {
  // Zero queries: uniform over the visible keys.
  const Mat q(2, Vec{0.0, 0.0});
  const Mat k(3, Vec{1.0, -1.0});
  // Contiguous positions 0,1,2; queries at 1 and 2: {1/2,1/2,0} + {1/3,1/3,1/3}.
  Vec s = kvevict::ref::column_sums(q, k, {0, 1, 2}, 1, 1.0);
  CHECK(s[0] == Approx(5.0 / 6));
  CHECK(s[1] == Approx(5.0 / 6));
  CHECK(s[2] == Approx(1.0 / 3));
  // Gapped positions (an evicted cache) 0,5,9; queries at 5 and 6 both see {0,5} only.
  s = kvevict::ref::column_sums(q, k, {0, 5, 9}, 5, 1.0);
  CHECK(s == Vec{1.0, 1.0, 0.0});
  // A query before every key contributes nothing.
  s = kvevict::ref::column_sums({{0.0, 0.0}}, k, {3, 4, 5}, 0, 1.0);
  CHECK(s == Vec{0.0, 0.0, 0.0});
  // Non-trivial logits: single query at position 1 sees keys 0,1 with logits {0, ln 3}.
  s = kvevict::ref::column_sums({{std::log(3.0)}}, {{0.0}, {1.0}, {100.0}}, {0, 1, 2}, 1, 1.0);
  CHECK(s[0] == Approx(0.25));
  CHECK(s[1] == Approx(0.75));
  CHECK(s[2] == 0.0);
}

TEST_CASE("topk_keep: protected entries plus best k by (score desc, pos asc)", "[support][ref]") {
  const Vec s{5, 1, 3, 3, 9, 0, 2};
  const Positions pos{0, 1, 2, 3, 4, 5, 6};
  CHECK(kvevict::ref::topk_keep(s, pos, 2, 1, 6) == Positions{0, 2, 4, 6});  // tie 3/3 -> lower position
  CHECK(kvevict::ref::topk_keep(s, pos, 0, 1, 6) == Positions{0, 6});
  CHECK(kvevict::ref::topk_keep(s, pos, 9, 1, 6) == pos);
  CHECK(kvevict::ref::topk_keep(s, pos, 3, 0, 100) == Positions{0, 2, 4});
  const Positions gapped{10, 20, 30, 40, 50, 60, 70};
  CHECK(kvevict::ref::topk_keep(s, gapped, 1, [](int64_t p) { return p == 20; }) == Positions{20, 50});
}

TEST_CASE("streaming_llm_keep and evict_for_space", "[support][ref]") {
  using kvevict::ref::streaming_llm_evict_for_space;
  using kvevict::ref::streaming_llm_keep;
  CHECK(streaming_llm_keep(10, 2, 3) == Positions{0, 1, 7, 8, 9});
  CHECK(streaming_llm_keep(5, 2, 3) == Positions{0, 1, 2, 3, 4});
  CHECK(streaming_llm_keep(6, 2, 3) == Positions{0, 1, 3, 4, 5});
  CHECK(streaming_llm_keep(10, 0, 3) == Positions{7, 8, 9});
  CHECK(streaming_llm_evict_for_space(10, 2, 3, 1) == Positions{0, 1, 8, 9});
  CHECK(streaming_llm_evict_for_space(10, 2, 3, 3) == Positions{0, 1});
  CHECK(streaming_llm_evict_for_space(10, 2, 3, 7) == Positions{0, 1});
  CHECK(streaming_llm_evict_for_space(2, 2, 3, 3) == Positions{0, 1});
  CHECK(streaming_llm_evict_for_space(4, 2, 3, 1) == Positions{0, 1, 2, 3});
}

TEST_CASE("H2OReference on a hand-computed trace", "[support][ref]") {
  kvevict::ref::H2OReference h2o(1, 1);
  // Prefill colsums {1.7, 0.8, 0.5}; T = 3 > 2: heavy = best of positions {0,1} -> 0; recent = {2}.
  h2o.prefill({{1.0, 0.0, 0.0}, {0.5, 0.5, 0.0}, {0.2, 0.3, 0.5}});
  CHECK(h2o.kept_positions() == Positions{0, 2});
  CHECK(h2o.scores()[0] == Approx(1.7));
  CHECK(h2o.scores()[1] == Approx(0.5));
  // Step at position 3 over slots (0, 2, 3): scores {1.8, 1.4, 0.0}; heavy among {0, 2} -> 0.
  h2o.step({0.1, 0.9, 0.0});
  CHECK(h2o.kept_positions() == Positions{0, 3});
  CHECK(h2o.scores()[1] == Approx(0.0));
  // Step at position 4 over (0, 3, 4): {1.8, 2.0, 0.0}: position 3 now outranks the sink.
  h2o.step({0.0, 2.0, 0.0});
  CHECK(h2o.kept_positions() == Positions{3, 4});
  CHECK(h2o.scores() == Vec{2.0, 0.0});
  CHECK_THROWS(h2o.step({1.0}));  // row length must be len() + 1

  // Below the budget nothing is evicted but scores still accumulate.
  kvevict::ref::H2OReference big(4, 4);
  big.prefill({{1.0, 0.0}, {0.5, 0.5}});
  big.step({0.2, 0.2, 0.6});
  CHECK(big.kept_positions() == Positions{0, 1, 2});
  CHECK(big.scores()[0] == Approx(1.7));
  CHECK(big.scores()[1] == Approx(0.7));
  CHECK(big.scores()[2] == Approx(0.6));

  // hh = 0 keeps only the recent window; recent = 0 ranks every slot.
  kvevict::ref::H2OReference rec_only(0, 2);
  rec_only.prefill({{1, 0, 0}, {0.5, 0.5, 0}, {0.9, 0.05, 0.05}});
  CHECK(rec_only.kept_positions() == Positions{1, 2});
  kvevict::ref::H2OReference hh_only(2, 0);
  hh_only.prefill({{1, 0, 0}, {0.5, 0.5, 0}, {0.1, 0.1, 0.8}});
  CHECK(hh_only.kept_positions() == Positions{0, 2});
}

TEST_CASE("H2OReference group aggregation (GQA extension)", "[support][ref]") {
  using kvevict::ref::GroupAgg;
  // head 0 colsums {1.6, 0.6, 0.8}, head 1 {1.0, 1.9, 0.1}; hh = 1 among {0, 1}, recent = {2}.
  const std::vector<Mat> attn{{{1, 0, 0}, {0.5, 0.5, 0}, {0.1, 0.1, 0.8}}, {{1, 0, 0}, {0, 1, 0}, {0, 0.9, 0.1}}};
  for (auto [agg, want] : {std::pair{GroupAgg::mean, Positions{0, 2}}, std::pair{GroupAgg::sum, Positions{0, 2}},
                           std::pair{GroupAgg::max, Positions{1, 2}}}) {
    kvevict::ref::H2OReference h2o(1, 1, 2, agg);
    h2o.update(attn);
    CHECK(h2o.kept_positions() == want);
  }
  kvevict::ref::H2OReference mean(1, 1, 2, GroupAgg::mean);
  mean.update(attn);
  REQUIRE(mean.head_scores().size() == 2);
  CHECK(mean.head_scores()[0][0] == Approx(1.6));
  CHECK(mean.head_scores()[0][1] == Approx(0.8));
  CHECK(mean.head_scores()[1][0] == Approx(1.0));
  CHECK(mean.head_scores()[1][1] == Approx(0.1));
  CHECK(mean.scores()[0] == Approx(1.3));
  CHECK(mean.scores()[1] == Approx(0.45));
  CHECK_THROWS(mean.update({attn[0]}));  // wrong group size
}

TEST_CASE("rope: hand-computed rotations, norm, layouts", "[support][ref]") {
  using kvevict::ref::rope_halves;
  using kvevict::ref::rope_interleaved;
  // 2-D: rotate (1, 0) by pos * base^0 = 1 rad.
  Vec r = rope_interleaved({1.0, 0.0}, 1, 10000.0, 2);
  CHECK(r[0] == Approx(std::cos(1.0)));
  CHECK(r[1] == Approx(std::sin(1.0)));
  r = rope_interleaved({0.0, 2.0}, 3, 10000.0, 2);  // (0, 2) at 3 rad -> (-2 sin 3, 2 cos 3)
  CHECK(r[0] == Approx(-2 * std::sin(3.0)));
  CHECK(r[1] == Approx(2 * std::cos(3.0)));
  // 4-D, base 100: pair 0 at 2 rad, pair 1 at 2 * 100^(-1/2) = 0.2 rad; dims 4,5 untouched.
  r = rope_interleaved({1.0, 0.0, 1.0, 0.0, 7.0, -7.0}, 2, 100.0, 4);
  CHECK(r[0] == Approx(std::cos(2.0)));
  CHECK(r[1] == Approx(std::sin(2.0)));
  CHECK(r[2] == Approx(std::cos(0.2)));
  CHECK(r[3] == Approx(std::sin(0.2)));
  CHECK(r[4] == 7.0);
  CHECK(r[5] == -7.0);
  r = rope_halves({1.0, 1.0, 0.0, 0.0, 7.0, -7.0}, 2, 100.0, 4);  // pairs (0,2) at 2 rad, (1,3) at 0.2 rad
  CHECK(r[0] == Approx(std::cos(2.0)));
  CHECK(r[2] == Approx(std::sin(2.0)));
  CHECK(r[1] == Approx(std::cos(0.2)));
  CHECK(r[3] == Approx(std::sin(0.2)));
  CHECK(r[4] == 7.0);

  const Vec v{0.3, -1.2, 2.5, 0.7, -0.4, 1.1, 0.9, -2.0};
  const Vec k{1.3, 0.2, -0.5, 0.8, 2.4, -1.0, 0.1, 0.6};
  for (auto rope : {rope_interleaved, rope_halves}) {
    const Vec a = rope(v, 37, 10000.0, 8);
    CHECK(kvevict::ref::dot(a, a) == Approx(kvevict::ref::dot(v, v)));  // rotation preserves the norm
    CHECK(a != v);
    const Vec twice = rope(rope(v, 5, 500.0, 8), 7, 500.0, 8);  // rotations compose additively
    const Vec once = rope(v, 12, 500.0, 8);
    for (size_t i = 0; i < v.size(); ++i) CHECK(twice[i] == Approx(once[i]));
    // q·k after rotation depends only on the position difference.
    CHECK(kvevict::ref::dot(rope(v, 10, 500.0, 8), rope(k, 4, 500.0, 8)) ==
          Approx(kvevict::ref::dot(rope(v, 106, 500.0, 8), rope(k, 100, 500.0, 8))));
    CHECK(rope(v, 0, 500.0, 8) == v);
    CHECK_THROWS(rope(v, 1, 500.0, 3));
    CHECK_THROWS(rope(v, 1, 500.0, 10));
  }
  // The layouts are the same rotation up to the permutation (2i, 2i+1) <-> (i, i + r/2).
  Vec perm(8);
  for (size_t i = 0; i < 4; ++i) {
    perm[i] = v[2 * i];
    perm[i + 4] = v[2 * i + 1];
  }
  const Vec a = rope_interleaved(v, 9, 10000.0, 8), b = rope_halves(perm, 9, 10000.0, 8);
  for (size_t i = 0; i < 4; ++i) {
    CHECK(b[i] == Approx(a[2 * i]));
    CHECK(b[i + 4] == Approx(a[2 * i + 1]));
  }
}

// ------------------------------------------------------------------- references vs the golden sets

TEST_CASE("streaming_llm reference reproduces the streaming_llm golden set", "[support][ref][golden]") {
  for (const auto& dir : golden_cases_or_skip("streaming_llm")) {
    const GoldenCase c(dir);
    INFO(c.id());
    const auto& hp = c.params["hyperparameters"];
    const int64_t ns = hp["start_size"], nr = hp["recent_size"], S = c.params["shapes"]["seq_len"];
    const std::string mode = c.params["mode"];
    const NpyArray ki = c.load("keep_indices");
    const auto keep = ki.as<int64_t>();
    Positions want;
    if (mode == "call") want = kvevict::ref::streaming_llm_keep(S, ns, nr);
    else if (mode == "evict_for_space") want = kvevict::ref::streaming_llm_evict_for_space(S, ns, nr, hp["num_coming"]);
    else {
      REQUIRE(mode == "decode");
      // eval_long_ppl pattern: trim after prefill, then append one token and trim, every step.
      const NpyArray sk = c.load("step_keep_indices");
      const auto steps = sk.as<int64_t>();
      const int64_t S0 = hp["S0"], T = hp["T"];
      Positions cache;
      for (int64_t t = 0; t <= T; ++t) {
        if (t == 0)
          for (int64_t p = 0; p < S0; ++p) cache.push_back(p);
        else
          cache.push_back(S0 + t - 1);
        Positions trimmed;
        for (int64_t slot : kvevict::ref::streaming_llm_keep(static_cast<int64_t>(cache.size()), ns, nr))
          trimmed.push_back(cache[static_cast<size_t>(slot)]);
        cache = trimmed;
        for (int64_t l = 0; l < sk.shape[1]; ++l)
          for (int64_t h = 0; h < sk.shape[2]; ++h) CHECK(unpad(slice(steps, sk.shape, {t, l, h})) == cache);
      }
      want = cache;
    }
    for (int64_t l = 0; l < ki.shape[0]; ++l)
      for (int64_t h = 0; h < ki.shape[1]; ++h) CHECK(unpad(slice(keep, ki.shape, {l, h})) == want);
  }
}

TEST_CASE("H2OReference, column_sums and attention_probs reproduce h2o_real_drop", "[support][ref][golden]") {
  for (const auto& dir : golden_cases_or_skip("h2o_real_drop")) {
    const GoldenCase c(dir);
    INFO(c.id());
    const auto& hp = c.params["hyperparameters"];
    const int64_t hh = hp["hh_size"], rec = hp["recent_size"], S0 = hp["S0"], T = hp["T"];
    const int64_t L = c.params["shapes"]["layers"], H = c.params["shapes"]["q_heads"], D = c.params["shapes"]["head_dim"];
    const double scale = 1.0 / std::sqrt(static_cast<double>(D));
    const NpyArray qa = c.load("queries"), ka = c.load("keys"), sk = c.load("step_keep_indices");
    const Vec q = qa.as<double>(), k = ka.as<double>();
    const auto steps = sk.as<int64_t>();
    const auto lens = T > 0 ? c.load("attn_decode_lens").as<int64_t>() : std::vector<int64_t>{};

    for (int64_t l = 0; l < L; ++l) {
      const NpyArray pa = c.load("attn_prefill_l" + std::to_string(l));
      const Vec prefill = pa.as<double>();
      const NpyArray da = T > 0 ? c.load("attn_decode_l" + std::to_string(l)) : NpyArray{};
      const Vec decode = T > 0 ? da.as<double>() : Vec{};
      const NpyArray oa = c.load("out_hh_score_l" + std::to_string(l));
      const Vec out_score = oa.as<double>();
      for (int64_t h = 0; h < H; ++h) {
        INFO("layer " << l << " head " << h);
        const Mat qh = to_mat(slice(q, qa.shape, {l, 0, h}), D), kh = to_mat(slice(k, ka.shape, {l, 0, h}), D);
        const Mat prefill_rows = to_mat(slice(prefill, pa.shape, {0, h}), S0);

        // column_sums from Q/K reproduces the prefill accumulated scores (the row sums of the stored attention).
        Positions prompt(static_cast<size_t>(S0));
        for (int64_t p = 0; p < S0; ++p) prompt[static_cast<size_t>(p)] = p;
        const Vec colsum = kvevict::ref::column_sums(Mat(qh.begin(), qh.begin() + S0), Mat(kh.begin(), kh.begin() + S0),
                                                     prompt, 0, scale);
        for (int64_t j = 0; j < S0; ++j) {
          double stored = 0.0;
          for (int64_t i = 0; i < S0; ++i) stored += prefill_rows[static_cast<size_t>(i)][static_cast<size_t>(j)];
          CHECK(rel_gap(colsum[static_cast<size_t>(j)], stored) < 1e-5);
        }

        kvevict::ref::H2OReference h2o(hh, rec);
        h2o.prefill(prefill_rows);
        CHECK(h2o.kept_positions() == unpad(slice(steps, sk.shape, {0, l, h})));
        for (int64_t t = 0; t < T; ++t) {
          const int64_t len = lens[static_cast<size_t>(t)];
          Vec row = slice(decode, da.shape, {t, 0, h});
          row.resize(static_cast<size_t>(len));
          // The stored row is softmax(q_new · K_cache) over the current cache plus the new token.
          Mat cache_keys;
          for (int64_t p : h2o.kept_positions()) cache_keys.push_back(kh[static_cast<size_t>(p)]);
          cache_keys.push_back(kh[static_cast<size_t>(S0 + t)]);
          REQUIRE(static_cast<int64_t>(cache_keys.size()) == len);
          const Vec probs = kvevict::ref::attention_probs({qh[static_cast<size_t>(S0 + t)]}, cache_keys, scale)[0];
          for (int64_t j = 0; j < len; ++j) CHECK(std::abs(probs[static_cast<size_t>(j)] - row[static_cast<size_t>(j)]) < 1e-5);

          h2o.step(row);
          CHECK(h2o.kept_positions() == unpad(slice(steps, sk.shape, {t + 1, l, h})));
        }
        const Vec want = slice(out_score, oa.shape, {h});
        const Vec got = h2o.scores();
        REQUIRE(got.size() == want.size());
        for (size_t j = 0; j < got.size(); ++j) CHECK(rel_gap(got[j], want[j]) < 1e-5);
      }
    }
  }
}
