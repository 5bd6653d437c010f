//! The `bundler` binary end to end: keygen, build, inspect, verify, and every refusal.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::*;
use serde_json::Value;

/// One digits_cnn bundle built through the CLI, shared by the tests that only read it.
struct Built {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    key_id: String,
    bundle: PathBuf,
}

fn digits_cnn() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let key_id = keygen(&dir, "ci");
        let bundle = dir.join("digits.mfb");
        let o = bundler(&[
            &"build",
            &model("digits_cnn", "digits_cnn.onnx"),
            &"--name",
            &"digits",
            &"--version",
            &"1.2.3",
            &"--security-version",
            &"7",
            &"--key",
            &dir.join("ci.key"),
            &"-o",
            &bundle,
            &"--golden-inputs",
            &model("digits_cnn", "test_input.npy"),
            &"--golden-labels",
            &model("digits_cnn", "test_labels.npy"),
            &"--calibration",
            &model("digits_cnn", "calib_input.npy"),
            &"--target",
            &"aarch64-unknown-linux-gnu",
            &"--target",
            &"x86_64-unknown-linux-gnu",
            &"--expires-in",
            &"30days",
            &"--latency-runs",
            &"10",
            &"--telemetry-samples",
            &"hashed",
            &"--json",
        ]);
        assert!(o.status.success(), "build failed: {}", stderr(&o));
        let report: Value = serde_json::from_str(&stdout(&o)).expect("build --json is JSON");
        assert_eq!(report["key_id"], key_id.as_str());
        assert_eq!(report["evaluated"], 450);
        Built {
            _dir: tmp,
            dir,
            key_id,
            bundle,
        }
    })
}

#[test]
fn keygen_writes_a_private_key_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let id = keygen(dir.path(), "k");
    assert_eq!(id.len(), 16, "key id is 16 hex characters: {id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    let key = dir.path().join("k.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "secret key mode");
    }
    assert!(fs::read_to_string(dir.path().join("k.pub"))
        .unwrap()
        .contains(&id));
    let before = fs::read(&key).unwrap();
    let o = bundler(&[&"keygen", &"--out-dir", &dir.path(), &"--name", &"k"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("refusing to overwrite"),
        "{}",
        stderr(&o)
    );
    assert_eq!(fs::read(&key).unwrap(), before, "existing key untouched");
}

