//! Cost of the health watch on the serving path (BENCHMARKS.md, "Health watch overhead").
//!
//! ```sh
//! cargo run -p modelfleet-agent --example watch_bench --config 'profile.dev.opt-level=3' \
//!     -- --rounds 10 --per-round 1000     # or --release
//! ```
//!
//! Two agents serve the same `digits_mlp` bundle, one with the watch on (default config) and one
//! with `health_watch = false`. Batch-1 JSON requests with an `id` (so the feedback memory is
//! exercised too) alternate between them in rounds:
//! 1. in process: `agent::http::serve_request` (decode, run, encode, metrics, health) — the work
//!    an inference worker does, without HTTP, so the watch's share is as large as it gets;
//! 2. over loopback HTTP (keep-alive), what a client sees;
//! 3. `Health::observe` alone, best of several timed loops: the watch's own cost per request.
//!
//! Reports median and p95 per mode and the overhead of the medians.

use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let rounds = arg("--rounds", 20);
    let per_round = arg("--per-round", 2000);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model_dir = root.join("examples/models/digits_mlp");
    let work = tempfile::tempdir()?;
    let key = bundler::keygen_files(&work.path().join("keys"), "bench")?;
    let keyring = bundler::load_keyring(&[&key.public])?;
    let bundle = work.path().join("digits_mlp.mfb");
    let mut o = bundler::BuildOptions::new(
        model_dir.join("digits_mlp.onnx"),
        "digits_mlp",
        "1.0.0",
        1,
        &key.secret,
        &bundle,
    );
    o.golden_inputs = Some(model_dir.join("test_input.npy"));
    bundler::build(&o)?;
    let inputs = engine::npy::read_npy(model_dir.join("test_input.npy"))?;
    let x = inputs.as_f32().unwrap();
    let bodies: Vec<Vec<u8>> = (0..450)
        .map(|i| {
            serde_json::to_vec(
                &serde_json::json!({"id": format!("r{i}"), "inputs": [{"name": "input",
                "datatype": "FP32", "shape": [1, 64], "data": &x[i * 64..(i + 1) * 64]}]}),
            )
            .unwrap()
        })
        .collect();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut agents = Vec::new();
    for watch in [true, false] {
        let mut config = agent::AgentConfig::new(work.path().join(format!("data-{watch}")));
        config.workers = 1;
        config.health_watch = watch;
        let a = Arc::new(agent::Agent::open(config, keyring.clone())?);
        a.install(&std::fs::read(&bundle)?)?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let url = format!(
            "http://{}/v2/models/digits_mlp/infer",
            listener.local_addr()?
        );
        listener.set_nonblocking(true)?;
        let app = agent::http::router(a.clone(), None);
        rt.spawn(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(l, app).await.unwrap();
        });
        agents.push((watch, a, url));
    }
    let http = ureq::AgentBuilder::new().build();

    // [mode][watch on/off] -> latencies in µs
    let mut lat = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
    // Requests alternate between the two agents one by one (the order flipping each time), so a
    // busy neighbour on the machine slows both modes alike.
    let models: Vec<_> = agents
        .iter()
        .map(|(_, a, _)| a.registry.get("digits_mlp").unwrap())
        .collect();
    for round in 0..rounds + 1 {
        for i in 0..per_round {
            let body = &bodies[i % bodies.len()];
            let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
            for w in order {
                let t = Instant::now();
                agent::http::serve_request(&models[w], body, None).unwrap();
                let us = t.elapsed().as_secs_f64() * 1e6;
                let t = Instant::now();
                http.post(&agents[w].2)
                    .set("Content-Type", "application/json")
                    .send_bytes(body)?
                    .into_string()?;
                let http_us = t.elapsed().as_secs_f64() * 1e6;
                if round > 0 {
                    // round 0 warms up
                    lat[0][w].push(us);
                    lat[1][w].push(http_us);
                }
            }
        }
    }
    // 3. The watch's own work per request, alone: `Health::observe` on a real request's tensors,
    // timed over many calls (robust to a noisy machine, unlike a difference of two medians).
    let observe_ns = {
        let model = agents[0].1.registry.get("digits_mlp").unwrap();
        let input = engine::Tensor::from_f32(vec![1, 64], x[..64].to_vec()).unwrap();
        let output = model.engine.run(std::slice::from_ref(&input))?;
        let ids: Vec<String> = (0..1000).map(|i| format!("r{i}")).collect();
        let mut best = f64::MAX;
        for _ in 0..rounds.max(3) {
            let t = Instant::now();
            for i in 0..per_round {
                model.health.observe(
                    Some(&ids[i % ids.len()]),
                    std::slice::from_ref(&input),
                    &output,
                    std::time::Duration::from_micros(20),
                );
            }
            best = best.min(t.elapsed().as_secs_f64() * 1e9 / per_round as f64);
        }
        best
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    println!(
        "machine: {cpu}, {} cores; {rounds} rounds x {per_round} requests per mode",
        std::thread::available_parallelism()?.get()
    );
    println!("| path | watch | median µs | p95 µs |");
    println!("|---|---|---|---|");
    for (m, name) in ["in process (serve_request)", "loopback HTTP"]
        .iter()
        .enumerate()
    {
        let mut med = [0.0; 2];
        for w in 0..2 {
            let v = &mut lat[m][w];
            med[w] = percentile(v, 0.5);
            println!(
                "| {name} | {} | {:.1} | {:.1} |",
                if w == 0 { "on" } else { "off" },
                med[w],
                percentile(v, 0.95)
            );
        }
        println!(
            "| {name} | overhead | {:+.1} ({:+.1} %) | |",
            med[0] - med[1],
            (med[0] / med[1] - 1.0) * 100.0
        );
    }
    let off = percentile(&mut lat[0][1], 0.5);
    println!(
        "| `Health::observe` alone (best of {} x {per_round}) | {:.2} µs per request | {:.1} % of the in-process median with the watch off | |",
        rounds.max(3),
        observe_ns / 1e3,
        observe_ns / 1e3 / off * 100.0
    );
    Ok(())
}
