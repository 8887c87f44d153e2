// kvcache/policy/registry.h — build a policy by name from a parameter string.
//
// Syntax: "name" or "name:key=value,key=value" (no spaces; keys and names are lower case). The
// two-argument form takes the parameter list separately. Errors are InvalidArgument and name the
// policy and the bad part: an unknown policy (listing the known ones), an unknown key (listing
// the keys of that policy), a value that is not a number, or a number out of range. Every policy
// and its defaults: ListPolicies() or docs/POLICIES.md.
//
// Example:
//   auto p = kvcache::policy::CreatePolicy("snapkv", "keep=0.1,window=32");
//   auto q = kvcache::policy::CreatePolicy("vlcache:keep=0.1,p=0.01");
//   for (const auto& info : kvcache::policy::ListPolicies()) std::cout << info.name << "\n";
#ifndef KVCACHE_POLICY_REGISTRY_H_
#define KVCACHE_POLICY_REGISTRY_H_

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "kvcache/policy/policy.h"

namespace kvcache::policy {

struct PolicyInfo {
  std::string name;
  std::string summary;
  std::string defaults;  // "key=value,..." every key the policy accepts with its default
};

[[nodiscard]] absl::StatusOr<std::unique_ptr<Policy>> CreatePolicy(std::string_view spec);
[[nodiscard]] absl::StatusOr<std::unique_ptr<Policy>> CreatePolicy(std::string_view name,
                                                                   std::string_view params);
std::vector<PolicyInfo> ListPolicies();

}  // namespace kvcache::policy

#endif  // KVCACHE_POLICY_REGISTRY_H_
