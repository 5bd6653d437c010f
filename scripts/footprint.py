#!/usr/bin/env python3
"""Agent memory footprint, measured the Greengrass-lite way (issue 9, BENCHMARKS.md).

Starts a `fleet-agent run` with `digits_cnn` installed, waits a warm-up, then samples the
agent's PSS (and RSS) from /proc/PID/smaps_rollup every --interval seconds for --window seconds
twice: idle, then while this script sends --rps OIP v2 JSON requests per second (single
digits from the model's test set, answers checked against the labels). Prints one markdown
table row per phase: min / mean / max PSS and RSS, requests sent, failures, accuracy.

    python3 scripts/footprint.py --agent target/release/fleet-agent \
        --bundler target/release/bundler [--window 120] [--interval 10] [--rps 50]

Only loopback is used. The load generator is this Python process, not the agent: its CPU and
memory are not counted.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(ROOT, "examples", "models", "digits_cnn")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_npy(path):
    """Minimal .npy reader for the little-endian float32/int64 arrays in examples/models."""
    import ast
    import struct

    with open(path, "rb") as f:
        data = f.read()
    assert data[:6] == b"\x93NUMPY", path
    hlen = struct.unpack("<H", data[8:10])[0]
    header = ast.literal_eval(data[10 : 10 + hlen].decode())
    body = data[10 + hlen :]
    fmt = {"<f4": "f", "<i8": "q", "<i4": "i"}[header["descr"]]
    count = 1
    for d in header["shape"]:
        count *= d
    values = struct.unpack("<%d%s" % (count, fmt), body[: count * struct.calcsize(fmt)])
    return header["shape"], list(values)


def pss_rss_kb(pid):
    fields = {}
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":"):
                fields[parts[0][:-1]] = int(parts[1]) if parts[1].isdigit() else 0
    return fields["Pss"], fields["Rss"]


def breakdown(pid, agent_path):
    """PSS in kB by kind of mapping (/proc/PID/smaps): the agent binary's code, read-only data
    and writable data, shared libraries, the brk heap (glibc's main arena), anonymous mappings
    (other malloc arenas, large allocations, thread stacks), and the rest."""
    name = os.path.basename(agent_path)
    kinds = {}
    kind = None
    with open("/proc/%d/smaps" % pid) as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                perms, path = head[1], (head[5] if len(head) > 5 else "")
                if os.path.basename(path) == name:
                    kind = "binary " + ("code" if "x" in perms else "data (rw)" if "w" in perms else "rodata")
                elif path.startswith("/"):
                    kind = "shared libraries"
                elif path == "[heap]":
                    kind = "heap (brk)"
                elif path in ("", "[anon]") or path.startswith("[anon:"):
                    kind = "anonymous"
                else:
                    kind = path
            elif head[0] == "Pss:" and kind:
                kinds[kind] = kinds.get(kind, 0) + int(head[1])
    return ", ".join("%s %d" % kv for kv in sorted(kinds.items(), key=lambda kv: -kv[1]) if kv[1])


def sample(pid, window, interval):
    samples = []
    end = time.monotonic() + window
    while True:
        samples.append(pss_rss_kb(pid))
        if time.monotonic() + interval > end + 0.01:
            break
        time.sleep(interval)
    return samples


class Load(threading.Thread):
    """Sends `rps` requests per second, one at a time on a fixed schedule."""

    def __init__(self, url, rows, labels, rps):
        super().__init__(daemon=True)
        self.url, self.rows, self.labels, self.rps = url, rows, labels, rps
        self.stop = threading.Event()
        self.sent = self.failed = self.correct = 0

    def run(self):
        period = 1.0 / self.rps
        next_at = time.monotonic()
        i = 0
        while not self.stop.is_set():
            row = self.rows[i % len(self.rows)]
            body = json.dumps(
                {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": row}]}
            ).encode()
            req = urllib.request.Request(
                self.url, data=body, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    out = json.loads(r.read())["outputs"][0]["data"]
                    if max(range(len(out)), key=out.__getitem__) == self.labels[i % len(self.labels)]:
                        self.correct += 1
            except (urllib.error.URLError, OSError, KeyError, ValueError):
                self.failed += 1
            self.sent += 1
            i += 1
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)


def row(phase, samples, extra=""):
    pss = [s[0] / 1024 for s in samples]
    rss = [s[1] / 1024 for s in samples]
    return "| %s | %d | %.1f / %.1f / %.1f | %.1f / %.1f / %.1f | %s |" % (
        phase,
        len(samples),
        min(pss),
        statistics.mean(pss),
        max(pss),
        min(rss),
        statistics.mean(rss),
        max(rss),
        extra,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agent", required=True)
    ap.add_argument("--bundler", required=True)
    ap.add_argument("--window", type=float, default=120, help="seconds sampled per phase")
    ap.add_argument("--interval", type=float, default=10, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=20, help="seconds before sampling")
    ap.add_argument("--rps", type=float, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--breakdown", action="store_true",
                    help="after each phase, print its last PSS split by kind of mapping (kB)")
    args = ap.parse_args()

    shape, flat = read_npy(os.path.join(MODEL_DIR, "test_input.npy"))
    per = 64
    rows = [flat[i * per : (i + 1) * per] for i in range(shape[0])]
    _, labels = read_npy(os.path.join(MODEL_DIR, "test_labels.npy"))

    with tempfile.TemporaryDirectory(prefix="modelfleet-footprint-") as work:
        keys = os.path.join(work, "keys")
        subprocess.run([args.bundler, "keygen", "--out-dir", keys, "--name", "fp"], check=True,
                       stdout=subprocess.DEVNULL)
        bundle = os.path.join(work, "digits_cnn.mfb")
        subprocess.run(
            [args.bundler, "build", os.path.join(MODEL_DIR, "digits_cnn.onnx"), "--name", "digits_cnn",
             "--version", "1.0.0", "--security-version", "1", "--key", os.path.join(keys, "fp.key"),
             "-o", bundle, "--golden-inputs", os.path.join(MODEL_DIR, "test_input.npy"),
             "--golden-labels", os.path.join(MODEL_DIR, "test_labels.npy")],
            check=True, stdout=subprocess.DEVNULL,
        )
        data = os.path.join(work, "device")
        keyring = os.path.join(keys, "fp.pub")
        subprocess.run([args.agent, "install", bundle, "--data-dir", data, "--keyring", keyring],
                       check=True, stdout=subprocess.DEVNULL)
        port = free_port()
        agent = subprocess.Popen(
            [args.agent, "run", "--data-dir", data, "--keyring", keyring,
             "--listen", "127.0.0.1:%d" % port, "--workers", str(args.workers)],
            stdout=subprocess.DEVNULL, env=dict(os.environ, RUST_LOG="warn"),
        )
        try:
            base = "http://127.0.0.1:%d" % port
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(base + "/v2/health/ready", timeout=1)
                    break
                except (urllib.error.URLError, OSError):
                    if time.monotonic() > deadline or agent.poll() is not None:
                        sys.exit("the agent did not become ready")
                    time.sleep(0.2)
            size = os.path.getsize(args.agent)
            print("agent binary: %s, %d bytes (%.2f MB)" % (args.agent, size, size / 1e6))
            time.sleep(args.warmup)
            print("| phase | samples | PSS MB min / mean / max | RSS MB min / mean / max | load |")
            print("|---|---|---|---|---|")
            idle = sample(agent.pid, args.window, args.interval)
            print(row("idle", idle), flush=True)
            if args.breakdown:
                print("  idle PSS kB: " + breakdown(agent.pid, args.agent), flush=True)
            load = Load(base + "/v2/models/digits_cnn/infer", rows, labels, args.rps)
            load.start()
            time.sleep(args.warmup)
            busy = sample(agent.pid, args.window, args.interval)
            split = breakdown(agent.pid, args.agent) if args.breakdown else None
            load.stop.set()
            load.join()
            rate = load.sent / (args.window + args.warmup)
            print(row("%g req/s" % args.rps, busy,
                      "%d requests (%.1f/s), %d failed, accuracy %.4f"
                      % (load.sent, rate, load.failed, load.correct / max(1, load.sent))))
            if split:
                print("  loaded PSS kB: " + split)
        finally:
            agent.terminate()
            agent.wait()


if __name__ == "__main__":
    main()
