// Eviction-plan validation and compilation: see plan_compile.h.
#include "src/plan_compile.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"
#include "src/cache_internal.h"

namespace kvcache::internal {

absl::Status ValidatePlan(const CacheConfig& c, const EvictionPlan& plan,
                          const StreamTable& table) {
  const int32_t d = c.head_dim;
  std::vector<uint8_t> seen(static_cast<size_t>(c.num_layers) * c.num_kv_heads, 0);
  for (size_t p = 0; p < plan.streams.size(); ++p) {
    const StreamPlan& sp = plan.streams[p];
    const std::string where =
        absl::StrCat("Apply: streams[", p, "] (layer ", sp.layer, ", kv_head ", sp.kv_head, "): ");
    if (absl::Status s = CheckStreamIndex(c, sp.layer, sp.kv_head); !s.ok()) {
      return absl::OutOfRangeError(absl::StrCat(where, s.message()));
    }
    const int32_t index = table.Index(sp.layer, sp.kv_head);
    if (seen[index]) return absl::InvalidArgumentError(absl::StrCat(where, "stream named twice"));
    seen[index] = 1;
    const int32_t len = table.stream(index).length();
    for (size_t i = 0; i < sp.kept.size(); ++i) {
      if (sp.kept[i] < 0 || sp.kept[i] >= len) {
        return absl::OutOfRangeError(absl::StrCat(where, "kept[", i, "] = ", sp.kept[i],
                                                  " is outside the stream's ", len, " tokens"));
      }
      if (i > 0 && sp.kept[i] <= sp.kept[i - 1]) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, "kept must be strictly ascending; kept[", i, "] = ", sp.kept[i]));
      }
    }
    for (size_t i = 0; i < sp.key_channels.size(); ++i) {
      if (sp.key_channels[i] < 0 || sp.key_channels[i] >= d) {
        return absl::OutOfRangeError(absl::StrCat(
            where, "key_channels[", i, "] = ", sp.key_channels[i], " is outside [0, ", d, ")"));
      }
      if (i > 0 && sp.key_channels[i] <= sp.key_channels[i - 1]) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, "key_channels must be strictly ascending"));
      }
    }
    if (sp.full_width_recent < 0 || sp.full_width_recent > static_cast<int32_t>(sp.kept.size())) {
      return absl::InvalidArgumentError(absl::StrCat(where,
                                                     "full_width_recent = ", sp.full_width_recent,
                                                     " is outside [0, ", sp.kept.size(), "]"));
    }
    for (const auto* w : {&sp.kept_key_weight, &sp.kept_value_weight}) {
      if (!w->empty() && w->size() != sp.kept.size()) {
        return absl::InvalidArgumentError(absl::StrCat(where, "kept weights have ", w->size(),
                                                       " entries for ", sp.kept.size(),
                                                       " kept tokens"));
      }
      for (float x : *w) {
        if (!std::isfinite(x)) {
          return absl::InvalidArgumentError(
              absl::StrCat(where, "kept weight ", x, " is not finite"));
        }
      }
    }
    for (size_t i = 0; i < sp.merges.size(); ++i) {
      const MergeTerm& t = sp.merges[i];
      if (t.kept_slot < 0 || t.kept_slot >= static_cast<int32_t>(sp.kept.size())) {
        return absl::OutOfRangeError(absl::StrCat(where, "merges[", i,
                                                  "].kept_slot = ", t.kept_slot, " is outside [0, ",
                                                  sp.kept.size(), ")"));
      }
      if (t.source < 0 || t.source >= len) {
        return absl::OutOfRangeError(absl::StrCat(where, "merges[", i, "].source = ", t.source,
                                                  " is outside the stream's ", len, " tokens"));
      }
      if (!std::isfinite(t.key_weight) || !std::isfinite(t.value_weight)) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, "merges[", i, "] has a non-finite weight"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status CheckStamp(const EvictionPlan& plan, const StreamStamp& stamp,
                        const StreamTable& table) {
  const size_t streams = static_cast<size_t>(table.num_streams());
  if (stamp.sequence != plan.sequence) {
    return absl::InvalidArgumentError(absl::StrCat("the stamp is of sequence ", stamp.sequence,
                                                   ", the plan of sequence ", plan.sequence));
  }
  if (stamp.lengths.size() != streams || stamp.versions.size() != streams) {
    return absl::InvalidArgumentError(
        absl::StrCat("the stamp holds ", stamp.lengths.size(), " lengths and ",
                     stamp.versions.size(), " versions; the sequence has ", streams, " streams"));
  }
  for (const StreamPlan& sp : plan.streams) {
    if (sp.kv_head < 0 || sp.kv_head >= table.num_kv_heads() || sp.layer < 0 ||
        static_cast<size_t>(table.Index(sp.layer, sp.kv_head)) >= streams) {
      return absl::OutOfRangeError(absl::StrCat("the plan names layer ", sp.layer, ", kv_head ",
                                                sp.kv_head, ", not a stream of the sequence"));
    }
    const int32_t index = table.Index(sp.layer, sp.kv_head);
    const Stream& st = table.stream(index);
    const std::string stream = absl::StrCat("stream (sequence ", plan.sequence, ", layer ",
                                            sp.layer, ", kv head ", sp.kv_head, ")");
    if (st.version != stamp.versions[index]) {
      return absl::FailedPreconditionError(
          absl::StrCat(stream, " was rebuilt by Apply after the plan was made; plan again"));
    }
    if (st.length() != stamp.lengths[index]) {
      return absl::FailedPreconditionError(absl::StrCat(stream, " has ", st.length(),
                                                        " tokens but had ", stamp.lengths[index],
                                                        " when the plan was made; plan again"));
    }
  }
  return absl::OkStatus();
}

namespace {

// A stream plan that keeps every token unchanged is a no-op: its pages (possibly shared with a
// fork) are left alone instead of being rewritten.
bool IsIdentity(const StreamPlan& sp, int32_t length, int32_t head_dim) {
  const auto all_ones = [](const std::vector<float>& w) {
    return std::all_of(w.begin(), w.end(), [](float x) { return x == 1.0f; });
  };
  return static_cast<int32_t>(sp.kept.size()) == length && sp.merges.empty() &&
         (sp.key_channels.empty() || static_cast<int32_t>(sp.key_channels.size()) == head_dim) &&
         all_ones(sp.kept_key_weight) && all_ones(sp.kept_value_weight);
}

}  // namespace

CompiledPlan CompilePlan(const CacheConfig& c, int64_t page_bytes, const EvictionPlan& plan,
                         StreamTable& table) {
  const int32_t d = c.head_dim;
  const size_t num_plans = plan.streams.size();
  CompiledPlan out;
  out.skip.assign(num_plans, 0);
  for (size_t p = 0; p < num_plans; ++p) {
    const StreamPlan& sp = plan.streams[p];
    out.skip[p] = IsIdentity(sp, table.stream(sp.layer, sp.kv_head).length(), d);
  }

  // Lay out the new segments: a channel-pruned part (when the plan prunes) then a full-width one.
  for (size_t p = 0; p < num_plans; ++p) {
    const StreamPlan& sp = plan.streams[p];
    if (out.skip[p]) continue;
    const int32_t kept = static_cast<int32_t>(sp.kept.size());
    const bool prune = !sp.key_channels.empty() && static_cast<int32_t>(sp.key_channels.size()) < d;
    const int32_t pruned_count = prune ? kept - sp.full_width_recent : 0;
    for (int part = 0; part < 2; ++part) {
      const bool pruned = part == 0;
      const int32_t first = pruned ? 0 : pruned_count;
      const int32_t count = pruned ? pruned_count : kept - pruned_count;
      if (count == 0) continue;
      NewSegment ns{static_cast<int32_t>(p), first, count, {}};
      Segment& s = ns.segment;
      s.key_width = pruned ? static_cast<int32_t>(sp.key_channels.size()) : d;
      s.value_width = d;
      if (pruned) s.key_channels = sp.key_channels;
      s.tokens_per_page = TokensPerPage(page_bytes, s.key_width, s.value_width, c.dtype);
      s.pages.resize(CeilDiv(count, s.tokens_per_page));
      out.total_pages += static_cast<int32_t>(s.pages.size());
      out.fresh.push_back(std::move(ns));
    }
  }

  // Source views and token -> (segment, row) maps, per planned stream.
  std::vector<std::vector<int32_t>> starts(num_plans);  // first stream token of each segment
  out.sources.resize(num_plans);
  for (size_t p = 0; p < num_plans; ++p) {
    const int32_t index = table.Index(plan.streams[p].layer, plan.streams[p].kv_head);
    table.AppendViews(index, out.sources[p]);
    int32_t start = 0;
    for (const SegmentView& v : out.sources[p]) {
      starts[p].push_back(start);
      start += v.length;
    }
  }
  auto locate = [&](size_t p, int32_t token) {
    const std::vector<int32_t>& st = starts[p];
    const int32_t seg =
        static_cast<int32_t>(std::upper_bound(st.begin(), st.end(), token) - st.begin()) - 1;
    return GatherTerm{seg, token - st[seg], 1.0f, 1.0f};
  };

  // Per new segment: its side data and its gather terms (self term, then merges of that slot).
  out.term_offsets.resize(out.fresh.size());
  out.terms.resize(out.fresh.size());
  for (size_t f = 0; f < out.fresh.size(); ++f) {
    NewSegment& ns = out.fresh[f];
    const StreamPlan& sp = plan.streams[ns.plan_index];
    const Stream& st = table.stream(sp.layer, sp.kv_head);
    // The merges of each slot of this segment, in plan order, as CSR (no allocation per slot):
    // slot i's merges are merge_index[merge_start[i] .. merge_start[i + 1]).
    std::vector<int32_t> merge_start, merge_index;
    if (!sp.merges.empty()) {
      merge_start.assign(ns.count + 1, 0);
      for (const MergeTerm& m : sp.merges) {
        if (m.kept_slot >= ns.first_slot && m.kept_slot < ns.first_slot + ns.count) {
          ++merge_start[m.kept_slot - ns.first_slot + 1];
        }
      }
      for (int32_t i = 0; i < ns.count; ++i) merge_start[i + 1] += merge_start[i];
      merge_index.resize(merge_start[ns.count]);
      std::vector<int32_t> fill(merge_start.begin(), merge_start.end() - 1);
      for (size_t m = 0; m < sp.merges.size(); ++m) {
        const int32_t slot = sp.merges[m].kept_slot;
        if (slot >= ns.first_slot && slot < ns.first_slot + ns.count) {
          merge_index[fill[slot - ns.first_slot]++] = static_cast<int32_t>(m);
        }
      }
    }
    Segment& s = ns.segment;
    std::vector<int32_t>& offsets = out.term_offsets[f];
    std::vector<GatherTerm>& terms = out.terms[f];
    s.positions.reserve(ns.count);
    s.modalities.reserve(ns.count);
    s.scores.reserve(ns.count);
    offsets.reserve(ns.count + 1);
    terms.reserve(ns.count + merge_index.size());
    offsets.push_back(0);
    for (int32_t i = 0; i < ns.count; ++i) {
      const int32_t slot = ns.first_slot + i;
      GatherTerm self = locate(ns.plan_index, sp.kept[slot]);
      const Segment& src = st.segments[self.src_segment];
      s.positions.push_back(src.positions[self.src_row]);
      s.modalities.push_back(src.modalities[self.src_row]);
      s.scores.push_back(src.scores[self.src_row]);
      if (!sp.kept_key_weight.empty()) self.key_weight = sp.kept_key_weight[slot];
      if (!sp.kept_value_weight.empty()) self.value_weight = sp.kept_value_weight[slot];
      terms.push_back(self);
      if (!merge_start.empty()) {
        for (int32_t j = merge_start[i]; j < merge_start[i + 1]; ++j) {
          const MergeTerm& m = sp.merges[merge_index[j]];
          GatherTerm t = locate(ns.plan_index, m.source);
          t.key_weight = m.key_weight;
          t.value_weight = m.value_weight;
          terms.push_back(t);
        }
      }
      offsets.push_back(static_cast<int32_t>(terms.size()));
    }
  }
  return out;
}

std::vector<RowGather> Gathers(CompiledPlan& compiled, int32_t head_dim) {
  std::vector<RowGather> gathers;
  gathers.reserve(compiled.fresh.size());
  for (size_t f = 0; f < compiled.fresh.size(); ++f) {
    RowGather g;
    g.sources = compiled.sources[compiled.fresh[f].plan_index];
    g.dst = compiled.fresh[f].segment.View();
    g.term_offsets = compiled.term_offsets[f];
    g.terms = compiled.terms[f];
    g.head_dim = head_dim;
    gathers.push_back(g);
  }
  return gathers;
}

}  // namespace kvcache::internal
