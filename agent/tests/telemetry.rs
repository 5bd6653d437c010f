//! Telemetry end to end with the real `fleet-agent` binary: metric windows and sampled records
//! accumulate in the durable outbox across a restart (kill -9), label feedback shows up as live
//! accuracy, every record validates against `docs/telemetry.schema.json`, and sampled records
//! obey each bundle's `telemetry_samples` mode (values, hashes, or none at all).

mod common;

use std::path::Path;
use std::time::Duration;

use agent::outbox::{Outbox, OutboxLimits};
use common::*;
use protocol::manifest::TelemetrySamples;
use protocol::telemetry::TelemetryRecord;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn schema() -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/telemetry.schema.json");
    let schema: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    jsonschema::validator_for(&schema).expect("the schema is a valid JSON Schema")
}

fn start(fx: &Fixture) -> AgentProcess {
    start_sampling(fx, 0.25)
}

/// An agent with 1-second windows keeping `sample_rate` of the requests as sampled records.
fn start_sampling(fx: &Fixture, sample_rate: f64) -> AgentProcess {
    let config = fx.path("agent.toml");
    std::fs::write(
        &config,
        format!("[health]\ntelemetry_window_seconds = 1\nsample_rate = {sample_rate}\n"),
    )
    .unwrap();
    AgentProcess::start(
        fx,
        &fx.path("data"),
        &["--config", config.to_str().unwrap()],
    )
}

/// `n` requests with ids `{prefix}{i}` on test samples `0..n`.
fn traffic(agent: &AgentProcess, prefix: &str, n: usize) {
    let inputs = engine::npy::read_npy(models_dir().join("digits_mlp/test_input.npy")).unwrap();
    for i in 0..n {
        let mut body = json_request("input", &sample(&inputs, i));
        body["id"] = json!(format!("{prefix}{i}"));
        ureq::post(&format!("{}/v2/models/digits_mlp/infer", agent.url))
            .send_json(body)
            .unwrap();
    }
}

/// Checks every record against the public schema and the public Rust types.
fn assert_valid(records: &[(u64, Value)]) {
    let validator = schema();
    for (id, record) in records {
        let errors: Vec<String> = validator
            .iter_errors(record)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "record {id} {record}: {errors:?}");
        serde_json::from_value::<TelemetryRecord>(record.clone()).unwrap();
    }
}

/// Reads the outbox of a stopped agent.
fn outbox_records(fx: &Fixture) -> Vec<(u64, Value)> {
    let outbox = Outbox::open(&fx.path("data").join("agent.redb"), OutboxLimits::default())
        .expect("outbox opens once the agent is gone");
    outbox
        .peek(100_000)
        .unwrap()
        .into_iter()
        .map(|p| (p.id, serde_json::from_slice(&p.json).unwrap()))
        .collect()
}

