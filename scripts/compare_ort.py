#!/usr/bin/env python3
"""The engine against onnxruntime, interleaved: many short rounds, a ratio per round.

On a shared machine the speed moves by tens of per cent between one second and the next, so
one long run of each side says little. This alternates `engine_bench` and `bench_ort.py`
(both 1 thread, batch 1, median of single requests) for `--rounds` rounds of `--seconds`
each, and prints each round's engine / onnxruntime ratio and the median of the ratios.

    cargo build --release -p modelfleet-engine --examples
    python3 scripts/compare_ort.py [--rounds 8] [--seconds 0.7] [--models mobilenetish] [--avx2]

`--avx2` compares the engine's AVX2 path (`MODELFLEET_ENGINE_NO_AVX512=1`) with onnxruntime's
AVX2 kernels (`scripts/no_avx512.c`, preloaded: onnxruntime sees a CPU without AVX-512), which
is what an AVX2-only CPU runs, on a CPU that has AVX-512.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def medians(cmd, env):
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[0] in ("engine", "ort") and parts[2] == "median_us":
            found[parts[1]] = float(parts[3])
    return found


def release_example(name):
    """Where `cargo build --release -p modelfleet-engine --examples` puts example `name`."""
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(HERE, "..", "target"))
    return os.path.join(target, "release", "examples", name)


def environments(avx2):
    """The engine's and onnxruntime's environments: with `avx2`, both on their AVX2 paths
    (the engine by `MODELFLEET_ENGINE_NO_AVX512`, onnxruntime under `no_avx512.so`)."""
    engine_env, ort_env = dict(os.environ), dict(os.environ)
    if avx2:
        engine_env["MODELFLEET_ENGINE_NO_AVX512"] = "1"
        lib = os.path.join(tempfile.mkdtemp(), "no_avx512.so")
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", lib,
                        os.path.join(HERE, "no_avx512.c")], check=True)
        ort_env["LD_PRELOAD"] = lib
    return engine_env, ort_env


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--seconds", type=float, default=0.7)
    p.add_argument("--models", default="mobilenetish")
    p.add_argument("--avx2", action="store_true")
    p.add_argument("--engine-bench", default=release_example("engine_bench"))
    a = p.parse_args()
    engine_env, ort_env = environments(a.avx2)
    secs = ["--seconds", str(a.seconds), "--models", a.models]
    models = a.models.split(",")
    ratios = {m: [] for m in models}
    print(f"# {'AVX2 paths' if a.avx2 else 'default paths'}; median µs per round, engine / onnxruntime")
    for r in range(a.rounds):
        # Alternate which side goes first, so neither always follows the other.
        sides = [("engine", [a.engine_bench] + secs, engine_env),
                 ("ort", [sys.executable, os.path.join(HERE, "bench_ort.py")] + secs, ort_env)]
        if r % 2:
            sides.reverse()
        got = {name: medians(cmd, env) for name, cmd, env in sides}
        for m in models:
            ratio = got["engine"][m] / got["ort"][m]
            ratios[m].append(ratio)
            print(f"round {r + 1} {m:<14} engine {got['engine'][m]:>9.1f} ort {got['ort'][m]:>9.1f} ratio {ratio:.3f}")
    for m in models:
        rs = sorted(ratios[m])
        print(f"{m:<14} ratio median {statistics.median(rs):.3f} (min {rs[0]:.3f}, max {rs[-1]:.3f}, {len(rs)} rounds)")


if __name__ == "__main__":
    main()
