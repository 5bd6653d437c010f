//! Issue 9: the device agent cross-built for ARM runs there. Under qemu-user, the cross-built
//! `fleet-agent` installs a signed bundle of `digits_cnn` (verify, self-test, activate), reports
//! its target, serves the model over OIP v2, and classifies the 450 reference digits with exactly
//! the accuracy the bundle recorded when it was built on this x86_64 machine.
//!
//! Needs a cross-built agent: `MODELFLEET_CROSS_AGENT=path/to/fleet-agent` (and optionally
//! `MODELFLEET_CROSS_RUNNER`, default `qemu-aarch64 -L /usr/aarch64-linux-gnu`). `.ci/run` builds
//! the aarch64 agent and sets both, so there this test always runs. Without them (a developer's
//! `cargo test --workspace` with no cross toolchain) it says loudly that it did not run.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{models_dir, World};
use modelfleet::harness::{free_port, oip_accuracy, wait_for_port};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn cross_built_agent_installs_and_serves_digits_cnn_under_qemu() {
    let Ok(agent) = std::env::var("MODELFLEET_CROSS_AGENT") else {
        eprintln!(
            "\n*** qemu smoke test NOT RUN: set MODELFLEET_CROSS_AGENT to a cross-built fleet-agent \
             (.ci/run does; see docs/targets.md) ***\n"
        );
        return;
    };
    let runner = std::env::var("MODELFLEET_CROSS_RUNNER")
        .unwrap_or_else(|_| "qemu-aarch64 -L /usr/aarch64-linux-gnu".into());
    let mut runner = runner.split_whitespace().map(str::to_string);
    let emulator = runner.next().expect("a runner command");
    let emulator_args: Vec<String> = runner.collect();
    let cmd = |args: &[&str]| {
        let mut c = Command::new(&emulator);
        c.args(&emulator_args).arg(&agent).args(args);
        c
    };

    let world = World::new();
    let bundle = world.bundle("digits_cnn", "1.0.0");
    let built = bundler::verify(&bundle, &world.keyring).unwrap();
    let expected = built
        .manifest
        .baseline
        .accuracy
        .expect("digits_cnn has labels");
    let data = world.path("device");
    let keyring = world.keyring_file.to_str().unwrap();

    let out = cmd(&["install", bundle.to_str().unwrap()])
        .args(["--data-dir", data.to_str().unwrap(), "--keyring", keyring])
        .output()
        .expect("the emulator runs");
    assert!(
        out.status.success(),
        "install under {emulator}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let out = cmd(&["status", "--json", "--data-dir", data.to_str().unwrap()])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let target = status["target"].as_str().unwrap_or_default().to_string();
    assert_ne!(
        target,
        agent::agent::BUILD_TARGET,
        "the agent under test must be a cross build, not this host's"
    );
    assert_eq!(status["models"][0]["active"], "1.0.0", "{status}");

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _server = Killed(
        cmd(&[
            "run",
            "--data-dir",
            data.to_str().unwrap(),
            "--keyring",
            keyring,
        ])
        .args(["--listen", &listen, "--workers", "1"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap(),
    );
    wait_for_port(port, Duration::from_secs(120)).unwrap();
    let url = format!("http://{listen}");
    let digits = models_dir().join("digits_cnn");
    let accuracy = oip_accuracy(
        &url,
        "digits_cnn",
        "input",
        &digits.join("test_input.npy"),
        &digits.join("test_labels.npy"),
    )
    .unwrap();
    eprintln!("{target} agent under {emulator}: accuracy {accuracy:.4} (bundle {expected:.4})");
    assert!(
        (accuracy - expected).abs() < 1e-9,
        "served accuracy {accuracy} on {target} differs from the bundle's {expected}"
    );
}
