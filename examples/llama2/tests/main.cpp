// llama2-tests: the engine, tokenizer, metrics and kvevict-eval. Tests that need the model files
// (KVEVICT_MODEL_DIR) skip with a WARN when they are absent.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
