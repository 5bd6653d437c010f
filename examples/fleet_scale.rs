//! Fleet scale benchmark (issue 10): one fleet server, one broker and N simulated devices on
//! this machine, each in its own process so each one's CPU and memory can be read apart.
//!
//! ```text
//! cargo run --release --example fleet_scale -- [--devices 1000,10000] [--broker embedded,mosquitto]
//!     [--rps 0.2] [--telemetry-seconds 10] [--measure-seconds 60] [--max-in-flight N]
//!     [--sim-workers 8] [--sim-data DIR] [--idle-seconds 10] [--trace] [--fanout-only]
//! cargo run --example fleet_scale -- --smoke     # CI: 1,000 devices, embedded broker, checks
//! ```
//!
//! For each broker and fleet size:
//! 1. **online**: the simulated devices (real agents: own data directory, MQTT session, redb
//!    stores; [`agent::simulate`]) start, in processes of at most 4,000 devices (each device
//!    holds a socket and two database files; the machine allows 20,000 descriptors per
//!    process); measured is the time until the server lists them all online.
//! 2. **fan-out**: a rollout of `digits_cnn` 1.0.0 (a ≈ 100 KB bundle) to every device in one
//!    stage: time from the rollout's creation until every device reports it installed, and the
//!    server's peak RSS (the server streams chunks from its store; it never holds a bundle per
//!    device). Before it the fleet idles online for `--idle-seconds` (no rollout, no API reads)
//!    to measure the server's background; the fan-out's server CPU is then split into that
//!    background times the fan-out's length and the rest, the fan-out's own work, per device and
//!    per message handled (status, events, telemetry and chunk requests received, commands sent,
//!    from the server's `/metrics`).
//! 3. **stages**: a rollout of 1.1.0 (the same model) in stages of 1 %, 10 %, 50 %, 100 % (no
//!    bake; a stage is judged once canaries and control have served 100 requests): per stage,
//!    the time from the stage's decision until all its canaries report installed, and until the
//!    next decision.
//! 4. **steady state**: every device serves `--rps` requests per second and sends a telemetry
//!    window every `--telemetry-seconds`; over `--measure-seconds` the server's, the broker's and
//!    the simulator's CPU (in cores) and RSS, the telemetry the server ingested per second, and
//!    the latency of the API pages the dashboard reads (device list, one rollout, summary).
//!
//! The broker runs as a process of its own in both cases (`embedded` is the fleet server's
//! rumqttd broker started alone, as `fleet-server broker` does), so the server's figures are the
//! server's. Loopback only. Results go to BENCHMARKS.md by hand, with the machine and this
//! command.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use modelfleet::api::ApiClient;
use modelfleet::harness::{free_port, wait_for_port, wait_until, BrokerProcess};

const MODEL: &str = "digits_cnn";
/// Devices per simulator process (file descriptors: a socket and two databases per device).
const DEVICES_PER_PROCESS: usize = 4_000;
/// Tokio worker threads per simulator process. An agent's link session writes its store (a
/// durable redb commit: a disk sync) on the async thread that runs it — a few milliseconds on a
/// device, where nothing else waits. In a simulator, thousands of sessions share the workers, so
/// with as few workers as cores each sync stalls every other device's session, whose MQTT
/// keep-alives then lapse (BENCHMARKS.md, "Fleet scale"). More workers than cores let the syncs
/// of different devices overlap, as on separate devices.
const SIM_WORKERS: usize = 8;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("__broker") => role_broker(&args[1..]),
        Some("__server") => role_server(&args[1..]),
        Some("__sim") => role_sim(&args[1..]),
        _ => drive(&args),
    }
}

/// What one run is asked to do.
#[derive(Debug, Clone)]
struct Settings {
    devices: Vec<usize>,
    brokers: Vec<String>,
    rps: f64,
    telemetry_seconds: u64,
    measure_seconds: u64,
    smoke: bool,
    /// Print a time series of the fan-out (`--trace`): the server's, the agents' and the
    /// machine's counters every 2 s.
    trace: bool,
    /// Stop after the fan-out (`--fanout-only`).
    fanout_only: bool,
    /// The rollouts' `max_in_flight` (`--max-in-flight`; the server's default if not given).
    max_in_flight: Option<u32>,
    /// Tokio worker threads per simulator process (`--sim-workers`).
    sim_workers: usize,
    /// Seconds the fleet idles online before the fan-out, to measure the server's background
    /// (`--idle-seconds`).
    idle_seconds: u64,
    /// Where the simulated devices' data directories go (`--sim-data`; default: the run's
    /// temporary directory under the system's temp dir).
    sim_data: Option<PathBuf>,
}

