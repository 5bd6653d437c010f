//! Issue 10, the faults of a device, each asserting that nothing is lost. Real `fleet-agent run`
//! processes (killed with SIGKILL), a real broker process and a fleet server in this process.
//!
//! - `killed_during_transfer_install_activation_and_trial`: v2 of a 15 MB model staged over a
//!   serving v1; the agent is killed again and again — at seeded moments of the chunked transfer,
//!   of the install, at its named crash points (`MODELFLEET_CRASH_AT`) and during the trial — and
//!   after every restart serves a verified model, resumes the transfer from what was durably on
//!   disk, and in the end has installed v2 exactly once.
//! - `disk_full_during_install_is_refused_and_the_old_model_keeps_serving`: the data directory
//!   on a small tmpfs.
//! - `expiry_slack_and_clock_skew`, `a_device_offline_for_months_catches_up`: bundles dated
//!   relative to now stand in for a device clock that is off (see `docs/faults.md`).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent::link::transfer::{Bitmap, TransferRecord, CHECKPOINT_CHUNKS};
use agent::link::transfer_worker::MAX_UNSYNCED_CHUNKS;
use common::{
    embedded_broker_exe, fault_seed, models_dir, redate_bundle, AgentOptions, AgentProcess, Rng,
    World,
};
use fleet_server::BrokerConnection;
use modelfleet::harness::{wait_until, BrokerProcess};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(180);

/// Trials short enough for a test and judged leniently: a loaded 2-core machine and a dozen
/// requests must not make a healthy v2 look regressed (the health watch has its own tests).
const AGENT_TOML: &str = "
[health]
trial_min_requests = 12
trial_min_seconds = 2
trial_max_p95_latency_ratio = 1000.0
trial_latency_floor_ms = 1000.0
trial_max_confidence_drop = 1.0
trial_max_prediction_psi = 1000.0
trial_max_output_shift = 1000.0
telemetry_window_seconds = 1
";

/// One row of a model's test inputs and the expected output, as an OIP JSON request.
struct Probe {
    model: String,
    request: Vec<u8>,
    expected: Vec<f32>,
}

impl Probe {
    fn new(model: &str, row: usize) -> Probe {
        let dir = models_dir().join(model);
        let inputs = engine::npy::read_npy(dir.join("test_input.npy")).unwrap();
        let outputs = engine::npy::read_npy(dir.join("test_output.npy")).unwrap();
        let per: usize = inputs.shape[1..].iter().product();
        let out_per: usize = outputs.shape[1..].iter().product();
        let mut shape = inputs.shape.clone();
        shape[0] = 1;
        let data = &inputs.as_f32().unwrap()[row * per..(row + 1) * per];
        let meta: Value =
            serde_json::from_slice(&std::fs::read(dir.join("meta.json")).unwrap()).unwrap();
        let input = meta["inputs"][0]["name"].as_str().unwrap();
        let request = json!({"inputs": [{"name": input, "datatype": "FP32", "shape": shape,
                                          "data": data}]});
        Probe {
            model: model.to_string(),
            request: request.to_string().into_bytes(),
            expected: outputs.as_f32().unwrap()[row * out_per..(row + 1) * out_per].to_vec(),
        }
    }

    /// One probe per row of the model's test inputs (traffic like the golden set's).
    fn all(model: &str) -> Vec<Probe> {
        let rows = engine::npy::read_npy(models_dir().join(model).join("test_input.npy"))
            .unwrap()
            .shape[0];
        (0..rows.min(16)).map(|r| Probe::new(model, r)).collect()
    }

    /// Runs the request on `agent` and checks the answer; returns the version that answered.
    fn check(&self, agent: &AgentProcess) -> String {
        let (status, answer) = agent.post(
            &format!("/v2/models/{}/infer", self.model),
            "application/json",
            &self.request,
        );
        assert_eq!(status, 200, "inference answered {status}: {answer}");
        let got: Vec<f32> = serde_json::from_value(answer["outputs"][0]["data"].clone()).unwrap();
        assert_eq!(got.len(), self.expected.len());
        let argmax = |v: &[f32]| {
            v.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i)
        };
        assert_eq!(argmax(&got), argmax(&self.expected), "the predicted class");
        let worst = got
            .iter()
            .zip(&self.expected)
            .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
            .fold(0f32, f32::max);
        assert!(worst < 1e-3, "output differs from the reference by {worst}");
        answer["model_version"].as_str().unwrap_or("?").to_string()
    }
}

