//! The health watch end to end, with the real `fleet-agent` binary under steady traffic: the
//! regressed variants of digits_mlp in `examples/models/regressed/` (made by
//! `scripts/make_regressed.py`) are reverted within their trial window, with the reason and the
//! evidence in `GET /admin/v1/events`; a re-bundled copy of the healthy model is committed, run
//! after run, with no false revert.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// These tests time latency: run them one at a time so they do not load each other's CPU.
static SERIAL: Mutex<()> = Mutex::new(());

const MIN_REQUESTS: u64 = 100;
const MIN_SECONDS: u64 = 4;

fn regressed(file: &str) -> PathBuf {
    models_dir().join("regressed").join(file)
}

fn start(fx: &Fixture) -> AgentProcess {
    let config = fx.path("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[health]\ntrial_min_requests = {MIN_REQUESTS}\ntrial_min_seconds = {MIN_SECONDS}\n"
        ),
    )
    .unwrap();
    let data = fx.path("data");
    AgentProcess::start(
        fx,
        &data,
        &["--config", config.to_str().unwrap(), "--workers", "2"],
    )
}

fn get(agent: &AgentProcess, path: &str) -> Value {
    ureq::get(&format!("{}{path}", agent.url))
        .call()
        .unwrap()
        .into_json()
        .unwrap()
}

fn install(agent: &AgentProcess, bundle: &std::path::Path) {
    let r = ureq::post(&format!("{}/admin/v1/bundles", agent.url))
        .send_bytes(&std::fs::read(bundle).unwrap())
        .unwrap_or_else(|e| panic!("install {}: {e:?}", bundle.display()));
    assert_eq!(r.status(), 201);
}

fn model_status(agent: &AgentProcess) -> Value {
    get(agent, "/admin/v1/status")["models"][0].clone()
}

