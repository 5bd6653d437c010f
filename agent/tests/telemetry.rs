//! Telemetry end to end with the real `fleet-agent` binary: metric windows and sampled records
//! accumulate in the durable outbox across a restart (kill -9), label feedback shows up as live
//! accuracy, and every record validates against `docs/telemetry.schema.json`.

mod common;

use std::path::Path;
use std::time::Duration;

use agent::outbox::{Outbox, OutboxLimits};
use common::*;
use protocol::telemetry::TelemetryRecord;
use serde_json::{json, Value};

fn schema() -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/telemetry.schema.json");
    let schema: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    jsonschema::validator_for(&schema).expect("the schema is a valid JSON Schema")
}

fn start(fx: &Fixture) -> AgentProcess {
    let config = fx.path("agent.toml");
    std::fs::write(
        &config,
        "[health]\ntelemetry_window_seconds = 1\nsample_rate = 0.25\n",
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

    let validator = schema();
    for (id, record) in &after {
        let errors: Vec<String> = validator
            .iter_errors(record)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "record {id} {record}: {errors:?}");
        // And the public Rust types read it back.
        serde_json::from_value::<TelemetryRecord>(record.clone()).unwrap();
    }

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
