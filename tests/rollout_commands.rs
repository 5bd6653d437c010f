//! A rollout's stage commands across fleet-server crashes (issue 10), on both brokers.
//!
//! The server (a real `fleet-server` process) is made to abort at each of the two points of a
//! rollout step (`MODELFLEET_CRASH_AT`):
//! - `rollout_orders_recorded`: the step, its decisions, its `command_sent` events and the signed
//!   stage commands are committed, nothing is published yet;
//! - `rollout_orders_sent`: the commands were handed to the MQTT client (which may or may not
//!   have written them to the broker before the process died).
//!
//! Started again on the same data, the server must finish the rollout with every device staged
//! by exactly one command: the one it recorded, published again unchanged if no device event
//! answered it. Each device installs the version exactly once.

mod common;

use std::time::Duration;

use common::{Broker, World};
use modelfleet::harness::wait_until;
use serde_json::{json, Value};

const DEVICES: usize = 4;
const MODEL: &str = "digits_cnn";
const LONG: Duration = Duration::from_secs(180);

fn a_crash_in_a_rollout_step_stages_each_device_once(broker: Broker, crash_at: &str) {
    let mut world = World::new();
    let broker = broker.start(&world);
    let mut server = world.spawn_server(&broker.url(), &[]);
    let _fleet = world.start_sim_fleet(&broker.url(), DEVICES, 0.0, &["berlin"]);
    let bundle = world.upload(&world.bundle(MODEL, "1.0.0"));

    // The next start aborts at `crash_at` in the first rollout step that has orders.
    server.kill();
    server.start(&[("MODELFLEET_CRASH_AT", crash_at)]);
    // Creating a rollout takes its first step at once: the server may die answering.
    let created = world
        .client()
        .create_rollout(&json!({"bundle_id": bundle, "stages": [{"percent": 100}]}));
    wait_until(
        &format!("the server to abort at {crash_at}"),
        Duration::from_secs(60),
        || server.exited().map(|_| ()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", server.log_text()));
    assert!(
        server
            .log_text()
            .contains(&format!("MODELFLEET_CRASH_AT={crash_at}")),
        "the server did not stop at {crash_at}:\n{}",
        server.log_text()
    );

    server.start(&[]);
    let list = world.get("/api/v1/rollouts");
    assert_eq!(list["rollouts"].as_array().unwrap().len(), 1, "{list}");
    let id = list["rollouts"][0]["id"].as_str().unwrap().to_string();
    if let Ok(created) = &created {
        assert_eq!(created, &id);
    }
    let r = world.wait_for_rollout(&id, &["succeeded", "failed", "rolled_back", "paused"], LONG);
    assert_eq!(r["state"], "succeeded", "{r:#}\n{}", server.log_text());

    let record = world.rollout_record(&id, "1.0.0");
    record.assert_each_device_staged_once_and_installed_once(DEVICES);
    let commands = &record.stage_commands;
    // Each device's one command is the one its rollout entry names (the recorded one).
    for (device, progress) in r["devices"].as_object().unwrap() {
        let named: &Value = &progress["command_id"];
        assert!(
            commands[device].contains(named.as_str().unwrap()),
            "{device}: rollout names {named}, sent {:?}",
            commands[device]
        );
    }
    if crash_at == "rollout_orders_recorded" {
        // Nothing went out before the crash: every command reached its device by a re-send.
        let metrics = ureq::get(&format!("{}/metrics", server.url))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        let resent: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("fleet_commands_resent_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no fleet_commands_resent_total in\n{metrics}"));
        assert!(resent >= DEVICES as u64, "resent {resent}:\n{metrics}");
    }
}

fn crash_after_recording(broker: Broker) {
    a_crash_in_a_rollout_step_stages_each_device_once(broker, "rollout_orders_recorded");
}

fn crash_after_sending(broker: Broker) {
    a_crash_in_a_rollout_step_stages_each_device_once(broker, "rollout_orders_sent");
}

common::on_both_brokers!(crash_after_recording, crash_after_sending);