fn parse(args: &[String]) -> Result<Settings> {
    let mut s = Settings {
        devices: vec![1_000, 10_000],
        brokers: vec!["embedded".into(), "mosquitto".into()],
        rps: 0.2,
        telemetry_seconds: 10,
        measure_seconds: 60,
        smoke: false,
        trace: false,
        fanout_only: false,
        max_in_flight: None,
        sim_workers: SIM_WORKERS,
        idle_seconds: 10,
        sim_data: None,
    };
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--trace" || args[i] == "--fanout-only" {
            s.trace |= args[i] == "--trace";
            s.fanout_only |= args[i] == "--fanout-only";
            i += 1;
            continue;
        }
        if args[i] == "--smoke" {
            s.smoke = true;
            s.devices = vec![1_000];
            s.brokers = vec!["embedded".into()];
            s.telemetry_seconds = 2;
            s.measure_seconds = 10;
            s.rps = 1.0;
            s.idle_seconds = 2;
            i += 1;
            continue;
        }
        let value = args
            .get(i + 1)
            .with_context(|| format!("{} needs a value", args[i]))?;
        match args[i].as_str() {
            "--devices" => {
                s.devices = value
                    .split(',')
                    .map(|v| v.parse().context("--devices takes numbers: 1000,10000"))
                    .collect::<Result<_>>()?
            }
            "--broker" => s.brokers = value.split(',').map(str::to_string).collect(),
            "--sim-workers" => s.sim_workers = value.parse().context("--sim-workers")?,
            "--sim-data" => s.sim_data = Some(PathBuf::from(value)),
            "--idle-seconds" => s.idle_seconds = value.parse().context("--idle-seconds")?,
            "--max-in-flight" => {
                s.max_in_flight = Some(value.parse().context("--max-in-flight takes a number")?)
            }
            "--rps" => s.rps = value.parse().context("--rps takes a number")?,
            "--telemetry-seconds" => {
                s.telemetry_seconds = value.parse().context("--telemetry-seconds")?
            }
            "--measure-seconds" => {
                s.measure_seconds = value.parse().context("--measure-seconds")?
            }
            other => bail!(
                "unknown flag {other}: use --devices 1000,10000 --broker embedded,mosquitto \
                 --rps 0.2 --telemetry-seconds 10 --measure-seconds 60 [--max-in-flight N] [--sim-workers N] [--sim-data DIR] [--idle-seconds S] [--trace] [--fanout-only], or --smoke"
            ),
        }
        i += 2;
    }
    Ok(s)
}

fn drive(args: &[String]) -> Result<()> {
    let settings = parse(args)?;
    println!("machine: {}", machine());
    println!("settings: {settings:?}");
    let mut rows = Vec::new();
    for broker in &settings.brokers {
        for &n in &settings.devices {
            println!("\n== {n} devices, broker {broker}");
            let row =
                run(&settings, broker, n).with_context(|| format!("{n} devices on {broker}"))?;
            println!("{}", serde_json::to_string(&row)?);
            rows.push(row);
        }
    }
    println!("\nsummary:");
    for r in &rows {
        println!("{}", serde_json::to_string(r)?);
    }
    Ok(())
}

/// The processes of one run; killed when dropped.
#[derive(Default)]
struct Processes {
    children: Vec<Child>,
    mosquitto: Option<BrokerProcess>,
}

impl Drop for Processes {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(m) = &mut self.mosquitto {
            m.kill();
        }
    }
}

