//! The fuzz seed corpora (`fuzz/corpus/<target>/`) and a deterministic miniature of the fuzzer:
//! every single-byte change and every truncation of a valid bundle is refused, without a panic.
//!
//! Every seed is written here, deterministically (ed25519 signatures are deterministic, the
//! clock is `protocol::testing::fuzz_now`), and checked against the committed files; regenerate
//! with `MODELFLEET_WRITE_FUZZ_SEED=1`.

use std::path::PathBuf;

use chrono::Duration;
use protocol::bundle::{compress_payload, read_bundle, write_bundle, DiscardSink, VerifyOptions};
use protocol::command_auth::SignedCommand;
use protocol::keyring_chain::KeyringChain;
use protocol::keys::{Keyring, KeyringUpdate, SecretKey, SignedKeyringUpdate};
use protocol::link::{
    self, Action, BundleRef, ChunkHeader, ChunkRequest, Command, DeviceEvent, DeviceStatus,
    ModelSummary, LINK_SCHEMA,
};
use protocol::telemetry::TelemetryRecord;
use protocol::testing::{fuzz_key, fuzz_now, FUZZ_DEVICE};
use serde_json::json;

fn corpus(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// The seed bundle: protocol's sample manifest with two tiny payloads. Deterministic.
fn seed() -> (Vec<u8>, Vec<u8>) {
    let key = fuzz_key();
    let mut manifest = protocol::testing::sample_manifest();
    manifest.name = "fuzz-seed".into();
    let payloads = vec![
        compress_payload("model.onnx", b"not really onnx", 3, |_, _| {}).unwrap(),
        compress_payload("golden.bin", &[0u8; 16], 3, |_, _| {}).unwrap(),
    ];
    let mut bytes = Vec::new();
    let manifest_bytes = write_bundle(&mut bytes, &mut manifest, &payloads, &[&key]).unwrap();
    (bytes, manifest_bytes)
}

/// Commands for the fuzz device, valid at `fuzz_now`.
fn commands() -> Vec<(&'static str, Command)> {
    let command = |seq: u64, action: Action| Command {
        schema: LINK_SCHEMA,
        command_id: format!("c{seq}"),
        rollout_id: Some("r1".into()),
        device_id: FUZZ_DEVICE.into(),
        seq,
        time: fuzz_now(),
        expires: fuzz_now() + Duration::hours(1),
        action,
    };
    let bundle = BundleRef {
        bundle_id: link::sha256_hex(b"bundle"),
        name: "digits".into(),
        version: "1.2.0".into(),
        size: 200_000,
        chunk_size: 65536,
        http_url: Some("http://server:8080/api/v1/bundles/x/file".into()),
    };
    vec![
        ("stage", command(1, Action::Stage { bundle })),
        (
            "revert",
            command(
                2,
                Action::Revert {
                    model: "digits".into(),
                    version: Some("1.2.0".into()),
                },
            ),
        ),
        (
            "cancel",
            command(
                3,
                Action::CancelTransfer {
                    bundle_id: link::sha256_hex(b"bundle"),
                },
            ),
        ),
    ]
}

/// A second fixed key, to rotate the fuzz keyring to.
fn second_key() -> SecretKey {
    SecretKey::from_file_text(
        "ed25519-secret 7365636f6e642066757a7a206b65792c206e6f74207365637265742065697468",
    )
    .unwrap()
}

/// Two keyring updates: the fuzz key alone → fuzz + second key (threshold 2) → second alone.
fn keyring_updates() -> Vec<SignedKeyringUpdate> {
    let (a, b) = (fuzz_key(), second_key());
    let body = |version, threshold, keys: &[&SecretKey]| KeyringUpdate {
        version,
        threshold,
        keys: keys.iter().map(|k| k.public().to_hex()).collect(),
    };
    vec![
        SignedKeyringUpdate::sign(&body(1, 2, &[&a, &b]), &[&a]),
        SignedKeyringUpdate::sign(&body(2, 1, &[&b]), &[&a, &b]),
    ]
}

fn chunk_frame(index: u32, bytes: &[u8]) -> Vec<u8> {
    let header = ChunkHeader {
        bundle_id: link::sha256_hex(b"bundle"),
        index,
        chunk_size: 64,
        total: 4,
        sha256: link::sha256_hex(bytes),
        error: None,
    };
    link::encode_chunk(&header, bytes)
}

fn status() -> DeviceStatus {
    DeviceStatus {
        schema: LINK_SCHEMA,
        device_id: FUZZ_DEVICE.into(),
        online: true,
        time: fuzz_now(),
        agent_version: Some("0.1.0".into()),
        target: Some("aarch64-unknown-linux-gnu".into()),
        labels: [("site".to_string(), "lab".to_string())].into(),
        models: Some(vec![ModelSummary {
            name: "digits".into(),
            active: "1.2.0".into(),
            previous: Some("1.1.0".into()),
            state: "trial".into(),
            security_version: 3,
            bundle_sha256: link::sha256_hex(b"bundle"),
            compute: None,
        }]),
    }
}

fn event() -> DeviceEvent {
    DeviceEvent {
        schema: LINK_SCHEMA,
        device_id: FUZZ_DEVICE.into(),
        seq: 12,
        time: fuzz_now(),
        kind: "reverted".into(),
        model: Some("digits".into()),
        version: Some("1.2.0".into()),
        rollout_id: Some("r1".into()),
        command_id: Some("c1".into()),
        detail: json!({"reason": "error_rate", "evidence": {"errors": 5, "requests": 40}}),
    }
}

fn telemetry() -> Vec<(&'static str, Vec<u8>)> {
    let hist = |lo: f64, hi: f64, counts: &[u64]| json!({"lo": lo, "hi": hi, "counts": counts});
    let window = json!({
        "type": "window", "schema": 1, "model": "digits", "version": "1.2.0",
        "start": "2027-01-15T08:00:00Z", "end": "2027-01-15T08:00:10Z", "state": "trial",
        "requests": 120, "errors": 1, "non_finite": 0,
        "latency": {"log10_us": hist(1.0, 6.0, &[0, 3, 90, 27, 0, 0, 0]),
                    "mean_ms": 1.5, "p50_ms": 1.2, "p95_ms": 3.4, "p99_ms": 5.0},
        "classification": {"class_counts": [10, 20, 30, 60],
                           "confidence": hist(0.0, 1.0, &[0, 1, 2, 117, 0]),
                           "mean_confidence": 0.91, "prediction_psi_baseline": 0.02},
        "input_psi": {"x": 0.01},
        "feedback": {"labelled": 10, "correct": 9, "accuracy": 0.9},
        "samples_over_budget": 0, "outbox_dropped_total": 0
    });
    let regression = json!({
        "type": "window", "schema": 1, "model": "vibration", "version": "2.0.0",
        "start": "2027-01-15T08:00:00Z", "end": "2027-01-15T08:00:10Z", "state": "committed",
        "requests": 7, "errors": 0, "non_finite": 1,
        "latency": {"log10_us": hist(1.0, 6.0, &[0, 7, 0]),
                    "mean_ms": null, "p50_ms": null, "p95_ms": null, "p99_ms": null},
        "regression": {"statistic": hist(0.0, 2.0, &[1, 5, 1]), "mean": 0.8, "std": 0.1},
        "input_psi": {}, "samples_over_budget": 2, "outbox_dropped_total": 5
    });
    let sample = json!({
        "type": "sample", "schema": 1, "model": "digits", "version": "1.2.0",
        "time": "2027-01-15T08:00:05Z", "request_id": "q1", "latency_ms": 1.25,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0.5, null, 1.0, 2.0]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [1, 2], "data": [0.1, 0.9]}]
    });
    [
        ("window.json", window),
        ("regression.json", regression),
        ("sample.json", sample),
    ]
    .map(|(name, v)| (name, serde_json::to_vec(&v).unwrap()))
    .to_vec()
}

