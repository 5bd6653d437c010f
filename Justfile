# Convenience recipes. Nothing here is required: README's two commands work without `just`.

# The demo (see README).
demo:
    cargo run --release --example demo

# Every test suite (the README's test command).
test:
    cargo test --workspace

# What CI runs on a clean clone.
ci:
    bash .ci/run

# Benchmarks; results go to BENCHMARKS.md by hand, with the machine and the command.
bench:
    cargo build --release -p modelfleet-engine -p modelfleet-bundler -p modelfleet-agent --bins --examples
    target/release/examples/engine_bench
    python3 scripts/bench_ort.py
    target/release/examples/bundle_bench
    target/release/examples/serve_bench

# Every fuzz target (bundle reader, manifest, MQTT payloads of both sides, OIP requests) for a
# fixed budget each; prints executions per target (needs nightly + cargo-fuzz; fuzz/README.md).
fuzz seconds="60" *targets="":
    scripts/fuzz.sh {{seconds}} {{targets}}

# Device agents for the ARM targets (linkers and qemu runners come from .cargo/config.toml;
# needs gcc-aarch64-linux-gnu / gcc-arm-linux-gnueabihf and `rustup target add`, see docs/targets.md).
# The `device` profile (fat LTO, one codegen unit, stripped, panic = "abort", opt-level "s" for
# the crates off the inference path and tract-core) without the `multithread` and `onnx` features (it serves
# NNEF bundles, the bundler's default, and refuses ONNX ones), as targets/*.toml say
# (`cargo_profile`, `cargo_features`), plus `device_rustflags` below; the binary is
# target/<triple>/device/fleet-agent. A profile with engine_threads > 1 (jetson-aarch64):
# `just cross-aarch64 multithread`; the Pi 4/5 class (rpi4-aarch64) without tract's FP16 kernels:
# `just cross-aarch64 no-fp16` (BENCHMARKS.md "Agent footprint", step 5).
cross-aarch64 features="":
    RUSTFLAGS="{{device_rustflags}}" cargo build --profile device -p modelfleet-agent --bin fleet-agent --target aarch64-unknown-linux-gnu --no-default-features --features "{{features}}"

cross-armv7 features="":
    RUSTFLAGS="{{device_rustflags}}" cargo build --profile device -p modelfleet-agent --bin fleet-agent --target armv7-unknown-linux-gnueabihf --no-default-features --features "{{features}}"

# The same device build for x86_64 boxes (targets/x86_64-generic.toml). `--target` is spelled
# out so that RUSTFLAGS reach the agent's crates only, not build scripts and proc macros (host
# tools, which the device flags are not meant for); the binary is
# target/x86_64-unknown-linux-gnu/device/fleet-agent.
device-x86_64 features="":
    RUSTFLAGS="{{device_rustflags}}" cargo build --profile device -p modelfleet-agent --bin fleet-agent --target x86_64-unknown-linux-gnu --no-default-features --features "{{features}}"

# Code-generation and link flags of the device builds only (issue 9, BENCHMARKS.md "Agent
# footprint", step 4). Stable cargo has no per-profile rustflags, and a `[target.TRIPLE]
# rustflags` in .cargo/config.toml would change every build for that triple (CI's dev-profile
# cross build, tests), so the device recipes set RUSTFLAGS (for the target's crates only: they
# all pass --target). Changing them rebuilds the device profile's dependencies once.
# - relocation-model=static (rustc then links with -no-pie): a fixed-address executable with no
#   dynamic relocation table to carry and apply at start-up. Loses ASLR for the agent's own code
#   (libraries, stack, heap and mmap stay randomised).
# - force-unwind-tables=no: with panic = "abort" nothing unwinds, so our crates' .eh_frame is
#   only read to print a backtrace, and the device binary is stripped, so such a backtrace is
#   bare addresses anyway; the panic message and its source location are still logged.
#   (The prebuilt std keeps its own tables.)
# - rust-lld (shipped with every rustup toolchain, found with -B; Debian's gold also has --icf,
#   but rustc warns that gold is deprecated and has known bugs with Rust) with --icf=all:
#   identical code folding merges byte-identical functions, which tract's many monomorphic
#   copies (one per datum type) produce.
rust_lld_dir := `echo "$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/gcc-ld"`
device_rustflags := "-C relocation-model=static -C force-unwind-tables=no -C link-arg=-fuse-ld=lld -C link-arg=-B" + rust_lld_dir + " -C link-arg=-Wl,--icf=all"

# Footprint table of BENCHMARKS.md: the agent's PSS (digits_cnn, idle and at 50 req/s), as a
# device runs it (`device` profile, no `multithread`); `just footprint 120 release` for the
# default build.
footprint window="120" profile="device":
    cargo build --release -p modelfleet-bundler --bin bundler
    {{ if profile == "device" { "just device-x86_64" } else { "cargo build --profile " + profile + " -p modelfleet-agent --bin fleet-agent --target x86_64-unknown-linux-gnu" } }}
    ls -l target/x86_64-unknown-linux-gnu/{{profile}}/fleet-agent
    python3 scripts/footprint.py --agent target/x86_64-unknown-linux-gnu/{{profile}}/fleet-agent --bundler target/release/bundler --window {{window}}
