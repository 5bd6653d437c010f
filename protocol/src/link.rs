//! The MQTT link between agents and the fleet server: topics and the messages on them.
//!
//! Every device has five topics under a configurable prefix (default `modelfleet/v1`):
//!
//! | topic | direction | payload |
//! |---|---|---|
//! | `{p}/devices/{id}/status` | agent → all, retained, last will | [`DeviceStatus`] JSON |
//! | `{p}/devices/{id}/commands` | server → agent | [`crate::command_auth::SignedCommand`] JSON |
//! | `{p}/devices/{id}/events` | agent → server | [`DeviceEvent`] JSON |
//! | `{p}/devices/{id}/telemetry` | agent → server and anyone | [`crate::telemetry::TelemetryRecord`] JSON |
//! | `{p}/devices/{id}/transfer/req` | agent → server | [`ChunkRequest`] JSON |
//! | `{p}/devices/{id}/transfer/chunk` | server → agent | a chunk frame ([`encode_chunk`]) |
//!
//! All are published with QoS 1. JSON messages tolerate unknown fields (newer peers may add
//! some) and carry `schema` so a reader can refuse a format it does not know. `docs/protocol.md`
//! is the field guide.
//!
//! A bundle travels as numbered chunks of `chunk_size` bytes (the last one shorter); the agent
//! asks for index ranges it lacks and the server answers one frame per chunk. A bundle is named
//! by the sha256 of its bytes (`bundle_id`), so the agent can check the reassembled file before
//! the install path verifies signatures and payloads.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The link format version these types write.
pub const LINK_SCHEMA: u32 = 1;
/// Default topic prefix.
pub const DEFAULT_PREFIX: &str = "modelfleet/v1";
/// Default chunk size: 64 KiB, under the 128 KB message cap common in hosted brokers.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
/// Largest chunk size either side accepts.
pub const MAX_CHUNK_SIZE: u32 = 1 << 20;
/// Most chunks the server sends for one [`ChunkRequest`]; an agent asks for at most this many
/// at once (a larger `count` is served only up to the cap).
pub const MAX_CHUNKS_PER_REQUEST: u32 = 64;
/// Most bytes the server sends for one [`ChunkRequest`] (same rule as the chunk cap).
pub const MAX_BYTES_PER_REQUEST: u64 = 4 << 20;

/// Chunks one request may ask for at `chunk_size`: both caps applied, at least 1.
pub fn max_chunks_per_request(chunk_size: u32) -> u32 {
    let by_bytes = (MAX_BYTES_PER_REQUEST / chunk_size.max(1) as u64).clamp(1, u32::MAX as u64);
    MAX_CHUNKS_PER_REQUEST.min(by_bytes as u32)
}

/// Largest JSON message (status, command, event, request) either side accepts.
pub const MAX_JSON_MESSAGE: usize = 256 * 1024;
/// Largest chunk frame header.
const MAX_CHUNK_HEADER: usize = 4096;
/// The first bytes of every chunk frame.
pub const CHUNK_MAGIC: &[u8; 4] = b"MFC1";

/// A frame of `chunk_size` bytes plus its header always fits in this many bytes; brokers and
/// clients must accept messages at least this large.
pub fn max_frame_len(chunk_size: u32) -> usize {
    chunk_size as usize + MAX_CHUNK_HEADER + 8
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("topic prefix '{0}' is not valid: it must be non-empty, without '+', '#', a leading or trailing '/'")]
    BadPrefix(String),
    #[error("device id '{0}' is not valid: use 1 to 64 characters of A-Z a-z 0-9 . _ -")]
    BadDeviceId(String),
    #[error("message of {0} bytes is over the {MAX_JSON_MESSAGE} byte limit")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("message schema {0} is not supported (this build reads {LINK_SCHEMA})")]
    Schema(u32),
    #[error("malformed chunk frame: {0}")]
    Frame(String),
    #[error(
        "chunk {index} of {bundle_id}: sha256 {actual} does not match the header's {expected}"
    )]
    ChunkHash {
        bundle_id: String,
        index: u32,
        expected: String,
        actual: String,
    },
}

