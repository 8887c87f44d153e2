#!/usr/bin/env python3
"""End-to-end test of the kvcache-eval binary at a tiny scale (registered with CTest).

Usage: eval_e2e_check.py KVCACHE_EVAL_EXE WORK_DIR

1. Runs the tool with --json, --report and --write-trace; checks the JSON fields, that the
   full-cache reference has fidelity exactly 1, that report.md/results.json (and the PNG plots,
   whenever a python3 with matplotlib exists) are there and non-empty.
2. Re-runs the same workload from the written trace (--trace) and checks identical memory and
   fidelity numbers (the trace reader reproduces the synthetic workload).
3. Checks usage errors: exit status 2 and a message naming the bad value.
Uses only the Python standard library.
"""
import json
import os
import shutil
import subprocess
import sys

TINY = ["--layers", "3", "--kv-heads", "2", "--q-heads", "4", "--head-dim", "32",
        "--system-tokens", "8", "--image-tokens", "120", "--image-tiles", "2",
        "--question-tokens", "40", "--steps", "4", "--quiet"]
POLICIES = ["--policy", "snapkv:window=8,h2o,streamingllm,fastv:layer=1,prumerge:knn=4",
            "--policy", "full", "--keep", "0.3,0.6"]

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAILED:", what, file=sys.stderr)


def run(exe, args):
    return subprocess.run([exe] + args, capture_output=True, text=True, timeout=600)


def have_matplotlib():
    cands = [os.environ.get("KVCACHE_EVAL_PYTHON", ""), "python3", "/usr/bin/python3"]
    for c in cands:
        if c and shutil.which(c) or (c and os.path.exists(c)):
            r = subprocess.run([c, "-c", "import matplotlib, numpy"], capture_output=True)
            if r.returncode == 0:
                return True
    return False


def nonempty(path):
    return os.path.isfile(path) and os.path.getsize(path) > 0


