//! Every way a bundle can be wrong is refused with an error that names what is wrong.

use chrono::{Duration, Utc};
use protocol::bundle::*;
use protocol::keys::{Keyring, SecretKey};
use protocol::manifest::Manifest;
use protocol::tar;
use protocol::testing::sample_manifest;

struct Fixture {
    key: SecretKey,
    keyring: Keyring,
}

impl Fixture {
    fn new() -> Fixture {
        let key = SecretKey::generate().unwrap();
        let keyring = Keyring::new([key.public()]);
        Fixture { key, keyring }
    }

    fn payloads() -> Vec<CompressedPayload> {
        let model: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        vec![
            compress_payload("model.onnx", &model, 3, |_, _| {}).unwrap(),
            compress_payload("golden.bin", &[1, 2, 3, 4], 3, |_, _| {}).unwrap(),
        ]
    }

    fn bundle_with(&self, edit: impl FnOnce(&mut Manifest)) -> Vec<u8> {
        let mut m = sample_manifest();
        edit(&mut m);
        let mut out = Vec::new();
        write_bundle(&mut out, &mut m, &Self::payloads(), &[&self.key]).unwrap();
        out
    }

    fn bundle(&self) -> Vec<u8> {
        self.bundle_with(|_| {})
    }

    fn verify(&self, bytes: &[u8]) -> Result<VerifiedBundle, BundleError> {
        read_bundle(
            bytes,
            &VerifyOptions::new(&self.keyring),
            &mut MemorySink::default(),
        )
    }

    fn refuse(&self, bytes: &[u8], needle: &str) -> String {
        let err = self
            .verify(bytes)
            .expect_err("bundle must be refused")
            .to_string();
        assert!(
            err.contains(needle),
            "error {err:?} does not mention {needle:?}"
        );
        err
    }
}

/// Entries of a valid bundle, to reassemble in bad ways.
fn entries(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut r = bytes;
    let mut out = Vec::new();
    for i in 0.. {
        match tar::read_header(&mut r, i).ok().unwrap() {
            tar::Next::End => break,
            tar::Next::Entry { name, size } => {
                let data = r[..size as usize].to_vec();
                r = &r[size as usize + tar::padding(size)..];
                out.push((name, data));
            }
        }
    }
    out
}

fn assemble(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in entries {
        out.extend_from_slice(&tar::header(name, data.len() as u64));
        out.extend_from_slice(data);
        out.extend_from_slice(&vec![0u8; tar::padding(data.len() as u64)]);
    }
    tar::write_end(&mut out).unwrap();
    out
}

/// Offset of entry `index`'s data in the bundle.
fn data_offset(bytes: &[u8], index: usize) -> usize {
    let mut off = 0;
    for (i, (_, data)) in entries(bytes).iter().enumerate() {
        off += tar::BLOCK;
        if i == index {
            return off;
        }
        off += data.len() + tar::padding(data.len() as u64);
    }
    panic!("no entry {index}")
}

#[test]
fn a_good_bundle_verifies_and_yields_its_payloads() {
    let f = Fixture::new();
    let bytes = f.bundle();
    let mut sink = MemorySink::default();
    let v = read_bundle(&bytes[..], &VerifyOptions::new(&f.keyring), &mut sink).unwrap();
    assert_eq!(v.signed_by, vec![f.key.id()]);
    assert_eq!(v.size, bytes.len() as u64);
    assert_eq!(sink.0["golden.bin"], vec![1, 2, 3, 4]);
    assert_eq!(sink.0["model.onnx"].len(), 200_000);
    assert_eq!(f.bundle(), bytes, "packing is deterministic");
}

#[test]
fn every_single_byte_flip_is_refused() {
    let f = Fixture::new();
    let bytes = f.bundle();
    // Every byte of a bundle is either signed content or fixed framing.
    let step = (bytes.len() / 4000).max(1);
    for pos in (0..bytes.len()).step_by(step) {
        let mut bad = bytes.clone();
        bad[pos] ^= 0x20;
        assert!(
            f.verify(&bad).is_err(),
            "flip at byte {pos} of {} accepted",
            bytes.len()
        );
    }
}

