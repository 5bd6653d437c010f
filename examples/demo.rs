//! `cargo run --release --example demo`: modelfleet end to end on one machine, no set-up.
//!
//! 1. generate a signing key; bundle the `digits_cnn` reference model as 1.0.0 and a regressed
//!    build of it (`digits_cnn_perturbed`, weights damaged: accuracy 0.07) as 2.0.0;
//! 2. start the fleet server with its embedded MQTT broker and its API on free loopback ports;
//! 3. start a simulated fleet of 24 devices in three sites — each a real agent with its own data
//!    directory, MQTT session, installs, health watch and telemetry — serving traffic drawn from
//!    the bundles' golden inputs;
//! 4. roll 1.0.0 out to every device; classify the reference digits on one of them over the Open
//!    Inference Protocol v2 and check the accuracy against the bundle's;
//! 5. roll 2.0.0 out in canary stages (10 % → 50 % → 100 %): the canaries' health watch sees the
//!    regression in live traffic and reverts on the device, the fleet server fails the stage at
//!    once and rolls back — the rest of the fleet never receives 2.0.0;
//! 6. print where to look, and keep running until Ctrl-C (`--exit-when-done`: exit 0 here).
//!
//! Every step is checked: if the story does not happen as told, the demo fails with the reason.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use agent::simulate::{SimConfig, SimFleet};
use fleet_server::{Server, ServerConfig};
use modelfleet::api::ApiClient;
use modelfleet::harness::oip_accuracy;

const DEVICES: usize = 24;
const MODEL: &str = "digits_cnn";
const STORY_TIMEOUT: Duration = Duration::from_secs(300);

