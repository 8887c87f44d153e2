// Cache::Validate: every invariant of every sequence's stream table against the pool.
#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "kvcache/cache.h"
#include "src/cache_internal.h"

namespace kvcache {

absl::Status Cache::Validate() const {
  const CacheConfig& c = config_;
  // The writer lock stops new operations from starting; in-flight ones finish before we get
  // their sequence locks (they never wait for the map lock while holding a sequence lock).
  absl::MutexLock lock(&mu_);
  std::vector<std::shared_ptr<Sequence>> seqs;
  for (const auto& [id, s] : sequences_) seqs.push_back(s);
  std::sort(seqs.begin(), seqs.end(), [](const auto& a, const auto& b) { return a->id < b->id; });
  for (auto& s : seqs) s->mu.Lock();
  std::vector<int32_t> refs(pool_->num_pages(), 0);
  std::vector<SequenceId> page_owner(pool_->num_pages(), 0);
  absl::Status status = absl::OkStatus();
  auto fail = [&](std::string msg) {
    if (status.ok()) status = absl::InternalError(std::move(msg));
  };
  for (auto& seq : seqs) {
    const internal::StreamTable& table = seq->table;
    if (seq->freed) {
      fail(absl::StrCat("sequence ", seq->id, " is marked freed but still in the map"));
    }
    if (table.num_streams() != c.num_layers * c.num_kv_heads) {
      fail(absl::StrCat("sequence ", seq->id, " has ", table.num_streams(), " streams"));
      continue;
    }
    for (int32_t si = 0; si < table.num_streams(); ++si) {
      const internal::Stream& st = table.stream(si);
      const std::string where = absl::StrCat("sequence ", seq->id, " layer ", si / c.num_kv_heads,
                                             " kv_head ", si % c.num_kv_heads, ": ");
      if (st.version == 0) fail(where + "has no version");
      int32_t last = -1;
      for (size_t g = 0; g < st.segments.size(); ++g) {
        const internal::Segment& s = st.segments[g];
        const std::string seg = absl::StrCat(where, "segment ", g, ": ");
        if (s.length() == 0) fail(seg + "is empty");
        if (s.modalities.size() != s.positions.size() || s.scores.size() != s.positions.size()) {
          fail(seg + "side data lengths differ");
        }
        if (s.value_width != c.head_dim) fail(absl::StrCat(seg, "value width ", s.value_width));
        if (s.key_channels.empty() ? s.key_width != c.head_dim
                                   : static_cast<int32_t>(s.key_channels.size()) != s.key_width ||
                                         s.key_width >= c.head_dim) {
          fail(absl::StrCat(seg, "key width ", s.key_width, " vs ", s.key_channels.size(),
                            " channels"));
        }
        for (size_t i = 0; i < s.key_channels.size(); ++i) {
          if (s.key_channels[i] < 0 || s.key_channels[i] >= c.head_dim ||
              (i > 0 && s.key_channels[i] <= s.key_channels[i - 1])) {
            fail(seg + "key channels not ascending in range");
          }
        }
        if (s.tokens_per_page !=
            TokensPerPage(pool_->page_bytes(), s.key_width, s.value_width, c.dtype)) {
          fail(absl::StrCat(seg, "tokens_per_page ", s.tokens_per_page,
                            " does not match its row format"));
          continue;
        }
        if (static_cast<int64_t>(s.pages.size()) != CeilDiv(s.length(), s.tokens_per_page)) {
          fail(absl::StrCat(seg, s.pages.size(), " pages for ", s.length(), " tokens at ",
                            s.tokens_per_page, " per page"));
        }
        if (c.page_summaries &&
            (s.key_min.size() != s.pages.size() * static_cast<size_t>(s.key_width) ||
             s.key_max.size() != s.key_min.size())) {
          fail(absl::StrCat(seg, "page summaries hold ", s.key_min.size(), " values for ",
                            s.pages.size(), " pages of ", s.key_width, " key channels"));
        }
        for (size_t i = 0; i < s.positions.size(); ++i) {
          if (s.positions[i] <= last) {
            fail(absl::StrCat(seg, "position ", s.positions[i], " after ", last));
          }
          last = s.positions[i];
          if (s.modalities.size() == s.positions.size() && s.modalities[i] >= kNumModalities) {
            fail(seg + "bad modality");
          }
        }
        for (int32_t page : s.pages) {
          if (page < 0 || page >= pool_->num_pages()) {
            fail(absl::StrCat(seg, "page id ", page, " out of range"));
            continue;
          }
          if (refs[page] > 0 && page_owner[page] == seq->id) {
            fail(absl::StrCat(seg, "page ", page, " is owned twice within sequence ", seq->id));
          }
          page_owner[page] = seq->id;
          ++refs[page];
        }
      }
    }
  }
  if (status.ok()) status = pool_->Validate(refs);
  for (auto it = seqs.rbegin(); it != seqs.rend(); ++it) (*it)->mu.Unlock();
  return status;
}

}  // namespace kvcache
