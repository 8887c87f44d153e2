// CollectSnapshot: the only policy code that touches a Cache.
#include <algorithm>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvcache/cache.h"
#include "kvcache/policy/select.h"
#include "kvcache/policy/snapshot.h"

namespace kvcache::policy {

absl::StatusOr<SequenceSnapshot> CollectSnapshot(Cache& cache, SequenceId seq,
                                                 const Observations& obs,
                                                 const SnapshotRequest& req) {
  const CacheConfig& c = cache.config();
  SequenceSnapshot snap =
      SequenceSnapshot::Make(c.num_layers, c.num_kv_heads, c.num_q_heads, c.head_dim);
  snap.sequence = seq;
  if (req.window_rows < 0 || req.query_rows < 0) {
    return absl::InvalidArgumentError(absl::StrCat("CollectSnapshot: window_rows ",
                                                   req.window_rows, " / query_rows ",
                                                   req.query_rows, " must be >= 0"));
  }
  for (int32_t l = 0; l < c.num_layers; ++l) {
    for (int32_t h = 0; h < c.num_kv_heads; ++h) {
      // Keys only: a snapshot has no values (StreamSnapshot), so reading them would be waste.
      absl::StatusOr<StreamContents> sc =
          cache.ReadStream(seq, l, h, StreamReadOptions{.keys = req.keys, .values = false});
      if (!sc.ok()) return sc.status();
      StreamSnapshot& s = snap.stream(l, h);
      s.positions = std::move(sc->positions);
      s.modalities = std::move(sc->modalities);
      s.accumulated = std::move(sc->scores);
      if (req.keys) s.keys = std::move(sc->keys);
    }
  }
  const bool rows_needed =
      req.window_rows > 0 || req.post_vision || req.sparsity || req.last_row || req.query_rows > 0;
  if (rows_needed) {
    if (obs.layers.size() != static_cast<size_t>(c.num_layers)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "CollectSnapshot: the policy scores observation queries but ", obs.layers.size(),
          " layer observations were given for ", c.num_layers, " layers"));
    }
    const size_t row_size = static_cast<size_t>(c.num_q_heads) * c.head_dim;
    for (int32_t l = 0; l < c.num_layers; ++l) {
      const LayerObservation& o = obs.layers[l];
      const int32_t rows = static_cast<int32_t>(o.positions.size());
      if (rows == 0 || o.queries.size() != rows * row_size) {
        return absl::InvalidArgumentError(absl::StrCat(
            "CollectSnapshot: layer ", l, " observation has ", rows, " positions and ",
            o.queries.size(), " query values (need >= 1 row of ", row_size, " values each)"));
      }
      for (int32_t r = 1; r < rows; ++r) {
        if (o.positions[r] <= o.positions[r - 1]) {
          return absl::InvalidArgumentError(absl::StrCat(
              "CollectSnapshot: layer ", l, " observation positions must ascend; positions[", r,
              "] = ", o.positions[r]));
        }
      }
      // Scores rows [first, rows) and hands each head's token scores to `store`.
      auto score = [&](int32_t first, auto&& store) -> absl::Status {
        ScoreRequest sr;
        sr.queries = o.queries.subspan(first * row_size);
        sr.positions = o.positions.subspan(first);
        sr.scale = req.scale;
        sr.aggregation = req.aggregation;
        sr.sparsity_threshold = req.sparsity_threshold;
        absl::StatusOr<ScoreResult> res = cache.ScoreRows(seq, l, sr);
        if (!res.ok()) return res.status();
        store(*res);
        return absl::OkStatus();
      };
      for (int32_t want : {req.window_rows, req.query_rows}) {
        if (want > rows) {
          return absl::InvalidArgumentError(absl::StrCat("CollectSnapshot: layer ", l, " has ",
                                                         rows, " observation rows; the policy "
                                                         "needs the last ", want));
        }
      }
      if (req.window_rows > 0) {
        absl::Status st = score(rows - req.window_rows, [&](ScoreResult& r) {
          for (int32_t h = 0; h < c.num_kv_heads; ++h) {
            snap.stream(l, h).window_scores = std::move(r.token_scores[h]);
          }
        });
        if (!st.ok()) return st;
      }
      if (req.last_row) {
        absl::Status st = score(rows - 1, [&](ScoreResult& r) {
          for (int32_t h = 0; h < c.num_kv_heads; ++h) {
            snap.stream(l, h).last_row_scores = std::move(r.token_scores[h]);
          }
        });
        if (!st.ok()) return st;
      }
      if (req.post_vision || req.sparsity) {
        int32_t last_visual = -1;
        for (int32_t h = 0; h < c.num_kv_heads; ++h) {
          const StreamSnapshot& s = snap.stream(l, h);
          for (int32_t j = s.length() - 1; j >= 0; --j) {
            if (IsVisual(s.modalities[j])) {
              last_visual = std::max(last_visual, s.positions[j]);
              break;
            }
          }
        }
        const int32_t first = static_cast<int32_t>(
            std::upper_bound(o.positions.begin(), o.positions.end(), last_visual) -
            o.positions.begin());
        if (first == rows) {
          return absl::FailedPreconditionError(absl::StrCat(
              "CollectSnapshot: layer ", l, " has no observation row after the last image/video "
              "token (position ", last_visual, "); the post-vision rows are needed"));
        }
        absl::Status st = score(first, [&](ScoreResult& r) {
          for (int32_t h = 0; h < c.num_kv_heads; ++h) {
            snap.stream(l, h).post_vision_scores = std::move(r.token_scores[h]);
          }
          if (req.sparsity) {
            snap.layers[l].below_threshold = std::move(r.below_threshold);
            snap.layers[l].causal_entries = std::move(r.causal_entries);
          }
        });
        if (!st.ok()) return st;
      }
      if (req.query_rows > 0) {
        LayerSnapshot& ls = snap.layers[l];
        ls.window_rows = req.query_rows;
        const auto tail = o.queries.subspan((rows - req.query_rows) * row_size);
        ls.window_queries.assign(tail.begin(), tail.end());
      }
    }
  }
  snap.image_score_positions.assign(obs.image_score_positions.begin(),
                                    obs.image_score_positions.end());
  snap.image_scores.assign(obs.image_scores.begin(), obs.image_scores.end());
  if (absl::Status st = snap.Validate(); !st.ok()) return st;
  return snap;
}

}  // namespace kvcache::policy