fn main() -> Result<()> {
    let exit_when_done = std::env::args().any(|a| a == "--exit-when-done");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let models = root.join("examples/models");
    let work = tempfile::Builder::new()
        .prefix("modelfleet-demo-")
        .tempdir()?;
    let dir = work.path();
    let started = Instant::now();

    step(1, "a signing key and two bundles");
    let key = bundler::keygen_files(&dir.join("keys"), "fleet")?;
    println!("   signing key {} in {}", key.key_id, key.secret.display());
    let bundle = |version: &str, onnx: &Path| -> Result<PathBuf> {
        let out = dir.join(format!("{MODEL}-{version}.mfb"));
        let mut opts = bundler::BuildOptions::new(onnx, MODEL, version, 1, &key.secret, &out);
        opts.golden_inputs = Some(models.join(MODEL).join("test_input.npy"));
        opts.golden_labels = Some(models.join(MODEL).join("test_labels.npy"));
        let report = bundler::build(&opts)?;
        println!(
            "   {MODEL} {version}: {} bytes, accuracy {:.3} on {} labelled digits ({})",
            report.size,
            report.accuracy.unwrap_or(f64::NAN),
            report.evaluated,
            onnx.file_name().unwrap_or_default().to_string_lossy()
        );
        Ok(out)
    };
    let v1 = bundle("1.0.0", &models.join(MODEL).join("digits_cnn.onnx"))?;
    let v2 = bundle(
        "2.0.0",
        &models.join("regressed").join("digits_cnn_perturbed.onnx"),
    )?;
    println!("   (2.0.0 is a damaged build that slipped through: the fleet must catch it)");

    step(2, "the fleet server, with its embedded MQTT broker");
    let keyring = bundler::load_keyring(&[&key.public])?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let server = rt.block_on(Server::start(ServerConfig::new(
        dir.join("server"),
        keyring.clone(),
    )))?;
    let token = server
        .admin_token()
        .context("a new server prints its admin token")?
        .to_string();
    let api = ApiClient::new(&server.http_url(), &token);
    println!("   API     {}/api/v1", server.http_url());
    println!("   broker  {}", server.broker_url());
    println!("   token   {token}");

    step(3, &format!("a simulated fleet of {DEVICES} devices"));
    let mut sim = SimConfig::new(DEVICES, server.broker_url(), keyring, dir.join("devices"));
    sim.server_key = Some(server.server_public_key());
    sim.labels =
        vec![agent::simulate::parse_label("site=berlin|munich|paris").map_err(anyhow::Error::msg)?];
    sim.rps = 20.0;
    sim.agent.telemetry_window = Duration::from_secs(2);
    let fleet = {
        let _guard = rt.enter();
        SimFleet::start(&sim)?
    };
    wait("every device to come online", || {
        let online = api.get("/api/v1/devices?online=true&limit=1")?;
        Ok((online["total"] == DEVICES).then_some(()))
    })?;
    println!(
        "   {DEVICES} agents online (sim-0000 … sim-{:04}), data in {}",
        DEVICES - 1,
        sim.data_root.display()
    );

    let mut log = Log::default();
    step(4, "roll out 1.0.0 to every device");
    let v1_id = api.upload(&std::fs::read(&v1)?)?;
    let first = api.create_rollout(&json!({
        "bundle_id": v1_id,
        "stages": [{"percent": 100, "bake_seconds": 0}],
    }))?;
    println!("   rollout {first}: one stage, 100 % (a first install has no control cohort)");
    let r = log.follow(&api, &first)?;
    ensure!(
        r["state"] == "succeeded",
        "the 1.0.0 rollout ended {}",
        r["state"]
    );
    let running = versions(&api)?;
    ensure!(
        running.len() == DEVICES && running.values().all(|v| v == "1.0.0"),
        "not every device runs 1.0.0: {running:?}"
    );
    println!("   every device runs {MODEL} 1.0.0");
    // Live figures of 1.0.0 are what each device's health watch compares the next version with.
    wait("200 requests served by 1.0.0 on every device", || {
        Ok(fleet
            .devices
            .iter()
            .all(|d| {
                d.agent
                    .registry
                    .get(MODEL)
                    .is_some_and(|m| m.health.recent().requests >= 200)
            })
            .then_some(()))
    })?;
    println!("   every device has served 1.0.0 200+ times: its live figures are the reference");
    let device = &fleet.devices[0];
    let oip = rt.block_on(serve_oip(device.agent.clone()))?;
    let accuracy = oip_accuracy(
        &oip,
        MODEL,
        "input",
        &models.join(MODEL).join("test_input.npy"),
        &models.join(MODEL).join("test_labels.npy"),
    )?;
    let bundled = device
        .agent
        .registry
        .get(MODEL)
        .context("sim-0000 serves digits_cnn")?
        .manifest
        .baseline
        .accuracy;
    println!(
        "   {} answers OIP v2 at {oip}/v2/models/{MODEL}/infer: accuracy {accuracy:.4} on the \
         reference digits (bundle: {:.4})",
        device.id,
        bundled.unwrap_or(f64::NAN)
    );
    ensure!(
        bundled.is_some_and(|b| (b - accuracy).abs() < 1e-9),
        "served accuracy {accuracy} differs from the bundle's {bundled:?}"
    );

    step(
        5,
        "roll out 2.0.0 in canary stages: 10 % → 50 % → 100 %, 60 s bake each",
    );
    let v2_id = api.upload(&std::fs::read(&v2)?)?;
    let second = api.create_rollout(&json!({
        "bundle_id": v2_id,
        "stages": [{"percent": 10, "bake_seconds": 60}, {"percent": 50, "bake_seconds": 60},
                   {"percent": 100, "bake_seconds": 0}],
        "on_failure": "rollback",
    }))?;
    println!("   rollout {second}");
    log.installs = true;
    let r = log.follow(&api, &second)?;
    ensure!(
        r["state"] == "rolled_back",
        "the 2.0.0 rollout ended {} instead of rolling back",
        r["state"]
    );
    let canaries: BTreeSet<&String> = r["devices"]
        .as_object()
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    wait("every device back on 1.0.0", || {
        let v = versions(&api)?;
        Ok((v.len() == DEVICES && v.values().all(|v| v == "1.0.0")).then_some(()))
    })?;
    log.catch_up(&api, &second)?;
    ensure!(
        log.watch_reverts > 0,
        "no canary's health watch reverted 2.0.0 (the rollout failed on other evidence)"
    );
    println!(
        "   2.0.0 reached {} canar{} of {DEVICES}; every device runs 1.0.0 again",
        canaries.len(),
        if canaries.len() == 1 { "y" } else { "ies" }
    );

    step(6, "look around");
    let base = server.http_url();
    println!("   dashboard: open {base}/ and sign in with the token above");
    let auth = format!("-H 'Authorization: Bearer {token}'");
    println!("   curl {auth} {base}/api/v1/rollouts/{second}");
    println!("   curl {auth} '{base}/api/v1/events?rollout_id={second}'");
    println!("   curl {auth} '{base}/api/v1/devices?label=site:berlin'");
    println!("   curl {base}/metrics");
    println!("   curl {oip}/v2/models/{MODEL}");
    println!("   the story took {:.0} s", started.elapsed().as_secs_f64());
    if exit_when_done {
        rt.block_on(fleet.shutdown());
        rt.block_on(server.shutdown());
        println!("\ndemo done.");
        return Ok(());
    }
    println!("\nthe fleet keeps running until Ctrl-C …");
    rt.block_on(tokio::signal::ctrl_c())?;
    rt.block_on(fleet.shutdown());
    rt.block_on(server.shutdown());
    Ok(())
}