#[test]
fn byte_changed_in_manifest() {
    let f = Fixture::new();
    let mut bytes = f.bundle();
    let at = data_offset(&bytes, 0) + 20;
    bytes[at] ^= 1;
    let err = f.verify(&bytes).unwrap_err();
    assert!(
        matches!(
            err,
            BundleError::BadSignature(_) | BundleError::ManifestParse(_)
        ),
        "{err}"
    );
}

#[test]
fn byte_changed_in_signature() {
    let f = Fixture::new();
    let mut bytes = f.bundle();
    let sig = String::from_utf8(entries(&bytes)[1].1.clone()).unwrap();
    let hex_at = sig.find("\"sig\": \"").unwrap() + 10;
    let at = data_offset(&bytes, 1) + hex_at;
    bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
    f.refuse(&bytes, "does not verify");
}

#[test]
fn byte_changed_in_each_payload() {
    let f = Fixture::new();
    for index in [2, 3] {
        let bytes = f.bundle();
        let len = entries(&bytes)[index].1.len();
        let mut bad = bytes.clone();
        bad[data_offset(&bytes, index) + len / 2] ^= 0x40;
        let err = f.verify(&bad).unwrap_err().to_string();
        let name = &entries(&bytes)[index].0;
        assert!(err.contains(name.as_str()), "{err} should name {name}");
    }
}

#[test]
fn truncated_anywhere() {
    let f = Fixture::new();
    let bytes = f.bundle();
    for cut in [
        0,
        100,
        512,
        700,
        bytes.len() / 2,
        bytes.len() - 1024,
        bytes.len() - 1,
    ] {
        let err = f.verify(&bytes[..cut]).unwrap_err().to_string();
        assert!(
            err.contains("ends inside") || err.contains("zstd") || err.contains("decompresses to"),
            "cut {cut}: {err}"
        );
    }
}

#[test]
fn trailing_garbage() {
    let f = Fixture::new();
    let mut bytes = f.bundle();
    bytes.extend_from_slice(b"garbage");
    f.refuse(&bytes, "after the end of the archive");
}

#[test]
fn payload_not_listed() {
    let f = Fixture::new();
    let mut e = entries(&f.bundle());
    e.push((
        "extra.bin.zst".into(),
        zstd::encode_all(&b"x"[..], 1).unwrap(),
    ));
    f.refuse(
        &assemble(&e),
        "'extra.bin.zst' is in the bundle but not listed",
    );
}

#[test]
fn duplicated_entry() {
    let f = Fixture::new();
    let mut e = entries(&f.bundle());
    e.push(e[2].clone());
    f.refuse(&assemble(&e), "more than once");
    let mut e = entries(&f.bundle());
    e.insert(2, e[0].clone());
    f.refuse(&assemble(&e), "more than once");
}

#[test]
fn path_like_entry_names() {
    let f = Fixture::new();
    for bad in ["../x", "/x", "a/b", ".."] {
        let mut e = entries(&f.bundle());
        e.push((bad.into(), b"x".to_vec()));
        let err = f.refuse(&assemble(&e), "name");
        assert!(err.contains(bad), "{err}");
    }
}

#[test]
fn path_like_payload_names_in_a_signed_manifest() {
    let f = Fixture::new();
    let mut e = entries(&f.bundle());
    let mut v: serde_json::Value = serde_json::from_slice(&e[0].1).unwrap();
    v["payloads"][0]["file"] = "../model.onnx.zst".into();
    e[0].1 = serde_json::to_vec(&v).unwrap();
    e[1].1 = serde_json::to_vec_pretty(&SignatureFile {
        signatures: vec![f.key.sign(&e[0].1)],
    })
    .unwrap();
    f.refuse(&assemble(&e), "payload '../model.onnx.zst': name is a path");
}