/// A sample's value in a Prometheus text page.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(' ')))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Events of the agent's own log of `kind` for `version`.
fn count(events: &[Value], kind: &str, version: &str) -> usize {
    events
        .iter()
        .filter(|e| e["kind"] == kind && e["version"] == version)
        .count()
}

/// What a kill left in `data` (the agent is not running).
struct AfterKill {
    /// Chunks the stored bitmap of the transfer claims (None: no transfer stored); each claimed
    /// chunk of the partial file was checked to hold the bundle's bytes.
    stored: Option<u32>,
    /// `chunks_present` of the first `transfer_started` of the bundle after the given event.
    resumed_with: Option<u64>,
    /// The newest event's `seq`.
    last_seq: u64,
}

fn after_kill(data: &Path, bundle_id: &str, bundle: &[u8], since: u64) -> AfterKill {
    let store = agent::store::Store::open(&data.join("agent.redb")).unwrap();
    let events = store.events(since, 100_000).unwrap();
    let last_seq = events.last().map_or(since, |e| e.seq);
    let resumed_with = events
        .iter()
        .find(|e| e.kind == "transfer_started" && e.detail["bundle_id"] == bundle_id)
        .and_then(|e| e.detail["chunks_present"].as_u64());
    let Some((_, record)) = store
        .transfers::<TransferRecord>()
        .unwrap()
        .into_iter()
        .find(|(id, _)| id == bundle_id)
    else {
        return AfterKill {
            stored: None,
            resumed_with,
            last_seq,
        };
    };
    let bitmap = Bitmap::from_hex(record.bundle.chunks(), &record.received);
    let part = std::fs::read(data.join(format!("tmp/transfers/{bundle_id}.part"))).unwrap();
    assert_eq!(
        part.len(),
        bundle.len(),
        "the partial file has the bundle's size"
    );
    let cs = record.bundle.chunk_size as usize;
    for i in (0..bitmap.len()).filter(|&i| bitmap.get(i)) {
        let range = i as usize * cs..((i as usize + 1) * cs).min(bundle.len());
        assert!(
            part[range.clone()] == bundle[range],
            "chunk {i} is claimed by the stored bitmap but not in the partial file"
        );
    }
    AfterKill {
        stored: Some(bitmap.count()),
        resumed_with,
        last_seq,
    }
}

