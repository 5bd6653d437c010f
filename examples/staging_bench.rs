//! Staging benchmark (issue 5): how long the fleet server takes to stage `mobilenetish` (a 15 MB
//! bundle) to 1 and to N agents over loopback, and how the chunk transfer's throughput compares
//! with a plain MQTT publish loop of the same bytes on the same broker.
//!
//! ```text
//! cargo run --release --example staging_bench -- [--devices 1,50] [--broker embedded,mosquitto]
//!     [--window 32] [--repeat 1]
//! ```
//!
//! `--repeat N` runs the plain loop and every staging configuration N times in turn on the same
//! broker and server and ends each broker with the medians (the machine is shared and noisy:
//! one run proves little).
//!
//! For each broker:
//! 1. **plain publish loop**: one client publishes the bundle's bytes as 64 KiB QoS 1 messages,
//!    another receives them; time from the first publish to the last message received. This is
//!    the ceiling for moving those bytes through that broker with rumqttc.
//! 2. **staging** to n agents (for each n): n agents (each a real `Agent` + `Link` with its own
//!    data directory) are started and online; the server gets a stage command for each through
//!    the HTTP API; measured are the time until every agent has the whole bundle on disk and
//!    hashed (`transfers_completed_total`), and until every agent serves it (verify, install,
//!    load, self-test, activate). Also the **chunk phase** (the chunk throughput the issue's
//!    target is about): from each agent's transfer starting to its last chunk written, from the
//!    `seconds` of its `transfer_completed` event; the slowest agent's sets the aggregate.
//!
//! Loopback only. Results go to BENCHMARKS.md by hand, with the machine and this command.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;

use agent::link::{Link, LinkConfig, LinkMetrics};
use agent::{Agent, AgentConfig};
use fleet_server::{BrokerChoice, BrokerConnection, Server, ServerConfig};
use modelfleet::api::ApiClient;
use modelfleet::harness::{free_port, BrokerProcess};

const CHUNK: usize = 64 * 1024;
const MODEL: &str = "mobilenetish";

