#!/usr/bin/env python3
"""Checks that the engine's matrix-product kernels keep their sums in registers in a built binary
(issue 3; BENCHMARKS.md, session 22).

In the release and device builds LLVM once kept the 12-point AVX-512 tile's 24 sums in memory as
well as in registers, storing every one to the stack after every multiply-add: the kernel ran at
half speed there while the dev build, which the benchmarks used, was fine. This script reads the
disassembly of a binary (`objdump -d`), finds every loop (a backward jump) inside the functions
whose names contain one of the kernels' names, and reports those with at least 8 fused
multiply-adds whose body — an innermost loop, holding no other — stores a vector register to the stack. Exit status 1 if there is one.

    python3 scripts/kernel_loops.py $CARGO_TARGET_DIR/release/examples/engine_profile
    python3 scripts/kernel_loops.py $CARGO_TARGET_DIR/device/fleet-agent   # built with
        # CARGO_PROFILE_DEVICE_STRIP=false: a stripped binary has no function names

x86_64 only (AT&T syntax, as GNU objdump prints it).
"""
import re
import subprocess
import sys

KERNELS = ["row_tile_avx512", "row_tile_avx2", "tile_avx2", "tile_pair_avx512", "narrow_group_avx2", "group_avx512", "group_avx2"]
FUNCTION = re.compile(r"^([0-9a-f]+) <(.*)>:$")
INSTRUCTION = re.compile(r"\s*([0-9a-f]+):\s+(.*)")
JUMP = re.compile(r"j\w+\s+([0-9a-f]+)")
STACK_STORE = re.compile(r"vmov[au]p[sd]\s+%[xyz]mm\d+,-?(0x[0-9a-f]+)?\(%rsp")


def functions(binary):
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", binary], check=True,
                             capture_output=True, text=True).stdout
    name, body = None, []
    for line in listing.splitlines():
        m = FUNCTION.match(line)
        if m:
            if name:
                yield name, body
            name, body = m.group(2), []
            continue
        m = INSTRUCTION.match(line)
        if name and m:
            body.append((int(m.group(1), 16), m.group(2)))
    if name:
        yield name, body


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    bad = checked = 0
    for name, body in functions(sys.argv[1]):
        if not any(k in name for k in KERNELS) or "engine" not in name:
            continue
        start = body[0][0] if body else 0
        # Innermost loop per jump target: the shortest body that ends in a jump back to it.
        loops = {}
        for at, text in body:
            m = JUMP.match(text)
            if m and start <= int(m.group(1), 16) < at:
                target = int(m.group(1), 16)
                loops[target] = min(loops.get(target, at), at)
        for target, end in loops.items():
            if any((t, e) != (target, end) and target <= t and e <= end for t, e in loops.items()):
                continue  # holds another loop: not an innermost one
            inner = [t for a, t in body if target <= a <= end]
            fmas = sum("vfmadd" in t for t in inner)
            if fmas < 8:
                continue
            checked += 1
            stores = sum(bool(STACK_STORE.search(t)) for t in inner)
            if stores:
                bad += 1
                print(f"{name} loop at {target:#x}: {fmas} multiply-adds, {stores} vector stores to the stack")
    print(f"{checked} kernel loops checked, {bad} with sums stored to the stack")
    if checked == 0:
        sys.exit("no kernel loop found: a stripped binary, or not an x86_64 build of the engine")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
