//! Issue 6 end to end, on both brokers: canary rollouts of `digits_cnn` across a simulated fleet
//! (real agents: MQTT sessions, chunked transfers, installs, health watch, telemetry, traffic
//! drawn from the bundles' golden inputs), judged by the fleet server on the devices' telemetry.
//!
//! - a healthy v2 is promoted through every stage and ends on every device;
//! - a regressed v2 (`digits_cnn_perturbed`, accuracy 0.07) is stopped at the first stage: the
//!   canaries' health watch reverts it, the rollout fails at once (not after the bake) and rolls
//!   back; only that stage's devices ever received it, and all of them run v1 again;
//! - with no traffic a stage is inconclusive: the rollout keeps baking, then pauses, and never
//!   promotes;
//! - the fleet server stops mid-rollout and starts again on the same data: the rollout resumes
//!   and no device is staged twice.
//!
//! Every fleet first gets v1 through a one-stage rollout to 100% (a first install has no control
//! cohort, so only a last stage of 100% can promote it — see docs/rollouts.md).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use agent::simulate::SimFleet;
use common::{models_dir, Broker, World};
use fleet_server::BrokerConnection;
use modelfleet::harness::{wait_until, BrokerProcess};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(180);
const DEVICES: usize = 10;
const MODEL: &str = "digits_cnn";

/// A fleet server, a broker and a simulated fleet running `digits_cnn` 1.0.0.
struct Rig {
    fleet: Option<SimFleet>,
    broker: BrokerProcess,
    world: World,
}

impl Rig {
    /// Starts everything and rolls v1 out to every device; `rps` is each device's traffic.
    fn start(broker: Broker, rps: f64) -> Rig {
        let mut world = World::new();
        // Traffic is drawn from the golden set: all 450 reference digits, so that live class
        // frequencies match the bundle's baseline as real traffic would.
        world.golden_max = 1000;
        let broker = broker.start(&world);
        world.start_server(BrokerConnection::plain(&broker.url()));

        let fleet = world.start_sim_fleet(&broker.url(), DEVICES, rps, &["berlin"]);

        let rig = Rig {
            fleet: Some(fleet),
            broker,
            world,
        };
        let v1 = rig.upload("1.0.0", None);
        let first = rig.create(json!({"bundle_id": v1, "stages": [{"percent": 100}]}));
        let done = rig.wait_state(&first, &["succeeded"], LONG);
        assert_eq!(rig.versions().len(), DEVICES, "{done}");
        assert!(
            rig.versions().values().all(|v| v == "1.0.0"),
            "{:?}",
            rig.versions()
        );
        if rps > 0.0 {
            // v1 serves long enough for its live figures to be the reference of the next trial.
            rig.wait_for_requests(100);
        }
        rig
    }

    /// Waits until every device's active model has served `n` requests.
    fn wait_for_requests(&self, n: u64) {
        let fleet = self.fleet.as_ref().unwrap();
        wait_until(&format!("{n} requests on every device"), LONG, || {
            fleet
                .devices
                .iter()
                .all(|d| {
                    d.agent
                        .registry
                        .get(MODEL)
                        .is_some_and(|m| m.health.recent().requests >= n)
                })
                .then_some(())
        })
        .unwrap();
    }

    /// Uploads `digits_cnn` at `version` (of another ONNX file if given); returns the bundle id.
    fn upload(&self, version: &str, onnx: Option<&str>) -> String {
        let onnx = match onnx {
            Some(path) => models_dir().join(path),
            None => models_dir().join(MODEL).join(format!("{MODEL}.onnx")),
        };
        let bundle = self.world.bundle_of(MODEL, &onnx, version);
        self.world.upload(&bundle)
    }