fn main() -> Result<()> {
    let mut devices = vec![1usize, 50];
    let mut brokers = vec!["embedded".to_string(), "mosquitto".to_string()];
    let mut windows = vec![LinkConfig::new("", "").window];
    let mut repeat = 1usize;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).context("a flag without its value")?;
        match args[i].as_str() {
            "--devices" => {
                devices = value
                    .split(',')
                    .map(|s| s.parse().context("--devices takes numbers: 1,50"))
                    .collect::<Result<_>>()?
            }
            "--broker" => brokers = value.split(',').map(str::to_string).collect(),
            "--window" => {
                windows = value
                    .split(',')
                    .map(|s| s.parse().context("--window takes numbers: 32,64"))
                    .collect::<Result<_>>()?
            }
            "--repeat" => {
                repeat = value
                    .parse::<usize>()
                    .context("--repeat takes a number")?
                    .max(1)
            }
            other => bail!(
                "unknown flag {other}: use --devices 1,50 --broker embedded,mosquitto --window 32 --repeat 1"
            ),
        }
        i += 2;
    }

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = tempfile::Builder::new()
        .prefix("modelfleet-staging-bench-")
        .tempdir()?;
    let dir = work.path();
    let key = bundler::keygen_files(&dir.join("keys"), "bench")?;
    let keyring = bundler::load_keyring(&[&key.public])?;
    let bundle_path = dir.join("mobilenetish.mfb");
    let src = root.join("examples/models").join(MODEL);
    let mut opts = bundler::BuildOptions::new(
        src.join("mobilenetish.onnx"),
        MODEL,
        "1.0.0",
        1,
        &key.secret,
        &bundle_path,
    );
    opts.golden_inputs = Some(src.join("test_input.npy"));
    opts.golden_max = 2;
    opts.latency_runs = 2;
    bundler::build(&opts)?;
    let bundle = std::fs::read(&bundle_path)?;
    println!(
        "bundle: {MODEL} 1.0.0, {} bytes ({} chunks of 64 KiB)",
        bundle.len(),
        bundle.len().div_ceil(CHUNK)
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    for broker_name in &brokers {
        println!("\n== broker: {broker_name}");
        let mut external = None;
        let choice = match broker_name.as_str() {
            "embedded" => BrokerChoice::Embedded(([127, 0, 0, 1], free_port()).into()),
            "mosquitto" => {
                let b = BrokerProcess::mosquitto(&dir.join("mosquitto"), None, false)?;
                let c = BrokerChoice::External(BrokerConnection::plain(b.url()));
                external = Some(b);
                c
            }
            other => bail!("unknown broker {other}: embedded or mosquitto"),
        };
        let mut config =
            ServerConfig::new(dir.join(format!("server-{broker_name}")), keyring.clone());
        config.broker = choice;
        let server = rt.block_on(Server::start(config))?;
        let api = ApiClient::new(&server.http_url(), server.admin_token().unwrap_or_default());
        let broker_url = server.broker_url().to_string();
        let bundle_id = api.upload(&bundle)?;

        let configs: Vec<(usize, u32)> = devices
            .iter()
            .flat_map(|&n| windows.iter().map(move |&w| (n, w)))
            .collect();
        let mut plains = Vec::new();
        // Per configuration: (transferred, its share of that round's plain loop in %, the
        // chunk phase's share).
        let mut results: Vec<Vec<(Duration, f64, f64)>> = vec![Vec::new(); configs.len()];
        for round in 0..repeat {
            if repeat > 1 {
                println!("-- round {}", round + 1);
            }
            let plain = rt.block_on(plain_publish_loop(&broker_url, &bundle))?;
            plains.push(plain);
            println!(
                "plain publish loop: {} bytes in {:.3} s = {:.1} MB/s",
                bundle.len(),
                plain.as_secs_f64(),
                mb_per_s(bundle.len(), plain)
            );
            for (c, &(n, window)) in configs.iter().enumerate() {
                let run = stage_to(
                    &rt,
                    &api,
                    &broker_url,
                    &bundle_id,
                    &keyring,
                    server.server_public_key(),
                    n,
                    window,
                    &dir.join(format!("{broker_name}-{n}-w{window}-r{round}")),
                )?;
                let bytes = bundle.len() * n;
                let plain_rate = mb_per_s(bundle.len(), plain);
                let share = 100.0 * mb_per_s(bytes, run.transferred) / plain_rate;
                // The agents' transfers start within milliseconds of each other (the last
                // `transfer_started` is printed), so n bundles over the slowest chunk phase is
                // the aggregate chunk throughput.
                let chunk_share = 100.0 * mb_per_s(bytes, run.chunk_phase) / plain_rate;
                results[c].push((run.transferred, share, chunk_share));
                println!(
                    "staging to {n:>3} agent(s), window {window:>3}: all transferred in {:.3} s ({:.1} MB/s aggregate, {share:.0} % of the plain loop), all serving in {:.3} s; first transfer {:.3} s; slowest chunk phase {:.3} s ({chunk_share:.0} % of the plain loop, aggregate); last transfer started {:.3} s after the first stage request",
                    run.transferred.as_secs_f64(),
                    mb_per_s(bytes, run.transferred),
                    run.serving.as_secs_f64(),
                    run.first_transfer.as_secs_f64(),
                    run.chunk_phase.as_secs_f64(),
                    run.command_to_start.as_secs_f64(),
                );
            }
        }
        if repeat > 1 {
            println!("-- medians of {repeat} rounds ({broker_name})");
            println!("plain publish loop: {:.3} s", median(&plains).as_secs_f64());
            for (c, &(n, window)) in configs.iter().enumerate() {
                let times: Vec<Duration> = results[c].iter().map(|r| r.0).collect();
                let sorted = |f: fn(&(Duration, f64, f64)) -> f64| {
                    let mut v: Vec<f64> = results[c].iter().map(f).collect();
                    v.sort_by(f64::total_cmp);
                    v
                };
                let shares = sorted(|r| r.1);
                let chunk_shares = sorted(|r| r.2);
                println!(
                    "staging to {n:>3} agent(s), window {window:>3}: transferred {:.3} s, {:.0} % of its round's plain loop (range {:.0}–{:.0} %); chunk phase {:.0} % (range {:.0}–{:.0} %)",
                    median(&times).as_secs_f64(),
                    shares[shares.len() / 2],
                    shares[0],
                    shares[shares.len() - 1],
                    chunk_shares[chunk_shares.len() / 2],
                    chunk_shares[0],
                    chunk_shares[chunk_shares.len() - 1],
                );
            }
        }
        rt.block_on(server.shutdown());
        drop(external);
    }
    Ok(())
}

/// The middle value (the upper one of an even count).
fn median(values: &[Duration]) -> Duration {
    let mut v = values.to_vec();
    v.sort();
    v[v.len() / 2]
}

fn mb_per_s(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / 1e6 / t.as_secs_f64()
}