/// Steady traffic: two clients cycling through the digits test set, each request with an id.
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(agent: &AgentProcess) -> Traffic {
        let inputs = engine::npy::read_npy(models_dir().join("digits_mlp/test_input.npy")).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let url = format!("{}/v2/models/digits_mlp/infer", agent.url);
        let threads = (0..2)
            .map(|c| {
                let (stop, sent, url, inputs) =
                    (stop.clone(), sent.clone(), url.clone(), inputs.clone());
                std::thread::spawn(move || {
                    let mut i = c;
                    while !stop.load(Ordering::Relaxed) {
                        let mut body = json_request("input", &sample(&inputs, i % 450));
                        body["id"] = json!(format!("req-{i}"));
                        // NaN outputs and 5xx are expected from broken models: traffic goes on.
                        let _ = ureq::post(&url).send_json(body);
                        sent.fetch_add(1, Ordering::Relaxed);
                        i += 2;
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            sent,
            threads,
        }
    }

    fn wait_for(&self, requests: u64) {
        let target = self.sent.load(Ordering::Relaxed) + requests;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.sent.load(Ordering::Relaxed) < target {
            assert!(Instant::now() < deadline, "traffic stalled");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Waits until the model leaves its trial; returns its status and the seconds it took.
fn wait_trial_end(agent: &AgentProcess, version: &str) -> (Value, f64) {
    let started = Instant::now();
    loop {
        let s = model_status(agent);
        if s["state"] != "trial" {
            return (s, started.elapsed().as_secs_f64());
        }
        assert_eq!(s["active"], version);
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "trial of {version} never ended: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn last_event(agent: &AgentProcess, kind: &str) -> Value {
    get(agent, "/admin/v1/events?limit=1000")["events"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|e| e["kind"] == kind)
        .cloned()
        .unwrap_or_else(|| panic!("no {kind} event"))
}

/// Installs `bundle` (version 2.0.0) over a healthy 1.0.0 that has been serving, under traffic,
/// and expects it reverted for `reason`. Returns the `reverted` event.
fn expect_revert(bundle_of: impl FnOnce(&Fixture) -> PathBuf, reason: &str) -> Value {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fx = Fixture::new();
    let v1 = fx.bundle("digits_mlp", "1.0.0", 1);
    let v2 = bundle_of(&fx);
    let agent = start(&fx);
    install(&agent, &v1);
    let traffic = Traffic::start(&agent);
    traffic.wait_for(2 * MIN_REQUESTS);
    install(&agent, &v2);
    let (status, seconds) = wait_trial_end(&agent, "2.0.0");
    assert_eq!(status["state"], "reverted", "{status}");
    assert_eq!(status["active"], "1.0.0");
    assert!(
        seconds < MIN_SECONDS as f64,
        "reverted after {seconds:.1}s, not within its {MIN_SECONDS}s trial window"
    );
    // Still serving, on the previous version.
    traffic.wait_for(20);
    drop(traffic);
    let ev = last_event(&agent, "reverted");
    assert_eq!(ev["version"], "1.0.0");
    assert_eq!(ev["detail"]["from"], "2.0.0");
    assert_eq!(ev["detail"]["to"], "1.0.0");
    assert_eq!(ev["detail"]["reason"], reason, "{ev:#}");
    let evidence = &ev["detail"]["evidence"];
    assert_eq!(evidence["automatic"], true);
    assert!(evidence["check"]["threshold"].is_number(), "{ev:#}");
    assert!(
        evidence["figures"]["trial"]["requests"].as_u64().unwrap() > 0,
        "{ev:#}"
    );
    assert!(evidence["elapsed_seconds"].as_f64().unwrap() < MIN_SECONDS as f64);
    eprintln!(
        "{reason}: reverted after {seconds:.2}s; check {}",
        evidence["check"]
    );
    ev
}

#[test]
fn perturbed_weights_are_reverted_for_confidence_or_predictions() {
    let ev = expect_revert(
        |fx| {
            fx.bundle_with("digits_mlp", "2.0.0", 1, |o| {
                o.model = regressed("digits_mlp_perturbed.onnx")
            })
        },
        "confidence_drop",
    );
    let check = &ev["detail"]["evidence"]["check"];
    assert!(check["drop"].as_f64().unwrap() > 0.5, "{check}");
    assert_eq!(check["against"], "previous");
}

#[test]
fn a_model_emitting_nan_is_reverted_on_its_error_rate() {
    let ev = expect_revert(
        |fx| {
            fx.bundle_with("digits_mlp", "2.0.0", 1, |o| {
                o.model = regressed("digits_mlp_nan.onnx");
                // The defect does not show on these inputs, so the bundle builds and self-tests.
                o.golden_inputs = Some(regressed("digits_mlp_nan_golden.npy"));
                o.golden_labels = None;
            })
        },
        "error_rate",
    );
    let check = &ev["detail"]["evidence"]["check"];
    assert!(check["non_finite"].as_u64().unwrap() >= 3, "{check}");
    assert!(
        check["requests"].as_u64().unwrap() < MIN_REQUESTS,
        "errors revert before the statistical checks wait for {MIN_REQUESTS} requests: {check}"
    );
}

#[test]
fn a_much_slower_model_is_reverted_on_p95_latency() {
    let ev = expect_revert(
        |fx| {
            fx.bundle_with("digits_mlp", "2.0.0", 1, |o| {
                o.model = regressed("digits_mlp_slow.onnx")
            })
        },
        "p95_latency",
    );
    let check = &ev["detail"]["evidence"]["check"];
    assert!(check["ratio"].as_f64().unwrap() > 2.0, "{check}");
}

#[test]
fn a_rebundled_healthy_model_is_committed_run_after_run() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fx = Fixture::new();
    let agent = start(&fx);
    install(&agent, &fx.bundle("digits_mlp", "1.0.0", 1));
    assert_eq!(model_status(&agent)["state"], "committed", "first version");
    let traffic = Traffic::start(&agent);
    traffic.wait_for(2 * MIN_REQUESTS);
    for run in 2..=4 {
        let version = format!("{run}.0.0");
        install(&agent, &fx.bundle("digits_mlp", &version, 1));
        assert_eq!(model_status(&agent)["state"], "trial");
        let (status, seconds) = wait_trial_end(&agent, &version);
        assert_eq!(status["state"], "committed", "run {run}: {status}");
        assert_eq!(status["active"], version);
        assert!(seconds >= MIN_SECONDS as f64 - 0.5, "committed too early");
        let ev = last_event(&agent, "committed");
        assert_eq!(ev["version"], version);
        let figures = &ev["detail"]["figures"];
        assert!(figures["trial"]["requests"].as_u64().unwrap() >= MIN_REQUESTS);
        assert!(figures["previous"]["requests"].as_u64().unwrap() >= MIN_REQUESTS);
        eprintln!(
            "run {run}: committed after {seconds:.1}s; trial {} previous {}",
            figures["trial"], figures["previous"]
        );
        // The committed version becomes the next trial's reference.
        traffic.wait_for(MIN_REQUESTS);
    }
    let events = get(&agent, "/admin/v1/events?limit=1000");
    assert!(
        !events["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "reverted"),
        "no false revert"
    );
}

#[test]
fn a_trial_interrupted_by_a_restart_starts_again_and_commits() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fx = Fixture::new();
    let data = fx.path("data");
    // Offline installs (no agent running): the second version is on trial with nobody watching.
    for version in ["1.0.0", "2.0.0"] {
        let bundle = fx.bundle("digits_mlp", version, 1);
        fx.install_offline(&bundle, &data);
    }
    let agent = start(&fx);
    assert_eq!(model_status(&agent)["state"], "trial");
    let traffic = Traffic::start(&agent);
    let (status, _) = wait_trial_end(&agent, "2.0.0");
    drop(traffic);
    assert_eq!(status["state"], "committed", "{status}");
    let ev = last_event(&agent, "committed");
    assert_eq!(
        ev["detail"]["figures"]["previous"],
        Value::Null,
        "no live reference after a restart: judged against the baseline"
    );
}
