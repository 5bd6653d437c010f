//! Packing, signing, reading and verifying bundles (`.mfb`).
//!
//! A bundle is a canonical tar archive (see [`crate::tar`]) whose entries are, in this order:
//! `manifest.json`, `manifest.sig`, then one zstd-compressed file per payload listed in the
//! manifest. Reading is one forward pass that never trusts an unchecked byte:
//!
//! 1. the manifest and its signatures are read first (both size-bounded) and the signatures are
//!    checked against the keyring *before* any payload is decompressed;
//! 2. the manifest's format version and expiry are checked;
//! 3. each payload entry must be listed in the manifest, appear once, have the declared compressed
//!    size, and decompress (streamed) to exactly the declared size with the declared sha256.
//!    Decompression stops one byte past the declared size, so a zstd bomb costs at most its
//!    declared size, and the window a frame may ask for is capped;
//! 4. every listed payload must be present, and nothing may follow the end of the archive.
//!
//! Where the decompressed payloads go is the caller's choice through [`PayloadSink`]: nowhere
//! (`verify`), memory, or files in a directory (the agent's new slot). A sink must treat what it
//! received as garbage unless [`read_bundle`] returns `Ok`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::keys::{join_ids, KeyId, Keyring, SecretKey, SignatureEntry};
use crate::manifest::{Manifest, PayloadEntry, FORMAT_VERSION};
use crate::tar::{self, Next, ReadError, TarError};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const SIGNATURE_FILE: &str = "manifest.sig";

/// Largest zstd window (2^25 = 32 MiB) a payload frame may require to decode.
pub const WINDOW_LOG_MAX: u32 = 25;

/// Size bounds applied while reading, before anything is allocated.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_manifest_bytes: u64,
    pub max_signature_bytes: u64,
    pub max_payload_bytes: u64,
    pub max_payloads: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_manifest_bytes: 8 << 20,
            max_signature_bytes: 64 << 10,
            max_payload_bytes: 4 << 30,
            max_payloads: 64,
        }
    }
}

/// What a reader trusts and when it is.
#[derive(Debug, Clone)]
pub struct VerifyOptions<'a> {
    pub keyring: &'a Keyring,
    /// Number of distinct trusted keys that must have signed (at least 1).
    pub min_signatures: usize,
    /// The time expiry is judged at.
    pub now: DateTime<Utc>,
    /// Grace after `expires_at`, for devices that were offline or whose clock is behind.
    pub expiry_slack: Duration,
    pub limits: Limits,
}

