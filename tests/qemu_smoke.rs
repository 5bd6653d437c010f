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

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{models_dir, rewrite_manifest, World};
use modelfleet::harness::{free_port, oip_accuracy, wait_for_port};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The cross-built agent and the emulator command that runs it, from the environment.
struct Cross {
    agent: String,
    emulator: String,
    emulator_args: Vec<String>,
}

impl Cross {
    fn from_env(test: &str) -> Option<Cross> {
        let Ok(agent) = std::env::var("MODELFLEET_CROSS_AGENT") else {
            eprintln!(
                "\n*** qemu smoke test {test} NOT RUN: set MODELFLEET_CROSS_AGENT to a cross-built \
                 fleet-agent (.ci/run does; see docs/targets.md) ***\n"
            );
            return None;
        };
        let runner = std::env::var("MODELFLEET_CROSS_RUNNER")
            .unwrap_or_else(|_| "qemu-aarch64 -L /usr/aarch64-linux-gnu".into());
        let mut runner = runner.split_whitespace().map(str::to_string);
        let emulator = runner.next().expect("a runner command");
        Some(Cross {
            agent,
            emulator,
            emulator_args: runner.collect(),
        })
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.emulator);
        c.args(&self.emulator_args).arg(&self.agent).args(args);
        c
    }

    /// `fleet-agent install BUNDLE` into `data`, with `env`; fails the test with the agent's
    /// output (`what` says which install) if it fails.
    fn install(&self, bundle: &Path, data: &Path, keyring: &str, env: &[(&str, &str)], what: &str) {
        let out = self
            .cmd(&["install", bundle.to_str().unwrap()])
            .args(["--data-dir", data.to_str().unwrap(), "--keyring", keyring])
            .envs(env.iter().copied())
            .output()
            .expect("the emulator runs");
        assert!(
            out.status.success(),
            "install {what}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn cross_built_agent_installs_and_serves_digits_cnn_under_qemu() {
    let Some(cross) = Cross::from_env("installs_and_serves") else {
        return;
    };
    let emulator = &cross.emulator;
    let cmd = |args: &[&str]| cross.cmd(args);

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

    cross.install(&bundle, &data, keyring, &[], &format!("under {emulator}"));

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

/// Runs `fleet-agent run` on `data` under the emulator with `env`; returns the process (killed
/// on drop) and its URL once it listens.
fn serve(cross: &Cross, data: &Path, keyring: &str, env: &[(&str, &str)]) -> (Killed, String) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut c = cross.cmd(&[
        "run",
        "--data-dir",
        data.to_str().unwrap(),
        "--keyring",
        keyring,
    ]);
    c.args(["--listen", &listen, "--workers", "1"])
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null());
    let process = Killed(c.spawn().unwrap());
    wait_for_port(port, Duration::from_secs(120)).unwrap();
    (process, format!("http://{listen}"))
}