#[derive(Debug, Clone, Copy)]
enum Kill {
    /// SIGKILL once this process has received this many chunks (or the transfer completed).
    Transfer(u64),
    /// SIGKILL right after the restart was checked.
    Restart,
    /// The process aborts itself at this named point of the install path.
    At(&'static str),
    /// SIGKILL this many ms after the install began (or at once if it already finished).
    Install(u64),
    /// SIGKILL this many ms after the new version went on trial.
    Trial(u64),
}

#[test]
fn killed_during_transfer_install_activation_and_trial() {
    let started = Instant::now();
    let mut rng = Rng(fault_seed(0x0f1e_e710));

    let mut world = World::new();
    // 16 KiB chunks: about 920 of them, so that the transfer outlasts several restarts (each
    // restart's check lets chunks in).
    world.chunk_size = 16 << 10;
    let broker = BrokerProcess::embedded(embedded_broker_exe()).unwrap();
    world.start_server(BrokerConnection::plain(&broker.url()));
    let model = "mobilenetish";
    let v1 = world.bundle(model, "1.0.0");
    let v2 = world.bundle(model, "2.0.0");
    let v2_bytes = std::fs::read(&v2).unwrap();
    let total_chunks = (v2_bytes.len() as u64).div_ceil(world.chunk_size as u64);
    eprintln!("v2: {} bytes, {total_chunks} chunks", v2_bytes.len());
    let data = world.path("device");
    let (status, body) = install(&offline_agent(&world, &data, AGENT_TOML), &v1);
    assert_eq!(status, 201, "{body}");
    let v2_id = world.upload(&v2);
    let probes = Probe::all(model);

    // The schedule: kills during the transfer, then at each named step of the install between
    // random kills of it, the crash right after the activation commit, kills during the trial.
    let mut plan: Vec<Kill> = (0..6).map(|_| Kill::Transfer(rng.range(8, 64))).collect();
    plan.extend([
        Kill::At("verified"),
        Kill::Restart,
        Kill::At("slot_written"),
        Kill::Install(rng.range(0, 600)),
        Kill::At("self_tested"),
        Kill::Install(rng.range(0, 1500)),
        Kill::At("activated"),
        Kill::Trial(rng.range(0, 1500)),
        Kill::Trial(rng.range(0, 1500)),
    ]);

    let broker_url = broker.url();
    let options = |env: &'static [(&'static str, &'static str)]| AgentOptions {
        data_dir: &data,
        link: Some(("dev-1", &broker_url)),
        config: AGENT_TOML,
        env,
    };
    let mut staged = false;
    // After the previous kill: chunks the stored bitmap claimed (None: no transfer stored) and
    // the newest event in the agent's log.
    let mut on_disk: Option<u32> = None;
    let mut last_seq = 0u64;
    // A killed transfer loses at most the chunks not covered by a finished checkpoint — the
    // agent asks for no more beyond MAX_UNSYNCED_CHUNKS of them, plus a window already asked
    // for — and those whose checkpoint (a commit that does not wait for the disk) no durable
    // commit followed yet: each tenth's progress event is one.
    let window = agent::link::LinkConfig::new("mqtt://x:1", "x").window as u64;
    let may_lose = MAX_UNSYNCED_CHUNKS as u64
        + window
        + CHECKPOINT_CHUNKS as u64
        + total_chunks.div_ceil(10)
        + 1;
    let mut outcomes = Vec::new();
    let mut v2_active = false;
    // Starts that found the transfer incomplete: each may have had a window of chunks in flight
    // (served, never stored) when it was killed, and lose `may_lose` more.
    let mut interrupted = 0u64;
    for (i, kill) in plan.iter().copied().enumerate() {
        let mut got = 0u64;
        if let Kill::At(point) = kill {
            if v2_active {
                // The install already went through: nothing left to crash in.
                outcomes.push(format!("{i}: at {point}: skipped, v2 already active"));
                continue;
            }
            let env: &'static [(&str, &str)] =
                Box::leak(Box::new([("MODELFLEET_CRASH_AT", point)]));
            let mut agent = world.spawn_agent(&options(env));
            let exit = wait_until(&format!("the agent to crash at {point}"), LONG, || {
                agent.exited()
            })
            .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
            assert!(!exit.success(), "{point}: {exit}");
            outcomes.push(format!("{i}: crashed at {point}"));
        } else {
            let mut agent = world.spawn_agent(&options(&[]));
            if !staged {
                wait_until("dev-1 online", LONG, || {
                    let d = world.client().get("/api/v1/devices/dev-1").ok()?;
                    (d["online"] == true).then_some(())
                })
                .unwrap();
                let (status, body) =
                    world.post_json("/api/v1/devices/dev-1/stage", json!({ "bundle_id": v2_id }));
                assert_eq!(status, 202, "{body}");
                staged = true;
            }
            let v2_on = |a: &AgentProcess| {
                a.model_status(model)
                    .is_some_and(|m| m["active"] == "2.0.0")
            };
            match kill {
                Kill::Transfer(n) => {
                    // Only /metrics while chunks arrive: each poll lets more in.
                    wait_until("chunks to arrive", LONG, || {
                        let text = agent.metrics_text()?;
                        got = sample(&text, "modelfleet_link_chunks_received_total")? as u64;
                        let done = sample(&text, "modelfleet_link_transfers_completed_total")?;
                        (got >= n || done >= 1.0).then_some(())
                    })
                    .unwrap();
                }
                Kill::Restart | Kill::At(_) => {}
                Kill::Install(ms) => {
                    wait_until("the install to begin", LONG, || {
                        let text = agent.metrics_text()?;
                        let done = sample(&text, "modelfleet_link_transfers_completed_total")?;
                        (done >= 1.0 || v2_on(&agent)).then_some(())
                    })
                    .unwrap();
                    std::thread::sleep(Duration::from_millis(ms));
                }
                Kill::Trial(ms) => {
                    wait_until("v2 on trial", LONG, || v2_on(&agent).then_some(()))
                        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
                    std::thread::sleep(Duration::from_millis(ms));
                }
            }
            // Before the kill, this start is checked: a verified model is served (the slot was
            // re-hashed and self-tested at start) and answers a real request correctly.
            wait_until("a model to be served", LONG, || {
                agent.model_status(model).filter(|m| m["serving"] == true)
            })
            .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
            let served = probes[i % probes.len()].check(&agent);
            assert!(served == "1.0.0" || served == "2.0.0", "{served}");
            agent.kill();
            outcomes.push(format!("{i}: {kill:?}: received {got} before the check"));
        }
        // What the kill left on disk, and how this start took the transfer over.
        let before = on_disk;
        let after = after_kill(&data, &v2_id, &v2_bytes, last_seq);
        (on_disk, last_seq) = (after.stored, after.last_seq);
        if let Some(stored) = before {
            // A stored transfer is taken over with exactly the chunks its bitmap claims.
            assert_eq!(
                after.resumed_with,
                Some(stored as u64),
                "kill {i}: resumed with what was on disk"
            );
        }
        let present = after.resumed_with.unwrap_or(0);
        if present < total_chunks && after.resumed_with.is_some() {
            interrupted += 1;
        }
        let status = agent::Agent::read_status(&data).unwrap();
        let m = status.models.iter().find(|m| m.name == model).unwrap();
        v2_active = m.active == "2.0.0";
        outcomes.last_mut().unwrap().push_str(&format!(
            "; resumed with {present} -> active {} ({:?}), stored bitmap {on_disk:?}",
            m.active, m.state
        ));
        if let (Kill::Transfer(_), Some(stored)) = (kill, on_disk) {
            assert!(
                stored as u64 + may_lose >= present + got,
                "kill {i}: {present} chunks at start + {got} received, but only {stored} on disk"
            );
        }
    }
    for o in &outcomes {
        eprintln!("  {o}");
    }

