//! The agent's serving path end to end, with real bundles of the reference models and the real
//! `fleet-agent` binary: install, serve over OIP v2, bad requests, refused bundles, hot swap
//! under load.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

fn post_json(url: &str, body: &serde_json::Value) -> Result<serde_json::Value, (u16, String)> {
    match ureq::post(url).send_json(body.clone()) {
        Ok(r) => Ok(r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => Err((code, r.into_string().unwrap_or_default())),
        Err(e) => Err((0, e.to_string())),
    }
}

#[test]
fn install_run_and_reach_reference_accuracy_over_oip() {
    let fx = Fixture::new();
    let bundle = fx.bundle("digits_cnn", "1.0.0", 1);
    let data = fx.path("data");
    let stdout = fx.install_offline(&bundle, &data);
    assert!(stdout.contains("installed digits_cnn 1.0.0"), "{stdout}");
    let agent = AgentProcess::start(&fx, &data, &[]);
    let infer = format!("{}/v2/models/digits_cnn/infer", agent.url);
    let inputs = engine::npy::read_npy(models_dir().join("digits_cnn/test_input.npy")).unwrap();
    let labels = labels("digits_cnn");
    let mut correct = 0;
    for (i, label) in labels.iter().enumerate() {
        let response = post_json(&infer, &json_request("input", &sample(&inputs, i))).unwrap();
        let out = &response["outputs"][0];
        assert_eq!(out["name"], "probabilities");
        assert_eq!(out["shape"], serde_json::json!([1, 10]));
        let probs: Vec<f32> = serde_json::from_value(out["data"].clone()).unwrap();
        correct += (argmax(&probs) as i64 == *label) as usize;
    }
    let accuracy = correct as f64 / labels.len() as f64;
    assert!((accuracy - 0.9889).abs() < 1e-4, "accuracy {accuracy}");

    // A wrong-shape request is a 400 with the protocol's error form; the next request works.
    let bad = serde_json::json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                             "data": vec![0.0f32; 64]}]});
    let (code, body) = post_json(&infer, &bad).unwrap_err();
    assert_eq!(code, 400, "{body}");
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(err["error"].as_str().unwrap().contains("input"), "{body}");
    let (code, _) = post_json(&infer, &serde_json::json!({"inputs": "nope"})).unwrap_err();
    assert_eq!(code, 400);
    let batch: Vec<f32> = inputs.as_f32().unwrap()[..64 * 5].to_vec();
    let five = engine::Tensor::from_f32(vec![5, 1, 8, 8], batch).unwrap();
    let response = post_json(&infer, &json_request("input", &five)).unwrap();
    assert_eq!(
        response["outputs"][0]["shape"],
        serde_json::json!([5, 10]),
        "batch of 5"
    );

    // Metadata, readiness, metrics, status.
    let meta: serde_json::Value = ureq::get(&format!("{}/v2/models/digits_cnn", agent.url))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(meta["versions"], serde_json::json!(["1.0.0"]));
    assert_eq!(
        meta["platform"], "tract_nnef",
        "bundles carry NNEF by default"
    );
    assert_eq!(meta["inputs"][0]["shape"], serde_json::json!([-1, 1, 8, 8]));
    assert_eq!(
        ureq::get(&format!("{}/v2/health/ready", agent.url))
            .call()
            .unwrap()
            .status(),
        200
    );
    let missing = ureq::get(&format!("{}/v2/models/nope/ready", agent.url)).call();
    assert!(matches!(missing, Err(ureq::Error::Status(404, _))));
    let metrics = ureq::get(&format!("{}/metrics", agent.url))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let line = format!(
        "modelfleet_agent_requests_total{{model=\"digits_cnn\",version=\"1.0.0\"}} {}",
        labels.len() + 3
    );
    assert!(metrics.contains(&line), "{metrics}");
    assert!(
        metrics.contains("modelfleet_agent_errors_total{model=\"digits_cnn\",version=\"1.0.0\"} 2")
    );

    let out = fx
        .agent_cmd(&["status", "--agent", &agent.url, "--json"])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["models"][0]["name"], "digits_cnn");
    assert_eq!(status["models"][0]["active"], "1.0.0");
    assert_eq!(status["models"][0]["previous"], serde_json::Value::Null);
    assert_eq!(status["models"][0]["state"], "committed");
}