/// Issue 8, "compute in f16 where the target supports it". On an ARMv8.2 FP16 CPU, `f16`
/// bundles of `digits_cnn` and `digits_mlp` compute in half precision: their golden outputs are
/// further from the golden ones than a float32 runtime's, they pass the bundle's half-precision
/// gate, and `digits_cnn` classifies the 450 reference digits within half a point of the
/// bundle's accuracy. The same agent on a CPU without FP16 computes them in float32 (bit for bit
/// the bundle's accuracy), and so does the FP16 CPU for a bundle whose gate its outputs fail.
///
/// Needs an aarch64 agent built with tract's FP16 kernels (without `no-fp16`):
/// `MODELFLEET_CROSS_FP16=1` says the agent in `MODELFLEET_CROSS_AGENT` is one (`.ci/run`
/// builds it). qemu-user 7.2 executes FP16 instructions (its default CPU is `max`) but shows
/// the guest the host's `/proc/cpuinfo`, where tract looks for `asimdhp`; the test tells tract
/// the CPU is a Cortex-A55 (`TRACT_CPU_AARCH64_KIND=a55`, an ARMv8.2 core with FP16), as a
/// device's own `/proc/cpuinfo` would. Without it tract sees no FP16: that is the CPU without.
#[test]
fn cross_built_agent_computes_an_f16_bundle_in_half_precision_where_the_cpu_has_fp16() {
    let Some(cross) = Cross::from_env("f16_compute") else {
        return;
    };
    if std::env::var("MODELFLEET_CROSS_FP16").is_err() {
        eprintln!(
            "\n*** qemu test f16_compute NOT RUN: MODELFLEET_CROSS_FP16 is not set (the agent \
             must be an aarch64 build with tract's FP16 kernels; .ci/run builds one) ***\n"
        );
        return;
    }
    let world = World::new();
    let keyring = world.keyring_file.to_str().unwrap();
    let f16_bundle = |model: &str| {
        let bundle = world.path(&format!("{model}-f16.mfb"));
        let src = models_dir().join(model);
        let mut opts = bundler::BuildOptions::new(
            &src.join(format!("{model}.onnx")),
            model,
            "1.0.0",
            1,
            &world.key,
            &bundle,
        );
        opts.golden_inputs = Some(src.join("test_input.npy"));
        opts.golden_labels = Some(src.join("test_labels.npy"));
        opts.quantize = bundler::QuantizeMode::F16;
        opts.latency_runs = 3;
        let built = bundler::build(&opts).unwrap();
        assert!(
            matches!(
                built.half_compute,
                Some(bundler::half::HalfCompute::Offered { .. })
            ),
            "the bundler offers no f16 compute for {model}: {:?}",
            built.half_compute
        );
        (bundle, built.accuracy.expect("digits models have labels"))
    };
    let (cnn, cnn_accuracy) = f16_bundle("digits_cnn");
    let (mlp, _) = f16_bundle("digits_mlp");
    // A gate no output can pass: the device must fall back to float32.
    let unreachable = rewrite_manifest(
        &world,
        &cnn,
        |m| {
            let gate = m.golden.f16_compute.as_mut().unwrap();
            gate.min_top1_agreement = Some(1.5);
        },
        "unreachable-gate",
    );
    let fp16_cpu = [("TRACT_CPU_AARCH64_KIND", "a55")];
    let cases = [
        ("digits_cnn", &cnn, "with FP16", &fp16_cpu[..], "f16"),
        ("digits_mlp", &mlp, "with FP16", &fp16_cpu[..], "f16"),
        ("digits_cnn", &cnn, "without FP16", &[][..], "f32"),
        (
            "digits_cnn",
            &unreachable,
            "with FP16, gate unreachable",
            &fp16_cpu[..],
            "f32",
        ),
    ];
    for (i, (model, bundle, cpu, env, compute)) in cases.into_iter().enumerate() {
        let data = world.path(&format!("device-{i}"));
        cross.install(
            bundle,
            &data,
            keyring,
            env,
            &format!("of {model} on a CPU {cpu}"),
        );
        let (_server, url) = serve(&cross, &data, keyring, env);
        let status: serde_json::Value = ureq::get(&format!("{url}/admin/v1/status"))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        assert_eq!(
            status["models"][0]["compute"], compute,
            "{model}, CPU {cpu}: {status}"
        );

        // The golden set as installed, run through the serving path in one batch: how far the
        // device's outputs are from the golden ones.
        let manifest: protocol::manifest::Manifest =
            serde_json::from_slice(&std::fs::read(find_file(&data, "manifest.json")).unwrap())
                .unwrap();
        let golden_bytes = std::fs::read(find_file(&data, &manifest.golden.file)).unwrap();
        let (inputs, want) =
            engine::tensor::golden_tensors(&manifest.golden, &golden_bytes).unwrap();
        let request = serde_json::json!({"inputs": [{"name": "input", "datatype": "FP32",
            "shape": inputs[0].shape, "data": inputs[0].as_f32().unwrap()}]});
        let response: serde_json::Value = ureq::post(&format!("{url}/v2/models/{model}/infer"))
            .send_json(request)
            .unwrap()
            .into_json()
            .unwrap();
        let got: Vec<f32> = serde_json::from_value(response["outputs"][0]["data"].clone()).unwrap();
        let max_diff = got
            .iter()
            .zip(want[0].as_f32().unwrap())
            .map(|(y, g)| (y - g).abs())
            .fold(0.0f32, f32::max);
        let gate = manifest.golden.f16_compute.unwrap();
        let judged = gate.judge(
            &manifest.task,
            &manifest.golden,
            &[want[0].as_f32().unwrap()],
            &[&got],
        );
        eprintln!(
            "f16 bundle of {model}, CPU {cpu}: computes in {compute}; golden outputs at most \
             {max_diff:e} apart (float32 atol {:e}); gate {judged:?}",
            manifest.golden.atol
        );
        if compute == "f16" {
            assert!(
                max_diff > manifest.golden.atol,
                "{model}: outputs within the float32 tolerance: not computed in half precision"
            );
            assert!(judged.is_ok(), "{model}: {judged:?}");
        } else {
            assert!(
                max_diff <= manifest.golden.atol + manifest.golden.rtol,
                "{model} in float32: {max_diff:e}"
            );
        }
        if model == "digits_cnn" {
            let src = models_dir().join(model);
            let accuracy = oip_accuracy(
                &url,
                model,
                "input",
                &src.join("test_input.npy"),
                &src.join("test_labels.npy"),
            )
            .unwrap();
            eprintln!("  accuracy {accuracy:.4} (bundle {cnn_accuracy:.4})");
            let allowed = if compute == "f16" { 0.005 } else { 1e-9 };
            assert!(
                (accuracy - cnn_accuracy).abs() <= allowed,
                "{model}, CPU {cpu}: accuracy {accuracy} vs the bundle's {cnn_accuracy}"
            );
        }
    }
}

/// The one file called `name` under `dir` (a device's data directory holds one slot).
fn find_file(dir: &Path, name: &str) -> std::path::PathBuf {
    let mut found = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == name) {
                found.push(p);
            }
        }
    }
    assert_eq!(found.len(), 1, "{name} under {}: {found:?}", dir.display());
    found.pop().unwrap()
}