    // The last start: traffic until the trial commits v2.
    let agent = world.spawn_agent(&options(&[]));
    let mut n = 0;
    wait_until("v2 committed", LONG, || {
        probes[n % probes.len()].check(&agent);
        n += 1;
        agent
            .model_status(model)
            .filter(|m| m["active"] == "2.0.0" && m["state"] == "committed")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
    assert_eq!(probes[0].check(&agent), "2.0.0");
    let events = agent.events();
    assert_eq!(count(&events, "installed", "2.0.0"), 1, "v2 installed once");
    assert_eq!(count(&events, "activated", "2.0.0"), 1, "v2 activated once");
    assert_eq!(count(&events, "committed", "2.0.0"), 1, "v2 committed once");
    assert_eq!(count(&events, "reverted", "1.0.0"), 0, "no revert");
    assert!(
        !events.iter().any(|e| e["kind"] == "load_failed"),
        "no slot failed to load"
    );
    // Nothing left behind: no partial transfer, no staging; the slots of v2 and v1 only.
    assert!(tmp_files(&data).is_empty(), "{:?}", tmp_files(&data));
    let slots: Vec<String> = std::fs::read_dir(data.join("slots").join(model))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(slots.len(), 2, "{slots:?}");
    // The server saw it all.
    world.wait_for_version("dev-1", model, "2.0.0", LONG);
    // The transfer was never restarted from zero: the server sent little more than the bundle
    // (a restart from zero would re-send everything stored before each kill).
    let served = world.get("/api/v1/devices/dev-1")["transfer"]["chunks_served"]
        .as_u64()
        .unwrap();
    eprintln!(
        "server: {served} chunks served for {total_chunks}, {interrupted} starts interrupted \
         the transfer; {} s in all",
        started.elapsed().as_secs()
    );
    assert!(
        served <= total_chunks + interrupted * (window + may_lose),
        "{served} chunks served for a bundle of {total_chunks}"
    );
}

/// Files under `tmp/` (staging, partial transfers) of a data directory.
fn tmp_files(data: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![data.join("tmp")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            }
            if e.file_type().unwrap().is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

/// A tmpfs of `bytes` mounted on a directory for the life of the value (we run as root).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, bytes: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}")])
            .arg("tmpfs")
            .arg(dir)
            .output()
            .expect("mount(8)");
        assert!(
            out.status.success(),
            "this test needs to mount a small tmpfs (as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }

    /// Bytes free for files.
    fn available(&self) -> u64 {
        let out = std::process::Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(&self.0)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().nth(1).unwrap().trim().parse().unwrap()
    }

    /// Takes all free space but `leave` bytes with a file (really allocated, not sparse).
    fn fill(&self, leave: u64) -> PathBuf {
        let filler = self.0.join("filler");
        let len = self.available().saturating_sub(leave);
        let ok = std::process::Command::new("fallocate")
            .args(["-l", &len.to_string()])
            .arg(&filler)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let mut f = std::fs::File::create(&filler).unwrap();
            let block = vec![0u8; 1 << 20];
            let mut left = len;
            while left > 0 {
                let n = left.min(block.len() as u64) as usize;
                std::io::Write::write_all(&mut f, &block[..n]).unwrap();
                left -= n as u64;
            }
        }
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn disk_full_during_install_is_refused_and_the_old_model_keeps_serving() {
    let mut world = World::new();
    world.golden_max = 2; // slots of about 15 MB
    let broker = BrokerProcess::embedded(embedded_broker_exe()).unwrap();
    world.start_server(BrokerConnection::plain(&broker.url()));
    let model = "mobilenetish";
    let v1 = world.bundle(model, "1.0.0");
    let v2 = world.bundle(model, "2.0.0");
    let v2_id = world.upload(&v2);
    let probe = Probe::new(model, 0);
    let data = world.path("device");
    let disk = Tmpfs::mount(&data, 160 << 20);

    let (status, body) = install(&offline_agent(&world, &data, AGENT_TOML), &v1);
    assert_eq!(status, 201, "{body}");
    let slot_bytes: u64 = std::fs::read_dir(data.join("slots").join(model))
        .unwrap()
        .flat_map(|slot| std::fs::read_dir(slot.unwrap().path()).unwrap())
        .map(|f| f.unwrap().metadata().unwrap().len())
        .sum();
    let broker_url = broker.url();
    let agent = world.spawn_agent(&AgentOptions {
        data_dir: &data,
        link: Some(("dev-full", &broker_url)),
        config: AGENT_TOML,
        env: &[],
    });
    wait_until("dev-full online", LONG, || {
        let d = world.client().get("/api/v1/devices/dev-full").ok()?;
        (d["online"] == true).then_some(())
    })
    .unwrap();

    // Room for the downloaded bundle, and half of what unpacking it into a slot needs.
    let bundle_bytes = std::fs::metadata(&v2).unwrap().len();
    let filler = disk.fill(bundle_bytes + slot_bytes / 2);
    eprintln!(
        "bundle {bundle_bytes} B, slot {slot_bytes} B; {} B left free",
        disk.available()
    );
    let (status, body) = world.post_json(
        "/api/v1/devices/dev-full/stage",
        json!({ "bundle_id": v2_id }),
    );
    assert_eq!(status, 202, "{body}");
    let refusal = wait_until("v2 refused", LONG, || {
        agent.events().into_iter().find(|e| {
            (e["kind"] == "rejected" || e["kind"] == "transfer_failed") && e["version"] == "2.0.0"
        })
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
    eprintln!("refusal: {refusal}");
    assert_eq!(
        refusal["kind"], "rejected",
        "the download fitted; the install did not"
    );
    assert_eq!(refusal["detail"]["reason"], "no_space", "{refusal}");
    let error = refusal["detail"]["error"].as_str().unwrap();
    assert!(error.contains("No space left on device"), "{error}");
    // The old model keeps serving, nothing half-written is left.
    assert_eq!(probe.check(&agent), "1.0.0");
    let m = agent.model_status(model).unwrap();
    assert_eq!(m["active"], "1.0.0", "{m}");
    assert_eq!(m["serving"], true, "{m}");
    wait_until("the partial bundle deleted", LONG, || {
        tmp_files(&data).is_empty().then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", tmp_files(&data)));
    assert_eq!(
        std::fs::read_dir(data.join("slots").join(model))
            .unwrap()
            .count(),
        1,
        "only v1's slot"
    );
    // The server hears why.
    wait_until("the refusal reported", LONG, || {
        let events = world.get("/api/v1/events?device_id=dev-full&kind=rejected");
        events["events"]
            .as_array()?
            .iter()
            .any(|e| e["detail"]["reason"] == "no_space")
            .then_some(())
    })
    .unwrap();

    // Space freed: the same stage goes through.
    std::fs::remove_file(&filler).unwrap();
    let (status, body) = world.post_json(
        "/api/v1/devices/dev-full/stage",
        json!({ "bundle_id": v2_id }),
    );
    assert_eq!(status, 202, "{body}");
    world.wait_for_version("dev-full", model, "2.0.0", LONG);
    assert_eq!(probe.check(&agent), "2.0.0");
    drop(agent);
    drop(disk);
}

/// `fleet-agent run` offline on `data` with `config`.
fn offline_agent(world: &World, data: &Path, config: &str) -> AgentProcess {
    world.spawn_agent(&AgentOptions {
        data_dir: data,
        link: None,
        config,
        env: &[],
    })
}

/// Installs a bundle file through the agent's admin API: the status and the answer.
fn install(agent: &AgentProcess, bundle: &Path) -> (u16, Value) {
    agent.post(
        "/admin/v1/bundles",
        "application/octet-stream",
        &std::fs::read(bundle).unwrap(),
    )
}

#[test]
fn expiry_slack_and_clock_skew() {
    use chrono::{Duration as Days, Utc};
    let world = World::new();
    let model = "digits_cnn";
    let now = Utc::now();
    let built = |version: &str| world.bundle(model, version);
    let data = world.path("device");
    let agent = offline_agent(&world, &data, "");
    let (status, body) = install(&agent, &built("1.0.0"));
    assert_eq!(status, 201, "{body}");

    // Expired 8 days ago: beyond the default slack of 7 days, refused, naming the expiry.
    let stale = redate_bundle(
        &world,
        &built("2.0.0"),
        now - Days::days(40),
        Some(now - Days::days(8)),
        "stale",
    );
    let (status, body) = install(&agent, &stale);
    assert_eq!(status, 422, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("bundle expired at") && error.contains("slack 604800 s"),
        "{error}"
    );
    let m = agent.model_status(model).unwrap();
    assert_eq!(
        (m["active"].as_str(), m["serving"].as_bool()),
        (Some("1.0.0"), Some(true))
    );
    let events = agent.events();
    let rejected = events
        .iter()
        .find(|e| e["kind"] == "rejected" && e["version"] == "2.0.0")
        .expect("a rejected event");
    assert_eq!(rejected["detail"]["reason"], "expired", "{rejected}");

    // Expired 6 days ago: within the slack (a device that was offline, or whose clock runs
    // ahead of the build machine's by less than the slack), accepted.
    let late = redate_bundle(
        &world,
        &built("3.0.0"),
        now - Days::days(40),
        Some(now - Days::days(6)),
        "late",
    );
    let (status, body) = install(&agent, &late);
    assert_eq!(status, 201, "{body}");

    // Built "in the future" by this device's clock (its clock is two days behind the build
    // machine's): `created_at` is informational, accepted.
    let ahead = redate_bundle(
        &world,
        &built("4.0.0"),
        now + Days::days(2),
        Some(now + Days::days(30)),
        "ahead",
    );
    let (status, body) = install(&agent, &ahead);
    assert_eq!(status, 201, "{body}");
    assert_eq!(agent.model_status(model).unwrap()["active"], "4.0.0");
    drop(agent);

    // No slack configured: a bundle a minute past its expiry is refused.
    let agent = offline_agent(&world, &data, "expiry_slack_seconds = 0\n");
    let just = redate_bundle(
        &world,
        &built("5.0.0"),
        now - Days::days(1),
        Some(now - Days::minutes(1)),
        "just",
    );
    let (status, body) = install(&agent, &just);
    assert_eq!(status, 422, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains("slack 0 s"), "{error}");
    assert_eq!(agent.model_status(model).unwrap()["active"], "4.0.0");
}

#[test]
fn a_device_offline_for_months_catches_up() {
    use agent::link::transfer::Transfer;
    use agent::link::TransferMode;
    use chrono::{Duration as Days, Utc};
    let mut world = World::new();
    let broker = BrokerProcess::embedded(embedded_broker_exe()).unwrap();
    world.start_server(BrokerConnection::plain(&broker.url()));
    let broker_url = broker.url();
    let model = "digits_cnn";
    let now = Utc::now();
    let data = world.path("device");
    let linked = AgentOptions {
        data_dir: &data,
        link: Some(("dev-away", &broker_url)),
        config: AGENT_TOML,
        env: &[],
    };

    // The device runs v1 and is known to the server; then it loses power.
    let agent = offline_agent(&world, &data, AGENT_TOML);
    let (status, body) = install(&agent, &world.bundle(model, "1.0.0"));
    assert_eq!(status, 201, "{body}");
    drop(agent);
    let mut agent = world.spawn_agent(&linked);
    world.wait_for_version("dev-away", model, "1.0.0", LONG);
    agent.kill();

    // Months ago it had fetched v2 completely but not installed it; v2 expired 90 days ago.
    let v2 = redate_bundle(
        &world,
        &world.bundle(model, "2.0.0"),
        now - Days::days(150),
        Some(now - Days::days(90)),
        "months-old",
    );
    let v2_bytes = std::fs::read(&v2).unwrap();
    // The server would not take it now (uploads are verified with no slack).
    let (status, body) = world.post("/api/v1/bundles", &v2_bytes);
    assert!(
        status >= 400 && body.to_string().contains("expired"),
        "{status} {body}"
    );
    {
        let keyring = world.keyring.clone();
        let device = agent::Agent::open(agent::AgentConfig::new(&data), keyring).unwrap();
        let bundle = protocol::link::BundleRef {
            bundle_id: protocol::link::sha256_hex(&v2_bytes),
            name: model.into(),
            version: "2.0.0".into(),
            size: v2_bytes.len() as u64,
            chunk_size: protocol::link::DEFAULT_CHUNK_SIZE,
            http_url: None,
        };
        let mut t =
            Transfer::create(&device, bundle, Default::default(), TransferMode::Mqtt).unwrap();
        let cs = protocol::link::DEFAULT_CHUNK_SIZE as usize;
        for (i, chunk) in v2_bytes.chunks(cs).enumerate() {
            assert!(t.write_chunk(i as u32, chunk).unwrap());
        }
        t.checkpoint(&device).unwrap();
        assert!(t.is_complete());
        // A durable commit of the record (a checkpoint's does not wait for the disk).
        device.store().put_transfer(t.id(), &t.record()).unwrap();
    }

    // Meanwhile the fleet moved on: v3 is rolled out to every device, this one offline.
    let v3 = world.upload(&world.bundle(model, "3.0.0"));
    let rollout = world
        .client()
        .create_rollout(&json!({"bundle_id": v3, "stages": [{"percent": 100}]}))
        .unwrap();

    // It comes back: the expired bundle is refused, naming its expiry; the rollout's version
    // is installed.
    let agent = world.spawn_agent(&linked);
    world.wait_for_version("dev-away", model, "3.0.0", LONG);
    let events = agent.events();
    let rejected = events
        .iter()
        .find(|e| e["kind"] == "rejected" && e["version"] == "2.0.0")
        .unwrap_or_else(|| panic!("no refusal of v2 in {events:#?}"));
    assert_eq!(rejected["detail"]["reason"], "expired", "{rejected}");
    let error = rejected["detail"]["error"].as_str().unwrap();
    assert!(error.contains("bundle expired at"), "{error}");
    assert_eq!(count(&events, "installed", "2.0.0"), 0);
    assert_eq!(count(&events, "installed", "3.0.0"), 1);
    assert!(tmp_files(&data).is_empty(), "{:?}", tmp_files(&data));
    // The server heard the refusal and the rollout completed.
    wait_until("the refusal reported", LONG, || {
        let events = world.get("/api/v1/events?device_id=dev-away&kind=rejected");
        events["events"]
            .as_array()?
            .iter()
            .any(|e| e["detail"]["reason"] == "expired")
            .then_some(())
    })
    .unwrap();
    world.wait_for_rollout(&rollout, &["succeeded"], LONG);
    assert_eq!(Probe::new(model, 0).check(&agent), "3.0.0");
}
