// The Catch2 main of kvevict-cuda-tests (a separate binary from kvevict-tests, so it has its own).
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