def main():
    exe, work = sys.argv[1], sys.argv[2]
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    json_path = os.path.join(work, "out.json")
    report = os.path.join(work, "report")
    trace = os.path.join(work, "trace")
    r = run(exe, TINY + POLICIES + ["--json", json_path, "--report", report,
                                    "--report-policy", "snapkv", "--write-trace", trace])
    print(r.stdout)
    print(r.stderr, file=sys.stderr)
    check(r.returncode == 0, f"tool exit status {r.returncode}")
    if r.returncode != 0:
        return 1
    check("full (reference)" in r.stdout, "table has the reference row")
    with open(json_path, encoding="utf-8") as f:
        res = json.load(f)
    check(res["format"] == "kvcache-eval-results" and res["version"] == 1, "format/version")
    w = res["workload"]
    check(w["num_layers"] == 3 and w["prompt_len"] == 168 and w["decode_steps"] == 4,
          "workload shape")
    check(w["prompt_by_modality"]["image"] == 120, "image tokens")
    full = res["full"]
    check(full["cosine"] == 1.0 and full["rel_l2"] == 0.0, "full fidelity exactly 1")
    check(full["attn_recall"] == 1.0 and full["norm_ratio"] == 1.0 and full["kept_share"] == 1.0,
          "full recall, norm ratio and kept share exactly 1")
    check(w["model"].endswith("/llava"), f"default profile llava in the model name: {w['model']}")
    specs = [x["spec"] for x in res["runs"]]
    expected = ["snapkv:window=8,keep=0.3", "snapkv:window=8,keep=0.6",
                "h2o:heavy=0.15,recent=0.15", "h2o:heavy=0.3,recent=0.3",
                "streamingllm:keep=0.3", "streamingllm:keep=0.6", "fastv:layer=1,keep=0.3",
                "fastv:layer=1,keep=0.6", "prumerge:knn=4", "full"]
    check(specs == expected, f"run specs {specs}")
    keys = ["spec", "policy", "describe", "keep", "pages", "kv_bytes", "pages_end",
            "kv_bytes_end", "kv_saving", "tokens_kept", "tokens_total", "kept_by_modality",
            "total_by_modality", "kept_by_layer", "kept_map", "collect_ms", "plan_ms", "apply_ms",
            "plan_apply_ms", "decode_ms_per_step", "decode_time_ratio", "cosine", "rel_l2",
            "min_cosine", "layer_cosine", "layer_rel_l2", "kept_share", "rel_l2_worst",
            "rel_l2_worst_layer", "norm_ratio", "layer_norm_ratio", "attn_recall",
            "attn_recall_worst", "attn_recall_worst_layer", "layer_attn_recall"]
    for run_ in res["runs"] + [full]:
        missing = [k for k in keys if k not in run_]
        check(not missing, f"{run_['spec']}: missing {missing}")
        check(len(run_["layer_cosine"]) == 3 and len(run_["kept_by_layer"]) == 3,
              f"{run_['spec']}: per-layer arrays")
        check(0.0 <= run_["kv_saving"] < 1.0, f"{run_['spec']}: saving in [0, 1)")
        check(-1.0 <= run_["cosine"] <= 1.0, f"{run_['spec']}: cosine range")
        check(0.0 < run_["attn_recall"] <= 1.0 and len(run_["layer_attn_recall"]) == 3,
              f"{run_['spec']}: recall in (0, 1] per layer")
        check(abs(run_["kept_share"] - run_["tokens_kept"] / run_["tokens_total"]) < 1e-12,
              f"{run_['spec']}: kept share")
        check(run_["kv_bytes"] == run_["pages"] * res["cache"]["page_bytes"],
              f"{run_['spec']}: bytes = pages x page bytes")
    by_spec = {x["spec"]: x for x in res["runs"]}
    check(by_spec["full"]["cosine"] == 1.0, "full as a policy equals the reference")
    check(by_spec["snapkv:window=8,keep=0.3"]["kv_bytes"] <=
          by_spec["snapkv:window=8,keep=0.6"]["kv_bytes"] < full["kv_bytes"],
          "snapkv bytes shrink with keep")
    check(by_spec["snapkv:window=8,keep=0.3"]["cosine"] < 1.0, "eviction changes the output")

    check(nonempty(os.path.join(report, "report.md")), "report.md")
    check(nonempty(os.path.join(report, "results.json")), "results.json")
    if have_matplotlib():
        for png in ["fidelity_vs_keep.png", "kept_by_layer.png", "kept_map.png"]:
            p = os.path.join(report, png)
            check(nonempty(p), png)
            if nonempty(p):
                with open(p, "rb") as f:
                    check(f.read(8) == b"\x89PNG\r\n\x1a\n", f"{png} is a PNG")
        with open(os.path.join(report, "report.md"), encoding="utf-8") as f:
            md = f.read()
        check("fidelity_vs_keep.png" in md, "report.md links the plots")
    else:
        print("no python3 with matplotlib: plot files not checked", file=sys.stderr)

    # The written trace reproduces the run.
    check(nonempty(os.path.join(trace, "manifest.json")), "trace manifest")
    json2 = os.path.join(work, "trace.json")
    r2 = run(exe, ["--trace", trace, "--quiet", "--json", json2] + POLICIES)
    check(r2.returncode == 0, f"--trace run exit status {r2.returncode}: {r2.stderr}")
    if r2.returncode == 0:
        with open(json2, encoding="utf-8") as f:
            res2 = json.load(f)
        for a, b in zip(res["runs"], res2["runs"]):
            check(a["kv_bytes"] == b["kv_bytes"] and a["cosine"] == b["cosine"] and
                  a["tokens_kept"] == b["tokens_kept"], f"trace run {a['spec']} matches")

    # The diffuse profile and a calibration knob run, and change the workload.
    json3 = os.path.join(work, "diffuse.json")
    r3 = run(exe, TINY + ["--profile", "diffuse", "--sink", "0.2", "--policy", "snapkv:window=8",
                          "--keep", "0.3", "--json", json3])
    check(r3.returncode == 0, f"--profile diffuse exit status {r3.returncode}: {r3.stderr}")
    if r3.returncode == 0:
        with open(json3, encoding="utf-8") as f:
            res3 = json.load(f)
        check(res3["workload"]["model"].endswith("/diffuse+knobs"), "diffuse profile named")
        check(res3["runs"][0]["rel_l2"] != by_spec["snapkv:window=8,keep=0.3"]["rel_l2"],
              "the profile changes the result")

    # Usage errors: exit status 2, the bad value named.
    for args, needle in [(["--keep", "1.5"], "1.5"), (["--policy", "nosuch"], "nosuch"),
                         (["--layers", "zero"], "zero"), (["--bogus"], "--bogus"),
                         (["--policy", "snapkv:window=abc"], "abc"),
                         (["--dtype", "f64"], "f64"), (["--layers"], "needs a value"),
                         (["--report-policy", "tova", "--policy", "h2o"], "tova"),
                         (["--profile", "sparse"], "sparse"), (["--sink", "2"], "sink=2"),
                         (["--k90", "abc"], "abc")]:
        e = run(exe, TINY + args)
        check(e.returncode == 2, f"{args}: exit status {e.returncode}, expected 2")
        check(needle in e.stderr, f"{args}: message {e.stderr!r} names {needle!r}")
    bad_trace = run(exe, ["--trace", os.path.join(work, "no_such_trace")])
    check(bad_trace.returncode == 1 and "manifest.json" in bad_trace.stderr,
          "missing trace is named")
    h = run(exe, ["--help"])
    check(h.returncode == 0 and "--policy" in h.stdout, "--help")
    lp = run(exe, ["--list-policies"])
    check(lp.returncode == 0 and "vlcache" in lp.stdout and "defaults:" in lp.stdout,
          "--list-policies")

    if failures:
        print(f"{len(failures)} check(s) failed", file=sys.stderr)
        return 1
    print("all end-to-end checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
