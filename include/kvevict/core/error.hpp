// kvevict error family: one exception hierarchy rooted at kvevict::Error, each with a code.
// Messages name the function, the argument, its value and the rule it broke.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

namespace kvevict {

enum class ErrorCode : int {
  ok = 0,
  invalid_argument,  // a configuration value outside its documented range
  shape_mismatch,    // tensors or shapes that do not fit together
  budget,            // budgets inconsistent with capacity, sinks or windows
  capacity,          // appending beyond the fixed capacity
  non_finite,        // NaN or Inf in queries, probabilities or scores
  empty_cache,       // an operation that needs resident entries found none
  device_mismatch,   // a pointer from the wrong memory space or device
  invariant,         // check_invariants() found corrupted state
  io,                // files (golden cases, checkpoints) unreadable or malformed
  unsupported,       // a valid request this build or backend cannot serve
};

constexpr std::string_view to_string(ErrorCode code) noexcept {
  switch (code) {
    case ErrorCode::ok: return "ok";
    case ErrorCode::invalid_argument: return "invalid_argument";
    case ErrorCode::shape_mismatch: return "shape_mismatch";
    case ErrorCode::budget: return "budget";
    case ErrorCode::capacity: return "capacity";
    case ErrorCode::non_finite: return "non_finite";
    case ErrorCode::empty_cache: return "empty_cache";
    case ErrorCode::device_mismatch: return "device_mismatch";
    case ErrorCode::invariant: return "invariant";
    case ErrorCode::io: return "io";
    case ErrorCode::unsupported: return "unsupported";
  }
  return "unknown";
}

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  [[nodiscard]] ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

// One type per code so callers (and tests) can catch precisely.
template <ErrorCode Code>
class TypedError : public Error {
 public:
  explicit TypedError(const std::string& message) : Error(Code, message) {}
};

using ArgumentError = TypedError<ErrorCode::invalid_argument>;
using ShapeError = TypedError<ErrorCode::shape_mismatch>;
using BudgetError = TypedError<ErrorCode::budget>;
using CapacityError = TypedError<ErrorCode::capacity>;
using NonFiniteError = TypedError<ErrorCode::non_finite>;
using EmptyCacheError = TypedError<ErrorCode::empty_cache>;
using DeviceError = TypedError<ErrorCode::device_mismatch>;
using InvariantError = TypedError<ErrorCode::invariant>;
using IoError = TypedError<ErrorCode::io>;
using UnsupportedError = TypedError<ErrorCode::unsupported>;

namespace detail {

// Builds "kvevict: <where>: argument '<name>' = <value>: <rule>" and throws E.
// Only called on error paths, so formatting cost never reaches a hot loop.
template <class E, class V>
[[noreturn]] void fail(std::string_view where, std::string_view name, const V& value,
                       std::string_view rule) {
  std::ostringstream os;
  os << "kvevict: " << where << ": argument '" << name << "' = " << value << ": " << rule;
  throw E(os.str());
}

template <class E>
[[noreturn]] void fail_state(std::string_view where, std::string_view what) {
  std::ostringstream os;
  os << "kvevict: " << where << ": " << what;
  throw E(os.str());
}

}  // namespace detail
}  // namespace kvevict