impl<'a> VerifyOptions<'a> {
    pub fn new(keyring: &'a Keyring) -> VerifyOptions<'a> {
        VerifyOptions {
            keyring,
            min_signatures: 1,
            now: Utc::now(),
            expiry_slack: Duration::zero(),
            limits: Limits::default(),
        }
    }
}

/// The `manifest.sig` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureFile {
    pub signatures: Vec<SignatureEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read the bundle: {0}")]
    Io(#[from] io::Error),
    #[error("malformed bundle archive: {0}")]
    Archive(#[from] TarError),
    #[error("entry {index} must be '{expected}', found '{found}'")]
    EntryOrder {
        index: usize,
        expected: &'static str,
        found: String,
    },
    #[error("bundle has no '{0}'")]
    MissingEntry(&'static str),
    #[error("'{name}' is {size} bytes, more than the limit of {limit}")]
    TooLarge { name: String, size: u64, limit: u64 },
    #[error("manifest.json is not a valid manifest: {0}")]
    ManifestParse(serde_json::Error),
    #[error("manifest.json is invalid: {0}")]
    ManifestInvalid(String),
    #[error("manifest.sig is not a valid signature file: {0}")]
    SignatureParse(serde_json::Error),
    #[error("manifest.sig is not in canonical form (re-serialised or edited)")]
    SignatureNotCanonical,
    #[error("unsupported bundle format version {found} (this build reads version {supported})")]
    FormatVersion { found: u32, supported: u32 },
    #[error("signature by key {0} does not verify: the manifest or the signature was altered")]
    BadSignature(String),
    #[error("not signed by a trusted key: signed by [{signed_by}], keyring has [{trusted}]")]
    Untrusted { signed_by: String, trusted: String },
    #[error("signed by {found} trusted key(s), {required} required")]
    TooFewSignatures { found: usize, required: usize },
    #[error("bundle expired at {expires_at} (now {now}, slack {slack_seconds} s)")]
    Expired {
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
        slack_seconds: i64,
    },
    #[error("'{0}' is in the bundle but not listed in the manifest")]
    Unlisted(String),
    #[error("'{0}' appears more than once")]
    Duplicate(String),
    #[error("payload '{0}' is listed in the manifest but missing from the bundle")]
    MissingPayload(String),
    #[error("payload '{name}' is {actual} compressed bytes, the manifest says {declared}")]
    CompressedSize {
        name: String,
        declared: u64,
        actual: u64,
    },
    #[error(
        "payload '{name}' decompresses to more than the {declared} bytes the manifest declares"
    )]
    Oversize { name: String, declared: u64 },
    #[error("payload '{name}' decompresses to {actual} bytes, the manifest declares {declared}")]
    Undersize {
        name: String,
        declared: u64,
        actual: u64,
    },
    #[error("payload '{name}' has sha256 {actual}, the manifest says {expected}")]
    Hash {
        name: String,
        expected: String,
        actual: String,
    },
    #[error("payload '{name}' is not valid zstd data: {reason}")]
    Decompress { name: String, reason: String },
    #[error("cannot store payload '{name}': {source}")]
    Sink { name: String, source: io::Error },
}

impl From<ReadError> for BundleError {
    fn from(e: ReadError) -> BundleError {
        match e {
            ReadError::Io(e) => BundleError::Io(e),
            ReadError::Tar(e) => BundleError::Archive(e),
        }
    }
}

/// Where verified payloads go. `name` is the decompressed name (the entry name without `.zst`).
pub trait PayloadSink {
    /// Consumes `data` (the decompressed payload, at most `size` bytes). An error aborts reading.
    fn store(&mut self, name: &str, size: u64, data: &mut dyn Read) -> io::Result<()>;
}

/// Drops payloads after checking them (`bundler verify`).
pub struct DiscardSink;

impl PayloadSink for DiscardSink {
    fn store(&mut self, _: &str, _: u64, data: &mut dyn Read) -> io::Result<()> {
        io::copy(data, &mut io::sink()).map(|_| ())
    }
}

/// Keeps payloads in memory.
#[derive(Default)]
pub struct MemorySink(pub BTreeMap<String, Vec<u8>>);

impl PayloadSink for MemorySink {
    fn store(&mut self, name: &str, size: u64, data: &mut dyn Read) -> io::Result<()> {
        // Never trust `size` for the allocation beyond a modest head start.
        let mut buf = Vec::with_capacity(size.min(16 << 20) as usize);
        data.read_to_end(&mut buf)?;
        self.0.insert(name.to_string(), buf);
        Ok(())
    }
}

/// Writes each payload to `dir/name` and fsyncs it. The directory must exist.
pub struct DirSink(pub PathBuf);

impl PayloadSink for DirSink {
    fn store(&mut self, name: &str, _: u64, data: &mut dyn Read) -> io::Result<()> {
        let mut file = fs::File::create(self.0.join(name))?;
        io::copy(data, &mut file)?;
        file.sync_all()
    }
}

/// A bundle whose signatures, expiry and every payload checked out.
#[derive(Debug, Clone)]
pub struct VerifiedBundle {
    pub manifest: Manifest,
    /// The exact signed bytes.
    pub manifest_bytes: Vec<u8>,
    pub signatures: Vec<SignatureEntry>,
    /// Trusted keys whose signature verified.
    pub signed_by: Vec<KeyId>,
    /// sha256 of the whole bundle file: its identity.
    pub sha256: String,
    /// Size of the bundle file in bytes.
    pub size: u64,
}

/// Reads and verifies a bundle, handing each verified payload to `sink`.
pub fn read_bundle(
    reader: impl Read,
    opts: &VerifyOptions<'_>,
    sink: &mut dyn PayloadSink,
) -> Result<VerifiedBundle, BundleError> {
    let mut r = HashingReader::new(BufReader::with_capacity(1 << 16, reader));
    let head = read_head(&mut r, &opts.limits)?;

    let (good, bad) = opts
        .keyring
        .check_signatures(&head.manifest_bytes, &head.signatures);
    if let Some(k) = bad.first() {
        return Err(BundleError::BadSignature(k.to_string()));
    }
    if good.is_empty() {
        let signers: Vec<KeyId> = head.signatures.iter().map(|s| s.key_id).collect();
        let trusted: Vec<KeyId> = opts.keyring.ids().collect();
        return Err(BundleError::Untrusted {
            signed_by: join_ids(&signers),
            trusted: join_ids(&trusted),
        });
    }
    if good.len() < opts.min_signatures.max(1) {
        return Err(BundleError::TooFewSignatures {
            found: good.len(),
            required: opts.min_signatures,
        });
    }
    let manifest = parse_manifest(&head.manifest_bytes)?;
    check_limits(&manifest, &opts.limits)?;
    if let Some(expires_at) = manifest.expires_at {
        if opts.now > expires_at + opts.expiry_slack {
            return Err(BundleError::Expired {
                expires_at,
                now: opts.now,
                slack_seconds: opts.expiry_slack.num_seconds(),
            });
        }
    }

    let mut seen: Vec<&str> = Vec::new();
    for index in 2.. {
        let (name, size) = match tar::read_header(&mut r, index)? {
            Next::End => break,
            Next::Entry { name, size } => (name, size),
        };
        let Some(entry) = manifest.payloads.iter().find(|p| p.file == name) else {
            return Err(if name == MANIFEST_FILE || name == SIGNATURE_FILE {
                BundleError::Duplicate(name)
            } else {
                BundleError::Unlisted(name)
            });
        };
        if seen.contains(&entry.file.as_str()) {
            return Err(BundleError::Duplicate(name));
        }
        seen.push(&entry.file);
        if size != entry.compressed_size {
            return Err(BundleError::CompressedSize {
                name,
                declared: entry.compressed_size,
                actual: size,
            });
        }
        read_payload(&mut r, entry, sink)?;
        tar::read_padding(&mut r, &name, size)?;
    }
    if let Some(missing) = manifest
        .payloads
        .iter()
        .find(|p| !seen.contains(&p.file.as_str()))
    {
        return Err(BundleError::MissingPayload(missing.file.clone()));
    }
    let (sha256, size) = r.finish();
    Ok(VerifiedBundle {
        manifest,
        manifest_bytes: head.manifest_bytes,
        signatures: head.signatures,
        signed_by: good,
        sha256,
        size,
    })
}

/// Opens and verifies the bundle file at `path`.
pub fn read_bundle_file(
    path: &Path,
    opts: &VerifyOptions<'_>,
    sink: &mut dyn PayloadSink,
) -> Result<VerifiedBundle, BundleError> {
    read_bundle(fs::File::open(path)?, opts, sink)
}

/// The manifest and signatures of a bundle, read without verifying anything (`inspect`).
#[derive(Debug, Clone)]
pub struct BundleHead {
    pub manifest_bytes: Vec<u8>,
    pub signatures: Vec<SignatureEntry>,
}

impl BundleHead {
    pub fn manifest(&self) -> Result<Manifest, BundleError> {
        parse_manifest(&self.manifest_bytes)
    }
}

/// Reads the first two entries (manifest and signatures). Verifies nothing.
pub fn read_head(r: &mut impl Read, limits: &Limits) -> Result<BundleHead, BundleError> {
    let manifest_bytes = read_small_entry(r, 0, MANIFEST_FILE, limits.max_manifest_bytes)?;
    let sig_bytes = read_small_entry(r, 1, SIGNATURE_FILE, limits.max_signature_bytes)?;
    let sig: SignatureFile =
        serde_json::from_slice(&sig_bytes).map_err(BundleError::SignatureParse)?;
    // The signature file is not itself signed: accept only the exact bytes we write.
    if serde_json::to_vec_pretty(&sig).expect("signatures serialise") != sig_bytes {
        return Err(BundleError::SignatureNotCanonical);
    }
    Ok(BundleHead {
        manifest_bytes,
        signatures: sig.signatures,
    })
}

fn read_small_entry(
    r: &mut impl Read,
    index: usize,
    expected: &'static str,
    limit: u64,
) -> Result<Vec<u8>, BundleError> {
    let (name, size) = match tar::read_header(r, index)? {
        Next::End => return Err(BundleError::MissingEntry(expected)),
        Next::Entry { name, size } => (name, size),
    };
    if name != expected {
        return Err(BundleError::EntryOrder {
            index,
            expected,
            found: name,
        });
    }
    if size > limit {
        return Err(BundleError::TooLarge { name, size, limit });
    }
    let mut buf = vec![0u8; size as usize];
    r.read_exact(&mut buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => BundleError::Archive(TarError::Truncated(expected)),
        _ => BundleError::Io(e),
    })?;
    tar::read_padding(r, expected, size)?;
    Ok(buf)
}