/// Requests for the OIP targets' model (`fuzz/src/lib.rs::oip_schema`).
fn oip_requests() -> Vec<(&'static str, Vec<u8>)> {
    let json_request = json!({
        "id": "q1",
        "parameters": {"binary_data_output": false},
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 4],
             "data": [[0.5, 1, -2.5, 3e-3], [0, 0, 0, 1]]},
            {"name": "ids", "datatype": "INT64", "shape": [3], "data": [1, -2, 9007199254740993i64]},
            {"name": "mask", "datatype": "INT32", "shape": [2, 1], "data": [1, 0]},
            {"name": "image", "datatype": "UINT8", "shape": [1, 2, 2], "data": [0, 255, 7, 8]}
        ],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}}, {"name": "embedding"}]
    });
    // Binary: `x` and `image` as raw little-endian bytes after the JSON header.
    let header = json!({
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, 4],
             "parameters": {"binary_data_size": 16}},
            {"name": "ids", "datatype": "INT64", "shape": [1], "data": [4]},
            {"name": "mask", "datatype": "INT32", "shape": [2, 0], "data": []},
            {"name": "image", "datatype": "UINT8", "shape": [1, 2, 2],
             "parameters": {"binary_data_size": 4}}
        ],
        "parameters": {"binary_data_output": true}
    });
    let header = serde_json::to_vec(&header).unwrap();
    let mut binary = (header.len() as u16).to_be_bytes().to_vec();
    binary.extend_from_slice(&header);
    for v in [1.0f32, -0.5, f32::NAN, 3.25] {
        binary.extend_from_slice(&v.to_le_bytes());
    }
    binary.extend_from_slice(&[1, 2, 3, 4]);
    vec![
        ("oip_json", serde_json::to_vec(&json_request).unwrap()),
        ("oip_binary", binary),
    ]
}

