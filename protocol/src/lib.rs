//! The modelfleet contract: every byte one modelfleet program writes and another reads.
//!
//! Three programs cooperate — the `bundler` in build pipelines, the `fleet-server` in the control
//! plane and the `fleet-agent` on each device — and this crate is the only place where the formats
//! between them are defined. Nothing here does I/O beyond the readers and writers it is handed,
//! knows about tract, HTTP or MQTT clients, or keeps state.
//!
//! # A tour: sign a bundle and verify it
//!
//! ```
//! use protocol::bundle::{compress_payload, read_bundle, write_bundle, MemorySink, VerifyOptions};
//! use protocol::keys::{Keyring, SecretKey};
//! # let mut manifest = protocol::testing::sample_manifest();
//!
//! let key = SecretKey::generate()?;
//! let payloads = vec![
//!     compress_payload("model.onnx", b"onnx bytes", 3, |_, _| {})?,
//!     compress_payload("golden.bin", b"", 3, |_, _| {})?,
//! ];
//! let mut bytes = Vec::new();
//! write_bundle(&mut bytes, &mut manifest, &payloads, &[&key])?;
//!
//! let keyring = Keyring::new([key.public()]);
//! let mut sink = MemorySink::default();
//! let verified = read_bundle(&bytes[..], &VerifyOptions::new(&keyring), &mut sink)?;
//! assert_eq!(verified.signed_by, vec![key.id()]);
//! assert_eq!(sink.0["model.onnx"], b"onnx bytes");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Map
//! - [`manifest`]: what a bundle says about its model (schema, golden set, baselines, policy).
//! - [`narrow_weights`]: int8 / float16 weights cut out of a model file, and put back on the
//!   device.
//! - [`bundle`]: packing, signing, and the single-pass verifying reader.
//! - [`tar`]: the canonical tar subset bundles are stored in.
//! - [`keys`]: key ids, key files, keyrings and threshold-signed keyring updates.
//! - [`keyring_chain`]: the keyring updates a fleet has accepted, as distributed to devices.
//! - [`stats`]: histograms, PSI and moments shared by baselines, device windows and cohorts.
//! - [`telemetry`]: the agent's telemetry records (metric windows and sampled requests).
//! - [`link`]: MQTT topics and the messages between agents and the fleet server.
//! - [`command_auth`]: commands signed by the fleet server's key (checked by every device).

pub mod bundle;
pub mod command_auth;
pub mod keyring_chain;
pub mod keys;
pub mod link;
pub mod manifest;
pub mod narrow_weights;
pub mod quality;
pub mod stats;
pub mod tar;
pub mod telemetry;
pub mod testing;