/// Parses manifest bytes and checks what the format requires beyond JSON shape.
pub fn parse_manifest(bytes: &[u8]) -> Result<Manifest, BundleError> {
    // Read the version first so a future format is reported as such, not as a parse error.
    #[derive(Deserialize)]
    struct Version {
        format_version: u32,
    }
    let v: Version = serde_json::from_slice(bytes).map_err(BundleError::ManifestParse)?;
    if v.format_version != FORMAT_VERSION {
        return Err(BundleError::FormatVersion {
            found: v.format_version,
            supported: FORMAT_VERSION,
        });
    }
    let m: Manifest = serde_json::from_slice(bytes).map_err(BundleError::ManifestParse)?;
    check_manifest(&m)?;
    Ok(m)
}

/// Refuses a manifest whose declared payloads exceed what this reader accepts.
fn check_limits(m: &Manifest, limits: &Limits) -> Result<(), BundleError> {
    if m.payloads.len() > limits.max_payloads {
        return Err(BundleError::ManifestInvalid(format!(
            "{} payloads, more than the limit of {}",
            m.payloads.len(),
            limits.max_payloads
        )));
    }
    if let Some(p) = m
        .payloads
        .iter()
        .find(|p| p.size.max(p.compressed_size) > limits.max_payload_bytes)
    {
        return Err(BundleError::TooLarge {
            name: p.file.clone(),
            size: p.size.max(p.compressed_size),
            limit: limits.max_payload_bytes,
        });
    }
    Ok(())
}