/// Checks a device id: it is a topic level, a client id and a file name, so it is kept plain.
pub fn check_device_id(id: &str) -> Result<(), LinkError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        && id != "."
        && id != "..";
    if ok {
        Ok(())
    } else {
        Err(LinkError::BadDeviceId(id.to_string()))
    }
}

/// Which of a device's topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    Status,
    Commands,
    Events,
    Telemetry,
    TransferRequest,
    TransferChunk,
}

impl Channel {
    pub const ALL: [Channel; 6] = [
        Channel::Status,
        Channel::Commands,
        Channel::Events,
        Channel::Telemetry,
        Channel::TransferRequest,
        Channel::TransferChunk,
    ];

    /// The topic levels after `{prefix}/devices/{id}/`.
    pub fn suffix(self) -> &'static str {
        match self {
            Channel::Status => "status",
            Channel::Commands => "commands",
            Channel::Events => "events",
            Channel::Telemetry => "telemetry",
            Channel::TransferRequest => "transfer/req",
            Channel::TransferChunk => "transfer/chunk",
        }
    }
}

/// Topic names under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Default for Topics {
    fn default() -> Topics {
        Topics {
            prefix: DEFAULT_PREFIX.to_string(),
        }
    }
}

impl Topics {
    pub fn new(prefix: &str) -> Result<Topics, LinkError> {
        let ok = !prefix.is_empty()
            && !prefix.starts_with('/')
            && !prefix.ends_with('/')
            && !prefix.contains(['+', '#', '\0']);
        if ok {
            Ok(Topics {
                prefix: prefix.to_string(),
            })
        } else {
            Err(LinkError::BadPrefix(prefix.to_string()))
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The topic of one device's channel.
    pub fn device(&self, device_id: &str, channel: Channel) -> String {
        format!("{}/devices/{}/{}", self.prefix, device_id, channel.suffix())
    }

    /// `{p}/keyring`: the retained [`crate::keyring_chain::KeyringChain`] every device reads.
    pub fn keyring(&self) -> String {
        format!("{}/keyring", self.prefix)
    }

    /// `{p}/server`: the fleet server's retained [`ServerPresence`].
    pub fn server(&self) -> String {
        format!("{}/server", self.prefix)
    }

    /// The filter matching a channel of every device (`{p}/devices/+/status`, …).
    pub fn every_device(&self, channel: Channel) -> String {
        self.device("+", channel)
    }

    /// The device id and channel a topic belongs to, if it is one of ours.
    pub fn parse<'t>(&self, topic: &'t str) -> Option<(&'t str, Channel)> {
        let rest = topic.strip_prefix(self.prefix.as_str())?;
        let rest = rest.strip_prefix("/devices/")?;
        let (device, suffix) = rest.split_once('/')?;
        let channel = Channel::ALL.into_iter().find(|c| c.suffix() == suffix)?;
        check_device_id(device).ok()?;
        Some((device, channel))
    }
}

/// A model as the device reports it; the same fields as `fleet-agent status --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSummary {
    pub name: String,
    pub active: String,
    pub previous: Option<String>,
    /// `trial`, `committed` or `reverted`.
    pub state: String,
    #[serde(default)]
    pub security_version: u64,
    /// sha256 of the bundle the active version came from (its `bundle_id`).
    #[serde(default)]
    pub bundle_sha256: String,
    /// The float precision the serving model computes in: `f32`, or `f16` for an `f16` bundle
    /// on a CPU with native half precision. Absent while not serving, and from agents that
    /// predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute: Option<String>,
}

/// A device's presence and inventory: published retained on every connect and change, and as
/// the last will (with `online: false` and nothing else known) when the connection drops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub schema: u32,
    pub device_id: String,
    pub online: bool,
    pub time: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Absent in a last will: the models are unknown then, not gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<ModelSummary>>,
}

