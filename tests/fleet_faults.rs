//! Faults in the middle of a rollout (issue 10), on both brokers, with a simulated fleet of real
//! agents (MQTT sessions, chunked transfers, installs, health watch, telemetry):
//!
//! - **the broker goes down** (SIGKILL, nothing saved: retained messages, sessions and the fleet
//!   server's subscriptions are gone) for a few seconds while a rollout stages and telemetry
//!   flows. The devices keep serving and buffer their telemetry, reconnect with jittered backoff
//!   (not all at once), hold what they publish until the server has subscribed again (its
//!   presence on `{p}/server`), and the rollout finishes. Every telemetry window every device
//!   wrote reaches the server: none is lost.
//! - **the fleet server is killed** (SIGKILL, a real `fleet-server` process) at seeded random
//!   moments of a rollout and started again on the same data: the rollout finishes, every device
//!   was staged by exactly one command and installed the version once.
//!
//! `MODELFLEET_FAULT_SEED=N` replays a run's kill times (each run prints its seed).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use agent::simulate::SimFleet;
use common::{fault_seed, Broker, Rng, World};
use fleet_server::BrokerConnection;
use modelfleet::harness::wait_until;
use serde_json::{json, Value};

const DEVICES: usize = 12;
const MODEL: &str = "digits_cnn";
const LONG: Duration = Duration::from_secs(240);