fn is_sha256_hex(digest: &str) -> bool {
    digest.len() == 64
        && digest
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn check_manifest(m: &Manifest) -> Result<(), BundleError> {
    let invalid = |s: String| Err(BundleError::ManifestInvalid(s));
    if let Err(reason) = tar::check_entry_name(&m.name) {
        return invalid(format!("model name '{}': {reason}", m.name));
    }
    for (i, p) in m.payloads.iter().enumerate() {
        if let Err(reason) = tar::check_entry_name(&p.file) {
            return invalid(format!("payload '{}': {reason}", p.file));
        }
        if !p.file.ends_with(".zst") || p.file.len() <= 4 {
            return invalid(format!("payload '{}' must be a '.zst' file", p.file));
        }
        if p.file == MANIFEST_FILE || p.file == SIGNATURE_FILE {
            return invalid(format!("payload '{}' reuses a reserved name", p.file));
        }
        if m.payloads[..i].iter().any(|q| q.file == p.file) {
            return invalid(format!("payload '{}' is listed twice", p.file));
        }
        for digest in [&p.sha256, &p.compressed_sha256] {
            if !is_sha256_hex(digest) {
                return invalid(format!(
                    "payload '{}': a sha256 is not 64 lowercase hex characters",
                    p.file
                ));
            }
        }
    }
    let narrow_file = m.narrow_weights.as_ref().map(|n| &n.file);
    for needed in [&m.model_file, &m.golden.file]
        .into_iter()
        .chain(narrow_file)
    {
        if m.payload(needed).is_none() {
            return invalid(format!("'{needed}' is referenced but not a payload"));
        }
    }
    if let Some(n) = &m.narrow_weights {
        if !is_sha256_hex(&n.model_sha256) {
            return invalid(format!(
                "narrow_weights: model_sha256 '{}' is not 64 lowercase hex characters",
                n.model_sha256
            ));
        }
        if n.file == m.model_file || n.file == m.golden.file {
            return invalid(format!(
                "narrow_weights: file '{}' is another payload",
                n.file
            ));
        }
    }
    Ok(())
}

fn read_payload(
    r: &mut impl Read,
    entry: &PayloadEntry,
    sink: &mut dyn PayloadSink,
) -> Result<(), BundleError> {
    let name = entry
        .file
        .strip_suffix(".zst")
        .expect("checked by check_manifest");
    let mut compressed = HashingReader::new(r.take(entry.compressed_size));
    let decompress_error = |e: io::Error| BundleError::Decompress {
        name: entry.file.clone(),
        reason: e.to_string(),
    };
    let mut decoder =
        zstd::stream::read::Decoder::new(&mut compressed).map_err(decompress_error)?;
    decoder
        .window_log_max(WINDOW_LOG_MAX)
        .map_err(decompress_error)?;
    let mut guarded = GuardedPayload {
        inner: decoder,
        remaining: entry.size,
        read: 0,
        hasher: Sha256::new(),
        outcome: None,
    };
    let stored = sink.store(name, entry.size, &mut guarded);
    // Whatever the sink did, read to the end so oversize and truncation are seen.
    let drained = stored.and_then(|_| io::copy(&mut guarded, &mut io::sink()));
    if let Some(outcome) = guarded.outcome.take() {
        return Err(match outcome {
            Outcome::Oversize => BundleError::Oversize {
                name: entry.file.clone(),
                declared: entry.size,
            },
            Outcome::Undersize => BundleError::Undersize {
                name: entry.file.clone(),
                declared: entry.size,
                actual: guarded.read,
            },
            Outcome::Decode(reason) => BundleError::Decompress {
                name: entry.file.clone(),
                reason,
            },
        });
    }
    drained.map_err(|source| BundleError::Sink {
        name: entry.file.clone(),
        source,
    })?;
    let actual = hex::encode(guarded.hasher.finalize());
    if actual != entry.sha256 {
        return Err(BundleError::Hash {
            name: entry.file.clone(),
            expected: entry.sha256.clone(),
            actual,
        });
    }
    // The zstd stream must use the whole entry: bytes after the last frame are tampering.
    let reader = guarded.inner.finish();
    if !reader.buffer().is_empty() || reader.get_ref().inner.limit() > 0 {
        return Err(BundleError::Decompress {
            name: entry.file.clone(),
            reason: "data after the end of the compressed stream".into(),
        });
    }
    let (actual, _) = compressed.finish();
    if actual != entry.compressed_sha256 {
        return Err(BundleError::Hash {
            name: entry.file.clone(),
            expected: entry.compressed_sha256.clone(),
            actual,
        });
    }
    Ok(())
}

enum Outcome {
    Oversize,
    Undersize,
    Decode(String),
}

/// Passes through at most `remaining` decompressed bytes, hashing them; records (rather than
/// just returns) why it stopped, so the reason survives whatever the sink does with the error.
struct GuardedPayload<R> {
    inner: R,
    remaining: u64,
    read: u64,
    hasher: Sha256,
    outcome: Option<Outcome>,
}

impl<R: Read> Read for GuardedPayload<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.outcome.is_some() {
            return Err(io::Error::other("payload rejected"));
        }
        if self.remaining == 0 {
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe) {
                Ok(0) => Ok(0),
                Ok(_) => self.fail(Outcome::Oversize),
                Err(e) => self.fail(Outcome::Decode(e.to_string())),
            };
        }
        let max = buf
            .len()
            .min(self.remaining.min(usize::MAX as u64) as usize);
        match self.inner.read(&mut buf[..max]) {
            Ok(0) if max > 0 => self.fail(Outcome::Undersize),
            Ok(n) => {
                self.hasher.update(&buf[..n]);
                self.remaining -= n as u64;
                self.read += n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => self.fail(Outcome::Decode(e.to_string())),
        }
    }
}