/// The fleet server's presence, retained on `{p}/server`. The server publishes `online: true`
/// each time its subscriptions are acknowledged (so after every reconnect, and after a broker
/// restart that lost them), and `online: false` when it stops or (as its last will) when its
/// connection drops. An agent publishes events and telemetry only while the newest presence it
/// received on its current connection says `online: true`: until then the broker would
/// acknowledge and drop what nobody subscribes to, and the agent would delete it from its outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerPresence {
    pub schema: u32,
    pub online: bool,
    pub time: DateTime<Utc>,
}

impl ServerPresence {
    pub fn new(online: bool) -> ServerPresence {
        ServerPresence {
            schema: LINK_SCHEMA,
            online,
            time: Utc::now(),
        }
    }
}

impl DeviceStatus {
    /// The last will a device registers when it connects.
    pub fn last_will(device_id: &str) -> DeviceStatus {
        DeviceStatus {
            schema: LINK_SCHEMA,
            device_id: device_id.to_string(),
            online: false,
            time: Utc::now(),
            agent_version: None,
            target: None,
            labels: BTreeMap::new(),
            models: None,
        }
    }
}

/// A bundle to fetch: what a `stage` command names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleRef {
    /// sha256 (lowercase hex) of the bundle file.
    pub bundle_id: String,
    pub name: String,
    pub version: String,
    /// Bundle size in bytes.
    pub size: u64,
    pub chunk_size: u32,
    /// Where the bundle can also be fetched over HTTP (with Range requests), if the server offers it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_url: Option<String>,
}

impl BundleRef {
    /// Number of chunks the bundle is split into.
    pub fn chunks(&self) -> u32 {
        chunk_count(self.size, self.chunk_size)
    }
}

/// Number of `chunk_size` chunks covering `size` bytes (an empty file has none).
pub fn chunk_count(size: u64, chunk_size: u32) -> u32 {
    size.div_ceil(chunk_size.max(1) as u64) as u32
}

/// An order from the server to one device. It travels signed by the server key, as the body
/// of a [`crate::command_auth::SignedCommand`]; a device obeys it only for its own id, before
/// `expires`, and once per `seq`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub schema: u32,
    /// Unique per command; the device echoes it in the events the command causes.
    pub command_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_id: Option<String>,
    /// The device the command is for (a command copied to another device's topic is refused).
    pub device_id: String,
    /// Grows with every command the server signs (microseconds since the epoch, bumped past
    /// the previous one); a device refuses a `seq` it has already accepted.
    pub seq: u64,
    pub time: DateTime<Utc>,
    /// After this instant (plus the clock slack) the device refuses the command.
    pub expires: DateTime<Utc>,
    #[serde(flatten)]
    pub action: Action,
}

/// What a command asks, tagged by `"type"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Action {
    /// Fetch the bundle, install and activate it (its trial then runs on the device).
    Stage { bundle: BundleRef },
    /// Go back to the previous version of `model`. With `version`, only if that version is the
    /// active one (a rollback must not revert a device that already moved on).
    Revert {
        model: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
    },
    /// Stop fetching a bundle (its chunks so far are deleted).
    CancelTransfer { bundle_id: String },
}

/// Something that happened on a device, in the order it happened (`seq` grows by one per
/// event of the device's store; a receiver can spot gaps and duplicates).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceEvent {
    pub schema: u32,
    pub device_id: String,
    pub seq: u64,
    pub time: DateTime<Utc>,
    /// `transfer_started`, `transfer_progress`, `transfer_completed`, `transfer_failed`,
    /// `installed`, `activated`, `committed`, `reverted`, `rejected`, `load_failed`, …
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<String>,
    /// Reason and evidence (kind-specific).
    #[serde(default)]
    pub detail: serde_json::Value,
}

/// The device asks for `count` chunks starting at `first`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRequest {
    pub schema: u32,
    pub bundle_id: String,
    pub chunk_size: u32,
    pub first: u32,
    pub count: u32,
}

