//! The fuzz seed corpus (`fuzz/corpus/`) and a deterministic miniature of the fuzzer: every
//! single-byte change and every truncation of a valid bundle is refused, without a panic.

use std::path::PathBuf;

use protocol::bundle::{compress_payload, read_bundle, write_bundle, DiscardSink, VerifyOptions};
use protocol::keys::{Keyring, SecretKey};

/// Same key as `fuzz/fuzz_targets/bundle_reader.rs`.
const FUZZ_SECRET_KEY: &str =
    "ed25519-secret 6d6f64656c666c6565742066757a7a696e67206b6579206e6f74207365637265";

fn corpus(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// The seed bundle: protocol's sample manifest with two tiny payloads. Deterministic.
fn seed() -> (Vec<u8>, Vec<u8>) {
    let key = SecretKey::from_file_text(FUZZ_SECRET_KEY).unwrap();
    let mut manifest = protocol::testing::sample_manifest();
    manifest.name = "fuzz-seed".into();
    let payloads = vec![
        compress_payload("model.onnx", b"not really onnx", 3, |_, _| {}).unwrap(),
        compress_payload("golden.bin", &[0u8; 16], 3, |_, _| {}).unwrap(),
    ];
    let mut bytes = Vec::new();
    let manifest_bytes = write_bundle(&mut bytes, &mut manifest, &payloads, &[&key]).unwrap();
    (bytes, manifest_bytes)
}

fn opts(keyring: &Keyring) -> VerifyOptions<'_> {
    let mut o = VerifyOptions::new(keyring);
    o.now = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
    o
}

#[test]
fn committed_seed_corpus_is_current() {
    let (bytes, manifest) = seed();
    let files = [
        (corpus("bundle_reader").join("valid-tiny.mfb"), bytes),
        (corpus("manifest_parser").join("manifest.json"), manifest),
    ];
    if std::env::var_os("MODELFLEET_WRITE_FUZZ_SEED").is_some() {
        for (path, data) in &files {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, data).unwrap();
        }
    }
    for (path, data) in &files {
        let committed = std::fs::read(path).unwrap_or_default();
        assert!(
            &committed == data,
            "{} is missing or stale; regenerate with MODELFLEET_WRITE_FUZZ_SEED=1",
            path.display()
        );
    }
    assert!(files[0].1.len() < 16 << 10, "keep the committed seed small");
}

#[test]
fn every_byte_change_and_truncation_of_the_seed_is_refused() {
    let key = SecretKey::from_file_text(FUZZ_SECRET_KEY).unwrap();
    let keyring = Keyring::new([key.public()]);
    let (bytes, _) = seed();
    read_bundle(&bytes[..], &opts(&keyring), &mut DiscardSink).expect("seed is valid");
    let mut mutated = bytes.clone();
    for i in 0..bytes.len() {
        for flip in [0x01u8, 0x80] {
            mutated[i] ^= flip;
            let r = read_bundle(&mutated[..], &opts(&keyring), &mut DiscardSink);
            assert!(r.is_err(), "byte {i} ^ {flip:#x} went unnoticed");
            mutated[i] ^= flip;
        }
    }
    for len in (0..bytes.len()).step_by(97).chain([bytes.len() - 1]) {
        assert!(read_bundle(&bytes[..len], &opts(&keyring), &mut DiscardSink).is_err());
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(read_bundle(&longer[..], &opts(&keyring), &mut DiscardSink).is_err());
}