impl<R> GuardedPayload<R> {
    fn fail(&mut self, outcome: Outcome) -> io::Result<usize> {
        self.outcome = Some(outcome);
        Err(io::Error::other("payload rejected"))
    }
}

/// Hashes everything read through it: the bundle's identity comes for free with verification.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }
    fn finish(self) -> (String, u64) {
        (hex::encode(self.hasher.finalize()), self.count)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// A payload compressed and ready to pack.
pub struct CompressedPayload {
    pub entry: PayloadEntry,
    pub bytes: Vec<u8>,
}

/// Compresses `data` as payload `name` (stored as `name.zst`) at zstd `level`, calling
/// `progress(done, total)` as input is consumed.
pub fn compress_payload(
    name: &str,
    data: &[u8],
    level: i32,
    mut progress: impl FnMut(u64, u64),
) -> io::Result<CompressedPayload> {
    let file = format!("{name}.zst");
    tar::check_entry_name(&file)
        .map_err(|r| io::Error::new(io::ErrorKind::InvalidInput, format!("'{file}': {r}")))?;
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), level)?;
    enc.include_checksum(true)?;
    enc.window_log(WINDOW_LOG_MAX.min(23))?;
    enc.set_pledged_src_size(Some(data.len() as u64))?;
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        enc.write_all(chunk)?;
        progress(((i << 20) + chunk.len()) as u64, data.len() as u64);
    }
    let bytes = enc.finish()?;
    Ok(CompressedPayload {
        entry: PayloadEntry {
            file,
            compressed_size: bytes.len() as u64,
            size: data.len() as u64,
            sha256: hex::encode(Sha256::digest(data)),
            compressed_sha256: hex::encode(Sha256::digest(&bytes)),
        },
        bytes,
    })
}

