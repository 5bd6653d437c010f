//! A compromised broker (played by a raw MQTT client publishing on a device's command topic)
//! cannot make a device act: unsigned, foreign-signed, tampered, expired, misaddressed and
//! replayed commands are refused, counted and recorded; only a command the fleet server signed
//! for this device, once, is obeyed — also after the agent restarts.

mod common;

use std::sync::Arc;
use std::time::Duration;

use agent::link::{Link, LinkConfig, LinkMetrics};
use agent::{Agent, AgentConfig};
use common::mqtt::*;
use common::*;
use protocol::command_auth::SignedCommand;
use protocol::keys::SecretKey;
use protocol::link::{self, Action, Channel};
use rumqttc::QoS;

fn open_agent(fx: &Fixture) -> Arc<Agent> {
    let keyring =
        protocol::keys::Keyring::from_file_text(&std::fs::read_to_string(&fx.keyring).unwrap())
            .unwrap();
    let mut config = AgentConfig::new(fx.path("data"));
    config.workers = 1;
    Arc::new(Agent::open(config, keyring).unwrap())
}

fn link_config(broker: &str) -> LinkConfig {
    let mut c = LinkConfig::new(broker, "dev-s");
    c.server_key = Some(server_key().public());
    c.backoff_min = Duration::from_millis(100);
    c.backoff_max = Duration::from_millis(500);
    c
}

fn revert() -> Action {
    Action::Revert {
        model: "digits_mlp".into(),
        version: Some("2.0.0".into()),
    }
}

fn active(agent: &Agent) -> String {
    agent.status().unwrap().models[0].active.clone()
}

