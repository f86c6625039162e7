// Schedule part: when a policy evicts.
#pragma once

namespace kvevict {

enum class Schedule {
  prefill_and_every_step,  // compress at prefill, then one eviction per decode step once full
  prefill_only,            // one-shot prefill compression (KVCache-Factory, kvpress); decode appends freely
};

}  // namespace kvevict