/// Writes a signed bundle. `manifest.payloads` is replaced by the entries of `payloads`.
/// Returns the exact manifest bytes that were signed.
pub fn write_bundle(
    out: &mut impl Write,
    manifest: &mut Manifest,
    payloads: &[CompressedPayload],
    signers: &[&SecretKey],
) -> Result<Vec<u8>, BundleError> {
    manifest.payloads = payloads.iter().map(|p| p.entry.clone()).collect();
    check_manifest(manifest)?;
    // Compact: the manifest is signed as the bytes it is, so readers of every version take any
    // spelling, and the indentation of a pretty one was a third of a small bundle's manifest.
    let manifest_bytes = serde_json::to_vec(manifest).expect("manifest serialises");
    let sig = SignatureFile {
        signatures: signers.iter().map(|k| k.sign(&manifest_bytes)).collect(),
    };
    if sig.signatures.is_empty() {
        return Err(BundleError::ManifestInvalid(
            "a bundle needs at least one signer".into(),
        ));
    }
    let sig_bytes = serde_json::to_vec_pretty(&sig).expect("signatures serialise");
    tar::write_entry(out, MANIFEST_FILE, &manifest_bytes)?;
    tar::write_entry(out, SIGNATURE_FILE, &sig_bytes)?;
    for p in payloads {
        tar::write_entry(out, &p.entry.file, &p.bytes)?;
    }
    tar::write_end(out)?;
    Ok(manifest_bytes)
}
