#!/usr/bin/env python3
"""Regenerates the kvcache-eval tables of README.md and docs/EVAL.md.

Usage: tools/eval/make_tables.py KVCACHE_EVAL_EXE [--write] [--out DIR]

Runs the default evaluation (`kvcache-eval` with no policy arguments) once per profile (llava,
diffuse) with --json, then prints, and with --write replaces in README.md and docs/EVAL.md
between the `<!-- eval-table:NAME -->` / `<!-- /eval-table:NAME -->` markers:

  default   the stdout table of the default run (profile llava)
  ranking   the policy ranking under each profile AT EQUAL MEMORY: each eviction policy's rel L2
            and attention-mass recall linearly interpolated at an actual kept share of prompt KV
            of 10% and 25% between its own runs (never extrapolated; a single run counts when
            its kept share is within 0.02 of the point)

Ranks are by rel L2 (lower is better). Read policies (quest, retrieval) keep every token and
are listed apart at the share they read. Uses only the standard library.
"""
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
READ = {"quest", "retrieval"}
POINTS = (0.10, 0.25)


def run(exe, profile, out):
    path = os.path.join(out, f"eval_{profile}.json")
    start = time.time()
    r = subprocess.run([exe, "--quiet", "--profile", profile, "--json", path],
                       capture_output=True, text=True, check=True)
    wall = time.time() - start
    with open(path, encoding="utf-8") as f:
        return r.stdout, json.load(f), wall


def at_share(runs, key, s):
    """key's value at kept share s: interpolated between the runs bracketing s, else the
    nearest run's value when it lies within 0.02 of s, else None (no extrapolation)."""
    pts = sorted((r["kept_share"], r[key]) for r in runs if r[key] is not None)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= s <= x1 and x1 > x0:
            return y0 + (y1 - y0) * (s - x0) / (x1 - x0)
    near = [(abs(x - s), y) for x, y in pts if abs(x - s) <= 0.02]
    return min(near)[1] if near else None


def ranking(res):
    by = {}
    for r in res["runs"]:
        if r["policy"] not in READ:
            by.setdefault(r["policy"], []).append(r)
    rows = {}
    for name, runs in by.items():
        rows[name] = {s: (at_share(runs, "rel_l2", s), at_share(runs, "attn_recall", s))
                      for s in POINTS}
    return rows


def fmt(x, spec="{:.3f}"):
    return "n/a" if x is None else spec.format(x)


def ranking_table(results):
    lines = []
    for s in POINTS:
        lines.append(f"At {int(s * 100)}% of prompt KV kept (actual kept share; rel L2 of the "
                     "attention output, lower is better / attention-mass recall):\n")
        header = "| rank |" + "".join(f" {p} | rel L2 | recall |" for p in results)
        lines.append(header)
        lines.append("|---|" + "---|---|---|" * len(results))
        ordered = {}
        for p, res in results.items():
            rows = ranking(res)
            ordered[p] = sorted(((v[s][0], v[s][1], name) for name, v in rows.items()
                                 if v[s][0] is not None), key=lambda t: t[0])
            ordered[p] += [(None, None, name) for name, v in rows.items() if v[s][0] is None]
        n = max(len(v) for v in ordered.values())
        for i in range(n):
            cells = []
            for p in results:
                if i < len(ordered[p]):
                    l2, rec, name = ordered[p][i]
                    cells.append(f" {name} | {fmt(l2)} | {fmt(rec)} |")
                else:
                    cells.append(" | | |")
            lines.append(f"| {i + 1} |" + "".join(cells))
        lines.append("")
    return "\n".join(lines)


def replace(path, name, body):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    pat = re.compile(rf"(<!-- eval-table:{name} -->\n).*?(<!-- /eval-table:{name} -->)", re.S)
    if not pat.search(text):
        return False
    text = pat.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return True


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 1
    exe = argv[1]
    out = argv[argv.index("--out") + 1] if "--out" in argv else "/tmp"
    results, tables, walls = {}, {}, {}
    for profile in ("llava", "diffuse"):
        tables[profile], results[profile], walls[profile] = run(exe, profile, out)
    default = "```\n" + tables["llava"].rstrip("\n") + "\n```\n"
    rank = ranking_table(results)
    print(default)
    print(rank)
    print(f"wall: llava {walls['llava']:.1f} s, diffuse {walls['diffuse']:.1f} s",
          file=sys.stderr)
    if "--write" in argv:
        for doc in ("README.md", "docs/EVAL.md"):
            path = os.path.join(ROOT, doc)
            for name, body in (("default", default), ("ranking", rank)):
                if replace(path, name, body):
                    print(f"updated {doc} ({name})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
