//! Chunk frames travel at QoS 0 (the fleet server's bulk connection, docs/protocol.md): a frame
//! can be lost on the way, and nothing but the agent's request timeout brings it back. Here a
//! fake server on a real broker publishes frames at QoS 0 and drops some of them the first time
//! they are asked for; the real agent asks for exactly those again and installs the bundle.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use agent::link::{Link, LinkMetrics};
use common::mqtt::*;
use common::*;
use protocol::link::{self, sha256_hex, Action};
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
    let server =
        FakeServer::with_qos(&broker, device, bundle.clone(), chunk_size, QoS::AtMostOnce).await;
    *server.lose_once.lock().unwrap() = lost.clone();

    let agent = open_agent(&fx, "data");
    let mut link_config = link_config(&broker, device);
    let timeout = Duration::from_millis(700);
    link_config.request_timeout = timeout;
    let handle = Link::start(agent.clone(), link_config).unwrap();
    wait_for("the link to connect", || {
        handle.is_connected().then_some(())
    })
    .await;

    let started = Instant::now();
    server
        .command(
            device,
            "c-q0",
            Action::Stage {
                bundle: bundle_ref(&bundle, "digits_mlp", "1.0.0", chunk_size),
            },
        )
        .await;
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
    for index in 0..total {
        let asked = server.requests_of(index);
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
