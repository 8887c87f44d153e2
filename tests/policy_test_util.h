// Helpers for the policy tests: hand-built snapshots.
#ifndef KVCACHE_TESTS_POLICY_TEST_UTIL_H_
#define KVCACHE_TESTS_POLICY_TEST_UTIL_H_

#include <cstdint>
#include <numeric>
#include <vector>

#include <catch2/catch.hpp>

#include <string_view>

#include "kvcache/policy/registry.h"
#include "kvcache/policy/snapshot.h"

namespace kvcache::policy::testing {

// A snapshot whose every stream holds n tokens at positions 0..n-1 (text), zero accumulators.
inline SequenceSnapshot Uniform(int32_t layers, int32_t kv_heads, int32_t q_heads, int32_t dim,
                                int32_t n) {
  SequenceSnapshot s = SequenceSnapshot::Make(layers, kv_heads, q_heads, dim);
  s.sequence = 7;
  for (StreamSnapshot& st : s.streams) {
    st.positions.resize(n);
    std::iota(st.positions.begin(), st.positions.end(), 0);
    st.modalities.assign(n, Modality::kText);
    st.accumulated.assign(n, 0.0f);
  }
  return s;
}

// Builds the policy `spec` and plans `s`; fails the running test on any error.
inline EvictionPlan MustPlan(std::string_view spec, const SequenceSnapshot& s) {
  auto p = CreatePolicy(spec);
  REQUIRE(p.ok());
  auto plan = (*p)->Plan(s);
  INFO(plan.status().message());
  REQUIRE(plan.ok());
  return *plan;
}

}  // namespace kvcache::policy::testing

#endif  // KVCACHE_TESTS_POLICY_TEST_UTIL_H_