#[test]
fn decompression_bomb_stops_at_declared_size() {
    let f = Fixture::new();
    // 256 MiB of zeros compresses to a few KiB; the manifest declares 1 KiB.
    let zeros = vec![0u8; 256 << 20];
    let bomb = compress_payload("model.onnx", &zeros, 1, |_, _| {}).unwrap();
    drop(zeros);
    let mut lying = CompressedPayload {
        entry: bomb.entry.clone(),
        bytes: bomb.bytes,
    };
    lying.entry.size = 1024;
    let golden = compress_payload("golden.bin", b"", 1, |_, _| {}).unwrap();
    let mut m = sample_manifest();
    let mut bytes = Vec::new();
    write_bundle(&mut bytes, &mut m, &[lying, golden], &[&f.key]).unwrap();
    let started = std::time::Instant::now();
    let err = f.refuse(&bytes, "decompresses to more than the 1024 bytes");
    assert!(
        started.elapsed().as_secs() < 5,
        "took {:?}: {err}",
        started.elapsed()
    );
}

#[test]
fn declared_size_larger_than_real() {
    let f = Fixture::new();
    let mut p = Fixture::payloads();
    p[1].entry.size += 10;
    let mut bytes = Vec::new();
    write_bundle(&mut bytes, &mut sample_manifest(), &p, &[&f.key]).unwrap();
    f.refuse(&bytes, "decompresses to 4 bytes, the manifest declares 14");
}

#[test]
fn signed_by_a_key_not_in_the_keyring() {
    let f = Fixture::new();
    let stranger = Fixture::new();
    let err = f.refuse(&stranger.bundle(), "not signed by a trusted key");
    assert!(err.contains(&stranger.key.id().to_string()) && err.contains(&f.key.id().to_string()));
}

#[test]
fn expired_and_slack() {
    let f = Fixture::new();
    let bytes = f.bundle_with(|m| m.expires_at = Some(Utc::now() - Duration::hours(2)));
    f.refuse(&bytes, "expired at");
    let mut opts = VerifyOptions::new(&f.keyring);
    opts.expiry_slack = Duration::hours(3);
    read_bundle(&bytes[..], &opts, &mut DiscardSink).expect("within the slack");
}

#[test]
fn unknown_format_version() {
    let f = Fixture::new();
    let bytes = f.bundle_with(|m| m.format_version = 2);
    f.refuse(&bytes, "unsupported bundle format version 2");
}

#[test]
fn unknown_manifest_field_is_refused() {
    let f = Fixture::new();
    let mut e = entries(&f.bundle());
    let mut v: serde_json::Value = serde_json::from_slice(&e[0].1).unwrap();
    v["surprise"] = 1.into();
    e[0].1 = serde_json::to_vec(&v).unwrap();
    e[1].1 = serde_json::to_vec_pretty(&SignatureFile {
        signatures: vec![f.key.sign(&e[0].1)],
    })
    .unwrap();
    f.refuse(&assemble(&e), "unknown field `surprise`");
}

#[test]
fn missing_payload_and_wrong_order() {
    let f = Fixture::new();
    let mut e = entries(&f.bundle());
    e.pop();
    f.refuse(&assemble(&e), "missing from the bundle");
    let mut e = entries(&f.bundle());
    e.swap(0, 1);
    f.refuse(&assemble(&e), "entry 0 must be 'manifest.json'");
}

#[test]
fn non_regular_file_entry() {
    let f = Fixture::new();
    let mut bytes = f.bundle();
    let payload_header = data_offset(&bytes, 2) - tar::BLOCK;
    bytes[payload_header + 156] = b'5'; // directory
    f.refuse(&bytes, "not a regular file");
}

#[test]
fn helpers_reassemble_the_same_bytes() {
    // Guard for the helpers above: reassembling the entries reproduces the bundle.
    let f = Fixture::new();
    let bytes = f.bundle();
    assert_eq!(assemble(&entries(&bytes)), bytes);
}

#[test]
fn payloads_beyond_the_reader_limits() {
    let f = Fixture::new();
    let bytes = f.bundle();
    let mut opts = VerifyOptions::new(&f.keyring);
    opts.limits.max_payload_bytes = 100_000;
    let err = read_bundle(&bytes[..], &opts, &mut DiscardSink)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("'model.onnx.zst' is 200000 bytes, more than the limit of 100000"),
        "{err}"
    );
    let mut opts = VerifyOptions::new(&f.keyring);
    opts.limits.max_payloads = 1;
    let err = read_bundle(&bytes[..], &opts, &mut DiscardSink)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("2 payloads, more than the limit of 1"),
        "{err}"
    );
}