fn create(world: &World, spec: Value) -> String {
    world
        .client()
        .create_rollout(&spec)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Every device gets v1 (a first install promotes only through a last stage of 100%).
fn roll_out_v1(world: &World) {
    let v1 = world.upload(&world.bundle(MODEL, "1.0.0"));
    let first = create(
        world,
        json!({"bundle_id": v1, "stages": [{"percent": 100}]}),
    );
    let r = world.wait_for_rollout(
        &first,
        &["succeeded", "failed", "rolled_back", "paused"],
        LONG,
    );
    assert_eq!(r["state"], "succeeded", "{r:#}");
}

/// v2 in two stages, gated on telemetry as in `tests/rollouts.rs`.
fn create_v2(world: &World) -> String {
    let v2 = world.upload(&world.bundle(MODEL, "2.0.0"));
    create(
        world,
        json!({
            "bundle_id": v2,
            "stages": [{"percent": 50, "bake_seconds": 4}, {"percent": 100, "bake_seconds": 0}],
            "gates": {"min_requests_per_cohort": 100, "latency_floor_ms": 5.0},
        }),
    )
}

fn wait_until_staging(world: &World, id: &str) {
    wait_until("the rollout to stage devices", LONG, || {
        let r = world.get(&format!("/api/v1/rollouts/{id}"));
        (r["devices"].as_object().is_some_and(|d| !d.is_empty())).then_some(())
    })
    .unwrap();
}

fn the_broker_goes_down_mid_rollout(broker: Broker) {
    let mut world = World::new();
    world.golden_max = 1000;
    let mut broker = broker.start(&world);
    world.start_server(BrokerConnection::plain(&broker.url()));
    let mut fleet = world.start_sim_fleet(&broker.url(), DEVICES, 20.0, &["berlin"]);
    roll_out_v1(&world);
    let id = create_v2(&world);
    wait_until_staging(&world, &id);

    let connects_before: Vec<u64> = connects(&fleet);
    broker.kill();
    std::thread::sleep(Duration::from_secs(5));
    broker.restart().unwrap();
    let restarted = Instant::now();

    // When each device is back: no thundering herd, every device within the backoff cap.
    let mut back: BTreeMap<usize, Duration> = BTreeMap::new();
    wait_until("every device reconnected", Duration::from_secs(60), || {
        for (i, n) in connects(&fleet).into_iter().enumerate() {
            if n > connects_before[i] {
                back.entry(i).or_insert_with(|| restarted.elapsed());
            }
        }
        (back.len() == DEVICES).then_some(())
    })
    .unwrap();
    let (first, last) = (back.values().min().unwrap(), back.values().max().unwrap());
    println!("reconnects after the broker restart: first {first:?}, last {last:?}");
    assert!(
        *last - *first >= Duration::from_millis(250),
        "reconnects bunched within {:?}: {back:?}",
        *last - *first
    );

    let r = world.wait_for_rollout(&id, &["succeeded", "failed", "rolled_back", "paused"], LONG);
    assert_eq!(r["state"], "succeeded", "{r:#}");
    let versions = world.versions(MODEL);
    assert!(
        versions.len() == DEVICES && versions.values().all(|v| v == "2.0.0"),
        "{versions:?}"
    );

    // Telemetry: stop the traffic, let the last windows close and the outboxes drain, then
    // every window each device wrote must be at the server.
    fleet.stop_traffic();
    std::thread::sleep(Duration::from_secs(2));
    wait_until("every outbox drained", LONG, || {
        fleet
            .devices
            .iter()
            .all(|d| d.agent.outbox.is_empty().unwrap())
            .then_some(())
    })
    .unwrap();
    let mut missing = Vec::new();
    wait_until(
        "every window at the server",
        Duration::from_secs(30),
        || {
            missing.clear();
            for d in &fleet.devices {
                let at_server = server_windows(&world, &d.id);
                for ((m, v), wrote) in d.agent.windows_written() {
                    let got = at_server.get(&(m.clone(), v.clone())).copied().unwrap_or(0);
                    if got != wrote {
                        missing.push(format!("{} {m} {v}: wrote {wrote}, server has {got}", d.id));
                    }
                }
            }
            missing.is_empty().then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {missing:#?}"));
    let total: u64 = fleet
        .devices
        .iter()
        .flat_map(|d| d.agent.windows_written().into_values())
        .sum();
    println!("{total} telemetry windows written, all at the server");
    assert!(
        total > (DEVICES * 20) as u64,
        "too few windows to mean anything: {total}"
    );
    world.rt.block_on(fleet.shutdown());
}

fn the_server_is_killed_mid_rollout(broker: Broker) {
    let seed = fault_seed(0x5eed_0010);
    let mut rng = Rng(seed);
    let mut world = World::new();
    world.golden_max = 1000;
    let broker = broker.start(&world);
    let mut server = world.spawn_server(&broker.url(), &[]);
    let fleet = world.start_sim_fleet(&broker.url(), DEVICES, 20.0, &["berlin"]);
    roll_out_v1(&world);
    let id = create_v2(&world);

    // Two kills at random moments of the rollout (the first while it may still be staging).
    for kill in 0..2 {
        std::thread::sleep(Duration::from_millis(rng.range(200, 4000)));
        let r = world.get(&format!("/api/v1/rollouts/{id}"));
        if r["state"] != "running" && r["state"] != "pending" {
            println!("kill {kill}: the rollout is already {}", r["state"]);
            break;
        }
        server.kill();
        std::thread::sleep(Duration::from_millis(rng.range(200, 3000)));
        server.start(&[]);
    }

    let r = world.wait_for_rollout(&id, &["succeeded", "failed", "rolled_back", "paused"], LONG);
    assert_eq!(r["state"], "succeeded", "{r:#}\n{}", server.log_text());
    world
        .rollout_record(&id, "2.0.0")
        .assert_each_device_staged_once_and_installed_once(DEVICES);
    let versions = world.versions(MODEL);
    assert!(versions.values().all(|v| v == "2.0.0"), "{versions:?}");
    world.rt.block_on(fleet.shutdown());
}

fn connects(fleet: &SimFleet) -> Vec<u64> {
    fleet
        .devices
        .iter()
        .map(|d| agent::link::LinkMetrics::get(&d.agent.link_metrics.connects_total))
        .collect()
}

/// Telemetry windows the server holds for `device`, by (model, version); each window once
/// (the server keeps a window received again once, so duplicates here are a failure too).
fn server_windows(world: &World, device: &str) -> BTreeMap<(String, String), u64> {
    let t = world.get(&format!("/api/v1/devices/{device}/telemetry"));
    let mut out = BTreeMap::new();
    for w in t["windows"].as_array().unwrap() {
        let key = (
            w["model"].as_str().unwrap().to_string(),
            w["version"].as_str().unwrap().to_string(),
        );
        *out.entry(key).or_default() += 1;
    }
    out
}

common::on_both_brokers!(
    the_broker_goes_down_mid_rollout,
    the_server_is_killed_mid_rollout
);
