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
# The `device` profile (fat LTO, one codegen unit, stripped, panic = "abort") without the
# `multithread` and `onnx` features (it serves NNEF bundles, the bundler's default, and refuses
# ONNX ones), as targets/*.toml say (`cargo_profile`, `cargo_features`); the binary is
# target/<triple>/device/fleet-agent. A profile with engine_threads > 1 (jetson-aarch64):
# `just cross-aarch64 multithread`.
cross-aarch64 features="":
    cargo build --profile device -p modelfleet-agent --bin fleet-agent --target aarch64-unknown-linux-gnu --no-default-features --features "{{features}}"

cross-armv7 features="":
    cargo build --profile device -p modelfleet-agent --bin fleet-agent --target armv7-unknown-linux-gnueabihf --no-default-features --features "{{features}}"

# The same device build for x86_64 boxes (targets/x86_64-generic.toml).
device-x86_64 features="":
    cargo build --profile device -p modelfleet-agent --bin fleet-agent --no-default-features --features "{{features}}"

# Footprint table of BENCHMARKS.md: the agent's PSS (digits_cnn, idle and at 50 req/s), as a
# device runs it (`device` profile, no `multithread`); `just footprint 120 release` for the
# default build.
footprint window="120" profile="device":
    cargo build --release -p modelfleet-bundler --bin bundler
    cargo build --profile {{profile}} -p modelfleet-agent --bin fleet-agent {{ if profile == "device" { "--no-default-features" } else { "" } }}
    ls -l target/{{profile}}/fleet-agent
    python3 scripts/footprint.py --agent target/{{profile}}/fleet-agent --bundler target/release/bundler --window {{window}}