/// Every committed seed: (target, file name, bytes).
/// A narrow-weights payload with one tensor of each encoding (placed for the fuzz target's
/// 12-byte model file: a `splice` of it succeeds).
fn narrow_weights() -> Vec<u8> {
    use protocol::narrow_weights::{encode, Encoding, NarrowTensor};
    encode(&[
        NarrowTensor {
            offset: 5,
            shape: vec![2, 3],
            encoding: Encoding::Int8 {
                axis: 0,
                scales: vec![0.5, 0.25],
                values: vec![1, -2, 127, 4, 0, -127],
            },
        },
        NarrowTensor {
            offset: 5 + 24 + 3,
            shape: vec![3],
            encoding: Encoding::F16 {
                bits: vec![0x3c00, 0xc000, 0x0001],
            },
        },
    ])
}

fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let key = fuzz_key();
    let (bundle, manifest) = seed();
    let mut seeds = vec![
        ("bundle_reader", "valid-tiny.mfb".into(), bundle),
        ("manifest_parser", "manifest.json".into(), manifest),
    ];
    for (name, command) in commands() {
        let signed = SignedCommand::sign(&command, &key);
        seeds.push((
            "command_body",
            format!("{name}.json"),
            signed.body.clone().into_bytes(),
        ));
        seeds.push(("command_envelope", format!("{name}.json"), signed.encode()));
    }
    let updates = keyring_updates();
    for (i, u) in updates.iter().enumerate() {
        seeds.push((
            "keyring_update_body",
            format!("update-{}.json", i + 1),
            u.body.clone(),
        ));
    }
    seeds.push((
        "keyring_chain",
        "two-rotations.json".into(),
        link::encode(&KeyringChain::new(updates)),
    ));
    seeds.push((
        "narrow_weights",
        "int8-and-f16.bin".into(),
        narrow_weights(),
    ));
    seeds.push(("chunk_frame", "chunk.bin".into(), chunk_frame(1, &[7; 64])));
    seeds.push((
        "chunk_frame",
        "last-chunk.bin".into(),
        chunk_frame(3, b"tail"),
    ));
    let error = ChunkHeader {
        bundle_id: link::sha256_hex(b"bundle"),
        index: 9,
        chunk_size: 64,
        total: 4,
        sha256: String::new(),
        error: Some("chunk range 9+1 is outside the bundle's 4 chunks".into()),
    };
    seeds.push((
        "chunk_frame",
        "error.bin".into(),
        link::encode_chunk(&error, &[]),
    ));
    seeds.push((
        "device_status",
        "online.json".into(),
        link::encode(&status()),
    ));
    let mut will = DeviceStatus::last_will(FUZZ_DEVICE);
    will.time = fuzz_now();
    seeds.push((
        "device_status",
        "last-will.json".into(),
        link::encode(&will),
    ));
    seeds.push((
        "device_event",
        "reverted.json".into(),
        link::encode(&event()),
    ));
    let request = ChunkRequest {
        schema: LINK_SCHEMA,
        bundle_id: link::sha256_hex(b"bundle"),
        chunk_size: 65536,
        first: 2,
        count: 64,
    };
    seeds.push((
        "chunk_request",
        "request.json".into(),
        link::encode(&request),
    ));
    for (name, bytes) in telemetry() {
        seeds.push(("telemetry", name.into(), bytes));
    }
    for (target, bytes) in oip_requests() {
        seeds.push((target, "request.bin".into(), bytes));
    }
    seeds
}

