// kvevict umbrella: core, policies and the CPU backend.
#pragma once

#include "kvevict/backends/cpu/cpu_backend.hpp"
#include "kvevict/core/backend.hpp"
#include "kvevict/core/error.hpp"
#include "kvevict/core/kv_cache.hpp"
#include "kvevict/core/layer_view.hpp"
#include "kvevict/core/memory_space.hpp"
#include "kvevict/core/observation.hpp"
#include "kvevict/core/plan.hpp"
#include "kvevict/core/policy.hpp"
#include "kvevict/core/rope.hpp"
#include "kvevict/core/shape.hpp"
#include "kvevict/policies/h2o.hpp"
#include "kvevict/policies/key_policies.hpp"
#include "kvevict/policies/snapkv.hpp"
#include "kvevict/policies/streaming_llm.hpp"
#include "kvevict/policies/tova.hpp"