#[test]
fn binary_tensor_requests_work_like_tritonclient_sends_them() {
    let fx = Fixture::new();
    let data = fx.path("data");
    let agent = AgentProcess::start(&fx, &data, &[]);
    let bundle = fx.bundle("digits_mlp", "1.0.0", 1);
    let out = fx
        .agent_cmd(&["install", bundle.to_str().unwrap(), "--agent", &agent.url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let inputs = engine::npy::read_npy(models_dir().join("digits_mlp/test_input.npy")).unwrap();
    let x = sample(&inputs, 0);
    let header = serde_json::json!({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                    "parameters": {"binary_data_size": 256}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}}]
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend(x.to_le_bytes());
    let r = ureq::post(&format!("{}/v2/models/digits_mlp/infer", agent.url))
        .set("Inference-Header-Content-Length", &header.len().to_string())
        .set("Content-Type", "application/octet-stream")
        .send_bytes(&body)
        .unwrap();
    let hlen: usize = r
        .header("Inference-Header-Content-Length")
        .unwrap()
        .parse()
        .unwrap();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut r.into_reader(), &mut bytes).unwrap();
    let head: serde_json::Value = serde_json::from_slice(&bytes[..hlen]).unwrap();
    assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 40);
    let probs: Vec<f32> = bytes[hlen..]
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(argmax(&probs) as i64, labels("digits_mlp")[0]);
    assert!((probs.iter().sum::<f32>() - 1.0).abs() < 1e-4);
}

#[test]
fn refused_bundles_leave_the_serving_model_untouched() {
    let fx = Fixture::new();
    let data = fx.path("data");
    let v1 = fx.bundle("digits_cnn", "1.0.0", 2);
    let agent = AgentProcess::start(&fx, &data, &[]);
    let install =
        |bytes: &[u8]| ureq::post(&format!("{}/admin/v1/bundles", agent.url)).send_bytes(bytes);
    assert_eq!(install(&std::fs::read(&v1).unwrap()).unwrap().status(), 201);

    let stranger = Fixture::new();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("tampered", {
            let mut b = std::fs::read(fx.bundle("digits_cnn", "1.1.0", 2)).unwrap();
            let n = b.len();
            b[n - 2048] ^= 1;
            b
        }),
        (
            "untrusted key",
            std::fs::read(stranger.bundle("digits_cnn", "1.2.0", 2)).unwrap(),
        ),
        (
            "lower security version",
            std::fs::read(fx.bundle("digits_cnn", "1.3.0", 1)).unwrap(),
        ),
        (
            "foreign target",
            std::fs::read(fx.bundle_with("digits_cnn", "1.4.0", 2, |o| {
                o.targets = vec!["riscv64gc-unknown-linux-gnu".into()]
            }))
            .unwrap(),
        ),
        ("garbage", b"not a bundle".to_vec()),
    ];
    for (what, bytes) in cases {
        match install(&bytes) {
            Err(ureq::Error::Status(422, r)) => {
                let body: serde_json::Value = r.into_json().unwrap();
                assert!(
                    body["error"]
                        .as_str()
                        .unwrap()
                        .starts_with("bundle rejected"),
                    "{what}: {body}"
                );
            }
            other => panic!("{what}: expected 422, got {other:?}"),
        }
    }
    let status: serde_json::Value = ureq::get(&format!("{}/admin/v1/status", agent.url))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(status["models"][0]["active"], "1.0.0");
    let events: serde_json::Value = ureq::get(&format!("{}/admin/v1/events", agent.url))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    let reasons: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "rejected")
        .map(|e| e["detail"]["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        [
            "invalid_bundle",
            "signature",
            "security_version",
            "target",
            "invalid_bundle"
        ]
    );
    let x = sample(
        &engine::npy::read_npy(models_dir().join("digits_cnn/test_input.npy")).unwrap(),
        0,
    );
    post_json(
        &format!("{}/v2/models/digits_cnn/infer", agent.url),
        &json_request("input", &x),
    )
    .unwrap();
}

