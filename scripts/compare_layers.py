#!/usr/bin/env python3
"""`mobilenetish` layer by layer: the engine's profile against onnxruntime's, interleaved.

Runs `PROFILE_ALL=1 engine_profile mobilenetish RUNS` and `profile_ort.py --runs RUNS` in turn
for `--rounds` rounds and prints, per layer (`l01`, `l02`, ...), the engine's and onnxruntime's
median time over the rounds and their difference, largest first. Where the engine fused layers
into one node (a projection into the depthwise layer before it, an expansion into the one
after, a residual addition into its projection), onnxruntime's layers are added up to match:
each of onnxruntime's layers counts towards the first engine node at or after it.

    cargo build --release -p modelfleet-engine --examples
    python3 scripts/compare_layers.py [--rounds 2] [--runs 60] [--avx2]

`--avx2` as in `compare_ort.py`: the engine's AVX2 path against onnxruntime's AVX2 kernels.
The host's speed moves between processes; compare layers within a round, not across.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys

from compare_ort import HERE, environments, release_example


def layer_id(name):
    m = re.match(r"l(\d+)_", name)
    return int(m.group(1)) if m else None


def engine_groups(text):
    """The engine's nodes by layer, in plan order: [layer id, µs, node name before its first
    dot], a fused node under the last layer it covers, a separate residual addition with the
    projection before it."""
    groups, on, last = [], False, 0
    for line in text.splitlines():
        if "all nodes" in line:
            on = True
            continue
        parts = line.split()
        if not on or len(parts) < 3:
            continue
        us, name = float(parts[0]), parts[2]
        lid = layer_id(name)
        if lid is None and name.startswith("block") and "engine_pointwise" in name:
            lid = last + 1  # a projection with its residual addition folded in
        if lid is None:
            if last == 0:
                continue  # the input
            if name.startswith("block") and groups:
                groups[-1][1] += us  # a separate residual addition: with its projection
                continue
            lid = 1000 + len(groups)  # pooling, fully connected: after every layer
        if groups and groups[-1][0] == lid:
            groups[-1][1] += us
        else:
            groups.append([lid, us, name.split(".")[0]])
        last = lid if lid < 1000 else last
    return groups


def ort_layers(text):
    layers = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[1] == "µs":
            layers.append((parts[3], float(parts[0])))
    return layers


def attribute(groups, layers):
    """onnxruntime's µs per engine group: each layer to the first group at or after it."""
    ids = [g[0] for g in groups]
    out = [0.0] * len(groups)
    for name, us in layers:
        lid = layer_id(name)
        at = next((i for i, g in enumerate(ids) if lid is not None and g >= lid), None)
        if at is None:  # pooling, flatten, fully connected: by name, else the last group
            at = next((i for i, g in enumerate(groups) if g[2].split("_")[0] in name), len(groups) - 1)
        out[at] += us
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--runs", type=int, default=60)
    p.add_argument("--avx2", action="store_true")
    p.add_argument("--engine-profile", default=release_example("engine_profile"))
    a = p.parse_args()
    engine_env, ort_env = environments(a.avx2)
    engine_env["PROFILE_ALL"] = "1"
    rows = {}
    for r in range(a.rounds):
        eng = subprocess.run([a.engine_profile, "mobilenetish", str(a.runs)], env=engine_env,
                             check=True, capture_output=True, text=True).stdout
        ort = subprocess.run([sys.executable, os.path.join(HERE, "profile_ort.py"),
                              "--model", "mobilenetish", "--runs", str(a.runs)], env=ort_env,
                             check=True, capture_output=True, text=True).stdout
        groups = engine_groups(eng)
        theirs = attribute(groups, ort_layers(ort))
        print(f"# round {r + 1}: engine nodes {sum(g[1] for g in groups):.0f} µs, "
              f"onnxruntime {sum(theirs):.0f} µs")
        for g, o in zip(groups, theirs):
            rows.setdefault(g[2], []).append((g[1], o))
    table = []
    for name, pairs in rows.items():
        e = statistics.median(p[0] for p in pairs)
        o = statistics.median(p[1] for p in pairs)
        table.append((e - o, name, e, o))
    table.sort(reverse=True)
    print(f"{'layer (engine node)':<22} {'engine':>8} {'ort':>8} {'diff µs':>8}  (medians over rounds)")
    for d, name, e, o in table:
        print(f"{name:<22} {e:>8.0f} {o:>8.0f} {d:>+8.0f}")


if __name__ == "__main__":
    main()