fn refusals(agent: &Agent) -> Vec<String> {
    agent
        .events(0, 1000)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "command_refused")
        .map(|e| e.detail["reason"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_misaddressed_and_replayed_commands_are_refused_and_recorded() {
    let broker = start_broker();
    let fx = Fixture::new();
    let v1 = std::fs::read(fx.bundle("digits_mlp", "1.0.0", 1)).unwrap();
    let v2 = std::fs::read(fx.bundle("digits_mlp", "2.0.0", 1)).unwrap();
    let agent = open_agent(&fx);
    agent.install(&v1).unwrap();
    agent.install(&v2).unwrap();
    assert_eq!(active(&agent), "2.0.0");
    let link = Link::start(agent.clone(), link_config(&broker)).unwrap();
    wait_for("the link to connect", || link.is_connected().then_some(())).await;
    let broker_client = Tap::new(&broker, "evil-broker", &[]).await;
    let publish = |payload: Vec<u8>| {
        let c = broker_client.client.clone();
        async move {
            c.publish(
                topic("dev-s", Channel::Commands),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap()
        }
    };

    // 1. The bare command of the unsigned format.
    publish(link::encode(&command_for("dev-s", "c-bare", revert()))).await;
    // 2. Signed, but by a key that is not the server's.
    let stranger = SecretKey::generate().unwrap();
    publish(SignedCommand::sign(&command_for("dev-s", "c-stranger", revert()), &stranger).encode())
        .await;
    // 3. Signed by the server, then altered (another model named in the body).
    let mut tampered =
        SignedCommand::sign(&command_for("dev-s", "c-tampered", revert()), server_key());
    tampered.body = tampered.body.replace("2.0.0", "1.0.0");
    publish(tampered.encode()).await;
    // 4. Signed by the server for another device, copied onto this device's topic.
    publish(signed_command("dev-other", "c-other", revert())).await;
    // 5. Signed by the server, expired an hour ago.
    let mut old = command_for("dev-s", "c-old", revert());
    old.time -= chrono::Duration::hours(2);
    old.expires = old.time + chrono::Duration::hours(1);
    publish(SignedCommand::sign(&old, server_key()).encode()).await;

    let m = agent.link_metrics.clone();
    // Counted first, then recorded: wait for both.
    wait_for("five refusals", || {
        (LinkMetrics::get(&m.commands_refused_total) == 5 && refusals(&agent).len() == 5)
            .then_some(())
    })
    .await;
    assert_eq!(active(&agent), "2.0.0", "no forged command was obeyed");
    for (counter, reason) in [
        (&m.commands_refused_unsigned_total, "unsigned"),
        (&m.commands_refused_unknown_key_total, "unknown_key"),
        (&m.commands_refused_bad_signature_total, "bad_signature"),
        (&m.commands_refused_wrong_device_total, "wrong_device"),
        (&m.commands_refused_expired_total, "expired"),
    ] {
        assert_eq!(LinkMetrics::get(counter), 1, "{reason}");
    }
    assert_eq!(
        refusals(&agent),
        [
            "unsigned",
            "unknown_key",
            "bad_signature",
            "wrong_device",
            "expired"
        ]
    );
    let mut metrics = String::new();
    m.render(&mut metrics);
    assert!(metrics.contains("\nmodelfleet_link_commands_refused_total 5\n"));

    // A command the server signed for this device is obeyed.
    let genuine = signed_command("dev-s", "c-genuine", revert());
    publish(genuine.clone()).await;
    wait_for("the genuine revert", || {
        (active(&agent) == "1.0.0").then_some(())
    })
    .await;
    // The same bytes again, after the device moved back to 2.0.0: refused as a replay.
    agent.install(&v2).unwrap();
    assert_eq!(active(&agent), "2.0.0");
    publish(genuine.clone()).await;
    wait_for("the replay refused", || {
        (LinkMetrics::get(&m.commands_refused_replayed_total) == 1).then_some(())
    })
    .await;
    assert_eq!(
        active(&agent),
        "2.0.0",
        "the replayed revert was not obeyed"
    );

    // The memory is in agent.redb: a restarted agent refuses the replay too.
    link.shutdown().await;
    drop(m);
    let agent = {
        let weak = Arc::downgrade(&agent);
        drop(agent);
        wait_for("the agent released", || {
            (weak.strong_count() == 0).then_some(())
        })
        .await;
        open_agent(&fx)
    };
    assert_eq!(active(&agent), "2.0.0");
    let link = Link::start(agent.clone(), link_config(&broker)).unwrap();
    wait_for("the link to reconnect", || {
        link.is_connected().then_some(())
    })
    .await;
    publish(genuine).await;
    let m = agent.link_metrics.clone();
    wait_for("the replay refused after the restart", || {
        (LinkMetrics::get(&m.commands_refused_replayed_total) == 1 && refusals(&agent).len() == 7)
            .then_some(())
    })
    .await;
    assert_eq!(active(&agent), "2.0.0");
    assert_eq!(
        refusals(&agent).last().map(String::as_str),
        Some("replayed")
    );
    // And a new command from the server still works.
    publish(signed_command("dev-s", "c-next", revert())).await;
    wait_for("the next genuine revert", || {
        (active(&agent) == "1.0.0").then_some(())
    })
    .await;
    link.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_server_key_every_command_is_refused() {
    let broker = start_broker();
    let fx = Fixture::new();
    let agent = open_agent(&fx);
    agent
        .install(&std::fs::read(fx.bundle("digits_mlp", "1.0.0", 1)).unwrap())
        .unwrap();
    let mut config = link_config(&broker);
    config.server_key = None;
    let link = Link::start(agent.clone(), config).unwrap();
    wait_for("the link to connect", || link.is_connected().then_some(())).await;
    let tap = Tap::new(&broker, "server-n", &[]).await;
    tap.client
        .publish(
            topic("dev-s", Channel::Commands),
            QoS::AtLeastOnce,
            false,
            signed_command("dev-s", "c-1", revert()),
        )
        .await
        .unwrap();
    let m = agent.link_metrics.clone();
    wait_for("the refusal", || {
        (LinkMetrics::get(&m.commands_refused_no_server_key_total) == 1
            && !refusals(&agent).is_empty())
        .then_some(())
    })
    .await;
    assert_eq!(refusals(&agent), ["no_server_key"]);
    link.shutdown().await;
}
