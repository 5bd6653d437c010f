#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/) for a fixed budget and prints, per target, the executions,
# executions per second, coverage, corpus size, peak RSS and whether anything was found.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]        (default: 60 s each, every target)
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Inputs the fuzzer
# finds go to fuzz/target/corpus/<target>/ (not committed); the committed seeds in
# fuzz/corpus/<target>/ are read, never written. Crashes land in fuzz/artifacts/<target>/.
# `just fuzz` calls this script.
#
# Environment:
#   FUZZ_SANITIZER   address or none, passed as `cargo fuzz run -s`, for every target. Default:
#                    address, except none for the oip_* targets (they link the agent, hence
#                    tract: see fuzz/README.md). Builds without a sanitizer use fuzz/target/nosan
#                    so the two kinds of build do not overwrite each other's dependencies.
#   FUZZ_JOBS        targets run at once (default 1).
#   MODELFLEET_BUNDLER  a bundler binary: when set (or when target/{release,debug}/bundler
#                    exists), real model bundles from examples/models/, signed by the fuzz
#                    key, seed the bundle_reader target too (fuzz/target/seeds/).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
fuzz="$root/fuzz"
seconds="${1:-60}"
shift || true
all=(bundle_reader manifest_parser command_envelope command_body chunk_frame narrow_weights keyring_chain
     keyring_update_body server_presence device_status device_event telemetry chunk_request oip_json oip_binary)
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${all[@]}")
jobs="${FUZZ_JOBS:-1}"
logs="$fuzz/target/fuzz-logs"
mkdir -p "$logs"

# The targets that need more than the protocol crate.
features_of() {
    case "$1" in
        telemetry) echo "--features server" ;;
        oip_*) echo "--features agent" ;;
        *) echo "" ;;
    esac
}

# Sanitizer and target directory options of a target.
build_opts_of() {
    local san="${FUZZ_SANITIZER:-}"
    if [ -z "$san" ]; then
        case "$1" in
            oip_*) san=none ;;
            *) san=address ;;
        esac
    fi
    if [ "$san" = none ]; then
        echo "-s none --target-dir target/nosan $(features_of "$1")"
    else
        echo "-s $san $(features_of "$1")"
    fi
}

# Real bundles for bundle_reader, signed by the fuzz key (protocol::testing::FUZZ_SECRET_KEY).
real_bundle_seeds() {
    local bundler="${MODELFLEET_BUNDLER:-}"
    if [ -z "$bundler" ]; then
        for p in "${CARGO_TARGET_DIR:-$root/target}"/{release,debug}/bundler; do
            [ -x "$p" ] && bundler="$p" && break
        done
    fi
    [ -n "$bundler" ] || return 0
    local out="$fuzz/target/seeds/bundle_reader"
    mkdir -p "$out"
    local key="$fuzz/target/seeds/fuzz.key"
    sed -n 's/^pub const FUZZ_SECRET_KEY: &str =$//;s/^ *"\(ed25519-secret [0-9a-f]*\)";$/\1/p' \
        "$root/protocol/src/testing.rs" > "$key"
    for model in digits_mlp digits_cnn; do
        local dir="$root/examples/models/$model"
        [ -s "$out/$model.mfb" ] && continue
        "$bundler" build "$dir/$model.onnx" --name "$model" --version 1.0.0 --security-version 1 \
            --key "$key" -o "$out/$model.mfb" --golden-inputs "$dir/test_input.npy" \
            > "$logs/bundler-$model.log" 2>&1 ||
            echo "note: could not build a $model bundle (see $logs/bundler-$model.log)"
    done
    echo "$out"
}

extra_seeds=""
if printf '%s\n' "${targets[@]}" | grep -qx bundle_reader; then
    extra_seeds="$(real_bundle_seeds)"
fi
# The fuzz crate builds into fuzz/target, whatever the workspace's target directory is.
unset CARGO_TARGET_DIR

run_one() {
    local t="$1"
    local corpus="$fuzz/target/corpus/$t"
    mkdir -p "$corpus" "$fuzz/artifacts/$t"
    local dirs=("$corpus" "$fuzz/corpus/$t")
    [ "$t" = bundle_reader ] && [ -n "$extra_seeds" ] && dirs+=("$extra_seeds")
    # One dictionary per run: the target's own words, plus JSON's for the JSON decoders.
    local dict="$logs/$t.dict"
    cat "$fuzz/dicts/$t.dict" > "$dict" 2>/dev/null || : > "$dict"
    [ "$t" = bundle_reader ] || cat "$fuzz/dicts/json.dict" >> "$dict"
    # shellcheck disable=SC2046
    (cd "$fuzz" && nice -n 10 cargo +nightly fuzz run $(build_opts_of "$t") "$t" \
        "${dirs[@]}" -- -max_total_time="$seconds" -print_final_stats=1 \
        -artifact_prefix="$fuzz/artifacts/$t/" -dict="$dict") > "$logs/$t.log" 2>&1
    echo $? > "$logs/$t.rc"
}

# Build first (one at a time: the builds share fuzz/target), then run.
for t in "${targets[@]}"; do
    echo "building $t" >&2
    # shellcheck disable=SC2046
    (cd "$fuzz" && nice -n 10 cargo +nightly fuzz build $(build_opts_of "$t") "$t") >&2
done
running=0
for t in "${targets[@]}"; do
    echo "fuzzing $t for ${seconds}s" >&2
    run_one "$t" || true &
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
        wait -n || true
        running=$((running - 1))
    fi
done
wait || true

printf '%-20s %12s %8s %6s %14s %8s  %s\n' target runs exec/s cov corpus rss_mb result
failed=0
for t in "${targets[@]}"; do
    log="$logs/$t.log"
    rc="$(cat "$logs/$t.rc" 2>/dev/null || echo '?')"
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)"
    rss="$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)"
    last="$(grep -E '^#[0-9]+' "$log" | tail -1 || true)"
    cov="$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")"
    corp="$(sed -n 's/.* corp: \([0-9]*\/[0-9]*[a-zA-Z]*\).*/\1/p' <<<"$last")"
    result=ok
    if [ "$rc" != 0 ]; then
        result="FOUND (exit $rc): $(grep -m1 -oE 'artifact_prefix.*|Test unit written to .*' "$log" || echo "see $log")"
        failed=1
    fi
    printf '%-20s %12s %8s %6s %14s %8s  %s\n' "$t" "${runs:-?}" "${rate:-?}" "${cov:-?}" \
        "${corp:-?}" "${rss:-?}" "$result"
done
echo "(logs: $logs; machine: $(nproc) x $(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -1))"
exit "$failed"
