//! Crash safety: an install killed at any moment leaves a device that serves the old or the new
//! model, fully verified — never nothing, never a half-written slot.
//!
//! Two kinds of kill, both of a real `fleet-agent install` child process:
//! - at each named point of the install path (`MODELFLEET_CRASH_AT`, the process aborts there,
//!   exactly as `kill -9` would leave it);
//! - `SIGKILL` after seeded random delays spread over the install's duration.
//!
//! After each kill the data directory is opened the way `fleet-agent run` opens it at start-up
//! (leftovers cleaned, slots re-hashed and golden-self-tested on load) and must serve a model.

mod common;

use std::path::Path;
use std::time::Instant;

use agent::{Agent, AgentConfig};
use common::*;

struct Setup {
    fx: Fixture,
    v2: std::path::PathBuf,
    template: std::path::PathBuf,
}

fn setup() -> Setup {
    let fx = Fixture::new();
    let v1 = fx.bundle("digits_cnn", "1.0.0", 1);
    let v2 = fx.bundle("digits_cnn", "2.0.0", 1);
    let template = fx.path("template");
    fx.install_offline(&v1, &template);
    Setup { fx, v2, template }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn install_cmd(s: &Setup, data: &Path) -> std::process::Command {
    let mut c = s.fx.agent_cmd(&[
        "install",
        s.v2.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    c.args(["--keyring", s.fx.keyring.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    c
}

/// Opens `data` as the agent does at start-up and checks it serves a verified model.
/// Returns the served version.
fn served_version_after_restart(s: &Setup, data: &Path) -> String {
    let keyring =
        protocol::keys::Keyring::from_file_text(&std::fs::read_to_string(&s.fx.keyring).unwrap())
            .unwrap();
    let agent = Agent::open(AgentConfig::new(data), keyring).expect("agent restarts");
    let model = agent
        .registry
        .get("digits_cnn")
        .expect("a model is served after the crash");
    // Loading already re-hashed the model file and passed the golden self-test; also answer a
    // real request.
    let inputs = engine::npy::read_npy(models_dir().join("digits_cnn/test_input.npy")).unwrap();
    let out = model.engine.run(&[sample(&inputs, 0)]).unwrap();
    assert_eq!(
        argmax(out[0].as_f32().unwrap()) as i64,
        labels("digits_cnn")[0]
    );
    // Nothing half-written is left behind.
    // (tmp/transfers/ is kept for resumable downloads; no transfer ran here, so it is empty.)
    let leftovers: Vec<_> = std::fs::read_dir(data.join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "transfers")
        .collect();
    assert!(leftovers.is_empty(), "tmp/ is cleaned: {leftovers:?}");
    if data.join("tmp/transfers").exists() {
        assert_eq!(
            std::fs::read_dir(data.join("tmp/transfers"))
                .unwrap()
                .count(),
            0
        );
    }
    let slots = std::fs::read_dir(data.join("slots/digits_cnn"))
        .unwrap()
        .count();
    let status = agent.status().unwrap();
    let referenced = 1 + status.models[0].previous.is_some() as usize;
    assert_eq!(slots, referenced, "only referenced slots remain");
    assert!(status.models[0].serving);
    model.version().to_string()
}

#[test]
fn killed_at_each_step_of_the_install_path() {
    let s = setup();
    for (point, expected) in [
        ("verified", "1.0.0"),
        ("slot_written", "1.0.0"),
        ("self_tested", "1.0.0"),
        ("activated", "2.0.0"),
    ] {
        let data = s.fx.path(&format!("data-{point}"));
        copy_dir(&s.template, &data);
        let status = install_cmd(&s, &data)
            .env("MODELFLEET_CRASH_AT", point)
            .status()
            .unwrap();
        assert!(
            !status.success(),
            "{point}: the install should have crashed"
        );
        assert_eq!(
            served_version_after_restart(&s, &data),
            expected,
            "after a crash at {point}"
        );
        // And the interrupted install can simply be run again.
        let status = install_cmd(&s, &data).status().unwrap();
        assert!(status.success(), "{point}: re-install after the crash");
        assert_eq!(served_version_after_restart(&s, &data), "2.0.0");
    }
}

#[test]
fn killed_at_random_moments() {
    let s = setup();
    // How long does an uninterrupted install take here?
    let data = s.fx.path("timing");
    copy_dir(&s.template, &data);
    let started = Instant::now();
    assert!(install_cmd(&s, &data).status().unwrap().success());
    let full = started.elapsed();

    // Seeded delays spread over the whole install (a small LCG: reproducible, no dependency).
    let mut seed: u64 = 0x5eed_2026;
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..16 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let frac = (seed >> 33) as f64 / (1u64 << 31) as f64;
        let delay = full.mul_f64(frac * 1.1);
        let data = s.fx.path(&format!("data-{i}"));
        copy_dir(&s.template, &data);
        let mut child = install_cmd(&s, &data).spawn().unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
        let version = served_version_after_restart(&s, &data);
        assert!(
            version == "1.0.0" || version == "2.0.0",
            "kill after {delay:?}: {version}"
        );
        *outcomes.entry(version).or_default() += 1;
    }
    eprintln!("install takes {full:?}; served after random kills: {outcomes:?}");
}