/// The header of a chunk frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkHeader {
    pub bundle_id: String,
    pub index: u32,
    pub chunk_size: u32,
    /// Chunks in the whole bundle.
    pub total: u32,
    /// sha256 (hex) of this chunk's bytes; empty when `error` is set.
    pub sha256: String,
    /// Why the chunk cannot be served (unknown bundle, index out of range); no bytes follow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Parses a JSON link message, refusing oversize input and unknown schemas.
pub fn decode<T: serde::de::DeserializeOwned + HasSchema>(bytes: &[u8]) -> Result<T, LinkError> {
    if bytes.len() > MAX_JSON_MESSAGE {
        return Err(LinkError::TooLarge(bytes.len()));
    }
    let msg: T = serde_json::from_slice(bytes)?;
    if msg.schema() != LINK_SCHEMA {
        return Err(LinkError::Schema(msg.schema()));
    }
    Ok(msg)
}

/// Serialises a link message.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    serde_json::to_vec(msg).expect("link messages always serialise")
}

/// Link messages that carry a `schema` field.
pub trait HasSchema {
    fn schema(&self) -> u32;
}

macro_rules! has_schema {
    ($($t:ty),*) => {$(impl HasSchema for $t { fn schema(&self) -> u32 { self.schema } })*};
}
has_schema!(
    DeviceStatus,
    Command,
    DeviceEvent,
    ChunkRequest,
    ServerPresence
);

/// sha256 of bytes, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A chunk frame: `MFC1`, the header length (u32 big-endian), the header JSON, the chunk bytes.
pub fn encode_chunk(header: &ChunkHeader, bytes: &[u8]) -> Vec<u8> {
    let head = serde_json::to_vec(header).expect("chunk headers always serialise");
    let mut frame = Vec::with_capacity(8 + head.len() + bytes.len());
    frame.extend_from_slice(CHUNK_MAGIC);
    frame.extend_from_slice(&(head.len() as u32).to_be_bytes());
    frame.extend_from_slice(&head);
    frame.extend_from_slice(bytes);
    frame
}

