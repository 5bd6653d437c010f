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

# Fuzz the bundle reader and the manifest parser for a fixed budget (needs nightly + cargo-fuzz).
fuzz seconds="300":
    cd fuzz && cargo +nightly fuzz run bundle_reader corpus/bundle_reader -- -max_total_time={{seconds}}
    cd fuzz && cargo +nightly fuzz run manifest_parser corpus/manifest_parser -- -max_total_time={{seconds}}
