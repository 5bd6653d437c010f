//! Signed commands: how a device knows an order comes from its fleet server.
//!
//! The broker carries commands but is not trusted with them. The fleet server signs every
//! [`Command`] with its own ed25519 key (the *server key*, distinct from the bundle-signing
//! keys), and the agent, given the server's public key, obeys only a command that
//! 1. is signed by that key (over [`SIGNING_CONTEXT`] followed by the exact body bytes),
//! 2. names this device (`device_id`),
//! 3. has not expired (`expires`, with [`CLOCK_SLACK_SECONDS`] of tolerance for clock skew),
//! 4. and whose `seq` it has not seen before (the agent keeps the sequence numbers it accepted
//!    until they expire, and a floor under which everything is refused, in its database).
//!
//! The wire form is [`SignedCommand`]: the command's JSON as a string (`body`) and one
//! signature. The body is kept as the exact bytes that were signed, so no canonical JSON is
//! needed; the receiver parses the body only after the signature verified.
//!
//! [`open`] performs checks 1–3 (pure: it is handed the key, the device id and the time);
//! the replay check needs the device's memory and is the agent's ([`Refusal::Replayed`] is
//! defined here so every refusal reason has one name).

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::keys::{KeyError, KeyId, Keyring, PublicKey, SecretKey, SignatureEntry};
use crate::link::{Command, HasSchema, LINK_SCHEMA, MAX_JSON_MESSAGE};

/// Prefix of every signed command message: a signature by the server key over anything else
/// (a manifest, a keyring update) never verifies as a command, and vice versa.
pub const SIGNING_CONTEXT: &[u8] = b"modelfleet-command-v1\n";

/// A command whose `expires` is up to this many seconds in the past (by the device's clock)
/// is still accepted: device and server clocks may disagree by this much.
pub const CLOCK_SLACK_SECONDS: i64 = 300;

/// How long a command is valid by default (the server's `command_ttl`).
pub const DEFAULT_COMMAND_TTL_SECONDS: i64 = 3600;

/// A command as published on `{p}/devices/{id}/commands`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCommand {
    pub schema: u32,
    /// The [`Command`] JSON, exactly as signed.
    pub body: String,
    /// The server key's signature over [`SIGNING_CONTEXT`] + `body`.
    pub signature: SignatureEntry,
}

impl HasSchema for SignedCommand {
    fn schema(&self) -> u32 {
        self.schema
    }
}

/// Why a device refused a command. [`Refusal::reason`] is the word used in metrics and events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("malformed command: {0}")]
    Malformed(String),
    #[error("unsigned command (a bare command, without the server's signature)")]
    Unsigned,
    #[error("signed by key {0}, not by the fleet server's key")]
    UnknownKey(KeyId),
    #[error("the signature does not verify under the fleet server's key")]
    BadSignature,
    #[error("addressed to device '{0}'")]
    WrongDevice(String),
    #[error("expired at {0}")]
    Expired(DateTime<Utc>),
    #[error("sequence number {0} was seen before (replay)")]
    Replayed(u64),
    #[error("no server key is configured: commands cannot be authenticated")]
    NoServerKey,
}

impl Refusal {
    /// Every reason word, for metrics.
    pub const REASONS: [&'static str; 8] = [
        "malformed",
        "unsigned",
        "unknown_key",
        "bad_signature",
        "wrong_device",
        "expired",
        "replayed",
        "no_server_key",
    ];

    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Malformed(_) => "malformed",
            Refusal::Unsigned => "unsigned",
            Refusal::UnknownKey(_) => "unknown_key",
            Refusal::BadSignature => "bad_signature",
            Refusal::WrongDevice(_) => "wrong_device",
            Refusal::Expired(_) => "expired",
            Refusal::Replayed(_) => "replayed",
            Refusal::NoServerKey => "no_server_key",
        }
    }
}

impl SignedCommand {
    /// Signs `command` with the server key.
    pub fn sign(command: &Command, key: &SecretKey) -> SignedCommand {
        let body = String::from_utf8(crate::link::encode(command)).expect("JSON is UTF-8");
        let signature = key.sign(&signed_message(body.as_bytes()));
        SignedCommand {
            schema: LINK_SCHEMA,
            body,
            signature,
        }
    }

    /// The message bytes, ready to publish.
    pub fn encode(&self) -> Vec<u8> {
        crate::link::encode(self)
    }
}

/// Reads a server public key file (`server.pub`: one `ed25519 <hex>` line).
pub fn server_key_from_file_text(text: &str) -> Result<PublicKey, KeyError> {
    let ring = Keyring::from_file_text(text)?;
    let mut ids = ring.ids();
    match (ids.next(), ids.next()) {
        (Some(id), None) => Ok(*ring.get(&id).expect("listed")),
        _ => Err(KeyError::Parse {
            line: 0,
            reason: format!("a server key file holds one key, this one {}", ring.len()),
        }),
    }
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNING_CONTEXT.len() + body.len());
    m.extend_from_slice(SIGNING_CONTEXT);
    m.extend_from_slice(body);
    m
}