#[test]
fn hot_swap_and_revert_under_concurrent_load_fail_no_request() {
    let fx = Fixture::new();
    let data = fx.path("data");
    let v1 = std::fs::read(fx.bundle("digits_cnn", "1.0.0", 1)).unwrap();
    let v2 = std::fs::read(fx.bundle("digits_cnn", "2.0.0", 1)).unwrap();
    let agent = AgentProcess::start(&fx, &data, &["--workers", "2"]);
    let admin = |path: &str, body: &[u8]| {
        ureq::post(&format!("{}{path}", agent.url))
            .send_bytes(body)
            .map(|r| r.status())
    };
    assert_eq!(admin("/admin/v1/bundles", &v1).unwrap(), 201);

    let inputs = engine::npy::read_npy(models_dir().join("digits_cnn/test_input.npy")).unwrap();
    let labels = labels("digits_cnn");
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let url = format!("{}/v2/models/digits_cnn/infer", agent.url);
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (stop, served, url, inputs, labels) = (
                stop.clone(),
                served.clone(),
                url.clone(),
                inputs.clone(),
                labels.clone(),
            );
            std::thread::spawn(move || {
                let mut versions = std::collections::BTreeSet::new();
                let mut i = c;
                while !stop.load(Ordering::Relaxed) {
                    let r = post_json(&url, &json_request("input", &sample(&inputs, i % 450)));
                    let r = r.unwrap_or_else(|e| panic!("request failed during swap: {e:?}"));
                    versions.insert(r["model_version"].as_str().unwrap().to_string());
                    let probs: Vec<f32> =
                        serde_json::from_value(r["outputs"][0]["data"].clone()).unwrap();
                    let _ = argmax(&probs) as i64 == labels[i % 450];
                    served.fetch_add(1, Ordering::Relaxed);
                    i += 4;
                }
                versions
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    for round in 0..3 {
        assert_eq!(
            admin("/admin/v1/bundles", &v2).unwrap(),
            201,
            "round {round}"
        );
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            admin("/admin/v1/models/digits_cnn/revert", b"").unwrap(),
            200
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let mut seen = std::collections::BTreeSet::new();
    for c in clients {
        seen.extend(c.join().expect("a client saw a failed request"));
    }
    assert!(
        served.load(Ordering::Relaxed) > 100,
        "load was too light to mean anything"
    );
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["1.0.0", "2.0.0"]);
}

#[test]
fn admin_token_guards_the_admin_api_only() {
    let fx = Fixture::new();
    let data = fx.path("data");
    let agent = AgentProcess::start(&fx, &data, &["--admin-token", "s3cret"]);
    let bundle = std::fs::read(fx.bundle("digits_mlp", "1.0.0", 1)).unwrap();
    let url = format!("{}/admin/v1/bundles", agent.url);
    match ureq::post(&url).send_bytes(&bundle) {
        Err(ureq::Error::Status(401, _)) => {}
        other => panic!("expected 401 without a token, got {other:?}"),
    }
    match ureq::post(&url)
        .set("Authorization", "Bearer wrong")
        .send_bytes(&bundle)
    {
        Err(ureq::Error::Status(401, _)) => {}
        other => panic!("expected 401 with a wrong token, got {other:?}"),
    }
    let r = ureq::post(&url)
        .set("Authorization", "Bearer s3cret")
        .send_bytes(&bundle)
        .unwrap();
    assert_eq!(r.status(), 201);
    // The CLI passes the token through.
    let out = fx
        .agent_cmd(&[
            "status", "--agent", &agent.url, "--json", "--token", "s3cret",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Inference is not behind the admin token; the version path serves only the active version.
    let x = sample(
        &engine::npy::read_npy(models_dir().join("digits_mlp/test_input.npy")).unwrap(),
        0,
    );
    let base = format!("{}/v2/models/digits_mlp", agent.url);
    post_json(
        &format!("{base}/versions/1.0.0/infer"),
        &json_request("input", &x),
    )
    .unwrap();
    let (code, body) = post_json(
        &format!("{base}/versions/0.9.0/infer"),
        &json_request("input", &x),
    )
    .unwrap_err();
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("serves version 1.0.0, not 0.9.0"), "{body}");
}

#[test]
fn every_quantized_bundle_serves_over_oip_with_the_accuracy_its_manifest_records() {
    // Each quantization mode of digits_cnn, installed on a running agent (hot swaps through the
    // admin API) and served over OIP: all 450 test samples in one batched request and each
    // alone. The accuracy is the one the manifest records, and a sample's scores are the same
    // in the batch and alone: bit for bit for static int8 (batches run sample by sample on the
    // batch-1 plan), within the golden tolerance for the others (two plans, float rounding).
    use bundler::{Int8Form, QuantizeMode};
    let fx = Fixture::new();
    let calibration = models_dir().join("digits_cnn/calib_input.npy");
    let keyring = bundler::load_keyring(std::slice::from_ref(&fx.keyring)).unwrap();
    let modes = [
        ("1.0.1", QuantizeMode::Int8Weights, None),
        ("1.0.2", QuantizeMode::F16, None),
        ("1.0.3", QuantizeMode::Int8, Some(Int8Form::Qdq)),
        ("1.0.4", QuantizeMode::Int8, Some(Int8Form::QOperator)),
    ];
    let data = fx.path("data");
    let agent = AgentProcess::start(&fx, &data, &[]);
    let infer = format!("{}/v2/models/digits_cnn/infer", agent.url);
    let inputs = engine::npy::read_npy(models_dir().join("digits_cnn/test_input.npy")).unwrap();
    let labels = labels("digits_cnn");
    for (version, mode, form) in modes {
        let bundle = fx.bundle_with("digits_cnn", version, 1, |o| {
            o.quantize = mode;
            o.int8_form = form;
            o.calibration = Some(calibration.clone());
        });
        let manifest = bundler::verify(&bundle, &keyring).unwrap().manifest;
        let what = format!("{mode:?} {form:?} ({:?})", manifest.model_format);
        let installed = ureq::post(&format!("{}/admin/v1/bundles", agent.url))
            .send_bytes(&std::fs::read(&bundle).unwrap())
            .unwrap();
        assert_eq!(installed.status(), 201, "{what}");

        let response = post_json(&infer, &json_request("input", &inputs)).unwrap();
        assert_eq!(response["model_version"], version, "{what}");
        let out = &response["outputs"][0];
        assert_eq!(
            out["shape"],
            serde_json::json!([labels.len(), 10]),
            "{what}"
        );
        let batch: Vec<f32> = serde_json::from_value(out["data"].clone()).unwrap();
        let correct = batch
            .chunks(10)
            .zip(&labels)
            .filter(|(row, &label)| argmax(row) as i64 == label)
            .count();
        let accuracy = correct as f64 / labels.len() as f64;
        assert_eq!(Some(accuracy), manifest.baseline.accuracy, "{what}");
        assert!(
            manifest.baseline.accuracy.unwrap() >= 0.9889 - 0.01,
            "{what}: within a point of float"
        );
        for i in [0, 1, 200, 449] {
            let alone = post_json(&infer, &json_request("input", &sample(&inputs, i))).unwrap();
            let alone: Vec<f32> =
                serde_json::from_value(alone["outputs"][0]["data"].clone()).unwrap();
            let in_batch = &batch[i * 10..(i + 1) * 10];
            if mode == QuantizeMode::Int8 {
                assert_eq!(alone, in_batch, "{what}: sample {i}");
            } else {
                // Float activations: two plans, equal within float rounding.
                let g = &manifest.golden;
                for (a, b) in alone.iter().zip(in_batch) {
                    assert!(
                        (a - b).abs() <= g.atol + g.rtol * b.abs(),
                        "{what}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
