// Schedule part: when a policy evicts.
#pragma once

#include <cstdint>

namespace kvevict {

enum class Schedule {
  prefill_and_every_step,     // compress at prefill, then one eviction per decode step once full
  prefill_only,               // one-shot prefill compression (KVCache-Factory, kvpress); decode appends freely
  prefill_and_every_n_steps,  // compress at prefill, then back to budget every decode_interval steps
  every_n_decode_steps,       // never at prefill; back to budget every decode_interval decode steps
                              // (LazyEviction's lagged eviction: step t evicts iff t % interval == 0)
};

}  // namespace kvevict