/// Checks a command message received by `device_id` at `now` against the server key: the
/// signature, the addressee and the expiry (not the replay memory: that is the device's).
pub fn open(
    payload: &[u8],
    server_key: &PublicKey,
    device_id: &str,
    now: DateTime<Utc>,
) -> Result<Command, Refusal> {
    if payload.len() > MAX_JSON_MESSAGE {
        return Err(Refusal::Malformed(format!(
            "{} bytes is over the limit",
            payload.len()
        )));
    }
    let value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| Refusal::Malformed(e.to_string()))?;
    let Some(obj) = value.as_object() else {
        return Err(Refusal::Malformed("not a JSON object".into()));
    };
    if !obj.contains_key("signature") && !obj.contains_key("body") {
        // A bare command (the format before signing) or anything else unsigned.
        return Err(
            if obj.contains_key("type") || obj.contains_key("command_id") {
                Refusal::Unsigned
            } else {
                Refusal::Malformed("neither a signed command nor a command".into())
            },
        );
    }
    let signed: SignedCommand =
        serde_json::from_value(value).map_err(|e| Refusal::Malformed(e.to_string()))?;
    if signed.schema != LINK_SCHEMA {
        return Err(Refusal::Malformed(format!(
            "schema {} is not supported",
            signed.schema
        )));
    }
    if signed.signature.key_id != server_key.id() {
        return Err(Refusal::UnknownKey(signed.signature.key_id));
    }
    if !server_key.verify(
        &signed_message(signed.body.as_bytes()),
        &signed.signature.sig,
    ) {
        return Err(Refusal::BadSignature);
    }
    // Authentic from here on: what the body says is what the server said.
    let command: Command = crate::link::decode(signed.body.as_bytes())
        .map_err(|e| Refusal::Malformed(e.to_string()))?;
    if command.device_id != device_id {
        return Err(Refusal::WrongDevice(command.device_id));
    }
    if command.expires + Duration::seconds(CLOCK_SLACK_SECONDS) < now {
        return Err(Refusal::Expired(command.expires));
    }
    Ok(command)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::Action;

    fn command(device: &str, expires_in: i64) -> Command {
        let now = Utc::now();
        Command {
            schema: LINK_SCHEMA,
            command_id: "c1".into(),
            rollout_id: None,
            device_id: device.into(),
            seq: 7,
            time: now,
            expires: now + Duration::seconds(expires_in),
            action: Action::Revert {
                model: "m".into(),
                version: None,
            },
        }
    }

    #[test]
    fn a_signed_command_opens_for_its_device_only() {
        let key = SecretKey::generate().unwrap();
        let cmd = command("dev-1", 60);
        let bytes = SignedCommand::sign(&cmd, &key).encode();
        assert_eq!(open(&bytes, &key.public(), "dev-1", Utc::now()), Ok(cmd));
        assert_eq!(
            open(&bytes, &key.public(), "dev-2", Utc::now()),
            Err(Refusal::WrongDevice("dev-1".into()))
        );
    }

    #[test]
    fn forged_altered_unsigned_and_expired_commands_are_refused() {
        let (key, other) = (
            SecretKey::generate().unwrap(),
            SecretKey::generate().unwrap(),
        );
        let public = key.public();
        let now = Utc::now();
        let by_other = SignedCommand::sign(&command("d", 60), &other).encode();
        assert_eq!(
            open(&by_other, &public, "d", now),
            Err(Refusal::UnknownKey(other.id()))
        );
        // Another key's signature relabelled with the server key's id.
        let mut relabelled = SignedCommand::sign(&command("d", 60), &other);
        relabelled.signature.key_id = key.id();
        assert_eq!(
            open(&relabelled.encode(), &public, "d", now),
            Err(Refusal::BadSignature)
        );
        let mut altered = SignedCommand::sign(&command("d", 60), &key);
        altered.body = altered.body.replace("\"seq\":7", "\"seq\":8");
        assert_eq!(
            open(&altered.encode(), &public, "d", now),
            Err(Refusal::BadSignature)
        );
        let bare = crate::link::encode(&command("d", 60));
        assert_eq!(open(&bare, &public, "d", now), Err(Refusal::Unsigned));
        assert!(matches!(
            open(b"{not json", &public, "d", now),
            Err(Refusal::Malformed(_))
        ));
        let old = SignedCommand::sign(&command("d", -CLOCK_SLACK_SECONDS - 5), &key).encode();
        assert!(matches!(
            open(&old, &public, "d", now),
            Err(Refusal::Expired(_))
        ));
        // Within the clock slack: still accepted.
        let late = SignedCommand::sign(&command("d", -CLOCK_SLACK_SECONDS + 30), &key).encode();
        assert!(open(&late, &public, "d", now).is_ok());
    }

    #[test]
    fn a_signature_over_the_bare_body_is_not_a_command_signature() {
        let key = SecretKey::generate().unwrap();
        let mut s = SignedCommand::sign(&command("d", 60), &key);
        s.signature = key.sign(s.body.as_bytes());
        assert_eq!(
            open(&s.encode(), &key.public(), "d", Utc::now()),
            Err(Refusal::BadSignature)
        );
    }
}