fn run(s: &Settings, broker: &str, n: usize) -> Result<Value> {
    let work = tempfile::Builder::new()
        .prefix("modelfleet-fleet-scale-")
        .tempdir()?;
    let dir = work.path();
    // Dropped (deleted) after the processes, which are declared after it.
    let sim_work = match &s.sim_data {
        Some(d) => Some(
            tempfile::Builder::new()
                .prefix("modelfleet-fleet-scale-sim-")
                .tempdir_in(d)
                .with_context(|| format!("--sim-data {}", d.display()))?,
        ),
        None => None,
    };
    let sim_dir = sim_work.as_ref().map_or(dir, |w| w.path());
    let me = std::env::current_exe()?;
    let mut procs = Processes::default();

    let key = bundler::keygen_files(&dir.join("keys"), "bench")?;
    let bundles: Vec<Vec<u8>> = ["1.0.0", "1.1.0"]
        .iter()
        .map(|v| build_bundle(dir, &key.secret, v))
        .collect::<Result<_>>()?;

    // The broker.
    let (broker_url, broker_pid) = match broker {
        "embedded" => {
            let port = free_port();
            let child = Command::new(&me)
                .args(["__broker", &format!("127.0.0.1:{port}")])
                .stdin(Stdio::null())
                .spawn()?;
            let pid = child.id();
            procs.children.push(child);
            wait_for_port(port, Duration::from_secs(20))?;
            (format!("mqtt://127.0.0.1:{port}"), pid)
        }
        "mosquitto" => {
            let m = BrokerProcess::mosquitto(&dir.join("mosquitto"), None, false)?;
            let url = m.url();
            let pid = pid_listening_on(m.port()).context("mosquitto's pid")?;
            procs.mosquitto = Some(m);
            (url, pid)
        }
        other => bail!("unknown broker {other}: embedded or mosquitto"),
    };

    // The server.
    let mut server = Command::new(&me)
        .arg("__server")
        .arg(dir.join("server"))
        .arg(&key.public)
        .arg(&broker_url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    let server_pid = server.id();
    let hello = first_json_line(server.stdout.take().context("server stdout")?)?;
    procs.children.push(server);
    let api = ApiClient::new(
        hello["http"].as_str().context("server url")?,
        hello["token"].as_str().context("server token")?,
    );
    let server_pub = dir.join("server").join("server.pub");

    // The simulated devices.
    let started = Instant::now();
    let mut sim_pids = Vec::new();
    let processes = n.div_ceil(DEVICES_PER_PROCESS);
    for p in 0..processes {
        let count = (n - p * DEVICES_PER_PROCESS).min(DEVICES_PER_PROCESS);
        let child = Command::new(&me)
            .arg("__sim")
            .arg(count.to_string())
            .arg(format!("s{p}"))
            .arg(&broker_url)
            .arg(&key.public)
            .arg(&server_pub)
            .arg(sim_dir.join(format!("fleet-{p}")))
            .arg(s.rps.to_string())
            .arg(s.telemetry_seconds.to_string())
            .arg(s.sim_workers.to_string())
            .stdin(Stdio::null())
            .spawn()?;
        sim_pids.push(child.id());
        procs.children.push(child);
    }
    let online_timeout = Duration::from_secs(60 + n as u64 / 20);
    wait_until("every device online", online_timeout, || {
        let v = api.get("/api/v1/devices?online=true&limit=1").ok()?;
        (v["total"] == n).then_some(())
    })?;
    let online_s = started.elapsed().as_secs_f64();
    let sim_rss_online_kb = sim_pids
        .iter()
        .map(|p| proc_status_kb(*p, "VmRSS"))
        .sum::<Result<u64>>()?;
    println!(
        "online: {n} devices after {online_s:.1} s; simulator RSS {} MB",
        sim_rss_online_kb / 1024
    );

    // The server's own background with the fleet online and nothing asked of it (no rollout,
    // no API reads): what a fan-out that takes longer pays for longer, apart from its own work.
    let idle = Duration::from_secs(s.idle_seconds);
    let idle_ticks_before = cpu_ticks(server_pid)?;
    std::thread::sleep(idle);
    let idle_server_cores = (cpu_ticks(server_pid)? - idle_ticks_before) as f64
        / clock_ticks_per_second()
        / idle.as_secs_f64().max(1e-9);

    // Fan-out: 1.0.0 to everyone in one stage.
    let v1 = api.upload(&bundles[0])?;
    // The same model under a new version number: these gates measure the machinery, not the
    // model (a 1 % stage sees a few dozen requests, whose class mix varies by chance).
    let gates = json!({"min_requests_per_cohort": 100, "latency_floor_ms": 50.0,
                       "max_prediction_psi": 1.0});
    let started = Instant::now();
    let server_ticks_before = cpu_ticks(server_pid)?;
    let messages_before = MessageCounts::take(&api)?;
    let mut spec = json!({
        "bundle_id": v1, "gates": gates, "stages": [{"percent": 100, "bake_seconds": 0}],
    });
    if let Some(m) = s.max_in_flight {
        spec["max_in_flight"] = m.into();
    }
    let first = api.create_rollout(&spec)?;
    let install_timeout = Duration::from_secs(120 + n as u64 / 10);
    let mut server_peak_rss = 0;
    let sim_roots: Vec<PathBuf> = (0..processes)
        .map(|p| sim_dir.join(format!("fleet-{p}")))
        .collect();
    let mut trace = s
        .trace
        .then(|| FanoutTrace::new(started, [server_pid, broker_pid], &sim_pids, sim_roots));
    // The rollout page reads every device record (tens of milliseconds at 10,000 devices):
    // asked twice a second, as a watching dashboard might, not twenty times, so the benchmark's
    // own polling does not take the server's CPU from the fan-out it measures.
    let mut polled: Option<Instant> = None;
    wait_until("the fan-out rollout to succeed", install_timeout, || {
        server_peak_rss = server_peak_rss.max(proc_status_kb(server_pid, "VmRSS").unwrap_or(0));
        if let Some(t) = &mut trace {
            t.sample(&api);
        }
        if polled.is_some_and(|t| t.elapsed() < Duration::from_millis(500)) {
            return None;
        }
        polled = Some(Instant::now());
        let r = api
            .get(&format!("/api/v1/rollouts/{first}?devices=false"))
            .ok()?;
        match r["state"].as_str() {
            Some("succeeded") => Some(Ok(())),
            Some("running" | "pending") => None,
            _ => Some(Err(anyhow::anyhow!("fan-out rollout ended {}", r["state"]))),
        }
    })??;
    let fanout_s = started.elapsed().as_secs_f64();
    let fanout_server_cpu_s =
        (cpu_ticks(server_pid)? - server_ticks_before) as f64 / clock_ticks_per_second();
    let messages = MessageCounts::take(&api)?.since(&messages_before);
    println!(
        "fan-out: {MODEL} 1.0.0 ({} bytes) on all {n} devices after {fanout_s:.1} s; server CPU \
         {fanout_server_cpu_s:.1} s, peak RSS {} MB",
        bundles[0].len(),
        server_peak_rss / 1024
    );
    let fanout_accounting =
        messages.accounting(n, fanout_server_cpu_s, fanout_s, idle_server_cores);
    println!("fan-out accounting: {fanout_accounting}");

    if let Some(t) = &trace {
        t.print();
    }
    if s.fanout_only {
        return Ok(
            json!({"broker": broker, "devices": n, "online_s": round(online_s),
                         "fanout_s": round(fanout_s),
                         "fanout_server_cpu_s": round(fanout_server_cpu_s),
                         "fanout_accounting": fanout_accounting}),
        );
    }

    // Stages: 1.1.0 in 1 %, 10 %, 50 %, 100 %.
    let v2 = api.upload(&bundles[1])?;
    let stages = [1u64, 10, 50, 100];
    let mut spec = json!({
        "bundle_id": v2, "gates": gates,
        "stages": stages.iter().map(|p| json!({"percent": p, "bake_seconds": 0})).collect::<Vec<_>>(),
    });
    if let Some(m) = s.max_in_flight {
        spec["max_in_flight"] = m.into();
    }
    let staged = api.create_rollout(&spec)?;
    let stage_times = watch_stages(&api, &staged, n, &stages, install_timeout, || {
        server_peak_rss = server_peak_rss.max(proc_status_kb(server_pid, "VmRSS").unwrap_or(0));
    })?;
    for (i, (installed, decided)) in stage_times.iter().enumerate() {
        println!(
            "stage {} ({} %): canaries installed after {installed:.1} s, next decision after {decided:.1} s",
            i, stages[i]
        );
    }

    // Steady state.
    std::thread::sleep(Duration::from_secs(2 * s.telemetry_seconds));
    let telemetry = |api: &ApiClient| -> Result<f64> {
        metric(
            api,
            "fleet_mqtt_messages_received_total{channel=\"telemetry\"}",
        )
    };
    let window = Duration::from_secs(s.measure_seconds);
    let before = Sample::take(server_pid, broker_pid, &sim_pids, telemetry(&api)?)?;
    let t0 = Instant::now();
    let mut pages = Pages::default();
    while t0.elapsed() < window {
        pages.time(&api, n, &staged)?;
        std::thread::sleep(Duration::from_millis(500));
    }
    let after = Sample::take(server_pid, broker_pid, &sim_pids, telemetry(&api)?)?;
    let secs = t0.elapsed().as_secs_f64();
    let ingest = (after.telemetry - before.telemetry) / secs;
    let row = json!({
        "broker": broker,
        "devices": n,
        "online_s": round(online_s),
        "fanout_s": round(fanout_s),
        "fanout_server_cpu_s": round(fanout_server_cpu_s),
        "fanout_accounting": fanout_accounting,
        "bundle_bytes": bundles[0].len(),
        "stages": stage_times.iter().zip(stages).map(|((i, d), p)| json!({"percent": p, "installed_s": round(*i), "decided_s": round(*d)})).collect::<Vec<_>>(),
        "server_cpu_cores": round(after.cpu(&before, "server", secs)),
        "server_rss_mb": after.server_rss_kb / 1024,
        "server_peak_rss_mb": server_peak_rss.max(after.server_rss_kb) / 1024,
        "broker_cpu_cores": round(after.cpu(&before, "broker", secs)),
        "broker_rss_mb": after.broker_rss_kb / 1024,
        "sim_cpu_cores": round(after.cpu(&before, "sim", secs)),
        "sim_rss_mb": after.sim_rss_kb / 1024,
        "sim_rss_online_mb": sim_rss_online_kb / 1024,
        "telemetry_per_s": round(ingest),
        "telemetry_expected_per_s": round(n as f64 / s.telemetry_seconds as f64),
        "api_ms": pages.summary(),
        "measure_s": round(secs),
    });
    if s.smoke {
        smoke_checks(s, n, &row)?;
    }
    drop(procs);
    Ok(row)
}

/// The smoke run's pass marks: generous (debug build, shared CI machine), so that only a real
/// regression — devices that do not come online, a rollout that stalls, telemetry that does not
/// arrive, a page that takes seconds — fails CI.
fn smoke_checks(s: &Settings, n: usize, row: &Value) -> Result<()> {
    let expected = n as f64 / s.telemetry_seconds as f64;
    let got = row["telemetry_per_s"].as_f64().unwrap_or(0.0);
    ensure!(
        got >= 0.5 * expected,
        "telemetry ingest {got:.0}/s is under half the {expected:.0}/s {n} devices send"
    );
    ensure!(
        row["fanout_s"].as_f64().unwrap_or(f64::MAX) < 120.0,
        "the fan-out to {n} devices took {} s (smoke limit 120 s)",
        row["fanout_s"]
    );
    for (page, figures) in row["api_ms"].as_object().context("api figures")? {
        let p95 = figures["p95"].as_f64().unwrap_or(f64::MAX);
        ensure!(p95 < 2_000.0, "GET {page}: p95 {p95} ms (smoke limit 2 s)");
    }
    println!("smoke checks passed");
    Ok(())
}

/// Per stage: (seconds from the stage's decision until its canaries are all installed,
/// seconds until the next decision or the end).
fn watch_stages(
    api: &ApiClient,
    id: &str,
    n: usize,
    stages: &[u64],
    timeout: Duration,
    mut also: impl FnMut(),
) -> Result<Vec<(f64, f64)>> {
    let mut times = Vec::new();
    let mut stage = 0usize;
    let mut stage_started = Instant::now();
    let mut installed_at: Option<f64> = None;
    let deadline = Instant::now() + timeout;
    loop {
        ensure!(
            Instant::now() < deadline,
            "rollout {id} did not finish in {timeout:?}"
        );
        also();
        // Without the map of every device: the bench's polling is not the fan-out's cost.
        let r = api.get(&format!("/api/v1/rollouts/{id}?devices=false"))?;
        let state = r["state"].as_str().unwrap_or("");
        let now_stage = r["stage"].as_u64().unwrap_or(0) as usize;
        // A stage of p % has ⌈n·p/100⌉ canaries (those of the earlier stages among them).
        let expected = (n as u64 * stages[stage.min(stages.len() - 1)]).div_ceil(100);
        let installed = r["cohorts"]["canary"]["installed"].as_u64().unwrap_or(0);
        if installed_at.is_none() && now_stage == stage && installed >= expected {
            installed_at = Some(stage_started.elapsed().as_secs_f64());
        }
        if now_stage != stage || state == "succeeded" {
            let decided = stage_started.elapsed().as_secs_f64();
            times.push((installed_at.unwrap_or(decided), decided));
            if state == "succeeded" {
                ensure!(
                    times.len() == stages.len(),
                    "succeeded after {} stages",
                    times.len()
                );
                return Ok(times);
            }
            stage = now_stage;
            stage_started = Instant::now();
            installed_at = None;
        }
        if !matches!(state, "running" | "pending" | "succeeded") {
            bail!("staged rollout ended {state}: {}", r["decisions"]);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Latencies of the pages the dashboard reads, per page.
#[derive(Default)]
struct Pages {
    times: std::collections::BTreeMap<&'static str, Vec<f64>>,
}

impl Pages {
    fn time(&mut self, api: &ApiClient, n: usize, rollout: &str) -> Result<()> {
        let offset = (self.times.values().map(Vec::len).sum::<usize>() * 97) % n.max(1);
        let pages: [(&'static str, String); 3] = [
            (
                "/api/v1/devices?limit=100&offset=…",
                format!("/api/v1/devices?limit=100&offset={offset}"),
            ),
            (
                "/api/v1/rollouts/{id}",
                format!("/api/v1/rollouts/{rollout}"),
            ),
            ("/api/v1/fleet/summary", "/api/v1/fleet/summary".to_string()),
        ];
        for (name, path) in pages {
            let t = Instant::now();
            api.get(&path)?;
            self.times
                .entry(name)
                .or_default()
                .push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(())
    }

    fn summary(&self) -> Value {
        let mut out = serde_json::Map::new();
        for (name, times) in &self.times {
            let mut t = times.clone();
            t.sort_by(f64::total_cmp);
            let q = |p: f64| t[((t.len() - 1) as f64 * p).round() as usize];
            out.insert(
                name.to_string(),
                json!({"p50": round(q(0.5)), "p95": round(q(0.95)), "calls": t.len()}),
            );
        }
        Value::Object(out)
    }
}

/// CPU ticks and RSS of the three kinds of process at one moment, and the telemetry counter.
struct Sample {
    ticks: [u64; 3],
    server_rss_kb: u64,
    broker_rss_kb: u64,
    sim_rss_kb: u64,
    telemetry: f64,
}

impl Sample {
    fn take(server: u32, broker: u32, sims: &[u32], telemetry: f64) -> Result<Sample> {
        let sim_ticks = sims.iter().map(|p| cpu_ticks(*p)).sum::<Result<u64>>()?;
        Ok(Sample {
            ticks: [cpu_ticks(server)?, cpu_ticks(broker)?, sim_ticks],
            server_rss_kb: proc_status_kb(server, "VmRSS")?,
            broker_rss_kb: proc_status_kb(broker, "VmRSS")?,
            sim_rss_kb: sims
                .iter()
                .map(|p| proc_status_kb(*p, "VmRSS"))
                .sum::<Result<u64>>()?,
            telemetry,
        })
    }

    /// Cores used by `who` between `before` and this sample, `secs` apart.
    fn cpu(&self, before: &Sample, who: &str, secs: f64) -> f64 {
        let i = match who {
            "server" => 0,
            "broker" => 1,
            _ => 2,
        };
        (self.ticks[i] - before.ticks[i]) as f64 / clock_ticks_per_second() / secs
    }
}

/// utime + stime of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, i.e. 12 and 13 after the name.
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

fn proc_status_kb(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("{field} of process {pid}"))
}

/// The fan-out as a time series (`--trace`): every 2 s, counters of the server (its
/// `/metrics`), of the simulated agents' links (summed per simulator process, see
/// [`write_link_metrics`]), of the machine (`/proc/stat`, `/proc/diskstats`) and each process's
/// CPU. Printed as one table once the fan-out is over.
struct FanoutTrace {
    started: Instant,
    last: Option<Instant>,
    pids: Vec<u32>,
    sim_roots: Vec<PathBuf>,
    rows: Vec<Vec<String>>,
}

/// Server samples in the trace: column name and the `/metrics` sample (a prefix: labelled
/// samples of it are summed).
const TRACE_SERVER: [(&str, &str); 9] = [
    ("cmd", "fleet_commands_sent_total"),
    ("cmd_resent", "fleet_commands_resent_total"),
    (
        "req_in",
        "fleet_mqtt_messages_received_total{channel=\"transfer_req\"}",
    ),
    ("req_dropped", "fleet_chunk_requests_dropped_total"),
    ("chunks_out", "fleet_chunks_served_total"),
    (
        "events_in",
        "fleet_mqtt_messages_received_total{channel=\"events\"}",
    ),
    (
        "status_in",
        "fleet_mqtt_messages_received_total{channel=\"status\"}",
    ),
    ("conn_err", "fleet_mqtt_connection_errors_total"),
    ("bulk_err", "fleet_mqtt_bulk_connection_errors_total"),
];

/// Agent link counters in the trace (summed over the simulated fleet).
const TRACE_AGENT: [(&str, &str); 10] = [
    ("a_conn_err", "connection_errors_total"),
    ("a_cmd", "commands_total"),
    ("a_replay", "commands_refused_replayed_total"),
    ("a_req", "chunk_requests_total"),
    ("a_timeout", "chunk_request_timeouts_total"),
    ("a_chunks", "chunks_received_total"),
    ("a_dup", "chunks_duplicate_total"),
    ("a_done", "transfers_completed_total"),
    ("a_ev", "events_published_total"),
    ("a_ev_ack", "events_acked_total"),
];

impl FanoutTrace {
    fn new(
        started: Instant,
        others: [u32; 2],
        sims: &[u32],
        sim_roots: Vec<PathBuf>,
    ) -> FanoutTrace {
        FanoutTrace {
            started,
            last: None,
            pids: others.iter().chain(sims).copied().collect(),
            sim_roots,
            rows: Vec::new(),
        }
    }

    fn header(&self) -> Vec<String> {
        let mut h = vec!["s".to_string()];
        h.extend(TRACE_SERVER.iter().map(|(c, _)| c.to_string()));
        h.extend(TRACE_AGENT.iter().map(|(c, _)| c.to_string()));
        h.extend(
            [
                "usr%", "sys%", "iowait%", "flushes", "cpu_srv", "cpu_brk", "cpu_sims",
            ]
            .map(String::from),
        );
        h
    }

    /// Takes a row if 2 s have passed since the last one. Missing figures are `-`.
    fn sample(&mut self, api: &ApiClient) {
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(2))
        {
            return;
        }
        self.last = Some(Instant::now());
        let mut row = vec![format!("{:.0}", self.started.elapsed().as_secs_f64())];
        let text = metrics_text(api).unwrap_or_default();
        for (_, sample) in TRACE_SERVER {
            let sum: f64 = text
                .lines()
                .filter_map(|l| l.strip_prefix(sample))
                .filter_map(|rest| rest.trim().parse::<f64>().ok())
                .sum();
            row.push(format!("{sum:.0}"));
        }
        let mut agents = vec![0u64; TRACE_AGENT.len()];
        for root in &self.sim_roots {
            let text = std::fs::read_to_string(root.join(LINK_METRICS_FILE)).unwrap_or_default();
            for line in text.lines() {
                let Some((name, v)) = line.split_once(' ') else {
                    continue;
                };
                if let Some(i) = TRACE_AGENT.iter().position(|(_, n)| *n == name) {
                    agents[i] += v.parse::<u64>().unwrap_or(0);
                }
            }
        }
        row.extend(agents.iter().map(u64::to_string));
        // Machine CPU since boot, as shares; the printed table turns them into per-row shares.
        let cpu: Vec<u64> = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|t| {
                let l = t.lines().next()?.strip_prefix("cpu ")?.to_string();
                Some(
                    l.split_whitespace()
                        .filter_map(|v| v.parse().ok())
                        .collect(),
                )
            })
            .unwrap_or_default();
        for i in [0usize, 2, 4] {
            row.push(cpu.get(i).map_or("-".into(), u64::to_string));
        }
        row.push(cpu.iter().take(8).sum::<u64>().to_string());
        // Flush requests completed, summed over whole disks (field 16 of /proc/diskstats).
        let flushes: u64 = std::fs::read_to_string("/proc/diskstats")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let name = f.get(2)?;
                let whole =
                    name.starts_with("vd") || name.starts_with("sd") || name.starts_with("nvme");
                let partition = name.chars().last()?.is_ascii_digit() && !name.starts_with("nvme");
                (whole && !partition).then(|| f.get(18)?.parse::<u64>().ok())?
            })
            .sum();
        row.push(flushes.to_string());
        let ticks = |p: &u32| cpu_ticks(*p).unwrap_or(0);
        row.push(ticks(&self.pids[0]).to_string());
        row.push(ticks(&self.pids[1]).to_string());
        row.push(self.pids[2..].iter().map(ticks).sum::<u64>().to_string());
        self.rows.push(row);
    }

    /// Prints the rows: counters as they were, CPU as shares and seconds of the interval since
    /// the previous row, flushes per interval.
    fn print(&self) {
        let header = self.header();
        let n_counters = 1 + TRACE_SERVER.len() + TRACE_AGENT.len();
        let hz = clock_ticks_per_second();
        println!("fan-out trace (counters cumulative; CPU and flushes per interval):");
        println!("{}", header.join("\t"));
        for pair in self.rows.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let num = |r: &Vec<String>, i: usize| r[i].parse::<f64>().unwrap_or(0.0);
            let mut out: Vec<String> = b[..n_counters].to_vec();
            let total = num(b, n_counters + 3) - num(a, n_counters + 3);
            for i in 0..3 {
                let d = num(b, n_counters + i) - num(a, n_counters + i);
                out.push(format!("{:.0}", 100.0 * d / total.max(1.0)));
            }
            out.push(format!(
                "{:.0}",
                num(b, n_counters + 4) - num(a, n_counters + 4)
            ));
            for i in 5..8 {
                out.push(format!(
                    "{:.1}",
                    (num(b, n_counters + i) - num(a, n_counters + i)) / hz
                ));
            }
            println!("{}", out.join("\t"));
        }
    }
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The pid of the process listening on loopback `port` (Mosquitto is started by the harness).
fn pid_listening_on(port: u16) -> Result<u32> {
    let out = Command::new("ss")
        .args(["-ltnpH", &format!("sport = :{port}")])
        .output()
        .context("running ss")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("pid=")
        .nth(1)
        .and_then(|s| s.split(',').next()?.parse().ok())
        .with_context(|| format!("no process listens on port {port}: {text}"))
}

/// The value of the Prometheus sample `name{labels}` on the server's `/metrics`.
/// What the server received and sent, from its `/metrics` counters.
#[derive(Debug, Clone, Copy, Default)]
struct MessageCounts {
    status: f64,
    events: f64,
    telemetry: f64,
    chunk_requests: f64,
    commands: f64,
}

impl MessageCounts {
    fn take(api: &ApiClient) -> Result<MessageCounts> {
        let text = metrics_text(api)?;
        let get = |sample: &str| sample_in(&text, sample);
        let received = |channel: &str| {
            get(&format!(
                "fleet_mqtt_messages_received_total{{channel=\"{channel}\"}}"
            ))
        };
        Ok(MessageCounts {
            status: received("status")?,
            events: received("events")?,
            telemetry: received("telemetry")?,
            chunk_requests: received("transfer_req")?,
            commands: get("fleet_commands_sent_total")?,
        })
    }

    fn since(&self, before: &MessageCounts) -> MessageCounts {
        MessageCounts {
            status: self.status - before.status,
            events: self.events - before.events,
            telemetry: self.telemetry - before.telemetry,
            chunk_requests: self.chunk_requests - before.chunk_requests,
            commands: self.commands - before.commands,
        }
    }

    fn total(&self) -> f64 {
        self.status + self.events + self.telemetry + self.chunk_requests + self.commands
    }

    /// The fan-out's server CPU split into the fleet's idle background (the idle rate times the
    /// fan-out's length) and the rest, per device and per message handled.
    fn accounting(&self, n: usize, cpu_s: f64, fanout_s: f64, idle_cores: f64) -> Value {
        let background_s = idle_cores * fanout_s;
        let work_s = (cpu_s - background_s).max(0.0);
        let per_device = |x: f64| round(x / n.max(1) as f64);
        json!({
            "messages_per_device": {
                "status": per_device(self.status), "events": per_device(self.events),
                "telemetry": per_device(self.telemetry),
                "chunk_requests": per_device(self.chunk_requests),
                "commands": per_device(self.commands),
            },
            "idle_server_cores": (idle_cores * 1e4).round() / 1e4,
            "background_cpu_s": round(background_s),
            "work_cpu_s": round(work_s),
            "work_cpu_ms_per_device": round(work_s * 1e3 / n.max(1) as f64),
            "work_cpu_us_per_message": round(work_s * 1e6 / self.total().max(1.0)),
        })
    }
}

fn metric(api: &ApiClient, sample: &str) -> Result<f64> {
    sample_in(&metrics_text(api)?, sample)
}

/// The value of `sample` (a metric name with its labels) in a `/metrics` page.
fn sample_in(text: &str, sample: &str) -> Result<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .with_context(|| format!("{sample} is not on /metrics"))
}

