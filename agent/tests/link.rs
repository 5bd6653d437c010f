//! The MQTT link against a real broker (rumqttd, in-process) and a fake fleet server played by a
//! raw rumqttc client that answers chunk requests from a real bundle file. No mocks: real agent,
//! real bundles, real sockets on 127.0.0.1.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent::link::transfer::{Bitmap, TransferRecord};
use agent::link::{Link, LinkHandle, LinkMetrics};
use agent::Agent;
use common::mqtt::*;
use common::*;
use protocol::link::{self, encode_chunk, sha256_hex, Action, Channel, ChunkHeader, DeviceStatus};
use protocol::telemetry::{SampleRecord, TelemetryRecord, TELEMETRY_SCHEMA};
use rumqttc::QoS;

async fn connected(handle: &LinkHandle) {
    wait_for("the link to connect", || {
        handle.is_connected().then_some(())
    })
    .await;
}

fn active_version(s: &DeviceStatus, model: &str) -> Option<String> {
    s.models
        .as_ref()?
        .iter()
        .find(|m| m.name == model)
        .map(|m| m.active.clone())
}

/// Drops the last reference to an agent (the link's blocking jobs may still hold one briefly)
/// so its database can be opened again.
async fn close(agent: Arc<Agent>) {
    let mut agent = Some(agent);
    wait_for("the agent to be released", || {
        let a = agent.take().unwrap();
        match Arc::try_unwrap(a) {
            Ok(a) => {
                drop(a);
                Some(())
            }
            Err(a) => {
                agent = Some(a);
                None
            }
        }
    })
    .await;
}

