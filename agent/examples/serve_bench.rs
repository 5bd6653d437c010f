//! Serving benchmark of the agent (results in BENCHMARKS.md, "Agent serving").
//!
//! ```sh
//! cargo build --release -p modelfleet-agent --bins --examples
//! target/release/examples/serve_bench [--seconds 3] [--pss-seconds 60]
//! ```
//!
//! 1. Engine vs HTTP: for `digits_mlp` and `digits_cnn`, the median and p95 of the engine alone
//!    (`Model::run`, batch 1) and of a full loopback OIP v2 round trip (JSON body, keep-alive),
//!    interleaved in one run; the overhead is the difference of the medians.
//! 2. Load time: from an installed slot to ready (re-hash, tract load + optimise, golden test).
//! 3. Memory: a `fleet-agent run` child serving `digits_cnn`, PSS from /proc/PID/smaps_rollup
//!    sampled every second, idle and under 50 requests/s.

use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn arg(name: &str, default: f64) -> f64 {
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
    let seconds = arg("--seconds", 3.0);
    let pss_seconds = arg("--pss-seconds", 60.0);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let models = root.join("examples/models");
    let work = tempfile::tempdir()?;
    let key = bundler::keygen_files(&work.path().join("keys"), "bench")?;
    let keyring = bundler::load_keyring(&[&key.public])?;
    let data = work.path().join("data");
    let mut bundles = Vec::new();
    for m in ["digits_mlp", "digits_cnn"] {
        let out = work.path().join(format!("{m}.mfb"));
        let mut o = bundler::BuildOptions::new(
            models.join(m).join(format!("{m}.onnx")),
            m,
            "1.0.0",
            1,
            &key.secret,
            &out,
        );
        o.golden_inputs = Some(models.join(m).join("test_input.npy"));
        bundler::build(&o)?;
        bundles.push((m, out));
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    println!(
        "machine: {cpu}, {} cores",
        std::thread::available_parallelism()?.get()
    );

    // --- 1. engine vs HTTP round trip
    {
        let mut config = agent::AgentConfig::new(&data);
        config.workers = 1;
        // `--no-watch`: the same run without the health watch, to see what it costs.
        config.health_watch = !std::env::args().any(|a| a == "--no-watch");
        let agent = Arc::new(agent::Agent::open(config, keyring.clone())?);
        for (_, b) in &bundles {
            agent.install(&std::fs::read(b)?)?;
        }
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let listener = rt.block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))?;
        let router = agent::http::router(agent.clone(), None);
        rt.spawn(async move { axum::serve(listener, router).await });
        let client = ureq::AgentBuilder::new().build();
        println!(
            "\n| model | engine p50 | engine p95 | HTTP JSON p50 | HTTP JSON p95 | overhead p50 |"
        );
        println!("|---|---|---|---|---|---|");
        for (m, _) in &bundles {
            let served = agent.registry.get(m).unwrap();
            let inputs = engine::npy::read_npy(models.join(m).join("test_input.npy"))?;
            let per: usize = inputs.shape[1..].iter().product();
            let mut shape = inputs.shape.clone();
            shape[0] = 1;
            let x =
                engine::Tensor::from_f32(shape.clone(), inputs.as_f32().unwrap()[..per].to_vec())
                    .unwrap();
            let body = serde_json::json!({"inputs": [{"name": served.manifest.inputs[0].name, "datatype": "FP32",
                                                      "shape": shape, "data": x.as_f32().unwrap()}]})
            .to_string();
            let url = format!("http://127.0.0.1:{port}/v2/models/{m}/infer");
            let (mut eng, mut http) = (Vec::new(), Vec::new());
            let deadline = Instant::now() + Duration::from_secs_f64(seconds);
            // Warm-up, then interleave: 10 engine runs, 10 HTTP requests.
            for _ in 0..200 {
                served.engine.run(std::slice::from_ref(&x))?;
                client.post(&url).send_string(&body)?.into_string()?;
            }
            while Instant::now() < deadline {
                for _ in 0..10 {
                    let t = Instant::now();
                    served.engine.run(std::slice::from_ref(&x))?;
                    eng.push(t.elapsed().as_secs_f64() * 1e6);
                }
                for _ in 0..10 {
                    let t = Instant::now();
                    client
                        .post(&url)
                        .set("Content-Type", "application/json")
                        .send_string(&body)?
                        .into_string()?;
                    http.push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
            let (e50, e95) = (percentile(&mut eng, 0.5), percentile(&mut eng, 0.95));
            let (h50, h95) = (percentile(&mut http, 0.5), percentile(&mut http, 0.95));
            println!(
                "| {m} | {e50:.1} µs | {e95:.1} µs | {h50:.1} µs | {h95:.1} µs | {:.1} µs |",
                h50 - e50
            );
        }
        drop(rt);
    }

    // --- 2. load time from an installed slot (a fresh open re-hashes, loads, self-tests)
    {
        let started = Instant::now();
        let agent = agent::Agent::open(agent::AgentConfig::new(&data), keyring.clone())?;
        let open = started.elapsed();
        println!("\n| model | slot → ready (load + optimise + golden self-test) |");
        println!("|---|---|");
        for m in agent.registry.all() {
            println!("| {} | {:.1} ms |", m.name, m.load_time.as_secs_f64() * 1e3);
        }
        println!(
            "agent open with both models: {:.1} ms",
            open.as_secs_f64() * 1e3
        );
    }

    // --- 3. PSS of a real agent process serving digits_cnn
    let exe = std::env::current_exe()?
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("fleet-agent");
    anyhow::ensure!(
        exe.exists(),
        "{} missing: cargo build --release -p modelfleet-agent --bins",
        exe.display()
    );
    let cnn_only = work.path().join("cnn-only");
    let status = std::process::Command::new(&exe)
        .args([
            "install",
            bundles[1].1.to_str().unwrap(),
            "--data-dir",
            cnn_only.to_str().unwrap(),
        ])
        .args(["--keyring", key.public.to_str().unwrap()])
        .status()?;
    anyhow::ensure!(status.success());
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut child = std::process::Command::new(&exe)
        .args([
            "run",
            "--data-dir",
            cnn_only.to_str().unwrap(),
            "--keyring",
            key.public.to_str().unwrap(),
        ])
        .args(["--listen", &format!("127.0.0.1:{port}"), "--workers", "2"])
        .env("RUST_LOG", "warn")
        .spawn()?;
    let url = format!("http://127.0.0.1:{port}");
    let client = ureq::AgentBuilder::new().build();
    while client
        .get(&format!("{url}/v2/health/ready"))
        .call()
        .is_err()
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let pss = |pid: u32| -> f64 {
        std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Pss:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<f64>().ok())
            })
            .unwrap_or(f64::NAN)
            / 1024.0
    };
    let inputs = engine::npy::read_npy(models.join("digits_cnn/test_input.npy"))?;
    let body = |i: usize| {
        serde_json::json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                                       "data": &inputs.as_f32().unwrap()[(i % 450) * 64..(i % 450 + 1) * 64]}]})
        .to_string()
    };
    // Warm-up: a few hundred requests.
    for i in 0..300 {
        client
            .post(&format!("{url}/v2/models/digits_cnn/infer"))
            .send_string(&body(i))?;
    }
    let sample_for = |secs: f64, rps: f64| -> anyhow::Result<Vec<f64>> {
        let mut samples = Vec::new();
        let start = Instant::now();
        let mut next_sample = start;
        let mut i = 0usize;
        while start.elapsed().as_secs_f64() < secs {
            if rps > 0.0 {
                client
                    .post(&format!("{url}/v2/models/digits_cnn/infer"))
                    .send_string(&body(i))?;
                i += 1;
                let due = start + Duration::from_secs_f64(i as f64 / rps);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            } else {
                std::thread::sleep(Duration::from_millis(100));
            }
            if Instant::now() >= next_sample {
                samples.push(pss(child.id()));
                next_sample += Duration::from_secs(1);
            }
        }
        Ok(samples)
    };
    let idle = sample_for(pss_seconds / 2.0, 0.0)?;
    let loaded = sample_for(pss_seconds / 2.0, 50.0)?;
    let _ = child.kill();
    let _ = child.wait();
    let stats = |v: &[f64]| {
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let max = v.iter().cloned().fold(f64::MIN, f64::max);
        (mean, max, v.len())
    };
    let (im, ix, n1) = stats(&idle);
    let (lm, lx, n2) = stats(&loaded);
    println!("\n| agent process serving digits_cnn | PSS mean | PSS max | samples |");
    println!("|---|---|---|---|");
    println!("| idle | {im:.1} MiB | {ix:.1} MiB | {n1} |");
    println!("| 50 req/s | {lm:.1} MiB | {lx:.1} MiB | {n2} |");
    Ok(())
}
