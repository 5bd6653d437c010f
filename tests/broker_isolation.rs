//! Issue 11 on Mosquitto: device identity by mutual TLS with certificates from the fleet CA
//! (`fleet_server::pki`), and isolation between devices by the generated ACL
//! (`fleet_server::isolation`). A real fleet server and a real agent work through the
//! confined broker, the server's chunk frames on its bulk connection with an identity of its
//! own; a device's certificate cannot publish as another device nor read its commands; the bulk
//! identity can only write chunk frames; no certificate, or one from another CA, is refused.

mod common;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use agent::link::TlsFiles;
use common::World;
use fleet_server::bulk::BULK_IDENTITY;
use fleet_server::isolation::{mosquitto_acl, SERVER_IDENTITY};
use fleet_server::pki::{issue_device_cert, issue_identity_cert, issue_server_cert, Issued};
use fleet_server::BrokerConnection;
use modelfleet::harness::{wait_until, BrokerProcess};
use protocol::link::{self, Channel, DeviceStatus, Topics};
use rumqttc::{Client, Event, Packet, QoS};
use serde_json::json;

const LONG: Duration = Duration::from_secs(120);

/// Mosquitto as docs/security.md configures it: client certificates required, the CN is the
/// username and the client id, the generated ACL.
fn confined_mosquitto(world: &World, ca: &Path) -> BrokerProcess {
    let pki = world.path("pki");
    let broker = issue_server_cert(
        ca,
        &["localhost".to_string(), "127.0.0.1".to_string()],
        &pki.join("broker"),
    )
    .unwrap();
    let acl = pki.join("acl");
    let text = mosquitto_acl(
        &Topics::default(),
        &[SERVER_IDENTITY.to_string()],
        &[BULK_IDENTITY.to_string()],
        &[],
    )
    .unwrap();
    std::fs::write(&acl, text).unwrap();
    let conf = format!(
        "allow_anonymous false\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n\
         use_identity_as_username true\nuse_username_as_clientid true\nacl_file {}\n",
        broker.ca.display(),
        broker.cert.display(),
        broker.key.display(),
        acl.display()
    );
    BrokerProcess::mosquitto_with(&world.path("mosquitto"), &conf, true).unwrap()
}

/// A raw MQTT client (the server's connection options: TLS with an optional client
/// certificate); every incoming packet or connection error goes to the channel.
struct Raw {
    client: Client,
    rx: mpsc::Receiver<Result<Packet, String>>,
}

impl Raw {
    fn connect(url: &str, ca: &Path, cert: Option<&Issued>, id: &str) -> Raw {
        let conn = BrokerConnection {
            url: url.to_string(),
            ca_file: Some(ca.to_path_buf()),
            client_cert: cert.map(|c| c.cert.clone()),
            client_key: cert.map(|c| c.key.clone()),
        };
        let mut opts = fleet_server::mqtt::options(&conn, id).unwrap();
        opts.set_clean_session(true);
        let (client, mut connection) = Client::new(opts, 64);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for ev in connection.iter() {
                let sent = match ev {
                    Ok(Event::Incoming(p)) => tx.send(Ok(p)),
                    Ok(_) => Ok(()),
                    Err(e) => {
                        std::thread::sleep(Duration::from_millis(300));
                        tx.send(Err(e.to_string()))
                    }
                };
                if sent.is_err() {
                    break;
                }
            }
        });
        Raw { client, rx }
    }

    /// The next packet matching `f`, or the first connection error, within `secs`.
    fn next<T>(&self, secs: u64, mut f: impl FnMut(&Packet) -> Option<T>) -> Result<T, String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(Ok(p)) => {
                    if let Some(v) = f(&p) {
                        return Ok(v);
                    }
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err("timed out".into()),
            }
        }
    }

    fn connected(&self) -> Result<(), String> {
        self.next(20, |p| matches!(p, Packet::ConnAck(_)).then_some(()))
    }
}

fn forged_status(device: &str) -> DeviceStatus {
    let mut s = DeviceStatus::last_will(device);
    s.online = true;
    s.agent_version = Some("forged".into());
    s.labels = [("site".to_string(), "forged".to_string())].into();
    s.models = Some(vec![]);
    s
}

