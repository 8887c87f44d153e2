#!/usr/bin/env python3
"""Writes the seed corpus of fuzz/fuzz_c_api.cc into fuzz/corpus/fuzz_c_api/.

Usage: python3 fuzz/make_c_api_seeds.py PATH/TO/fuzz_c_api

fuzz_c_api reads its input through FuzzedDataProvider, so a seed is hard to write by hand.
Instead: 400 pseudo-random byte strings (fixed seed) are run through the fuzzer with
FUZZ_C_API_VERBOSE=1, which prints every C API call and its status; kept are the inputs whose
successful calls cover a full lifecycle: every input with a successful kvc_plan_apply or
kvc_plan_kept_tokens, up to four with kvc_compress, two with kvc_decode_attention_sparse, and
the four with the most distinct successful entry points.
"""
import os
import random
import re
import subprocess
import sys
import tempfile

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "fuzz_c_api")


def ok_calls(fuzzer, path):
    env = dict(os.environ, FUZZ_C_API_VERBOSE="1")
    run = subprocess.run([fuzzer, path], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, check=True)
    calls = set()
    for line in run.stderr.decode(errors="replace").splitlines():
        m = re.match(r"(kvc_[a-z_]+)\(.* -> KVC_OK", line)
        if m:
            calls.add(m.group(1))
    return calls


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    fuzzer = sys.argv[1]
    rng = random.Random(11)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = []
        for i in range(400):
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1500, 4000)))
            path = os.path.join(tmp, f"r{i:03d}")
            with open(path, "wb") as f:
                f.write(data)
            inputs.append((data, ok_calls(fuzzer, path)))
    chosen = []

    def take(pred, limit=None):
        n = 0
        for idx, (_, calls) in enumerate(inputs):
            if pred(calls) and (limit is None or n < limit):
                n += 1
                if idx not in chosen:
                    chosen.append(idx)

    take(lambda c: "kvc_plan_apply" in c or "kvc_plan_kept_tokens" in c)
    take(lambda c: "kvc_compress" in c, 4)
    take(lambda c: "kvc_decode_attention_sparse" in c, 2)
    by_breadth = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][1]))
    for idx in by_breadth[:4]:
        if idx not in chosen:
            chosen.append(idx)
    os.makedirs(OUT, exist_ok=True)
    for n, idx in enumerate(sorted(chosen)):
        with open(os.path.join(OUT, f"seed_lifecycle_{n:02d}"), "wb") as f:
            f.write(inputs[idx][0])
        print(f"seed_lifecycle_{n:02d}: {len(inputs[idx][1])} entry points OK:",
              " ".join(sorted(inputs[idx][1])))


if __name__ == "__main__":
    main()