/// Publishes `payload` as 64 KiB QoS 1 messages from one client to another.
async fn plain_publish_loop(broker_url: &str, payload: &[u8]) -> Result<Duration> {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let port: u16 = broker_url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .context("broker URL has no port")?;
    let options = |id: &str| {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_max_packet_size(2 << 20, 2 << 20);
        o.set_keep_alive(Duration::from_secs(30));
        o
    };
    let chunks: Vec<Vec<u8>> = payload.chunks(CHUNK).map(<[u8]>::to_vec).collect();
    let expected = chunks.len() as u64;
    let (sub, mut sub_loop) = AsyncClient::new(options(&format!("bench-sub-{run}")), 100);
    sub.subscribe("bench/plain", QoS::AtLeastOnce).await?;
    let received = Arc::new(AtomicU64::new(0));
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Instant>();
    let r = received.clone();
    tokio::spawn(async move {
        let mut subscribed = Some(subscribed_tx);
        let mut done = Some(done_tx);
        loop {
            match sub_loop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = subscribed.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    if r.fetch_add(1, Ordering::SeqCst) + 1 == expected {
                        if let Some(tx) = done.take() {
                            let _ = tx.send(Instant::now());
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("subscriber: {e}");
                    return;
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
        .await
        .context("no SUBACK")??;
    let (publisher, mut pub_loop) = AsyncClient::new(options(&format!("bench-pub-{run}")), 100);
    tokio::spawn(async move { while pub_loop.poll().await.is_ok() {} });
    let start = Instant::now();
    for c in chunks {
        publisher
            .publish("bench/plain", QoS::AtLeastOnce, false, c)
            .await?;
    }
    let end = tokio::time::timeout(Duration::from_secs(300), done_rx)
        .await
        .context("the plain loop did not deliver every message")??;
    Ok(end - start)
}

struct StagingRun {
    first_transfer: Duration,
    transferred: Duration,
    serving: Duration,
    /// The slowest agent's chunk phase: its transfer created (command checked) → last chunk
    /// written, from its `transfer_completed` event.
    chunk_phase: Duration,
    /// The latest `transfer_started` event's time after the first stage request was sent: the
    /// command's way (API, signature, broker, the agent's checks and durable records).
    command_to_start: Duration,
}

/// Starts `n` agents, stages the bundle to all of them, and times it.
fn stage_to(
    rt: &tokio::runtime::Runtime,
    api: &ApiClient,
    broker_url: &str,
    bundle_id: &str,
    keyring: &protocol::keys::Keyring,
    server_key: protocol::keys::PublicKey,
    n: usize,
    window: u32,
    dir: &std::path::Path,
) -> Result<StagingRun> {
    let mut agents = Vec::new();
    let mut links = Vec::new();
    let prefix = dir
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    for i in 0..n {
        let id = format!("{prefix}-{i:03}");
        let mut config = AgentConfig::new(dir.join(&id));
        config.workers = 1;
        let agent = Arc::new(Agent::open(config, keyring.clone())?);
        let link = {
            let _guard = rt.enter();
            let mut link = LinkConfig::new(broker_url, &id);
            link.window = window;
            link.server_key = Some(server_key);
            Link::start(agent.clone(), link)?
        };
        agents.push((id, agent));
        links.push(link);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while api.get("/api/v1/devices?online=true&limit=1")?["total"]
        .as_u64()
        .unwrap_or(0)
        < n as u64
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let start = Instant::now();
    let start_wall = chrono::Utc::now();
    for (id, _) in &agents {
        let (status, body) = api.post_json(
            &format!("/api/v1/devices/{id}/stage"),
            &json!({ "bundle_id": bundle_id }),
        )?;
        if status != 202 {
            bail!("stage to {id}: {status} {body}");
        }
    }
    let mut first_transfer = None;
    let mut transferred = None;
    let deadline = start + Duration::from_secs(1800);
    loop {
        let done = agents
            .iter()
            .filter(|(_, a)| LinkMetrics::get(&a.link_metrics.transfers_completed_total) > 0)
            .count();
        if done > 0 && first_transfer.is_none() {
            first_transfer = Some(start.elapsed());
        }
        if done == n && transferred.is_none() {
            transferred = Some(start.elapsed());
        }
        let serving = agents
            .iter()
            .filter(|(_, a)| a.registry.get(MODEL).is_some())
            .count();
        if serving == n {
            let serving = start.elapsed();
            rt.block_on(async {
                for l in links {
                    l.shutdown().await;
                }
            });
            let mut chunk_phase = Duration::ZERO;
            let mut command_to_start = Duration::ZERO;
            for (id, agent) in &agents {
                let events = agent.events(0, 10_000)?;
                let seconds = events
                    .iter()
                    .find(|e| e.kind == "transfer_completed")
                    .and_then(|e| e.detail["seconds"].as_f64())
                    .with_context(|| format!("{id} recorded no transfer_completed"))?;
                chunk_phase = chunk_phase.max(Duration::from_secs_f64(seconds));
                let started = events
                    .iter()
                    .find(|e| e.kind == "transfer_started")
                    .with_context(|| format!("{id} recorded no transfer_started"))?;
                let after = (started.time - start_wall).to_std().unwrap_or_default();
                command_to_start = command_to_start.max(after);
            }
            return Ok(StagingRun {
                first_transfer: first_transfer.unwrap_or(serving),
                transferred: transferred.unwrap_or(serving),
                serving,
                chunk_phase,
                command_to_start,
            });
        }
        if Instant::now() > deadline {
            bail!("after 30 min only {done} of {n} transfers completed, {serving} agents serve");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
