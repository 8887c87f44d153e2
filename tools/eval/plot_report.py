#!/usr/bin/env python3
"""Draws the kvcache-eval report plots from results.json (matplotlib, Agg backend).

Usage: plot_report.py RESULTS_JSON OUT_DIR [POLICY]

Writes OUT_DIR/fidelity_vs_keep.png (relative L2 error of the decode attention output,
attention-mass recall and cosine similarity against the ACTUAL share of prompt KV each run kept,
one line per policy: equal memory is the same x),
OUT_DIR/kept_by_layer.png (tokens kept per layer by modality for POLICY, one panel per keep ratio)
and OUT_DIR/kept_map.png (layer x prompt position share of kv heads keeping each token, for
POLICY's tightest run). Exit status 0 on success, 1 on bad input.
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

MODALITY_COLORS = {"text": "#4C72B0", "image": "#DD8452", "video": "#55A868", "audio": "#C44E52"}


def fidelity_plot(res, path):
    fig, (ax_l2, ax_rec, ax_cos) = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax in (ax_l2, ax_rec, ax_cos):  # more than the default 10 colours: one per policy
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
    by_policy = {}
    for run in res["runs"]:
        by_policy.setdefault(run["policy"], []).append(run)
    # Read policies (quest, retrieval) keep every token; they are placed at the share of keys a
    # decode step reads (their keep ratio), drawn dashed, so they compare with the eviction runs.
    read_policies = {"quest", "retrieval"}

    def share(r):
        if r["policy"] in read_policies and (r.get("keep") or -1) > 0:
            return r["keep"]
        return r.get("kept_share", r["tokens_kept"] / max(r["tokens_total"], 1))

    for name, runs in by_policy.items():
        runs = sorted(runs, key=share)
        x = [share(r) for r in runs]
        reads = name in read_policies
        style = ("o--" if reads else "o-") if len(runs) > 1 else "s"
        label = f"{name} (read share; all kept)" if reads else name
        ax_cos.plot(x, [r["cosine"] for r in runs], style, label=label)
        ax_l2.plot(x, [r["rel_l2"] for r in runs], style, label=label)
        if not reads:
            ax_rec.plot(x, [r.get("attn_recall") for r in runs], style, label=label)
    for ax, title in ((ax_l2, "relative L2 error of the attention output (log)"),
                      (ax_rec, "attention-mass recall (full cache's mass kept)"),
                      (ax_cos, "cosine similarity")):
        ax.set_xlabel("actual share of prompt KV kept (read share for read policies)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    ax_cos.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax_rec.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax_l2.set_yscale("log")
    ax_l2.legend(fontsize=7, loc="upper right")
    w = res["workload"]
    fig.suptitle(f"Decode attention fidelity vs the full cache — {w['model']}, "
                 f"{w['num_layers']} layers, prompt {w['prompt_len']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def kept_by_layer_plot(res, policy, path):
    runs = [r for r in res["runs"] if r["policy"] == policy][:4]
    total = res["workload"]["prompt_by_modality"]
    heads = res["workload"]["num_kv_heads"]
    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 3.8), squeeze=False)
    for ax, run in zip(axes[0], runs):
        layers = np.arange(len(run["kept_by_layer"]))
        bottom = np.zeros(len(layers))
        for m, color in MODALITY_COLORS.items():
            if total.get(m, 0) == 0:
                continue
            vals = np.array([e[m] for e in run["kept_by_layer"]], dtype=float) / heads
            ax.bar(layers, vals, bottom=bottom, color=color, label=f"{m} ({total[m]} in prompt)")
            bottom += vals
        keep = run["keep"]
        ax.set_title(f"{run['spec']}" if keep is None else f"{policy}, keep {keep:g}", fontsize=9)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("tokens kept (mean over kv heads)")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=8, loc="lower left", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def kept_map_plot(res, policy, path):
    runs = [r for r in res["runs"] if r["policy"] == policy]
    run = min(runs, key=lambda r: r["tokens_kept"])
    grid = np.array(run["kept_map"], dtype=float)
    fig, ax = plt.subplots(figsize=(10, 4.2))
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=1.0,
                   interpolation="nearest")
    n = res["workload"]["prompt_len"]
    bins = grid.shape[1]
    ticks = np.linspace(0, bins - 1, 6)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(int(round(t * n / bins))) for t in ticks])
    ax.set_xlabel("prompt token index (binned)")
    ax.set_ylabel("layer")
    ax.set_title(f"share of kv heads keeping each prompt token — {run['spec']}", fontsize=10)
    fig.colorbar(im, ax=ax, label="kept share")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 1
    with open(argv[1], encoding="utf-8") as f:
        res = json.load(f)
    out = argv[2]
    os.makedirs(out, exist_ok=True)
    if not res.get("runs"):
        print("plot_report.py: no policy runs in the results", file=sys.stderr)
        return 1
    policy = argv[3] if len(argv) > 3 and argv[3] else res["runs"][0]["policy"]
    if not any(r["policy"] == policy for r in res["runs"]):
        print(f"plot_report.py: policy '{policy}' not in the results", file=sys.stderr)
        return 1
    fidelity_plot(res, os.path.join(out, "fidelity_vs_keep.png"))
    kept_by_layer_plot(res, policy, os.path.join(out, "kept_by_layer.png"))
    kept_map_plot(res, policy, os.path.join(out, "kept_map.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