/// Splits a chunk frame into its header and bytes, checking the bytes against the header's
/// sha256 and the chunk size. A frame with `error` set is returned with no bytes.
pub fn decode_chunk(frame: &[u8]) -> Result<(ChunkHeader, &[u8]), LinkError> {
    let bad = |why: &str| LinkError::Frame(why.to_string());
    if frame.len() < 8 || &frame[..4] != CHUNK_MAGIC {
        return Err(bad("does not start with MFC1"));
    }
    let head_len = u32::from_be_bytes(frame[4..8].try_into().unwrap()) as usize;
    if head_len > MAX_CHUNK_HEADER || frame.len() < 8 + head_len {
        return Err(bad("header length out of range"));
    }
    let header: ChunkHeader = serde_json::from_slice(&frame[8..8 + head_len])?;
    let bytes = &frame[8 + head_len..];
    if header.error.is_some() {
        return Ok((header, &[]));
    }
    if header.chunk_size == 0 || header.chunk_size > MAX_CHUNK_SIZE {
        return Err(bad("chunk size out of range"));
    }
    if bytes.is_empty() || bytes.len() > header.chunk_size as usize {
        return Err(LinkError::Frame(format!(
            "chunk of {} bytes for a chunk size of {}",
            bytes.len(),
            header.chunk_size
        )));
    }
    if header.index >= header.total {
        return Err(bad("chunk index past the last chunk"));
    }
    let actual = sha256_hex(bytes);
    if actual != header.sha256 {
        return Err(LinkError::ChunkHash {
            bundle_id: header.bundle_id.clone(),
            index: header.index,
            expected: header.sha256.clone(),
            actual,
        });
    }
    Ok((header, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip_and_refuse_foreign_topics() {
        let t = Topics::new("acme/fleet").unwrap();
        let topic = t.device("dev-1", Channel::TransferChunk);
        assert_eq!(topic, "acme/fleet/devices/dev-1/transfer/chunk");
        assert_eq!(t.parse(&topic), Some(("dev-1", Channel::TransferChunk)));
        assert_eq!(
            t.every_device(Channel::Status),
            "acme/fleet/devices/+/status"
        );
        assert_eq!(t.parse("acme/fleet/devices/dev-1/other"), None);
        assert_eq!(t.parse("other/devices/dev-1/status"), None);
        assert_eq!(t.parse("acme/fleet/devices/a b/status"), None);
        for bad in ["", "/x", "x/", "a/+/b", "a/#"] {
            assert!(Topics::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn device_ids_are_plain() {
        for ok in ["dev-1", "A.b_c", "x"] {
            check_device_id(ok).unwrap();
        }
        for bad in ["", "..", "a/b", "a+b", "a b", &"x".repeat(65)] {
            assert!(check_device_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn command_json_is_tagged_and_flat() {
        let cmd = Command {
            schema: LINK_SCHEMA,
            command_id: "c1".into(),
            rollout_id: Some("r1".into()),
            device_id: "d1".into(),
            seq: 1,
            time: Utc::now(),
            expires: Utc::now(),
            action: Action::Revert {
                model: "digits".into(),
                version: Some("2.0.0".into()),
            },
        };
        let json: serde_json::Value = serde_json::from_slice(&encode(&cmd)).unwrap();
        assert_eq!(json["type"], "revert");
        assert_eq!(json["model"], "digits");
        let back: Command = decode(&encode(&cmd)).unwrap();
        assert_eq!(back, cmd);
    }

    #[test]
    fn decode_refuses_unknown_schema_and_oversize() {
        let mut status = DeviceStatus::last_will("d");
        status.schema = 99;
        assert!(matches!(
            decode::<DeviceStatus>(&encode(&status)),
            Err(LinkError::Schema(99))
        ));
        let huge = vec![b' '; MAX_JSON_MESSAGE + 1];
        assert!(matches!(
            decode::<DeviceStatus>(&huge),
            Err(LinkError::TooLarge(_))
        ));
        assert!(matches!(
            decode::<DeviceStatus>(b"{"),
            Err(LinkError::Json(_))
        ));
    }

    #[test]
    fn chunk_frames_round_trip_and_catch_corruption() {
        let bytes = vec![7u8; 1000];
        let header = ChunkHeader {
            bundle_id: "b".into(),
            index: 2,
            chunk_size: 1024,
            total: 3,
            sha256: sha256_hex(&bytes),
            error: None,
        };
        let mut frame = encode_chunk(&header, &bytes);
        assert!(frame.len() <= max_frame_len(1024));
        let (h, b) = decode_chunk(&frame).unwrap();
        assert_eq!((h, b), (header.clone(), &bytes[..]));
        let last = frame.len() - 1;
        frame[last] ^= 1;
        assert!(matches!(
            decode_chunk(&frame),
            Err(LinkError::ChunkHash { index: 2, .. })
        ));
        assert!(decode_chunk(b"MFC1").is_err());
        assert!(decode_chunk(b"XXXX\0\0\0\0").is_err());
        let mut long = header.clone();
        long.chunk_size = 10;
        assert!(decode_chunk(&encode_chunk(&long, &bytes)).is_err());
        let error = ChunkHeader {
            error: Some("unknown bundle".into()),
            sha256: String::new(),
            ..header
        };
        let frame = encode_chunk(&error, &[]);
        let (h, b) = decode_chunk(&frame).unwrap();
        assert_eq!(h.error.as_deref(), Some("unknown bundle"));
        assert!(b.is_empty());
    }

    #[test]
    fn chunk_count_covers_the_file() {
        assert_eq!(chunk_count(0, 64), 0);
        assert_eq!(chunk_count(1, 64), 1);
        assert_eq!(chunk_count(64, 64), 1);
        assert_eq!(chunk_count(65, 64), 2);
    }
}
