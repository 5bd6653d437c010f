//! Bundles signed by earlier releases keep verifying: the manifest is signed over its exact bytes,
//! so a field added later must parse as absent and must not be written back when it holds its
//! default (a re-serialised old manifest is byte-for-byte the signed one).
//!
//! `tests/data/pre-telemetry-samples.mfb` was written (and signed with the key whose public half is
//! `tests/data/pre-telemetry-samples.pub`) by the code before `Manifest::telemetry_samples` existed,
//! with `protocol/examples/write_compat_fixture.rs` (`cargo run --example write_compat_fixture`,
//! meaningful only on a commit that predates the fields the fixture stands for).

use std::path::{Path, PathBuf};

use protocol::bundle::*;
use protocol::keys::{Keyring, SecretKey};
use protocol::manifest::{ModelFormat, TelemetrySamples};
use protocol::testing::sample_manifest;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn verify(bytes: &[u8], keyring: &Keyring) -> Result<VerifiedBundle, BundleError> {
    read_bundle(
        bytes,
        &VerifyOptions::new(keyring),
        &mut MemorySink::default(),
    )
}

#[test]
fn a_bundle_signed_before_telemetry_samples_still_verifies_and_reserialises_identically() {
    let bytes = std::fs::read(data("pre-telemetry-samples.mfb")).unwrap();
    let keyring = Keyring::from_file_text(
        &std::fs::read_to_string(data("pre-telemetry-samples.pub")).unwrap(),
    )
    .unwrap();
    let v = verify(&bytes, &keyring).expect("an old bundle verifies");
    let text = String::from_utf8(v.manifest_bytes.clone()).unwrap();
    assert!(!text.contains("telemetry_samples"), "the fixture is old");
    assert_eq!(v.manifest.telemetry_samples, TelemetrySamples::Full);
    assert!(
        !text.contains("model_format"),
        "the fixture predates model_format too"
    );
    assert_eq!(v.manifest.model_format, ModelFormat::Onnx);
    assert_eq!(
        serde_json::to_vec_pretty(&v.manifest).unwrap(),
        v.manifest_bytes,
        "an old manifest re-serialises to the exact bytes that were signed"
    );
}

#[test]
fn telemetry_samples_is_signed_and_left_out_only_when_full() {
    let key = SecretKey::generate().unwrap();
    let keyring = Keyring::new([key.public()]);
    let payloads = vec![
        compress_payload("model.onnx", b"model", 3, |_, _| {}).unwrap(),
        compress_payload("golden.bin", &[1, 2, 3, 4], 3, |_, _| {}).unwrap(),
    ];
    for mode in TelemetrySamples::ALL {
        let mut m = sample_manifest();
        m.telemetry_samples = mode;
        let mut out = Vec::new();
        let signed = write_bundle(&mut out, &mut m, &payloads, &[&key]).unwrap();
        let v = verify(&out, &keyring).unwrap();
        assert_eq!(v.manifest.telemetry_samples, mode);
        assert_eq!(
            serde_json::to_vec(&v.manifest).unwrap(),
            signed,
            "the writer signs compact JSON, which re-serialises to the signed bytes"
        );
        let text = String::from_utf8(signed).unwrap();
        let field = format!("\"telemetry_samples\":\"{mode}\"");
        assert_eq!(text.contains(&field), !mode.is_full(), "{text}");
        assert_eq!(text.contains("telemetry_samples"), !mode.is_full());
    }
    assert_eq!("hashed".parse(), Ok(TelemetrySamples::Hashed));
    assert!("anonymous"
        .parse::<TelemetrySamples>()
        .unwrap_err()
        .contains("full, hashed, none"));
}

#[test]
fn model_format_is_signed_and_left_out_only_when_onnx() {
    let key = SecretKey::generate().unwrap();
    let keyring = Keyring::new([key.public()]);
    for format in ModelFormat::ALL {
        let model_file = match format {
            ModelFormat::Onnx => "model.onnx",
            ModelFormat::Nnef => "model.nnef.tar",
        };
        let payloads = vec![
            compress_payload(model_file, b"model", 3, |_, _| {}).unwrap(),
            compress_payload("golden.bin", &[1, 2, 3, 4], 3, |_, _| {}).unwrap(),
        ];
        let mut m = sample_manifest();
        m.model_file = model_file.into();
        m.model_format = format;
        let mut out = Vec::new();
        let signed = write_bundle(&mut out, &mut m, &payloads, &[&key]).unwrap();
        let v = verify(&out, &keyring).unwrap();
        assert_eq!(v.manifest.model_format, format);
        assert_eq!(v.manifest.model_file, model_file);
        let text = String::from_utf8(signed).unwrap();
        assert_eq!(
            text.contains("\"model_format\":\"nnef\""),
            format == ModelFormat::Nnef,
            "{text}"
        );
        assert_eq!(text.contains("model_format"), !format.is_onnx());
    }
    assert_eq!("nnef".parse(), Ok(ModelFormat::Nnef));
    assert!("tflite"
        .parse::<ModelFormat>()
        .unwrap_err()
        .contains("onnx, nnef"));
}