fn opts(keyring: &Keyring) -> VerifyOptions<'_> {
    let mut o = VerifyOptions::new(keyring);
    o.now = fuzz_now();
    o
}

#[test]
fn committed_seed_corpora_are_current() {
    let seeds = seeds();
    if std::env::var_os("MODELFLEET_WRITE_FUZZ_SEED").is_some() {
        for (target, name, data) in &seeds {
            std::fs::create_dir_all(corpus(target)).unwrap();
            std::fs::write(corpus(target).join(name), data).unwrap();
        }
    }
    for (target, name, data) in &seeds {
        let path = corpus(target).join(name);
        let committed = std::fs::read(&path).unwrap_or_default();
        assert!(
            &committed == data,
            "{} is missing or stale; regenerate with MODELFLEET_WRITE_FUZZ_SEED=1",
            path.display()
        );
        assert!(data.len() < 16 << 10, "keep the committed seeds small");
    }
}

#[test]
fn the_link_seeds_are_valid_messages() {
    let key = fuzz_key().public();
    for (_, command) in commands() {
        let signed = SignedCommand::sign(&command, &fuzz_key()).encode();
        let opened = protocol::command_auth::open(&signed, &key, FUZZ_DEVICE, fuzz_now()).unwrap();
        assert_eq!(opened, command);
    }
    let ring = KeyringChain::new(keyring_updates())
        .apply(&Keyring::new([key]))
        .unwrap();
    assert_eq!((ring.version, ring.threshold), (2, 1));
    for index in [1, 3] {
        let bytes: &[u8] = if index == 1 { &[7; 64] } else { b"tail" };
        link::decode_chunk(&chunk_frame(index, bytes)).unwrap();
    }
    for (name, bytes) in telemetry() {
        let record: TelemetryRecord = serde_json::from_slice(&bytes).expect(name);
        let again: TelemetryRecord =
            serde_json::from_slice(&serde_json::to_vec(&record).unwrap()).unwrap();
        assert_eq!(again, record, "{name}");
    }
}

#[test]
fn every_byte_change_and_truncation_of_the_seed_is_refused() {
    let keyring = Keyring::new([fuzz_key().public()]);
    let (bytes, _) = seed();
    read_bundle(&bytes[..], &opts(&keyring), &mut DiscardSink).expect("seed is valid");
    let mut mutated = bytes.clone();
    for i in 0..bytes.len() {
        for flip in [0x01u8, 0x80] {
            mutated[i] ^= flip;
            let r = read_bundle(&mutated[..], &opts(&keyring), &mut DiscardSink);
            assert!(r.is_err(), "byte {i} ^ {flip:#x} went unnoticed");
            mutated[i] ^= flip;
        }
    }
    for len in (0..bytes.len()).step_by(97).chain([bytes.len() - 1]) {
        assert!(read_bundle(&bytes[..len], &opts(&keyring), &mut DiscardSink).is_err());
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(read_bundle(&longer[..], &opts(&keyring), &mut DiscardSink).is_err());
}

#[test]
fn the_narrow_weights_seed_decodes_and_splices_into_the_targets_model_file() {
    use protocol::narrow_weights::{decode, encode, splice, strip};
    let seed = narrow_weights();
    let tensors = decode(&seed).unwrap();
    assert_eq!(encode(&tensors), seed);
    let stripped = b"head!midtail";
    let spliced = splice(stripped, &tensors).unwrap();
    assert_eq!(spliced.len(), stripped.len() + 4 * 9);
    assert_eq!(strip(&spliced, &tensors), stripped);
}