/// The server's `/metrics` page.
fn metrics_text(api: &ApiClient) -> Result<String> {
    Ok(ureq::get(&format!("{}/metrics", api.base))
        .call()?
        .into_string()?)
}

fn first_json_line(out: ChildStdout) -> Result<Value> {
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    serde_json::from_str(&line).with_context(|| format!("the server said {line:?}"))
}

fn build_bundle(dir: &Path, secret: &Path, version: &str) -> Result<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("examples/models").join(MODEL);
    let out = dir.join(format!("{MODEL}-{version}.mfb"));
    let mut opts = bundler::BuildOptions::new(
        src.join(format!("{MODEL}.onnx")),
        MODEL,
        version,
        1,
        secret,
        &out,
    );
    opts.golden_inputs = Some(src.join("test_input.npy"));
    opts.golden_max = 20;
    opts.latency_runs = 2;
    bundler::build(&opts)?;
    Ok(std::fs::read(out)?)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split(':')
                    .nth(1)
                    .map(str::trim)
                    .map(String::from)
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

// ---- the child processes ----

/// `__broker ADDR`: the fleet server's embedded rumqttd broker alone.
fn role_broker(args: &[String]) -> Result<()> {
    let addr = args.first().context("__broker ADDR")?.parse()?;
    let _broker = fleet_server::broker::EmbeddedBroker::start(addr)?;
    loop {
        std::thread::park();
    }
}

