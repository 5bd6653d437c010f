//! Writes `tests/data/pre-telemetry-samples.mfb` and its `.pub`: a bundle signed the way the
//! code signs bundles at the commit this runs on, for `tests/compat.rs` to check that later code
//! still verifies it. Only meaningful on a commit that predates the fields the fixture stands for
//! (it was made at 43b76a8, before `Manifest::telemetry_samples`).
//!
//! ```text
//! cargo run --example write_compat_fixture
//! ```

use std::path::{Path, PathBuf};

use protocol::bundle::*;
use protocol::keys::{Keyring, SecretKey};
use protocol::testing::sample_manifest;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn main() {
    let key = SecretKey::generate().unwrap();
    let payloads = vec![
        compress_payload("model.onnx", b"not a real model", 3, |_, _| {}).unwrap(),
        compress_payload("golden.bin", &[1, 2, 3, 4], 3, |_, _| {}).unwrap(),
    ];
    let mut m = sample_manifest();
    // Optional fields filled in too, so their old forms are covered.
    m.expires_at = chrono::DateTime::from_timestamp(4_000_000_000, 0);
    m.inputs[0].range = Some([-1.5, 2.25]);
    m.health_policy.min_requests = Some(50);
    m.health_policy.max_error_rate = Some(0.02);
    let mut out = Vec::new();
    write_bundle(&mut out, &mut m, &payloads, &[&key]).unwrap();
    std::fs::write(data("pre-telemetry-samples.mfb"), out).unwrap();
    std::fs::write(
        data("pre-telemetry-samples.pub"),
        Keyring::new([key.public()]).to_file_text(),
    )
    .unwrap();
}
