// KeyIndex over hnswlib (Debian's libhnswlib-dev, used through its public API): an L2 graph over
// the keys under IceFormer's MIPS -> NN transform, so the nearest neighbours of T_Q(q) are the
// keys with the largest q.k. This is the only file that includes the (heavy) hnswlib header.
#include <algorithm>
#include <cmath>
#include <exception>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cpu/sparse_decode.h"

// hnswlib 0.6.2's SSE prefetch hints read one link-list entry past the end of a node's list
// (searchBaseLayer: *(datal + j + 1)); harmless in practice (the value is only used as a prefetch
// address) but a real out-of-bounds read that AddressSanitizer reports. Sanitizer builds use
// hnswlib's scalar path, which has no prefetches; normal builds keep the SSE distances.
#if defined(__SANITIZE_ADDRESS__) && !defined(NO_MANUAL_VECTORIZATION)
#define NO_MANUAL_VECTORIZATION
#endif
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wunused-variable"
#pragma GCC diagnostic ignored "-Wunused-but-set-variable"
#pragma GCC diagnostic ignored "-Wshadow"
#pragma GCC diagnostic ignored "-Wconversion"
#pragma GCC diagnostic ignored "-Wsign-conversion"
#pragma GCC diagnostic ignored "-Wold-style-cast"
#pragma GCC diagnostic ignored "-Wpedantic"
#include <hnswlib/hnswlib.h>
#pragma GCC diagnostic pop

namespace kvcache::cpu {
namespace {

class HnswKeyIndex final : public KeyIndex {
 public:
  explicit HnswKeyIndex(const KeyIndexParams& p)
      : head_dim_(p.head_dim),
        max_norm_(p.max_norm),
        space_(static_cast<size_t>(p.head_dim) + 1),
        graph_(std::make_unique<hnswlib::HierarchicalNSW<float>>(
            &space_, static_cast<size_t>(std::max(p.capacity, 16)), static_cast<size_t>(p.m),
            static_cast<size_t>(p.ef_construction), /*random_seed=*/100)) {}

  bool Add(const float* keys, int32_t count) override {
    const int32_t d = head_dim_;
    for (int32_t t = 0; t < count; ++t) {
      double sq = 0.0;
      for (int32_t c = 0; c < d; ++c) {
        const double x = keys[static_cast<int64_t>(t) * d + c];
        sq += x * x;
      }
      if (!(std::sqrt(sq) <= max_norm_)) return false;  // also rejects NaN
    }
    const size_t needed = static_cast<size_t>(size_) + count;
    if (needed > graph_->max_elements_) {
      graph_->resizeIndex(std::max(needed, 2 * graph_->max_elements_));
    }
    // Serial insertion: hnswlib's addPoint may run concurrently, but then the graph (and so
    // which keys a search finds) depends on thread scheduling; serial insertion with a fixed
    // level seed makes retrieval reproducible run to run.
    std::vector<float> x(d + 1);
    for (int32_t t = 0; t < count; ++t) {
      MipsTransformKey(keys + static_cast<int64_t>(t) * d, d, max_norm_, x.data());
      graph_->addPoint(x.data(), static_cast<hnswlib::labeltype>(size_ + t));
    }
    size_ += count;
    return true;
  }

  int32_t size() const override { return size_; }
  float max_norm() const override { return max_norm_; }
  void SetSearchBeam(int32_t ef) override { graph_->setEf(static_cast<size_t>(std::max(ef, 1))); }

  int32_t Search(const float* q, int32_t k, int32_t* ids) const override {
    if (size_ == 0 || k <= 0) return 0;
    std::vector<float> x(head_dim_ + 1);
    MipsTransformQuery(q, head_dim_, x.data());
    auto result = graph_->searchKnn(x.data(), static_cast<size_t>(k));
    int32_t n = 0;
    while (!result.empty()) {
      ids[n++] = static_cast<int32_t>(result.top().second);
      result.pop();
    }
    return n;
  }

  int64_t MemoryBytes() const override {
    // Level 0 holds, per element, its links, its vector and its label; upper levels are ~1/M of it.
    return static_cast<int64_t>(graph_->max_elements_) *
           static_cast<int64_t>(graph_->size_data_per_element_ +
                                graph_->size_links_per_element_ / std::max<size_t>(graph_->M_, 1));
  }

 private:
  int32_t head_dim_;
  float max_norm_;
  int32_t size_ = 0;
  hnswlib::L2Space space_;
  std::unique_ptr<hnswlib::HierarchicalNSW<float>> graph_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<KeyIndex>> CreateHnswKeyIndex(const KeyIndexParams& params) {
  if (params.head_dim <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("key index: head_dim ", params.head_dim));
  }
  if (!(params.max_norm > 0.0f) || !std::isfinite(params.max_norm)) {
    return absl::InvalidArgumentError(absl::StrCat("key index: max_norm ", params.max_norm,
                                                   " must be finite and > 0"));
  }
  if (params.m < 2 || params.ef_construction < 1) {
    return absl::InvalidArgumentError(absl::StrCat("key index: m ", params.m, ", ef_construction ",
                                                   params.ef_construction));
  }
  try {
    return std::unique_ptr<KeyIndex>(new HnswKeyIndex(params));
  } catch (const std::exception& e) {
    return absl::ResourceExhaustedError(absl::StrCat("key index: ", e.what()));
  }
}

}  // namespace kvcache::cpu
