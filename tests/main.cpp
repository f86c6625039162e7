// The one Catch2 main of kvevict-tests.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
