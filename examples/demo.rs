//! `cargo run --release --example demo`: modelfleet end to end on one machine, no set-up.
//!
//! Today's story (the fleet server and canary rollouts join it as they land):
//! 1. generate a signing key and bundle the `digits_cnn` reference model twice (v1.0.0, v1.1.0),
//!    with its golden set, baselines and measured accuracy;
//! 2. start a device agent with its Open Inference Protocol v2 API on a free loopback port;
//! 3. install v1.0.0 through the agent's admin API and classify the 450 reference digits over
//!    HTTP, checking the accuracy against the bundle's;
//! 4. try a tampered bundle (refused, v1.0.0 keeps serving), hot-swap to v1.1.0, revert;
//! 5. keep serving until Ctrl-C (or exit with `--exit-when-done`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

fn main() -> Result<()> {
    let exit_when_done = std::env::args().any(|a| a == "--exit-when-done");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let models = root.join("examples/models/digits_cnn");
    let work = tempfile::Builder::new()
        .prefix("modelfleet-demo-")
        .tempdir()?;
    let dir = work.path();
    step(1, "keys and bundles");
    let key = bundler::keygen_files(&dir.join("keys"), "fleet")?;
    println!("   signing key {} in {}", key.key_id, key.secret.display());
    let bundle = |version: &str| -> Result<(PathBuf, bundler::BuildReport)> {
        let out = dir.join(format!("digits_cnn-{version}.mfb"));
        let mut opts = bundler::BuildOptions::new(
            models.join("digits_cnn.onnx"),
            "digits_cnn",
            version,
            1,
            &key.secret,
            &out,
        );
        opts.golden_inputs = Some(models.join("test_input.npy"));
        opts.golden_labels = Some(models.join("test_labels.npy"));
        let report = bundler::build(&opts)?;
        println!(
            "   built {} ({} bytes, accuracy {:.4} on {} labelled inputs, golden set {})",
            out.display(),
            report.size,
            report.accuracy.unwrap_or(f64::NAN),
            report.evaluated,
            report.golden_count
        );
        Ok((out, report))
    };
    let (v1, v1_report) = bundle("1.0.0")?;
    let (v2, _) = bundle("1.1.0")?;

    step(2, "a device agent");
    let keyring = bundler::load_keyring(&[&key.public])?;
    let data_dir = dir.join("device-1");
    let agent = Arc::new(agent::Agent::open(
        agent::AgentConfig::new(&data_dir),
        keyring,
    )?);
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let url = format!("http://127.0.0.1:{port}");
    let rt = tokio::runtime::Runtime::new()?;
    let router = agent::http::router(agent.clone(), None);
    let listener = rt.block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))?;
    rt.spawn(async move { axum::serve(listener, router).await });
    println!("   agent data in {}, API on {url}", data_dir.display());

    step(
        3,
        "install v1.0.0 and classify the reference digits over OIP v2",
    );
    let installed = post(&format!("{url}/admin/v1/bundles"), &std::fs::read(&v1)?)?;
    println!("   installed: {installed}");
    let inputs = engine::npy::read_npy(models.join("test_input.npy"))?;
    let labels = match engine::npy::read_npy(models.join("test_labels.npy"))?.data {
        engine::TensorData::I32(v) => v.into_iter().map(i64::from).collect::<Vec<_>>(),
        engine::TensorData::I64(v) => v,
        _ => bail!("labels are not integers"),
    };
    let pixels = inputs.as_f32().context("inputs are not f32")?;
    let started = std::time::Instant::now();
    let mut correct = 0;
    for (i, label) in labels.iter().enumerate() {
        let request = json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                                         "data": &pixels[i * 64..(i + 1) * 64]}]});
        let response: Value = ureq::post(&format!("{url}/v2/models/digits_cnn/infer"))
            .send_json(request)?
            .into_json()?;
        let probs: Vec<f32> = serde_json::from_value(response["outputs"][0]["data"].clone())?;
        let predicted = probs
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i);
        correct += (predicted == Some(*label as usize)) as usize;
    }
    let accuracy = correct as f64 / labels.len() as f64;
    println!(
        "   {} requests in {:.0} ms: accuracy {accuracy:.4} (bundle says {:.4})",
        labels.len(),
        started.elapsed().as_secs_f64() * 1e3,
        v1_report.accuracy.unwrap_or(f64::NAN)
    );
    ensure!(
        (accuracy - v1_report.accuracy.unwrap_or(0.0)).abs() < 1e-9,
        "served accuracy differs from the bundle's"
    );

    step(4, "a tampered bundle is refused; hot swap; revert");
    let mut tampered = std::fs::read(&v2)?;
    let n = tampered.len();
    tampered[n - 4096] ^= 0x01;
    match ureq::post(&format!("{url}/admin/v1/bundles")).send_bytes(&tampered) {
        Err(ureq::Error::Status(code, r)) => {
            let body: Value = r.into_json()?;
            println!(
                "   tampered v1.1.0 → HTTP {code}: {}",
                body["error"].as_str().unwrap_or("")
            );
        }
        other => bail!("the tampered bundle was not refused: {other:?}"),
    }
    println!(
        "   installed: {}",
        post(&format!("{url}/admin/v1/bundles"), &std::fs::read(&v2)?)?
    );
    let reverted = post(&format!("{url}/admin/v1/models/digits_cnn/revert"), b"")?;
    println!(
        "   reverted: active {} (state {})",
        reverted["active"], reverted["state"]
    );
    let events: Value = ureq::get(&format!("{url}/admin/v1/events"))
        .call()?
        .into_json()?;
    for e in events["events"].as_array().into_iter().flatten() {
        println!(
            "   event {:>3} {:<10} {} {}",
            e["seq"],
            e["kind"].as_str().unwrap_or(""),
            e["model"].as_str().unwrap_or("-"),
            e["version"].as_str().unwrap_or("-")
        );
    }

    step(5, "look around");
    println!("   curl {url}/v2/models/digits_cnn");
    println!("   curl {url}/metrics");
    println!("   curl {url}/admin/v1/status");
    if exit_when_done {
        println!("\ndemo done.");
        return Ok(());
    }
    println!("\nserving until Ctrl-C …");
    rt.block_on(tokio::signal::ctrl_c())?;
    Ok(())
}

fn step(n: usize, what: &str) {
    println!("\n[{n}] {what}");
}

fn post(url: &str, body: &[u8]) -> Result<Value> {
    match ureq::post(url).send_bytes(body) {
        Ok(r) => Ok(r.into_json()?),
        Err(ureq::Error::Status(code, r)) => {
            bail!(
                "{url} answered {code}: {}",
                r.into_string().unwrap_or_default()
            )
        }
        Err(e) => Err(e.into()),
    }
}