#[test]
fn windows_and_samples_accumulate_across_a_restart_and_match_the_schema() {
    let fx = Fixture::new();
    let bundle = fx.bundle("digits_mlp", "1.0.0", 1);
    let labels = labels("digits_mlp");

    let mut agent = start(&fx);
    ureq::post(&format!("{}/admin/v1/bundles", agent.url))
        .send_bytes(&std::fs::read(&bundle).unwrap())
        .unwrap();
    traffic(&agent, "a", 200);
    // Ground truth for the first 100 requests, plus ids the agent never saw.
    let mut feedback: Vec<Value> = (0..100)
        .map(|i| json!({"id": format!("a{i}"), "label": labels[i]}))
        .collect();
    feedback.push(json!({"id": "never-sent", "label": 1}));
    let answer: Value = ureq::post(&format!(
        "{}/admin/v1/models/digits_mlp/feedback",
        agent.url
    ))
    .send_json(json!({ "labels": feedback }))
    .unwrap()
    .into_json()
    .unwrap();
    assert_eq!(answer["received"], 101);
    assert_eq!(answer["matched"], 100);
    assert!(answer["correct"].as_u64().unwrap() >= 95, "{answer}");
    let bad = ureq::post(&format!(
        "{}/admin/v1/models/digits_mlp/feedback",
        agent.url
    ))
    .send_json(json!({"labels": "nope"}));
    assert!(matches!(bad, Err(ureq::Error::Status(400, _))));
    std::thread::sleep(Duration::from_millis(2500));
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();

    let before = outbox_records(&fx);
    assert!(!before.is_empty(), "nothing reached the outbox");

    agent = start(&fx);
    traffic(&agent, "b", 100);
    std::thread::sleep(Duration::from_millis(2500));
    drop(agent);

    let after = outbox_records(&fx);
    assert_eq!(
        &after[..before.len()],
        &before[..],
        "records written before the restart are still there, in order"
    );
    assert!(
        after.len() > before.len(),
        "the restarted agent adds records"
    );

    assert_valid(&after);

    let windows: Vec<&Value> = after
        .iter()
        .map(|(_, r)| r)
        .filter(|r| r["type"] == "window")
        .collect();
    let samples = after.iter().filter(|(_, r)| r["type"] == "sample").count();
    let requests: u64 = windows
        .iter()
        .map(|w| w["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(requests, 300, "every request is in exactly one window");
    assert!(
        (25..=130).contains(&samples),
        "about a quarter of 300 requests sampled, got {samples}"
    );
    let labelled: u64 = windows
        .iter()
        .filter_map(|w| w["feedback"]["labelled"].as_u64())
        .sum();
    assert_eq!(labelled, 100);
    let w = windows[0];
    assert_eq!(w["model"], "digits_mlp");
    assert_eq!(w["state"], "committed");
    assert_eq!(
        w["classification"]["class_counts"]
            .as_array()
            .unwrap()
            .len(),
        10
    );
    assert!(w["latency"]["p95_ms"].as_f64().unwrap() > 0.0);
    assert!(w["input_psi"]["input"].as_f64().is_some(), "{w}");
    let sample = &after.iter().find(|(_, r)| r["type"] == "sample").unwrap().1;
    assert_eq!(sample["inputs"][0]["shape"], json!([1, 64]));
    assert_eq!(sample["outputs"][0]["name"], "probabilities");
    assert!(sample["request_id"].as_str().unwrap().starts_with('a'));
}

/// sha256 (lowercase hex) of f32 values as little-endian bytes: how `hashed` mode identifies a
/// tensor. Computed here independently of the agent's code.
#[test]
fn the_last_window_of_a_replaced_version_is_reported() {
    // Windows of an hour: the health watch never closes one during this test, so whatever
    // window v1 reports is the one its replacement closed.
    let fx = Fixture::new();
    let config = fx.path("agent.toml");
    std::fs::write(&config, "[health]\ntelemetry_window_seconds = 3600\n").unwrap();
    let agent = AgentProcess::start(
        &fx,
        &fx.path("data"),
        &["--config", config.to_str().unwrap()],
    );
    let install = |version: &str| {
        let bundle = fx.bundle("digits_mlp", version, 1);
        ureq::post(&format!("{}/admin/v1/bundles", agent.url))
            .send_bytes(&std::fs::read(bundle).unwrap())
            .unwrap();
    };
    install("1.0.0");
    traffic(&agent, "a", 30);
    install("2.0.0");
    traffic(&agent, "b", 5);
    drop(agent);

    let records = outbox_records(&fx);
    assert_valid(&records);
    let windows: Vec<&Value> = records
        .iter()
        .map(|(_, r)| r)
        .filter(|r| r["type"] == "window")
        .collect();
    let v1: Vec<&&Value> = windows.iter().filter(|w| w["version"] == "1.0.0").collect();
    assert_eq!(v1.len(), 1, "v1's last window, once: {windows:?}");
    assert_eq!(v1[0]["requests"], 30, "{}", v1[0]);
    assert_eq!(v1[0]["model"], "digits_mlp");
    assert!(
        windows.iter().all(|w| w["version"] != "2.0.0"),
        "v2's window is still open: {windows:?}"
    );
}

fn sha256_f32(values: impl IntoIterator<Item = f32>) -> String {
    let bytes: Vec<u8> = values.into_iter().flat_map(f32::to_le_bytes).collect();
    hex::encode(Sha256::digest(bytes))
}

/// Issue 11: sampled inputs can be personal data, so each bundle says what its sampled records
/// may carry. One agent serves the same network under three names, one per mode, and samples
/// every request; the outbox (the bytes the link publishes) must hold values for `full`, only
/// hashes (the right ones) for `hashed`, and no sample at all for `none` while its aggregate
/// windows still flow. A second version of the `full` model switches to `none`: the mode is the
/// version's that served the request.
#[test]
fn sampled_records_obey_each_bundles_telemetry_samples_mode() {
    let fx = Fixture::new();
    let modes = TelemetrySamples::ALL;
    let name = |m: TelemetrySamples| format!("digits_{m}");
    let mut agent = start_sampling(&fx, 1.0);
    let install = |agent: &AgentProcess, bundle: &Path| {
        ureq::post(&format!("{}/admin/v1/bundles", agent.url))
            .send_bytes(&std::fs::read(bundle).unwrap())
            .unwrap();
    };
    for mode in modes {
        // Same file each time (named after the source model): installed before the next build.
        let bundle = fx.bundle_with("digits_mlp", "1.0.0", 1, |o| {
            o.name = name(mode);
            o.telemetry_samples = mode;
        });
        install(&agent, &bundle);
    }

    let inputs = engine::npy::read_npy(models_dir().join("digits_mlp/test_input.npy")).unwrap();
    // What each request sent and got back, by request id.
    let mut sent: std::collections::HashMap<String, (Vec<f32>, Vec<f32>)> = Default::default();
    let requests = 20;
    let mut send = |agent: &AgentProcess, model: &str, tag: &str| {
        for i in 0..requests {
            let x = sample(&inputs, i);
            let id = format!("{model}-{tag}-{i}");
            let mut body = json_request("input", &x);
            body["id"] = json!(id);
            let answer: Value = ureq::post(&format!("{}/v2/models/{model}/infer", agent.url))
                .send_json(body)
                .unwrap()
                .into_json()
                .unwrap();
            let y: Vec<f32> = answer["outputs"][0]["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            sent.insert(id, (x.as_f32().unwrap().to_vec(), y));
        }
    };
    for mode in modes {
        send(&agent, &name(mode), "v1");
    }
    std::thread::sleep(Duration::from_millis(2500));
    // Version 2 of the `full` model forbids samples: requests it serves leave none.
    let v2 = fx.bundle_with("digits_mlp", "2.0.0", 2, |o| {
        o.name = name(TelemetrySamples::Full);
        o.telemetry_samples = TelemetrySamples::None;
    });
    install(&agent, &v2);
    send(&agent, &name(TelemetrySamples::Full), "v2");
    std::thread::sleep(Duration::from_millis(2500));
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    drop(agent);

    let records = outbox_records(&fx);
    assert_valid(&records);
    let of = |model: &str, kind: &str| -> Vec<Value> {
        records
            .iter()
            .map(|(_, r)| r)
            .filter(|r| r["model"] == model && r["type"] == kind)
            .cloned()
            .collect()
    };
    let served = |model: &str, version: &str| -> u64 {
        of(model, "window")
            .iter()
            .filter(|w| w["version"] == version)
            .map(|w| w["requests"].as_u64().unwrap())
            .sum()
    };

    // full, version 1: every request sampled with its values.
    let full = name(TelemetrySamples::Full);
    let samples = of(&full, "sample");
    assert_eq!(samples.len(), requests, "sample_rate 1.0 samples all of v1");
    for s in &samples {
        assert_eq!(s["version"], "1.0.0", "v2 (mode none) left no sample: {s}");
        let (x, y) = &sent[s["request_id"].as_str().unwrap()];
        let data: Vec<f32> = s["inputs"][0]["data"]
            .as_array()
            .expect("full mode carries input values")
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(&data, x);
        let out: Vec<f32> = s["outputs"][0]["data"]
            .as_array()
            .expect("full mode carries output values")
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(&out, y);
        assert!(s["inputs"][0].get("sha256").is_none());
    }
    assert_eq!(served(&full, "1.0.0"), requests as u64);
    assert_eq!(
        served(&full, "2.0.0"),
        requests as u64,
        "v2's aggregate windows still flow"
    );

    // hashed: every request sampled, each tensor by the sha256 of its bytes, no values.
    let hashed = name(TelemetrySamples::Hashed);
    let samples = of(&hashed, "sample");
    assert_eq!(samples.len(), requests);
    for s in &samples {
        let (x, y) = &sent[s["request_id"].as_str().unwrap()];
        for (t, values) in [(&s["inputs"][0], x), (&s["outputs"][0], y)] {
            assert!(t.get("data").is_none(), "hashed mode leaked values: {s}");
            assert_eq!(t["sha256"], sha256_f32(values.iter().copied()), "{s}");
            assert_eq!(t["datatype"], "FP32");
        }
        assert_eq!(s["inputs"][0]["name"], "input");
        assert_eq!(s["inputs"][0]["shape"], json!([1, 64]));
        assert_eq!(s["outputs"][0]["shape"], json!([1, 10]));
        for t in [&s["inputs"][0], &s["outputs"][0]] {
            let mut keys: Vec<&str> = t.as_object().unwrap().keys().map(|k| k.as_str()).collect();
            keys.sort();
            assert_eq!(keys, ["datatype", "name", "sha256", "shape"], "{s}");
        }
    }

    // none: not one sample, but the aggregates (counts, latency, classes, input drift).
    let none = name(TelemetrySamples::None);
    assert!(
        of(&none, "sample").is_empty(),
        "mode none sampled a request"
    );
    let windows = of(&none, "window");
    assert_eq!(served(&none, "1.0.0"), requests as u64);
    let class_rows: u64 = windows
        .iter()
        .flat_map(|w| {
            w["classification"]["class_counts"]
                .as_array()
                .unwrap()
                .clone()
        })
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert_eq!(class_rows, requests as u64);
    assert!(windows.iter().all(|w| w["latency"]["p95_ms"].is_number()));
    assert!(windows.iter().all(|w| w["input_psi"]["input"].is_number()));
    assert!(
        windows.iter().all(|w| w["samples_over_budget"] == 0),
        "withheld samples are not 'over budget'"
    );
    // And no record of any kind from the `none` models holds a tensor.
    for r in records.iter().map(|(_, r)| r) {
        if r["model"] == none.as_str() || r["version"] == "2.0.0" {
            assert!(
                r.get("inputs").is_none() && r.get("outputs").is_none(),
                "{r}"
            );
        }
    }
}

/// The public schema takes a sampled tensor with values or with a hash, never both or neither,
/// and only a well-formed hash.
#[test]
fn schema_takes_a_tensor_with_values_or_a_hash_but_not_both() {
    let validator = schema();
    let record = |tensor: Value| {
        json!({"type": "sample", "schema": 1, "model": "m", "version": "1.0.0",
               "time": "2025-01-01T00:00:00Z", "latency_ms": 0.5,
               "inputs": [tensor], "outputs": []})
    };
    let base = json!({"name": "input", "datatype": "FP32", "shape": [1, 2]});
    let with = |extra: Value| {
        let mut t = base.clone();
        t.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        record(t)
    };
    let hash = sha256_f32([1.0, 2.0]);
    assert!(validator.is_valid(&with(json!({"data": [1.0, null]}))));
    assert!(validator.is_valid(&with(json!({ "sha256": hash }))));
    assert!(!validator.is_valid(&record(base.clone())), "neither");
    assert!(
        !validator.is_valid(&with(json!({"data": [1.0, 2.0], "sha256": hash}))),
        "both"
    );
    assert!(
        !validator.is_valid(&with(json!({"sha256": "ABC"}))),
        "not a sha256"
    );
    // The Rust types read the hashed form back.
    let parsed: TelemetryRecord = serde_json::from_value(with(json!({ "sha256": hash }))).unwrap();
    let TelemetryRecord::Sample(s) = parsed else {
        panic!("a sample")
    };
    assert_eq!(s.inputs[0].sha256.as_deref(), Some(hash.as_str()));
    assert!(s.inputs[0].data.is_none());
}