// ---- tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_retained_and_a_staged_bundle_is_fetched_installed_and_reported() {
    let broker = start_broker();
    let fx = Fixture::new();
    let v1 = fx.bundle("digits_mlp", "1.0.0", 1);
    let v2 = std::fs::read(fx.bundle("digits_mlp", "2.0.0", 1)).unwrap();
    let agent = open_agent(&fx, "data");
    agent.install(&std::fs::read(v1).unwrap()).unwrap();

    let mut config = link_config(&broker, "dev-a");
    config.labels = BTreeMap::from([
        ("site".into(), "berlin".into()),
        ("hw".into(), "pi5".into()),
    ]);
    let link = Link::start(agent.clone(), config).unwrap();
    connected(&link).await;

    // Retained: a subscriber that comes later still gets the status.
    let observer = Tap::new(
        &broker,
        "observer-a",
        &[
            topic("dev-a", Channel::Status),
            topic("dev-a", Channel::Events),
        ],
    )
    .await;
    let status = wait_for("a retained online status", || {
        observer.statuses("dev-a").into_iter().find(|s| s.online)
    })
    .await;
    assert_eq!(status.labels["site"], "berlin");
    assert_eq!(status.target.as_deref(), Some(agent::agent::BUILD_TARGET));
    let models = status.models.clone().unwrap();
    assert_eq!(models.len(), 1);
    assert_eq!(
        (models[0].name.as_str(), models[0].active.as_str()),
        ("digits_mlp", "1.0.0")
    );
    assert_eq!(models[0].state, "committed");
    assert_eq!(models[0].bundle_sha256.len(), 64);

    let chunk_size = 4096;
    let server = FakeServer::new(&broker, "dev-a", v2.clone(), chunk_size).await;
    let started = Instant::now();
    server
        .command(
            "dev-a",
            "c-stage",
            Action::Stage {
                bundle: bundle_ref(&v2, "digits_mlp", "2.0.0", chunk_size),
            },
        )
        .await;
    let status = wait_for("status with 2.0.0 active", || {
        observer
            .statuses("dev-a")
            .into_iter()
            .rev()
            .find(|s| active_version(s, "digits_mlp").as_deref() == Some("2.0.0"))
    })
    .await;
    let elapsed = started.elapsed();
    let m = &status.models.unwrap()[0];
    assert_eq!(
        (m.previous.as_deref(), m.state.as_str()),
        (Some("1.0.0"), "trial")
    );
    assert_eq!(m.bundle_sha256, sha256_hex(&v2));

    let chunks = link::chunk_count(v2.len() as u64, chunk_size);
    for i in 0..chunks {
        assert_eq!(server.requests_of(i), 1, "chunk {i} asked for once");
    }
    eprintln!(
        "{} chunks of {chunk_size} B ({} B) staged and installed in {elapsed:?}",
        chunks,
        v2.len()
    );
    // Events: in seq order, with the command's ids on everything the stage caused.
    let events = wait_for("the activation event", || {
        let e = observer.events("dev-a");
        e.iter()
            .any(|e| e.kind == "activated" && e.version.as_deref() == Some("2.0.0"))
            .then_some(e)
    })
    .await;
    let kinds: Vec<&str> = events
        .iter()
        .filter(|e| e.command_id.as_deref() == Some("c-stage"))
        .map(|e| e.kind.as_str())
        .collect();
    let first = |k: &str| {
        kinds
            .iter()
            .position(|x| *x == k)
            .unwrap_or_else(|| panic!("{k} in {kinds:?}"))
    };
    assert!(first("transfer_started") < first("transfer_progress"));
    assert!(first("transfer_progress") < first("transfer_completed"));
    assert!(first("transfer_completed") < first("installed"));
    assert!(first("installed") < first("activated"));
    let completed = events
        .iter()
        .find(|e| e.kind == "transfer_completed" && e.command_id.as_deref() == Some("c-stage"))
        .unwrap();
    assert_eq!(
        completed.detail["hashed_while_receiving"], true,
        "a transfer that saw every chunk arrive checks the hash it computed on the way: {:?}",
        completed.detail
    );
    assert!(events
        .iter()
        .filter(|e| e.command_id.is_some())
        .all(|e| e.rollout_id.as_deref() == Some("r-1")));
    let mut seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    seqs.dedup();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    assert!(
        agent
            .layout()
            .transfers()
            .read_dir()
            .unwrap()
            .next()
            .is_none(),
        "partial file deleted"
    );
    assert!(agent
        .store()
        .transfers::<TransferRecord>()
        .unwrap()
        .is_empty());

    // The same stage again: already active, nothing fetched.
    let before = server.requested.lock().unwrap().len();
    server
        .command(
            "dev-a",
            "c-again",
            Action::Stage {
                bundle: bundle_ref(&v2, "digits_mlp", "2.0.0", chunk_size),
            },
        )
        .await;
    wait_for("already_active", || {
        observer
            .events("dev-a")
            .into_iter()
            .find(|e| e.kind == "already_active" && e.command_id.as_deref() == Some("c-again"))
    })
    .await;
    assert_eq!(server.requested.lock().unwrap().len(), before);

    // A clean shutdown leaves a full offline status, not the last will.
    link.shutdown().await;
    let last = wait_for("the goodbye status", || {
        observer
            .statuses("dev-a")
            .into_iter()
            .rev()
            .find(|s| !s.online)
    })
    .await;
    assert!(
        last.models.is_some(),
        "a goodbye, not the last will: {last:?}"
    );
    let cursor = agent
        .store()
        .link_meta(agent::link::event_pump::CURSOR_KEY)
        .unwrap();
    assert!(
        cursor >= events.iter().map(|e| e.seq).max().unwrap(),
        "cursor {cursor} covers what the broker took"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_resumes_after_a_crash_without_refetching_durable_chunks() {
    let broker = start_broker();
    let fx = Fixture::new();
    let v1 = std::fs::read(fx.bundle("digits_mlp", "1.0.0", 1)).unwrap();
    let chunk_size = 2048;
    let chunks = link::chunk_count(v1.len() as u64, chunk_size);
    assert!(chunks > 60, "{chunks} chunks");
    let server = FakeServer::new(&broker, "dev-r", v1.clone(), chunk_size).await;
    let held_back = 40;
    server.serve_below.store(held_back, Ordering::SeqCst);

    let agent = open_agent(&fx, "data");
    let link = Link::start(agent.clone(), link_config(&broker, "dev-r")).unwrap();
    connected(&link).await;
    server
        .command(
            "dev-r",
            "c-1",
            Action::Stage {
                bundle: bundle_ref(&v1, "digits_mlp", "1.0.0", chunk_size),
            },
        )
        .await;
    let metrics = agent.link_metrics.clone();
    wait_for("the first 40 chunks", || {
        (LinkMetrics::get(&metrics.chunks_received_total) == held_back as u64).then_some(())
    })
    .await;
    // Power cut: no goodbye, no final checkpoint.
    link.abort().await;
    close(agent).await;

    let agent = open_agent(&fx, "data");
    let records: Vec<(String, TransferRecord)> = agent.store().transfers().unwrap();
    assert_eq!(records.len(), 1);
    let durable = Bitmap::from_hex(chunks, &records[0].1.received);
    // A checkpoint is asked for after 16 chunks, and after 16 more once the disk has begun the
    // previous one (a slow disk gets fewer, larger checkpoints): at least the first is durable.
    assert!(
        durable.count() >= 16,
        "checkpointed after 16 chunks: {}",
        durable.count()
    );
    assert!(durable.count() <= held_back);
    assert_eq!(records[0].1.context.command_id.as_deref(), Some("c-1"));

    let before: HashMap<u32, usize> = (0..chunks).map(|i| (i, server.requests_of(i))).collect();
    server.serve_below.store(u32::MAX, Ordering::SeqCst);
    let link = Link::start(agent.clone(), link_config(&broker, "dev-r")).unwrap();
    let status = wait_for("the resumed bundle installed", || {
        agent
            .status()
            .ok()
            .filter(|s| s.models.iter().any(|m| m.active == "1.0.0"))
    })
    .await;
    assert_eq!(status.models[0].bundle_sha256, sha256_hex(&v1));
    for i in 0..chunks {
        let again = server.requests_of(i) - before[&i];
        if durable.get(i) {
            assert_eq!(
                again, 0,
                "chunk {i} was durable and must not be fetched again"
            );
        } else {
            assert!(again >= 1, "chunk {i} was missing");
        }
    }
    let events = agent.events(0, 1000).unwrap();
    let installed = events.iter().find(|e| e.kind == "installed").unwrap();
    assert_eq!(
        installed.command_id.as_deref(),
        Some("c-1"),
        "the stored command ids survive the restart"
    );
    let completed = events
        .iter()
        .find(|e| e.kind == "transfer_completed")
        .unwrap();
    assert_eq!(
        completed.detail["hashed_while_receiving"], false,
        "chunks from before the restart never went through the running hash: the file is hashed"
    );
    link.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_does_not_hash_to_the_bundle_id_is_refused_and_deleted() {
    let broker = start_broker();
    let fx = Fixture::new();
    let v1 = std::fs::read(fx.bundle("digits_mlp", "1.0.0", 1)).unwrap();
    let chunk_size = 4096;
    let server = FakeServer::new(&broker, "dev-h", v1.clone(), chunk_size).await;
    // Chunk 3 checks out against its own frame hash but is not the bundle's chunk 3.
    server.tamper.lock().unwrap().insert(3);
    let agent = open_agent(&fx, "data");
    let link = Link::start(agent.clone(), link_config(&broker, "dev-h")).unwrap();
    connected(&link).await;
    server
        .command(
            "dev-h",
            "c-h",
            Action::Stage {
                bundle: bundle_ref(&v1, "digits_mlp", "1.0.0", chunk_size),
            },
        )
        .await;
    let failed = wait_for("transfer_failed", || {
        agent
            .events(0, 1000)
            .unwrap()
            .into_iter()
            .find(|e| e.kind == "transfer_failed")
    })
    .await;
    assert_eq!(
        failed.detail["reason"], "bundle_hash_mismatch",
        "{failed:?}"
    );
    assert_eq!(failed.command_id.as_deref(), Some("c-h"));
    let events = agent.events(0, 1000).unwrap();
    assert!(
        !events
            .iter()
            .any(|e| matches!(e.kind.as_str(), "transfer_completed" | "installed")),
        "{events:?}"
    );
    assert!(
        agent.status().unwrap().models.is_empty(),
        "nothing installed"
    );
    wait_for("the partial file and record deleted", || {
        (agent
            .layout()
            .transfers()
            .read_dir()
            .unwrap()
            .next()
            .is_none()
            && agent
                .store()
                .transfers::<TransferRecord>()
                .unwrap()
                .is_empty())
        .then_some(())
    })
    .await;
    link.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_chunk_is_requested_again_and_bad_messages_are_counted() {
    let broker = start_broker();
    let fx = Fixture::new();
    let v1 = fx.bundle("digits_mlp", "1.0.0", 1);
    let v2 = std::fs::read(fx.bundle("digits_mlp", "2.0.0", 1)).unwrap();
    let agent = open_agent(&fx, "data");
    agent.install(&std::fs::read(v1).unwrap()).unwrap();
    let link = Link::start(agent.clone(), link_config(&broker, "dev-c")).unwrap();
    connected(&link).await;
    let chunk_size = 8192;
    let server = FakeServer::new(&broker, "dev-c", v2.clone(), chunk_size).await;
    server.corrupt_once.lock().unwrap().extend([3, 7]);

    // Garbage first: none of it stops the link.
    let commands = topic("dev-c", Channel::Commands);
    let chunk_topic = topic("dev-c", Channel::TransferChunk);
    let c = &server.tap.client;
    c.publish(
        commands.clone(),
        QoS::AtLeastOnce,
        false,
        b"{not json".to_vec(),
    )
    .await
    .unwrap();
    c.publish(
        commands.clone(),
        QoS::AtLeastOnce,
        false,
        br#"{"schema": 99}"#.to_vec(),
    )
    .await
    .unwrap();
    c.publish(
        chunk_topic.clone(),
        QoS::AtLeastOnce,
        false,
        b"MFC1 garbage".to_vec(),
    )
    .await
    .unwrap();
    let stray = ChunkHeader {
        bundle_id: "ab".repeat(32),
        index: 0,
        chunk_size: 4,
        total: 1,
        sha256: sha256_hex(b"abcd"),
        error: None,
    };
    c.publish(
        chunk_topic,
        QoS::AtLeastOnce,
        false,
        encode_chunk(&stray, b"abcd"),
    )
    .await
    .unwrap();
    let mut bad = bundle_ref(&v2, "digits_mlp", "2.0.0", chunk_size);
    bad.bundle_id = "../../etc/passwd".into();
    server
        .command("dev-c", "c-bad", Action::Stage { bundle: bad })
        .await;
    let m = agent.link_metrics.clone();
    wait_for("the bad messages counted", || {
        (LinkMetrics::get(&m.malformed_messages_total) >= 4
            && LinkMetrics::get(&m.chunks_unknown_transfer_total) >= 1)
            .then_some(())
    })
    .await;
    assert!(link.is_connected());

    server
        .command(
            "dev-c",
            "c-stage",
            Action::Stage {
                bundle: bundle_ref(&v2, "digits_mlp", "2.0.0", chunk_size),
            },
        )
        .await;
    wait_for("2.0.0 active", || {
        agent
            .status()
            .ok()
            .filter(|s| s.models[0].active == "2.0.0")
    })
    .await;
    assert_eq!(LinkMetrics::get(&m.chunks_bad_hash_total), 2);
    assert_eq!(
        (
            server.requests_of(3),
            server.requests_of(7),
            server.requests_of(4)
        ),
        (2, 2, 1)
    );

    // A revert command for a version that is not active is refused; for the active one it works.
    server
        .command(
            "dev-c",
            "c-rv-wrong",
            Action::Revert {
                model: "digits_mlp".into(),
                version: Some("9.9.9".into()),
            },
        )
        .await;
    server
        .command(
            "dev-c",
            "c-rv",
            Action::Revert {
                model: "digits_mlp".into(),
                version: Some("2.0.0".into()),
            },
        )
        .await;
    wait_for("1.0.0 active again", || {
        agent
            .status()
            .ok()
            .filter(|s| s.models[0].active == "1.0.0")
    })
    .await;
    let events = agent.events(0, 1000).unwrap();
    assert!(events
        .iter()
        .any(|e| e.kind == "command_failed" && e.command_id.as_deref() == Some("c-rv-wrong")));
    let reverted = events.iter().find(|e| e.kind == "reverted").unwrap();
    assert_eq!(reverted.command_id.as_deref(), Some("c-rv"));

    let mut text = String::new();
    agent.link_metrics.render(&mut text);
    assert!(
        text.contains("modelfleet_link_chunks_bad_hash_total 2\n"),
        "{text}"
    );
    link.shutdown().await;
}

fn sample(i: usize) -> TelemetryRecord {
    TelemetryRecord::Sample(SampleRecord {
        schema: TELEMETRY_SCHEMA,
        model: "m".into(),
        version: "1.0.0".into(),
        time: chrono::Utc::now(),
        request_id: Some(format!("r{i}")),
        latency_ms: 0.1,
        inputs: vec![],
        outputs: vec![],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_waits_in_the_outbox_while_offline_and_leaves_it_once_acknowledged() {
    let fx = Fixture::new();
    let agent = open_agent(&fx, "data");
    let n = 300;
    let records: Vec<TelemetryRecord> = (0..n).map(sample).collect();
    agent.outbox.push(&records).unwrap();

    // No broker yet: the link keeps trying, the records stay.
    let port = free_port();
    let broker = format!("mqtt://127.0.0.1:{port}");
    let link = Link::start(agent.clone(), link_config(&broker, "dev-t")).unwrap();
    let m = agent.link_metrics.clone();
    wait_for("a few failed attempts", || {
        (LinkMetrics::get(&m.connection_errors_total) >= 3).then_some(())
    })
    .await;
    assert_eq!(agent.outbox.len().unwrap(), n as u64);
    assert_eq!(LinkMetrics::get(&m.telemetry_published_total), 0);

    start_broker_on(port);
    let observer = Tap::new(&broker, "observer-t", &[topic("dev-t", Channel::Telemetry)]).await;
    connected(&link).await;
    // More records while connected.
    agent
        .outbox
        .push(&(n..n + 10).map(sample).collect::<Vec<_>>())
        .unwrap();
    wait_for("the outbox drained", || {
        agent.outbox.is_empty().unwrap().then_some(())
    })
    .await;
    let received: HashSet<String> = wait_for("every record at the subscriber", || {
        let ids: HashSet<String> = observer
            .on(&topic("dev-t", Channel::Telemetry))
            .iter()
            .map(
                |p| match serde_json::from_slice::<TelemetryRecord>(p).unwrap() {
                    TelemetryRecord::Sample(s) => s.request_id.unwrap(),
                    other => panic!("{other:?}"),
                },
            )
            .collect();
        (ids.len() == n + 10).then_some(ids)
    })
    .await;
    assert!(received.contains("r0") && received.contains(&format!("r{}", n + 9)));
    assert!(LinkMetrics::get(&m.telemetry_acked_total) >= (n + 10) as u64);
    link.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_and_telemetry_wait_for_the_servers_presence() {
    // A broker the fleet server has not (re)subscribed to yet, as after a broker restart: what
    // a device published now would be acknowledged and dropped.
    let fx = Fixture::new();
    let agent = open_agent(&fx, "data");
    let port = free_port();
    start_bare_broker(port, None);
    let broker = format!("mqtt://127.0.0.1:{port}");
    let (telemetry, events) = (
        topic("dev-p", Channel::Telemetry),
        topic("dev-p", Channel::Events),
    );
    let observer = Tap::new(&broker, "observer-p", &[telemetry.clone(), events.clone()]).await;
    let n = 20;
    agent
        .outbox
        .push(&(0..n).map(sample).collect::<Vec<_>>())
        .unwrap();
    agent
        .record(&[agent::store::Event::new(
            "note",
            None,
            None,
            serde_json::json!({"what": "recorded before the server was there"}),
        )])
        .unwrap();
    let link = Link::start(agent.clone(), link_config(&broker, "dev-p")).unwrap();
    connected(&link).await;
    let m = agent.link_metrics.clone();
    wait_for("the link to wait for the server", || {
        (LinkMetrics::get(&m.awaiting_server) == 1).then_some(())
    })
    .await;
    // An offline presence (the server stopped) holds them too.
    tokio::task::spawn_blocking(move || announce_server(port, false))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(observer.on(&telemetry).is_empty(), "telemetry went out");
    assert!(observer.on(&events).is_empty(), "events went out");
    assert_eq!(agent.outbox.len().unwrap(), n as u64);
    assert_eq!(LinkMetrics::get(&m.telemetry_published_total), 0);
    assert_eq!(LinkMetrics::get(&m.events_published_total), 0);
    assert_eq!(LinkMetrics::get(&m.awaiting_server), 1);

    // The server is back: everything goes out, nothing lost.
    tokio::task::spawn_blocking(move || announce_server(port, true))
        .await
        .unwrap();
    wait_for("the outbox drained", || {
        agent.outbox.is_empty().unwrap().then_some(())
    })
    .await;
    wait_for("every record and the event at the subscriber", || {
        let notes = observer
            .on(&events)
            .iter()
            .filter(|p| link::decode::<protocol::link::DeviceEvent>(p).unwrap().kind == "note")
            .count();
        (observer.on(&telemetry).len() >= n && notes == 1).then_some(())
    })
    .await;
    assert_eq!(LinkMetrics::get(&m.awaiting_server), 0);
    link.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_will_marks_a_device_offline_when_the_link_dies() {
    let broker = start_broker();
    let fx = Fixture::new();
    let agent = open_agent(&fx, "data");
    let observer = Tap::new(&broker, "observer-w", &[topic("dev-w", Channel::Status)]).await;
    let link = Link::start(agent.clone(), link_config(&broker, "dev-w")).unwrap();
    wait_for("online", || {
        observer.statuses("dev-w").into_iter().find(|s| s.online)
    })
    .await;
    // The task dies without DISCONNECT: the socket just closes.
    link.abort().await;
    let will = wait_for("the last will", || {
        observer.statuses("dev-w").into_iter().find(|s| !s.online)
    })
    .await;
    assert_eq!(
        will.models, None,
        "the last will knows nothing of the models"
    );
    assert_eq!(will.device_id, "dev-w");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_agent_simulate_runs_labelled_devices_on_the_broker() {
    let broker = start_broker();
    let fx = Fixture::new();
    let observer = Tap::new(
        &broker,
        "observer-sim",
        &["modelfleet/v1/devices/+/status".to_string()],
    )
    .await;
    let data = fx.path("sim");
    let server_pub = fx.path("server.pub");
    std::fs::write(&server_pub, server_key().public().to_line()).unwrap();
    let mut child = fx
        .agent_cmd(&["simulate", "--devices", "3", "--broker", &broker])
        .args(["--label", "site=berlin|munich", "--id-prefix", "cli"])
        .arg("--server-key")
        .arg(&server_pub)
        .arg("--keyring")
        .arg(&fx.keyring)
        .arg("--data-dir")
        .arg(&data)
        .spawn()
        .unwrap();
    let labels = wait_for("three simulated devices online", || {
        let online: Vec<(String, String)> = (0..3)
            .filter_map(|i| {
                let id = format!("cli-{i:04}");
                let s = observer.statuses(&id).into_iter().rfind(|s| s.online)?;
                Some((id, s.labels.get("site")?.clone()))
            })
            .collect();
        (online.len() == 3).then_some(online)
    })
    .await;
    let sites: Vec<&str> = labels.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(sites, ["berlin", "munich", "berlin"]);
    for (id, _) in &labels {
        assert!(
            data.join(id).join("agent.redb").exists(),
            "{id} keeps its data on disk"
        );
    }
    // A killed simulator leaves last wills: every device shows offline.
    child.kill().unwrap();
    child.wait().unwrap();
    wait_for("last wills of the simulated devices", || {
        (0..3)
            .all(|i| {
                observer
                    .statuses(&format!("cli-{i:04}"))
                    .last()
                    .is_some_and(|s| !s.online)
            })
            .then_some(())
    })
    .await;

    // Bad arguments are refused with the flag named.
    let out = fx
        .agent_cmd(&["simulate", "--devices", "0", "--broker", &broker])
        .arg("--server-key")
        .arg(&server_pub)
        .arg("--keyring")
        .arg(&fx.keyring)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--devices"));
}

/// A throw-away CA and a server certificate for localhost / 127.0.0.1: (ca, cert, key) files.
fn test_pki(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "link test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let files = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&files.0, ca_cert.pem()).unwrap();
    std::fs::write(&files.1, cert.pem()).unwrap();
    std::fs::write(&files.2, key.serialize_pem()).unwrap();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verifies_the_broker_against_the_ca_file() {
    let fx = Fixture::new();
    let (ca, cert, key) = test_pki(&fx.path(""));
    let port = free_port();
    start_broker_with(port, Some((&cert, &key)));
    let agent = open_agent(&fx, "data");

    // A CA that did not sign the broker's certificate: never connected.
    let other = tempfile::tempdir().unwrap();
    let (wrong_ca, _, _) = test_pki(other.path());
    let mut config = link_config(&format!("mqtts://localhost:{port}"), "dev-tls");
    config.tls = Some(agent::link::TlsFiles {
        ca_file: wrong_ca,
        client_cert: None,
        client_key: None,
    });
    let link = Link::start(agent.clone(), config.clone()).unwrap();
    let m = agent.link_metrics.clone();
    wait_for("refused handshakes", || {
        (LinkMetrics::get(&m.connection_errors_total) >= 2).then_some(())
    })
    .await;
    assert!(!link.is_connected());
    link.abort().await;

    config.tls = Some(agent::link::TlsFiles {
        ca_file: ca,
        client_cert: None,
        client_key: None,
    });
    let link = Link::start(agent.clone(), config).unwrap();
    connected(&link).await;
    link.shutdown().await;
}

/// A bundle server with HTTP Range support that answers 503 to its first request.
async fn range_server(bundle: Vec<u8>) -> (String, Arc<Mutex<Vec<(u64, u64)>>>) {
    use axum::http::{header, HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    let ranges: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let bundle = Arc::new(bundle);
    let (r, b) = (ranges.clone(), bundle.clone());
    let first = Arc::new(AtomicBool::new(true));
    let app = axum::Router::new().route(
        "/content",
        axum::routing::get(move |headers: HeaderMap| {
            let (r, b, first) = (r.clone(), b.clone(), first.clone());
            async move {
                if first.swap(false, Ordering::SeqCst) {
                    return StatusCode::SERVICE_UNAVAILABLE.into_response();
                }
                let range = headers
                    .get(header::RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes="))
                    .and_then(|v| v.split_once('-'))
                    .map(|(a, z)| (a.parse::<u64>().unwrap(), z.parse::<u64>().unwrap()))
                    .expect("the agent always asks for a range");
                r.lock().unwrap().push(range);
                let body = b[range.0 as usize..=range.1 as usize].to_vec();
                let content_range = format!("bytes {}-{}/{}", range.0, range.1, b.len());
                (
                    StatusCode::PARTIAL_CONTENT,
                    [(header::CONTENT_RANGE, content_range)],
                    body,
                )
                    .into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/content", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, ranges)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_transfer_fetches_by_range_and_retries() {
    let broker = start_broker();
    let fx = Fixture::new();
    let v1 = std::fs::read(fx.bundle("digits_mlp", "1.0.0", 1)).unwrap();
    let (url, ranges) = range_server(v1.clone()).await;
    let agent = open_agent(&fx, "data");
    let mut config = link_config(&broker, "dev-h");
    config.transfer = agent::link::TransferMode::Http;
    let link = Link::start(agent.clone(), config).unwrap();
    connected(&link).await;
    let server = Tap::new(&broker, "server-h", &[]).await;
    let mut bundle = bundle_ref(&v1, "digits_mlp", "1.0.0", 4096);
    bundle.http_url = Some(url);
    server
        .client
        .publish(
            topic("dev-h", Channel::Commands),
            QoS::AtLeastOnce,
            false,
            signed_command("dev-h", "c-http", Action::Stage { bundle }),
        )
        .await
        .unwrap();
    wait_for("1.0.0 installed over HTTP", || {
        agent
            .status()
            .ok()
            .filter(|s| s.models.iter().any(|m| m.active == "1.0.0"))
    })
    .await;
    assert_eq!(
        *ranges.lock().unwrap(),
        vec![(0, v1.len() as u64 - 1)],
        "one range after the 503"
    );
    let events = agent.events(0, 100).unwrap();
    assert!(events
        .iter()
        .any(|e| e.kind == "transfer_completed" && e.command_id.as_deref() == Some("c-http")));
    link.shutdown().await;
}