fn step(n: usize, what: &str) {
    println!("\n[{n}] {what}");
}

/// Polls `check` every 250 ms until it returns `Some`.
fn wait<T>(what: &str, mut check: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + STORY_TIMEOUT;
    loop {
        if let Some(v) = check()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("gave up after {STORY_TIMEOUT:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The active version of `digits_cnn` on each device that has it.
fn versions(api: &ApiClient) -> Result<BTreeMap<String, String>> {
    let list = api.get("/api/v1/devices?limit=1000")?;
    Ok(list["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| {
            let m = d["models"]
                .as_array()?
                .iter()
                .find(|m| m["name"] == MODEL)?;
            Some((d["id"].as_str()?.into(), m["active"].as_str()?.into()))
        })
        .collect())
}

/// Prints a rollout's decisions and its devices' notable events as they happen.
#[derive(Default)]
struct Log {
    decisions: usize,
    seen_events: BTreeSet<u64>,
    started: Option<Instant>,
    /// Print each device's installs and commits (reverts and refusals are always printed).
    installs: bool,
    /// Reverts decided by a device's own health watch.
    watch_reverts: usize,
}

impl Log {
    /// Follows rollout `id` until it ends; returns it.
    fn follow(&mut self, api: &ApiClient, id: &str) -> Result<Value> {
        self.decisions = 0;
        wait(&format!("rollout {id} to end"), || {
            let r = self.catch_up(api, id)?;
            let done = ["succeeded", "failed", "rolled_back", "paused", "aborted"]
                .iter()
                .any(|s| r["state"] == *s);
            Ok(done.then_some(r))
        })
    }

    /// Prints what is new; returns the rollout.
    fn catch_up(&mut self, api: &ApiClient, id: &str) -> Result<Value> {
        let t0 = *self.started.get_or_insert_with(Instant::now);
        let r = api.get(&format!("/api/v1/rollouts/{id}"))?;
        let events = api.get(&format!("/api/v1/events?rollout_id={id}&limit=500"))?;
        let mut lines: Vec<(String, String)> = Vec::new();
        for e in events["events"].as_array().into_iter().flatten().rev() {
            let seq = e["seq"].as_u64().unwrap_or(0);
            let kind = e["kind"].as_str().unwrap_or("");
            let wanted = match kind {
                "installed" | "committed" => self.installs,
                "reverted" | "rejected" => true,
                _ => false,
            };
            if !wanted || !self.seen_events.insert(seq) {
                continue;
            }
            if kind == "reverted" && e["detail"]["reason"] != "fleet_command" {
                self.watch_reverts += 1;
            }
            let mut line = format!(
                "{} {kind} {}",
                e["device_id"].as_str().unwrap_or("-"),
                e["version"].as_str().unwrap_or("")
            );
            if kind == "reverted" {
                line += &format!(
                    " (left {}: {})",
                    e["detail"]["from"].as_str().unwrap_or("?"),
                    revert_reason(&e["detail"])
                );
            }
            lines.push((e["time"].as_str().unwrap_or("").to_string(), line));
        }
        for d in r["decisions"]
            .as_array()
            .into_iter()
            .flatten()
            .skip(self.decisions)
        {
            self.decisions += 1;
            let line = format!(
                "rollout {} (stage {}): {}",
                d["action"].as_str().unwrap_or(""),
                d["stage"].as_u64().unwrap_or(0) + 1,
                d["reason"].as_str().unwrap_or("")
            );
            lines.push((d["time"].as_str().unwrap_or("").to_string(), line));
        }
        lines.sort();
        for (_, line) in lines {
            println!("   {:>5.1} s  {line}", t0.elapsed().as_secs_f64());
        }
        Ok(r)
    }
}

/// Why a device reverted: the health watch's check with its figures, or the fleet's command.
fn revert_reason(detail: &Value) -> String {
    let reason = detail["reason"].as_str().unwrap_or("?");
    if reason == "fleet_command" {
        return "rollback ordered by the fleet server".into();
    }
    let figures: Vec<String> = detail["evidence"]["check"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| match v {
            Value::Number(n) => Some(format!("{k} {:.3}", n.as_f64()?)),
            Value::String(s) => Some(format!("{k} {s}")),
            _ => None,
        })
        .collect();
    format!("health watch: {reason} ({})", figures.join(", "))
}

/// Serves one simulated device's agent over HTTP on a free loopback port; returns its URL.
async fn serve_oip(agent: Arc<agent::Agent>) -> Result<String> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let url = format!("http://{}", listener.local_addr()?);
    let router = agent::http::router(agent, None);
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(url)
}
