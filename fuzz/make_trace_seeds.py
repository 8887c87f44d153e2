#!/usr/bin/env python3
"""Writes the seed corpus of fuzz/fuzz_trace.cc into fuzz/corpus/fuzz_trace/.

Usage: python3 fuzz/make_trace_seeds.py PATH/TO/kvcache-eval

Seeds:
  npy_*    single .npy files of every dtype the reader accepts (written by numpy, format 1.0 and
           2.0, 0-d to 3-d), each also a one-part input (a manifest that is not JSON) for (b);
  trace_*  a tiny trace written by the tool itself (kvcache-eval --write-trace), packed into the
           fuzzer's input format: manifest.json, then each .npy file, joined by SEPARATOR, with
           the manifest's file names rewritten to "1.npy", "2.npy", ... (the names fuzz_trace
           gives the parts); variants with int64 positions, uint8 modalities, float16 arrays and
           without decode_positions.
"""
import io
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

SEPARATOR = b"\n#~FILE~#\n"  # must match kSeparator in fuzz/fuzz_trace.cc
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "fuzz_trace")


def npy_bytes(a, version=None):
    buf = io.BytesIO()
    if version is None:
        np.save(buf, a)
    else:
        np.lib.format.write_array(buf, a, version=version)
    return buf.getvalue()


def pack(manifest, files):
    """files: list of (manifest key path, bytes); rewrites the names to 1.npy, 2.npy, ..."""
    parts = [b""]
    for i, (setter, data) in enumerate(files, start=1):
        setter(manifest, f"{i}.npy")
        parts.append(data)
    parts[0] = json.dumps(manifest, indent=1).encode()
    return SEPARATOR.join(parts)


def trace_seed(trace_dir, convert=None, drop_decode_positions=False):
    with open(os.path.join(trace_dir, "manifest.json")) as f:
        manifest = json.load(f)
    files = []

    def top(key):
        def set_(m, name):
            m[key] = name
        return set_

    def layer(l, key):
        def set_(m, name):
            m["layers"][l][key] = name
        return set_

    def load(name, key):
        a = np.load(os.path.join(trace_dir, name))
        return npy_bytes(convert(key, a) if convert else a)

    for key in ("positions", "modalities", "decode_positions"):
        if key not in manifest:
            continue
        if drop_decode_positions and key == "decode_positions":
            del manifest[key]
            continue
        files.append((top(key), load(manifest[key], key)))
    for l, entry in enumerate(manifest["layers"]):
        for key in sorted(entry):
            files.append((layer(l, key), load(entry[key], key)))
    return pack(manifest, files)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    tool = sys.argv[1]
    os.makedirs(OUT, exist_ok=True)
    seeds = {}

    rng = np.random.default_rng(7)
    seeds["npy_f4_2d"] = npy_bytes(rng.standard_normal((3, 4)).astype("<f4"))
    seeds["npy_f2_3d"] = npy_bytes(rng.standard_normal((2, 1, 3)).astype("<f2"))
    seeds["npy_i4_1d"] = npy_bytes(np.arange(5, dtype="<i4"))
    seeds["npy_i8_1d"] = npy_bytes(np.arange(3, dtype="<i8") * 7)
    seeds["npy_u1_1d"] = npy_bytes(np.array([0, 1, 2, 3], dtype="|u1"))
    seeds["npy_f4_0d"] = npy_bytes(np.array(1.5, dtype="<f4"))
    seeds["npy_f4_empty"] = npy_bytes(np.zeros((0, 2), dtype="<f4"))
    seeds["npy_i4_v2"] = npy_bytes(np.arange(4, dtype="<i4"), version=(2, 0))

    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace")
        subprocess.run(
            [tool, "--layers", "1", "--kv-heads", "1", "--q-heads", "2", "--head-dim", "16",
             "--system-tokens", "2", "--image-tokens", "4", "--image-tiles", "1",
             "--question-tokens", "2", "--steps", "2", "--policy", "full", "--keep", "1",
             "--quiet", "--write-trace", trace],
            check=True, stdout=subprocess.DEVNULL)
        seeds["trace_f4"] = trace_seed(trace)

        def narrow(key, a):
            if key == "positions":
                return a.astype("<i8")
            if key == "modalities":
                return a.astype("|u1")
            if a.dtype.kind == "f":
                return a.astype("<f2")
            return a
        seeds["trace_f2_i8_u1"] = trace_seed(trace, convert=narrow)
        seeds["trace_no_decode_positions"] = trace_seed(trace, drop_decode_positions=True)

    for name, data in seeds.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)
        print(f"{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