/// `__server DATA_DIR KEYRING.pub BROKER_URL`: a fleet server on a free port; prints
/// `{"http": URL, "token": ADMIN_TOKEN}` once it is up.
fn role_server(args: &[String]) -> Result<()> {
    let [data_dir, keyring, broker] = args else {
        bail!("__server DATA_DIR KEYRING BROKER_URL")
    };
    let keyring = bundler::load_keyring(&[&PathBuf::from(keyring)])?;
    let mut config = fleet_server::ServerConfig::new(data_dir, keyring);
    config.broker = fleet_server::BrokerChoice::External(fleet_server::BrokerConnection::plain(
        broker.as_str(),
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let server = fleet_server::Server::start(config).await?;
        println!(
            "{}",
            json!({"http": server.http_url(), "token": server.admin_token()})
        );
        std::future::pending::<()>().await;
        anyhow::Ok(())
    })
}

/// Where a simulator process keeps the sum of its devices' link counters (in its data root).
const LINK_METRICS_FILE: &str = "link-metrics.txt";

/// Every second, the sum of every device's link counters as `name value` lines, replaced whole
/// (temp + rename) so a reader never sees half of it.
fn write_link_metrics(links: &[std::sync::Arc<agent::link::LinkMetrics>], path: &Path) {
    let tmp = path.with_extension("tmp");
    loop {
        let mut sums: Vec<(&str, u64)> = Vec::new();
        for l in links {
            for (i, (name, v)) in l.snapshot().into_iter().enumerate() {
                match sums.get_mut(i) {
                    Some(s) => s.1 += v,
                    None => sums.push((name, v)),
                }
            }
        }
        let text: String = sums.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// `__sim COUNT PREFIX BROKER_URL KEYRING.pub SERVER.pub DATA_ROOT RPS TELEMETRY_SECONDS
/// WORKERS`.
fn role_sim(args: &[String]) -> Result<()> {
    let [count, prefix, broker, keyring, server_pub, data_root, rps, telemetry, workers] = args
    else {
        bail!(
            "__sim COUNT PREFIX BROKER_URL KEYRING SERVER_PUB DATA_ROOT RPS TELEMETRY_SECONDS \
             WORKERS"
        )
    };
    let keyring = bundler::load_keyring(&[&PathBuf::from(keyring)])?;
    let server_key =
        protocol::command_auth::server_key_from_file_text(&std::fs::read_to_string(server_pub)?)?;
    std::fs::create_dir_all(data_root)?;
    let mut config =
        agent::simulate::SimConfig::new(count.parse()?, broker, keyring, data_root.into());
    config.id_prefix = prefix.clone();
    config.rps = rps.parse()?;
    config.agent.telemetry_window = Duration::from_secs(telemetry.parse()?);
    // Thousands of devices each looking at their trials and their link ten times a second (the
    // defaults) saturate two cores (load above 1,000 at 7,500 devices): once a second here.
    config.agent.watch_tick = Duration::from_secs(1);
    let mut link = agent::link::LinkConfig::new(broker.as_str(), "");
    link.tick = Duration::from_secs(1);
    config.link = Some(link);
    config.server_key = Some(server_key);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.parse()?)
        .enable_all()
        .build()?;
    let metrics_file = PathBuf::from(data_root).join(LINK_METRICS_FILE);
    rt.block_on(async {
        let fleet = agent::simulate::SimFleet::start(&config)?;
        let links: Vec<_> = fleet
            .devices
            .iter()
            .map(|d| d.agent.link_metrics.clone())
            .collect();
        std::thread::spawn(move || write_link_metrics(&links, &metrics_file));
        std::future::pending::<()>().await;
        anyhow::Ok(())
    })
}
