//! Chunk frames travel at QoS 0 (the fleet server's bulk connection, docs/protocol.md): a frame
//! can be lost on the way, and nothing but the agent's request timeout brings it back. Here a
//! fake server on a real broker publishes frames at QoS 0 and drops some of them the first time
//! they are asked for; the real agent asks for exactly those again and installs the bundle.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent::link::{Link, LinkConfig, LinkMetrics};
use agent::{Agent, AgentConfig};
use common::mqtt::*;
use common::*;
use protocol::link::{
    self, encode_chunk, sha256_hex, Action, BundleRef, Channel, ChunkHeader, ChunkRequest,
};
use rumqttc::QoS;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_lost_at_qos_0_are_asked_for_again_after_the_request_timeout() {
    let broker = start_broker();
    let fx = Fixture::new();
    let bundle = std::fs::read(fx.bundle("digits_mlp", "1.0.0", 1)).unwrap();
    let chunk_size = 2048u32;
    let total = link::chunk_count(bundle.len() as u64, chunk_size);
    let lost: HashSet<u32> = [1, 5, 6, total - 1].into();
    assert!(total > 10, "{total} chunks");

    // The server's side: every request recorded; frames published at QoS 0, the `lost` ones
    // not at all the first time.
    let device = "dev-q0";
    let tap = Tap::new(
        &broker,
        "server-q0",
        &[topic(device, Channel::TransferRequest)],
    )
    .await;
    let requested: Arc<Mutex<Vec<u32>>> = Arc::default();
    let (client, messages, seen_requests) =
        (tap.client.clone(), tap.messages.clone(), requested.clone());
    let chunk_topic = topic(device, Channel::TransferChunk);
    let (id, bytes, to_lose) = (sha256_hex(&bundle), bundle.clone(), lost.clone());
    tokio::spawn(async move {
        let mut to_lose = to_lose;
        let mut seen = 0;
        loop {
            let batch: Vec<Vec<u8>> = {
                let m = messages.lock().unwrap();
                let new = m[seen..].iter().map(|(_, p)| p.clone()).collect();
                seen = m.len();
                new
            };
            for payload in batch {
                let req: ChunkRequest = link::decode(&payload).unwrap();
                for index in req.first..req.first + req.count {
                    seen_requests.lock().unwrap().push(index);
                    if to_lose.remove(&index) {
                        continue;
                    }
                    let start = index as usize * chunk_size as usize;
                    let chunk = &bytes[start..(start + chunk_size as usize).min(bytes.len())];
                    let header = ChunkHeader {
                        bundle_id: id.clone(),
                        index,
                        chunk_size,
                        total,
                        sha256: sha256_hex(chunk),
                        error: None,
                    };
                    client
                        .publish(
                            chunk_topic.clone(),
                            QoS::AtMostOnce,
                            false,
                            encode_chunk(&header, chunk),
                        )
                        .await
                        .unwrap();
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });

    let keyring =
        protocol::keys::Keyring::from_file_text(&std::fs::read_to_string(&fx.keyring).unwrap())
            .unwrap();
    let mut config = AgentConfig::new(fx.path("data"));
    config.workers = 1;
    let agent = Arc::new(Agent::open(config, keyring).unwrap());
    let mut link_config = LinkConfig::new(&broker, device);
    link_config.server_key = Some(server_key().public());
    let timeout = Duration::from_millis(700);
    link_config.request_timeout = timeout;
    let handle = Link::start(agent.clone(), link_config).unwrap();
    wait_for("the link to connect", || {
        handle.is_connected().then_some(())
    })
    .await;

    let started = Instant::now();
    tap.client
        .publish(
            topic(device, Channel::Commands),
            QoS::AtLeastOnce,
            false,
            signed_command(
                device,
                "c-q0",
                Action::Stage {
                    bundle: BundleRef {
                        bundle_id: sha256_hex(&bundle),
                        name: "digits_mlp".into(),
                        version: "1.0.0".into(),
                        size: bundle.len() as u64,
                        chunk_size,
                        http_url: None,
                    },
                },
            ),
        )
        .await
        .unwrap();
    let status = wait_for("the bundle installed", || {
        agent
            .status()
            .ok()
            .filter(|s| s.models.iter().any(|m| m.active == "1.0.0"))
    })
    .await;
    assert_eq!(status.models[0].bundle_sha256, sha256_hex(&bundle));
    assert!(
        started.elapsed() >= timeout,
        "the lost frames came back only after the request timeout"
    );
    let requested = requested.lock().unwrap().clone();
    for index in 0..total {
        let asked = requested.iter().filter(|&&i| i == index).count();
        if lost.contains(&index) {
            assert!(asked >= 2, "lost chunk {index} asked for {asked} time(s)");
        } else {
            assert!(asked >= 1, "chunk {index} never asked for");
        }
    }
    let m = &agent.link_metrics;
    assert!(LinkMetrics::get(&m.chunk_request_timeouts_total) >= lost.len() as u64);
    assert_eq!(LinkMetrics::get(&m.chunks_received_total), total as u64);
    assert_eq!(LinkMetrics::get(&m.transfers_completed_total), 1);
    handle.shutdown().await;
}