#[test]
fn digits_cnn_bundle_reports_accuracy_and_verifies() {
    let b = digits_cnn();
    let o = bundler(&[&"inspect", &b.bundle, &"--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let accuracy = v["accuracy"].as_f64().expect("accuracy recorded");
    assert!((accuracy - 0.9889).abs() <= 1e-4, "accuracy {accuracy}");
    assert_eq!(v["baseline"]["accuracy"], v["accuracy"]);
    assert_eq!(v["name"], "digits");
    assert_eq!(v["version"], "1.2.3");
    assert_eq!(v["security_version"], 7);
    assert_eq!(v["key_ids"][0], b.key_id.as_str());
    assert_eq!(v["task"]["kind"], "classification");
    assert_eq!(v["task"]["scores"], "probabilities");
    assert_eq!(v["task"]["classes"], 10);
    assert_eq!(v["golden"]["count"], 64);
    assert_eq!(
        v["golden"]["inputs"][0]["shape"],
        serde_json::json!([64, 1, 8, 8])
    );
    assert_eq!(
        v["golden"]["outputs"][0]["shape"],
        serde_json::json!([64, 10])
    );
    assert_eq!(v["inputs"][0]["shape"], serde_json::json!([null, 1, 8, 8]));
    assert_eq!(v["inputs"][0]["range"], serde_json::json!([0.0, 1.0]));
    assert_eq!(v["baseline"]["samples"], 100, "calibration set");
    assert!(v["baseline"]["source"]
        .as_str()
        .unwrap()
        .contains("calib_input.npy"));
    let dist = v["baseline"]["classification"]["class_distribution"]
        .as_array()
        .unwrap();
    assert_eq!(dist.len(), 10);
    let sum: f64 = dist.iter().map(|x| x.as_f64().unwrap()).sum();
    assert!((sum - 1.0).abs() < 1e-9);
    assert!(v["baseline"]["latency"]["p50_us"].as_f64().unwrap() > 0.0);
    assert_eq!(
        v["targets"],
        serde_json::json!(["aarch64-unknown-linux-gnu", "x86_64-unknown-linux-gnu"])
    );
    assert!(v["expires_at"].is_string());
    assert_eq!(v["expired"], false);
    assert_eq!(v["payloads"].as_array().unwrap().len(), 2);
    assert_eq!(v["telemetry_samples"], "hashed");

    let text = bundler(&[&"inspect", &b.bundle]);
    assert!(text.status.success());
    assert!(
        stdout(&text).contains("accuracy 0.9889"),
        "{}",
        stdout(&text)
    );
    assert!(
        stdout(&text).contains("telemetry        hashed (sampled requests carry a sha256"),
        "{}",
        stdout(&text)
    );

    let pubkey = b.dir.join("ci.pub");
    let o = bundler(&[&"verify", &b.bundle, &"--keyring", &pubkey]);
    assert!(o.status.success(), "verify: {}", stderr(&o));
    assert!(stdout(&o).contains("valid"));
    let o = bundler(&[&"verify", &b.bundle, &"--keyring", &pubkey, &"--json"]);
    assert!(o.status.success());
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["signed_by"][0], b.key_id.as_str());
}

#[test]
fn verify_with_the_wrong_keyring_names_the_keys() {
    let b = digits_cnn();
    let other = tempfile::tempdir().unwrap();
    let other_id = keygen(other.path(), "other");
    let o = bundler(&[
        &"verify",
        &b.bundle,
        &"--keyring",
        &other.path().join("other.pub"),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains(&b.key_id), "names the signer: {err}");
    assert!(err.contains(&other_id), "names the trusted key: {err}");
    assert!(err.contains("not signed by a trusted key"), "{err}");

    // Several keyring files make one keyring: adding the right key makes it valid.
    let o = bundler(&[
        &"verify",
        &b.bundle,
        &"--keyring",
        &other.path().join("other.pub"),
        &"--keyring",
        &b.dir.join("ci.pub"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    // An unreadable keyring is a usage error, not an invalid bundle.
    let o = bundler(&[&"verify", &b.bundle, &"--keyring", &b.dir.join("ci.key")]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("secret key file"), "{}", stderr(&o));
}

#[test]
fn tampered_bundles_fail_verify() {
    let b = digits_cnn();
    let bytes = fs::read(&b.bundle).unwrap();
    let pubkey = b.dir.join("ci.pub");
    let dir = tempfile::tempdir().unwrap();
    // A byte in the manifest, in the signature file, early and late in the payloads.
    let sig_at = bytes
        .windows(b"\"sig\"".len())
        .position(|w| w == b"\"sig\"")
        .unwrap()
        + 12;
    for (what, at) in [
        ("manifest", 600),
        ("signature", sig_at),
        ("model payload", bytes.len() / 2),
        ("golden payload", bytes.len() - 2048),
    ] {
        let mut t = bytes.clone();
        t[at] ^= 0x01;
        let path = dir.path().join(format!("tampered-{at}.mfb"));
        fs::write(&path, &t).unwrap();
        let o = bundler(&[&"verify", &path, &"--keyring", &pubkey]);
        assert_eq!(o.status.code(), Some(1), "{what} change must be refused");
        assert!(
            stderr(&o).contains("is not valid"),
            "{what}: {}",
            stderr(&o)
        );
    }
    let truncated = dir.path().join("truncated.mfb");
    fs::write(&truncated, &bytes[..bytes.len() - 700]).unwrap();
    let o = bundler(&[&"verify", &truncated, &"--keyring", &pubkey, &"--json"]);
    assert_eq!(o.status.code(), Some(1));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["valid"], false);
    assert!(v["error"].as_str().unwrap().contains("truncated.mfb"));
}

/// Runs a build that must be refused; checks the exit code, that the message contains every
/// `needles`, and that nothing was written to the output directory.
fn refused(extra: &[&dyn AsRef<std::ffi::OsStr>], model_file: &Path, needles: &[&str]) {
    let keys = tempfile::tempdir().unwrap();
    keygen(keys.path(), "ci");
    let out = tempfile::tempdir().unwrap();
    let bundle = out.path().join("out.mfb");
    let key = keys.path().join("ci.key");
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"build",
        &model_file,
        &"--security-version",
        &"1",
        &"--key",
        &key,
        &"-o",
        &bundle,
        &"--latency-runs",
        &"2",
    ];
    for (flag, default) in [("--version", "1.0.0"), ("--name", "digits")] {
        if !extra.iter().any(|a| a.as_ref() == flag) {
            args.push(flag_ref(flag));
            args.push(flag_ref(default));
        }
    }
    args.extend_from_slice(extra);
    let o = bundler(&args);
    let err = stderr(&o);
    assert!(!o.status.success(), "build should be refused: {err}");
    for n in needles {
        assert!(err.contains(n), "message should contain '{n}': {err}");
    }
    assert_eq!(listing(out.path()), Vec::<String>::new(), "nothing written");
}

fn flag_ref(s: &'static str) -> &'static dyn AsRef<std::ffi::OsStr> {
    Box::leak(Box::new(s))
}

#[test]
fn build_refuses_a_file_that_is_not_onnx() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("not-a-model.onnx");
    fs::write(&fake, b"this is not a protobuf").unwrap();
    refused(
        &[],
        &fake,
        &["not-a-model.onnx", "not a loadable ONNX model"],
    );
    let missing = dir.path().join("missing.onnx");
    refused(&[], &missing, &["missing.onnx", "cannot read model file"]);
}

#[test]
fn build_refuses_golden_inputs_of_the_wrong_shape() {
    let cnn = model("digits_cnn", "digits_cnn.onnx");
    let mlp_inputs = model("digits_mlp", "test_input.npy");
    refused(
        &[&"--golden-inputs", &mlp_inputs],
        &cnn,
        &[
            "input 'input' expects shape [?, 1, 8, 8]",
            "[450, 64]",
            "test_input.npy",
        ],
    );
    // Labels that do not match the inputs.
    let labels = model("vibration_ae", "test_labels.npy");
    refused(
        &[
            &"--golden-inputs",
            &model("digits_cnn", "test_input.npy"),
            &"--golden-labels",
            &labels,
        ],
        &cnn,
        &["golden labels", "[1000]", "450"],
    );
}

#[test]
fn build_refuses_bad_flags() {
    let cnn = model("digits_cnn", "digits_cnn.onnx");
    refused(
        &[&"--version", &"1.0"],
        &cnn,
        &["'1.0'", "semantic version"],
    );
    refused(
        &[&"--expires-at", &"2020-01-01T00:00:00Z"],
        &cnn,
        &["2020-01-01", "in the past"],
    );
    refused(
        &[&"--quantize", &"int4"],
        &cnn,
        &["'int4'", "none, int8-weights, int8, f16"],
    );
    refused(
        &[&"--quantize", &"int8"],
        &cnn,
        &["--quantize int8 needs --calibration"],
    );
    refused(
        &[&"--quantize", &"int8-weights", &"--exclude-node", &"nope"],
        &cnn,
        &["--exclude-node 'nope'", "no node of that name"],
    );
    refused(&[&"--name", &"../evil"], &cnn, &["'../evil'"]);
    refused(
        &[&"--telemetry-samples", &"anonymised"],
        &cnn,
        &["'anonymised'", "full, hashed, none"],
    );
}

#[test]
fn build_refuses_a_missing_or_garbled_key() {
    let cnn = model("digits_cnn", "digits_cnn.onnx");
    let out = tempfile::tempdir().unwrap();
    let garbled = out.path().join("garbled.key");
    fs::write(&garbled, "ed25519-secret nothex\n").unwrap();
    for (key, needle) in [
        (garbled.clone(), "not a valid secret key file"),
        (out.path().join("absent.key"), "cannot read key file"),
    ] {
        let bundle = out.path().join("out.mfb");
        let o = bundler(&[
            &"build",
            &cnn,
            &"--name",
            &"d",
            &"--version",
            &"1.0.0",
            &"--security-version",
            &"1",
            &"--key",
            &key,
            &"-o",
            &bundle,
        ]);
        assert!(!o.status.success());
        assert!(stderr(&o).contains(needle), "{}", stderr(&o));
        assert!(!bundle.exists());
    }
}

#[test]
fn a_failed_build_leaves_an_existing_output_untouched() {
    let b = digits_cnn();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("keep.mfb");
    fs::copy(&b.bundle, &out).unwrap();
    let o = bundler(&[
        &"build",
        &model("digits_cnn", "digits_cnn.onnx"),
        &"--name",
        &"d",
        &"--version",
        &"2.0.0",
        &"--security-version",
        &"1",
        &"--key",
        &b.dir.join("ci.key"),
        &"-o",
        &out,
        &"--golden-inputs",
        &model("vibration_ae", "test_input.npy"),
    ]);
    assert!(!o.status.success());
    assert_eq!(fs::read(&out).unwrap(), fs::read(&b.bundle).unwrap());
    assert_eq!(listing(dir.path()), vec!["keep.mfb".to_string()]);
}

#[test]
fn mobilenetish_builds_with_its_test_inputs() {
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path(), "ci");
    let bundle = dir.path().join("mobilenet.mfb");
    let o = bundler(&[
        &"build",
        &model("mobilenetish", "mobilenetish.onnx"),
        &"--name",
        &"mobilenetish",
        &"--version",
        &"0.1.0",
        &"--security-version",
        &"1",
        &"--key",
        &dir.path().join("ci.key"),
        &"-o",
        &bundle,
        &"--golden-inputs",
        &model("mobilenetish", "test_input.npy"),
        &"--golden-atol",
        &"1e-3",
        &"--latency-runs",
        &"3",
        &"--zstd-level",
        &"3",
        // Room for two of the four samples (606,112 bytes each: input and logits).
        &"--golden-max-bytes",
        &"1300000",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = bundler(&[&"inspect", &bundle, &"--json"]);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["task"]["kind"], "classification");
    assert_eq!(v["task"]["scores"], "logits");
    assert_eq!(v["task"]["classes"], 1000);
    assert_eq!(v["golden"]["count"], 2);
    assert_eq!(
        v["baseline"]["samples"], 4,
        "statistics over every golden input"
    );
    assert!(v["accuracy"].is_null());
    assert_eq!(v["telemetry_samples"], "full", "the default");
    assert!(v["payload_bytes"].as_u64().unwrap() > 13_900_000);
    let o = bundler(&[&"verify", &bundle, &"--keyring", &dir.path().join("ci.pub")]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_build_failing_at_the_final_rename_leaves_no_temp_file() {
    // The output path is a non-empty directory: everything succeeds up to the rename.
    let b = digits_cnn();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("taken");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("x"), b"x").unwrap();
    let o = bundler(&[
        &"build",
        &model("digits_mlp", "digits_mlp.onnx"),
        &"--name",
        &"d",
        &"--version",
        &"1.0.0",
        &"--security-version",
        &"1",
        &"--key",
        &b.dir.join("ci.key"),
        &"-o",
        &out,
        &"--latency-runs",
        &"2",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cannot write"), "{}", stderr(&o));
    assert_eq!(
        listing(dir.path()),
        vec!["taken".to_string()],
        "temp file removed"
    );
}

#[test]
fn keyring_update_is_signed_in_turn_and_applies_to_the_current_keyring() {
    use protocol::keys::{Keyring, SignedKeyringUpdate};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for name in ["k0", "k1", "k2"] {
        keygen(d, name);
    }
    let update = d.join("update.json");
    let o = bundler(&[
        &"keyring-update",
        &"--version",
        &"1",
        &"--threshold",
        &"2",
        &"--key",
        &d.join("k1.pub"),
        &"--key",
        &d.join("k2.pub"),
        &"--sign",
        &d.join("k1.key"),
        &"-o",
        &update,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let read =
        || -> SignedKeyringUpdate { serde_json::from_slice(&fs::read(&update).unwrap()).unwrap() };
    let current = bundler::load_keyring(&[d.join("k1.pub"), d.join("k2.pub")]).unwrap();
    let mut two = current.clone();
    two.threshold = 2;
    // One signature is enough for a file keyring (threshold 1), not for one of threshold 2.
    assert_eq!(current.apply_update(&read()).unwrap().version, 1);
    assert!(two.apply_update(&read()).is_err());
    // The second holder co-signs the same file (twice: counted once).
    for _ in 0..2 {
        let o = bundler(&[
            &"keyring-update",
            &"--cosign",
            &update,
            &"--sign",
            &d.join("k2.key"),
            &"-o",
            &update,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    assert_eq!(read().signatures.len(), 2);
    assert_eq!(two.apply_update(&read()).unwrap().threshold, 2);
    // Signed by a key outside the current keyring: refused when applied.
    let k0_only = bundler::load_keyring(&[d.join("k0.pub")]).unwrap();
    assert!(Keyring::apply_update(&k0_only, &read()).is_err());
    // A threshold the new keys cannot meet is refused when writing.
    let o = bundler(&[
        &"keyring-update",
        &"--version",
        &"1",
        &"--threshold",
        &"3",
        &"--key",
        &d.join("k1.pub"),
        &"--sign",
        &d.join("k0.key"),
        &"-o",
        &d.join("bad.json"),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("threshold"), "{}", stderr(&o));
}