#[test]
fn device_certificates_and_the_acl_confine_each_device_to_its_own_topics() {
    let mut world = World::new();
    let ca: PathBuf = world.path("fleet-ca");
    let certs = world.path("certs");
    let server_cert = issue_identity_cert(&ca, SERVER_IDENTITY, &certs).unwrap();
    let bulk_cert = issue_identity_cert(&ca, BULK_IDENTITY, &certs).unwrap();
    let dev_a = issue_device_cert(&ca, "dev-a", &certs).unwrap();
    let dev_b = issue_device_cert(&ca, "dev-b", &certs).unwrap();
    let rogue = issue_device_cert(&world.path("rogue-ca"), "dev-c", &world.path("rogue")).unwrap();
    let broker = confined_mosquitto(&world, &ca);
    let url = broker.url();
    let ca_pem = server_cert.ca.clone();

    // The fleet server and a real agent, each with its certificate, work as usual; the server's
    // chunk frames take its bulk connection, which has a certificate of its own.
    world.bulk.client_cert = Some(bulk_cert.cert.clone());
    world.bulk.client_key = Some(bulk_cert.key.clone());
    world.start_server(BrokerConnection {
        url: url.clone(),
        ca_file: Some(ca_pem.clone()),
        client_cert: Some(server_cert.cert.clone()),
        client_key: Some(server_cert.key.clone()),
    });
    let tls = TlsFiles {
        ca_file: ca_pem.clone(),
        client_cert: Some(dev_a.cert.clone()),
        client_key: Some(dev_a.key.clone()),
    };
    let device = world.start_device("dev-a", &[("site", "berlin")], &url, Some(tls));
    wait_until("dev-a online", LONG, || {
        let d = world.client().get("/api/v1/devices/dev-a").ok()?;
        (d["online"] == true).then_some(())
    })
    .unwrap();
    let fleet = world.server.as_ref().unwrap().fleet().clone();
    wait_until("the bulk connection up", LONG, || {
        fleet.bulk.is_connected().then_some(())
    })
    .unwrap();
    let bundle = world.bundle("digits_mlp", "1.0.0");
    let id = world.upload(&bundle);
    let (s, body) = world.post_json("/api/v1/devices/dev-a/stage", json!({ "bundle_id": id }));
    assert_eq!(s, 202, "{body}");
    world.wait_for_version("dev-a", "digits_mlp", "1.0.0", LONG);
    assert!(device.link.as_ref().unwrap().is_connected());
    let metrics = fleet.render_metrics();
    let chunks = std::fs::metadata(&bundle)
        .unwrap()
        .len()
        .div_ceil(world.chunk_size as u64);
    assert!(
        metrics.contains(&format!(
            "fleet_chunk_frames_sent_total{{connection=\"bulk\"}} {chunks}\n"
        )) && metrics.contains("fleet_chunk_frames_sent_total{connection=\"main\"} 0\n")
            && metrics.contains("fleet_mqtt_bulk_connected 1\n"),
        "every chunk frame took the bulk connection:\n{metrics}"
    );

    // dev-b's certificate: it cannot read dev-a's commands, nor anything else of the fleet but
    // the fleet-wide retained topics (Mosquitto's acl_file grants the subscription and filters
    // every delivery) ...
    let topics = Topics::default();
    let mallory = Raw::connect(&url, &ca_pem, Some(&dev_b), "dev-b");
    mallory
        .connected()
        .expect("dev-b's certificate is accepted");
    for filter in [
        topics.device("dev-a", Channel::Commands),
        "modelfleet/v1/#".to_string(),
    ] {
        mallory.client.subscribe(filter, QoS::AtLeastOnce).unwrap();
        mallory
            .next(20, |p| matches!(p, Packet::SubAck(_)).then_some(()))
            .unwrap();
    }
    // ... nor publish dev-a's status or events (the broker drops them) ...
    let forged = link::encode(&forged_status("dev-a"));
    mallory
        .client
        .publish(
            topics.device("dev-a", Channel::Status),
            QoS::AtLeastOnce,
            true,
            forged,
        )
        .unwrap();
    let event = json!({"schema": 1, "device_id": "dev-a", "seq": 1_000_000,
                       "time": "2026-01-01T00:00:00Z", "kind": "forged", "detail": {}});
    mallory
        .client
        .publish(
            topics.device("dev-a", Channel::Events),
            QoS::AtLeastOnce,
            false,
            event.to_string(),
        )
        .unwrap();
    // ... while its own status, published after them on the same connection, is delivered.
    mallory
        .client
        .publish(
            topics.device("dev-b", Channel::Status),
            QoS::AtLeastOnce,
            true,
            link::encode(&forged_status("dev-b")),
        )
        .unwrap();
    wait_until("dev-b's own status registers it", LONG, || {
        let d = world.client().get("/api/v1/devices/dev-b").ok()?;
        (d["id"] == "dev-b").then_some(())
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let a = world.get("/api/v1/devices/dev-a");
    assert_eq!(
        a["labels"]["site"], "berlin",
        "dev-a's status was not replaced: {a}"
    );
    assert_ne!(a["agent_version"], "forged", "{a}");
    let events = world.get("/api/v1/events?device_id=dev-a&kind=forged");
    assert_eq!(events["events"], json!([]), "no forged event for dev-a");
    // A command to dev-a still reaches dev-a only.
    let (s, body) = world.post_json(
        "/api/v1/devices/dev-a/revert",
        json!({ "model": "digits_mlp" }),
    );
    assert_eq!(s, 202, "{body}");
    // (The fleet-wide retained messages every device reads — the server's presence, the keyring
    // chain — are not dev-a's.)
    let fleet_wide = [topics.server(), topics.keyring()];
    let leaked = mallory.next(3, |p| match p {
        Packet::Publish(p) if !fleet_wide.contains(&p.topic) => Some(p.topic.clone()),
        _ => None,
    });
    assert_eq!(
        leaked,
        Err("timed out".to_string()),
        "dev-b received a message"
    );

    // No certificate, or a certificate from another CA: refused at the TLS handshake.
    let anonymous = Raw::connect(&url, &ca_pem, None, "anon");
    assert!(
        anonymous.connected().is_err(),
        "a client without a certificate connected"
    );
    let stranger = Raw::connect(&url, &ca_pem, Some(&rogue), "dev-c");
    assert!(
        stranger.connected().is_err(),
        "a certificate from another CA was accepted"
    );
    let all = world.get("/api/v1/devices");
    assert_eq!(all["total"], 2, "{all}");
    drop(device);
    world.stop_server();

    // The bulk identity (its server stopped, so nobody takes its client id back): chunk frames
    // to any device get through, nothing else does, and it reads nothing.
    let watcher = Raw::connect(&url, &ca_pem, Some(&server_cert), SERVER_IDENTITY);
    watcher.connected().expect("the server's certificate");
    let (events_a, chunk_a) = (
        topics.device("dev-a", Channel::Events),
        topics.device("dev-a", Channel::TransferChunk),
    );
    for filter in [&events_a, &chunk_a] {
        watcher.client.subscribe(filter, QoS::AtLeastOnce).unwrap();
        watcher
            .next(20, |p| matches!(p, Packet::SubAck(_)).then_some(()))
            .unwrap();
    }
    let bulk = Raw::connect(&url, &ca_pem, Some(&bulk_cert), BULK_IDENTITY);
    bulk.connected().expect("the bulk certificate is accepted");
    bulk.client
        .subscribe("modelfleet/v1/#", QoS::AtLeastOnce)
        .unwrap();
    bulk.next(20, |p| matches!(p, Packet::SubAck(_)).then_some(()))
        .unwrap();
    bulk.client
        .publish(&events_a, QoS::AtLeastOnce, false, event.to_string())
        .unwrap();
    bulk.client
        .publish(&chunk_a, QoS::AtMostOnce, false, b"a chunk frame".to_vec())
        .unwrap();
    let delivered = watcher
        .next(20, |p| match p {
            Packet::Publish(p) => Some(p.topic.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        delivered, chunk_a,
        "the chunk frame, not the event published before it"
    );
    watcher
        .client
        .publish(
            topics.device("dev-a", Channel::Commands),
            QoS::AtLeastOnce,
            false,
            b"{}".to_vec(),
        )
        .unwrap();
    // (The ACL's patterns, like the fleet-wide retained topics every device may read, apply to
    // the bulk identity too: those are public within the fleet.)
    let read = bulk.next(3, |p| match p {
        Packet::Publish(p) if !fleet_wide.contains(&p.topic) => Some(p.topic.clone()),
        _ => None,
    });
    assert_eq!(
        read,
        Err("timed out".to_string()),
        "the bulk identity read a message"
    );
}
