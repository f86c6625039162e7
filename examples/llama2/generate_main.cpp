// llama2-generate: greedy generation with any kvevict policy, run.c style. The prompt is fed token
// by token (every token a decode step), then the argmax is appended until --steps tokens.
#include <algorithm>
#include <cstdint>
#include <span>
#include <exception>
#include <iostream>
#include <string>
#include <variant>

#include "policies.hpp"
#include "sampling.hpp"
#include "tokenizer.hpp"
#include "transformer.hpp"

int main(int argc, char** argv) {
  std::string prompt, policy_name = "full";
  std::int64_t steps = 256, budget = 64;
  try {
    for (int i = 1; i + 1 < argc; i += 2) {
      const std::string key = argv[i], value = argv[i + 1];
      if (key == "--prompt") prompt = value;
      else if (key == "--policy") policy_name = value;
      else if (key == "--budget") budget = std::stoll(value);
      else if (key == "--steps") steps = std::stoll(value);
      else {
        std::cerr << "usage: llama2-generate [--prompt TEXT] [--steps N] [--policy NAME (see kvevict-eval --help)] [--budget B]\n";
        return 2;
      }
    }
    const auto dir = llama2::model_dir();
    const llama2::Model model(dir / "stories260K.bin");
    const llama2::Config& cfg = model.config();
    const llama2::Tokenizer tokenizer(dir / "tok512.bin", cfg.vocab_size);
    llama2::Transformer transformer(model);
    // The runtime choice of policy: one std::visit for the whole generation.
    std::visit(
        [&]<class Entry>(Entry) {
          llama2::Cache cache(cfg.cache_shape(llama2::cache_capacity<Entry>(cfg, budget)));  // allocate once
          typename Entry::Policy policy(cache, Entry::config(budget));                       // validates
          const std::vector<int> tokens = tokenizer.encode(prompt, /*bos=*/true, /*eos=*/false);
          const std::int64_t max_steps = Entry::bounded ? steps : std::min(steps, cfg.seq_len);  // full: one context
          int token = tokens[0];
          for (std::int64_t pos = 0; pos < max_steps; ++pos) {
            const std::span<const float> logits = transformer.template forward<Entry::observe>(token, cache, policy);
            const int next = pos + 1 < static_cast<std::int64_t>(tokens.size()) ? tokens[static_cast<std::size_t>(pos + 1)]
                                                                                : llama2::argmax(logits);
            if (next == llama2::Tokenizer::kBos) break;  // the model ends a story by starting the next
            std::cout << tokenizer.decode(token, next) << std::flush;
            token = next;
          }
          const kvevict::MemoryReport r = policy.report(cache);
          std::cout << "\n[" << r.policy << ": " << r.entries << " entries, " << r.kv_bytes << " KV bytes kept]\n";
        },
        llama2::policy_entry(policy_name));
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "llama2-generate: " << e.what() << "\n";
    return 1;
  }
}
