// kvevict-eval: quality of every policy and budget against the full cache on a llama2.c model.
// Prints a Markdown table, optionally writes a CSV and an SVG plot; progress goes to stderr.
#include <algorithm>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "eval.hpp"
#include "plot.hpp"

namespace {

constexpr const char* kUsage = R"(usage: kvevict-eval [options]
  --model PATH       llama2.c checkpoint      (default $KVEVICT_MODEL_DIR/stories260K.bin)
  --tokenizer PATH   llama2.c tokenizer       (default $KVEVICT_MODEL_DIR/tok512.bin)
  --text PATH        stories separated by <|endoftext|> lines
                                              (default $KVEVICT_MODEL_DIR/tinystories_sample.txt)
  --policies LIST    comma-separated policy names (default: all registered, listed below)
  --budgets LIST     comma-separated entries per (layer, kv-head) (default 32,64,128,256)
  --sequences N      windows to evaluate (default 64)
  --max-tokens N     tokens per window (default: the model's context length)
  --seed S           picks the stories (default 1)
  --csv PATH         write the results as CSV
  --plot PATH        write the quality-vs-budget plot as SVG
  --quiet            no progress bar
)";

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

std::int64_t to_int(const std::string& key, const std::string& v) {
  std::size_t used = 0;
  const long long n = std::stoll(v, &used);
  if (used != v.size() || n <= 0) throw std::invalid_argument(key + " must be a positive integer, got '" + v + "'");
  return n;
}

void write_file(const std::filesystem::path& path, auto&& write) {
  if (path.has_parent_path()) std::filesystem::create_directories(path.parent_path());
  std::ofstream out(path);
  write(out);
  if (!out) throw kvevict::IoError("kvevict-eval: cannot write '" + path.string() + "'");
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> opt;
  bool quiet = false;
  for (int i = 1; i < argc; ++i) {
    const std::string key = argv[i];
    if (key == "--help" || key == "-h") {
      std::cout << kUsage << "policies:";
      for (const auto& name : llama2::policy_names()) std::cout << ' ' << name;
      std::cout << '\n';
      return 0;
    }
    if (key == "--quiet") {
      quiet = true;
      continue;
    }
    static const char* kKeys[] = {"--model", "--tokenizer", "--text", "--policies", "--budgets", "--sequences",
                                  "--max-tokens", "--seed", "--csv", "--plot"};
    if (std::find(std::begin(kKeys), std::end(kKeys), key) == std::end(kKeys) || i + 1 >= argc) {
      std::cerr << "kvevict-eval: unknown option or missing value: " << key << "\n" << kUsage;
      return 2;
    }
    opt[key.substr(2)] = argv[++i];
  }
  try {
    const std::filesystem::path dir = llama2::model_dir();
    auto get = [&](const std::string& k, const std::string& fallback) { return opt.contains(k) ? opt[k] : fallback; };
    const std::filesystem::path model_path = get("model", (dir / "stories260K.bin").string());
    const std::filesystem::path text_path = get("text", (dir / "tinystories_sample.txt").string());
    const std::vector<std::string> policies = opt.contains("policies") ? split(opt["policies"]) : llama2::policy_names();
    std::vector<std::int64_t> budgets;
    for (const auto& b : split(get("budgets", "32,64,128,256"))) budgets.push_back(to_int("--budgets", b));
    const std::int64_t sequences = to_int("--sequences", get("sequences", "64"));
    const std::uint64_t seed = std::stoull(get("seed", "1"));
    for (const auto& p : policies) (void)llama2::policy_entry(p);  // reject unknown names before loading anything

    const llama2::Model model(model_path);
    const llama2::Config& cfg = model.config();
    const llama2::Tokenizer tokenizer(get("tokenizer", (dir / "tok512.bin").string()), cfg.vocab_size);
    const std::int64_t length = opt.contains("max-tokens") ? std::min(to_int("--max-tokens", opt["max-tokens"]), cfg.seq_len) : cfg.seq_len;
    const auto windows = llama2::make_windows(tokenizer, llama2::read_stories(text_path), sequences, length, seed);
    const llama2::EvalResult result = llama2::run_eval(model, windows, policies, budgets, quiet ? nullptr : &std::cerr);

    std::cout << "kvevict-eval: " << model_path.filename().string() << " (dim " << cfg.dim << ", " << cfg.num_layers << " layers, "
              << cfg.num_q_heads << " q-heads / " << cfg.num_kv_heads << " kv-heads, context " << cfg.seq_len << "), "
              << sequences << " sequences x " << length << " tokens of " << text_path.filename().string() << ", seed " << seed
              << "\nfull-cache perplexity " << std::fixed << std::setprecision(3)
              << result.full.ppl << " over " << result.full.positions
              << " predicted tokens\n\n";
    llama2::write_table(std::cout, result);
    std::cout << "\ntotal " << std::setprecision(1) << result.seconds << " s\n";
    if (opt.contains("csv")) write_file(opt["csv"], [&](std::ostream& o) { llama2::write_csv(o, result); });
    if (opt.contains("plot"))
      write_file(opt["plot"], [&](std::ostream& o) {
        llama2::write_svg(o, result, "kvevict on " + model_path.filename().string() + ": quality vs KV budget (" +
                                         std::to_string(sequences) + " x " + std::to_string(length) + " tokens)");
      });
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "kvevict-eval: " << e.what() << "\n";
    return 1;
  }
}