    fn create(&self, spec: Value) -> String {
        self.world
            .client()
            .create_rollout(&spec)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn rollout(&self, id: &str) -> Value {
        self.world.get(&format!("/api/v1/rollouts/{id}"))
    }

    /// Waits until the rollout is in one of `states`; returns it.
    fn wait_state(&self, id: &str, states: &[&str], timeout: Duration) -> Value {
        self.world.wait_for_rollout(id, states, timeout)
    }

    /// The active version of `digits_cnn` on each device that has it.
    fn versions(&self) -> BTreeMap<String, String> {
        self.world.versions(MODEL)
    }

    /// Every `reverted` event, with its evidence (for failure messages).
    fn reverts(&self) -> Value {
        let events = self.world.get("/api/v1/events?limit=5000");
        let reverted: Vec<&Value> = events["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "reverted")
            .collect();
        json!(reverted)
    }

    /// Device ids with an event of `kind` for `version` of the model.
    fn devices_with_event(&self, kind: &str, version: &str) -> BTreeSet<String> {
        let events = self.world.get("/api/v1/events?limit=5000");
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == kind && e["model"] == MODEL && e["version"] == version)
            .filter_map(|e| e["device_id"].as_str().map(str::to_string))
            .collect()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(fleet) = self.fleet.take() {
            self.world.rt.block_on(fleet.shutdown());
        }
        self.world.stop_server();
        self.broker.kill();
    }
}

/// The `(stage, action)` of each decision.
fn decisions(rollout: &Value) -> Vec<(u64, String)> {
    rollout["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["stage"].as_u64().unwrap(),
                d["action"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn actions(rollout: &Value) -> Vec<String> {
    decisions(rollout).into_iter().map(|(_, a)| a).collect()
}

/// Gates for a test fleet: 100 requests per cohort are enough evidence here, and latency is
/// compared above 5 ms only (parallel tests share two cores; the latency gate itself is
/// unit-tested in fleet-server's `rollout::gates`).
fn test_gates() -> Value {
    json!({"min_requests_per_cohort": 100, "latency_floor_ms": 5.0})
}

fn healthy_v2_is_promoted_through_every_stage(broker: Broker) {
    let rig = Rig::start(broker, 20.0);
    let v2 = rig.upload("2.0.0", None);
    let id = rig.create(json!({
        "bundle_id": v2,
        "stages": [{"percent": 30, "bake_seconds": 3}, {"percent": 60, "bake_seconds": 3},
                   {"percent": 100, "bake_seconds": 0}],
        "gates": test_gates(),
    }));
    let r = rig.wait_state(&id, &["succeeded", "failed", "rolled_back", "paused"], LONG);
    assert_eq!(
        r["state"],
        "succeeded",
        "{r:#}\nreverts: {:#}",
        rig.reverts()
    );
    let promoted: Vec<u64> = decisions(&r)
        .into_iter()
        .filter(|(_, a)| a == "promote")
        .map(|(s, _)| s)
        .collect();
    // A promotion is recorded at the stage it promotes to.
    assert_eq!(promoted, vec![1, 2], "{:?}", decisions(&r));
    // Each promotion was a passing judgement with both cohorts measured.
    for d in r["decisions"].as_array().unwrap() {
        if d["action"] == "promote" {
            assert_eq!(d["judgement"]["verdict"], "pass", "{d:#}");
        }
    }
    let versions = rig.versions();
    assert!(
        versions.len() == DEVICES && versions.values().all(|v| v == "2.0.0"),
        "{versions:?}"
    );
    // Stage by stage, each stage's canaries include the previous stage's.
    let by_stage: Vec<usize> = (0..3)
        .map(|s| {
            r["devices"]
                .as_object()
                .unwrap()
                .values()
                .filter(|p| p["stage"].as_u64().unwrap() <= s)
                .count()
        })
        .collect();
    assert_eq!(by_stage, vec![3, 6, 10], "{:#}", r["devices"]);
}

fn regressed_v2_stops_at_the_first_stage_and_rolls_back(broker: Broker) {
    let rig = Rig::start(broker, 20.0);
    let bad = rig.upload("2.0.0", Some("regressed/digits_cnn_perturbed.onnx"));
    // A long bake (600 s, beyond every wait here): the canaries' own reverts must fail the stage without waiting for it.
    let id = rig.create(json!({
        "bundle_id": bad,
        "stages": [{"percent": 20, "bake_seconds": 600}, {"percent": 100, "bake_seconds": 0}],
        "gates": test_gates(),
        "on_failure": "rollback",
    }));
    let r = rig.wait_state(&id, &["rolled_back", "failed", "succeeded"], LONG);
    assert_eq!(r["state"], "rolled_back", "{r:#}");
    assert!(
        decisions(&r).contains(&(0, "fail".to_string())),
        "{:?}",
        decisions(&r)
    );
    assert!(!actions(&r).contains(&"promote".to_string()));

    // Only the first stage's canaries ever received 2.0.0.
    let canaries: BTreeSet<String> = r["devices"].as_object().unwrap().keys().cloned().collect();
    assert_eq!(canaries.len(), 2, "20% of {DEVICES}: {:#}", r["devices"]);
    for p in r["devices"].as_object().unwrap().values() {
        assert_eq!(p["stage"], 0, "{p}");
    }
    let received = rig.devices_with_event("installed", "2.0.0");
    assert!(
        !received.is_empty() && received.is_subset(&canaries),
        "installed 2.0.0: {received:?}, canaries {canaries:?}"
    );
    // The failure signal was a canary's own health watch (a revert that left 2.0.0), not the
    // server's comparison of telemetry.
    let events = rig.world.get("/api/v1/events?limit=5000");
    let watch_reverts: BTreeSet<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "reverted" && e["detail"]["from"] == "2.0.0")
        .filter(|e| e["detail"]["reason"] != "fleet_command")
        .filter_map(|e| e["device_id"].as_str())
        .collect();
    assert!(
        !watch_reverts.is_empty(),
        "no device reverted 2.0.0 on its own: {:#}",
        r["decisions"]
    );
    // Every device, canaries included, runs v1 again.
    wait_until("every device back on 1.0.0", LONG, || {
        let v = rig.versions();
        (v.len() == DEVICES && v.values().all(|v| v == "1.0.0")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", rig.versions()));
}

fn a_stage_without_traffic_keeps_baking_then_pauses(broker: Broker) {
    let rig = Rig::start(broker, 0.0);
    let v2 = rig.upload("2.0.0", None);
    let id = rig.create(json!({
        "bundle_id": v2,
        "stages": [{"percent": 50, "bake_seconds": 1}, {"percent": 100, "bake_seconds": 0}],
        "gates": test_gates(),
        "inconclusive_timeout_seconds": 4,
    }));
    let r = rig.wait_state(&id, &["paused", "succeeded", "failed", "rolled_back"], LONG);
    assert_eq!(r["state"], "paused", "{r:#}");
    assert_eq!(r["stage"], 0);
    let acts = actions(&r);
    let kept = acts.iter().position(|a| a == "keep_baking");
    let paused = acts.iter().position(|a| a == "pause");
    assert!(
        kept.is_some() && kept < paused,
        "kept baking, then paused: {acts:?}"
    );
    assert!(!acts.contains(&"promote".to_string()), "{acts:?}");
    let last = r["decisions"].as_array().unwrap().last().unwrap();
    assert_eq!(last["judgement"]["verdict"], "inconclusive", "{last:#}");
    // Half the fleet runs the canary, the other half still v1: nothing more was staged.
    let versions = rig.versions();
    let on_v2 = versions.values().filter(|v| *v == "2.0.0").count();
    assert_eq!(on_v2, DEVICES / 2, "{versions:?}");
}

fn a_restarted_server_resumes_the_rollout(broker: Broker) {
    let mut rig = Rig::start(broker, 20.0);
    let v2 = rig.upload("2.0.0", None);
    let id = rig.create(json!({
        "bundle_id": v2,
        "stages": [{"percent": 50, "bake_seconds": 6}, {"percent": 100, "bake_seconds": 0}],
        "gates": test_gates(),
    }));
    // Stop the server while the first stage bakes.
    wait_until("the first stage to bake", LONG, || {
        actions(&rig.rollout(&id))
            .contains(&"bake".to_string())
            .then_some(())
    })
    .unwrap();
    rig.world.stop_server();
    std::thread::sleep(Duration::from_secs(2));
    let url = rig.broker.url();
    rig.world.start_server(BrokerConnection::plain(&url));

    let r = rig.wait_state(&id, &["succeeded", "failed", "rolled_back", "paused"], LONG);
    assert_eq!(
        r["state"],
        "succeeded",
        "{r:#}\nreverts: {:#}",
        rig.reverts()
    );
    assert_eq!(
        actions(&r).iter().filter(|a| *a == "bake").count(),
        2,
        "one bake per stage, none repeated after the restart: {:?}",
        actions(&r)
    );
    // No device was staged twice.
    let staged = rig.world.rollout_record(&id, "2.0.0").stage_commands;
    assert_eq!(staged.len(), DEVICES, "{staged:?}");
    assert!(staged.values().all(|c| c.len() == 1), "{staged:?}");
    let versions = rig.versions();
    assert!(versions.values().all(|v| v == "2.0.0"), "{versions:?}");
}

common::on_both_brokers!(
    healthy_v2_is_promoted_through_every_stage,
    regressed_v2_stops_at_the_first_stage_and_rolls_back,
    a_stage_without_traffic_keeps_baking_then_pauses,
    a_restarted_server_resumes_the_rollout
);
