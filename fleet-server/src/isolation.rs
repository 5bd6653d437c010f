//! Isolation between devices on the broker: a device publishes only on its own `status`,
//! `events`, `telemetry` and `transfer/req` topics and reads only its own `commands` and
//! `transfer/chunk`.
//!
//! With Mosquitto, [`mosquitto_acl`] writes the ACL file (`fleet-server mosquitto-acl`). It is
//! pattern-based, keyed on the client's **username** (`%u`), so it needs no update when devices
//! join: what makes a username a device is the credential behind it — a client certificate from
//! the fleet CA whose CN is the device id (`require_certificate true` +
//! `use_identity_as_username true`, see [`crate::pki`]) or a `password_file` entry. With
//! `use_username_as_clientid true` the client id is forced to the same name, so a device cannot
//! take over another's session either. The server's identities get the whole prefix; the
//! identities of its bulk connections ([`crate::bulk`]) may only write chunk frames. See
//! `docs/security.md`.
//!
//! With the embedded rumqttd broker the server cannot do the same: rumqttd 0.20 hands a
//! subscriber the topic and payload of a publish but not the publisher's client id, and has no
//! per-topic authorisation hook. What the server checks instead ([`crate::ingest`]) is that the
//! device id inside every status and event payload matches the topic's device id; mismatches
//! are dropped and counted in `fleet_mqtt_device_mismatch_total`. That stops a confused or
//! naive device but not one that forges both: the embedded broker is for development and
//! demos, not for fleets whose devices may be hostile.

use std::fmt::Write;

use protocol::link::{Channel, Topics};

/// The identity (certificate CN or username) the fleet server connects to Mosquitto with by
/// default. It contains `@`, which no device id may contain, so no device certificate can
/// carry it.
pub const SERVER_IDENTITY: &str = "fleet-server@fleet";

/// The channels a device publishes on.
pub const DEVICE_WRITES: [Channel; 4] = [
    Channel::Status,
    Channel::Events,
    Channel::Telemetry,
    Channel::TransferRequest,
];
/// The channels a device subscribes to.
pub const DEVICE_READS: [Channel; 2] = [Channel::Commands, Channel::TransferChunk];

#[derive(Debug, thiserror::Error)]
pub enum AclError {
    #[error("topic prefix '{0}' cannot be written in a Mosquitto ACL (no spaces or '%')")]
    Prefix(String),
    #[error("identity '{0}' cannot be written in a Mosquitto ACL (1-128 characters, no spaces, '#', '+' or '%')")]
    Identity(String),
}

fn acl_safe(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && !s
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '%' | '#' | '+'))
}

/// The Mosquitto ACL: `servers` read and write everything under the prefix, `bulk` (the
/// servers' bulk connections, [`crate::bulk`]) only write chunk frames to every device,
/// `telemetry_readers` read every device's telemetry, and every other user is a device confined
/// to its own topics.
pub fn mosquitto_acl(
    topics: &Topics,
    servers: &[String],
    bulk: &[String],
    telemetry_readers: &[String],
) -> Result<String, AclError> {
    let p = topics.prefix();
    if p.contains('%') || p.chars().any(char::is_whitespace) {
        return Err(AclError::Prefix(p.to_string()));
    }
    for who in servers.iter().chain(bulk).chain(telemetry_readers) {
        if !acl_safe(who, 128) {
            return Err(AclError::Identity(who.clone()));
        }
    }
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(
        w,
        "# Mosquitto ACL for modelfleet (written by `fleet-server mosquitto-acl`).\n\
         # Every client other than the users below is a device: its username (the CN of its\n\
         # fleet CA certificate, with use_identity_as_username) is its device id, and it may only\n\
         # publish on its own status, events, telemetry and transfer/req topics and read its own\n\
         # commands and transfer/chunk topics. Pair with use_username_as_clientid true."
    );
    for s in servers {
        let _ = writeln!(w, "\n# fleet server\nuser {s}\ntopic readwrite {p}/#");
    }
    for b in bulk {
        let _ = writeln!(
            w,
            "\n# fleet server's bulk connection: chunk frames only\nuser {b}\ntopic write {}",
            topics.every_device(Channel::TransferChunk)
        );
    }
    for r in telemetry_readers {
        let _ = writeln!(
            w,
            "\n# telemetry reader\nuser {r}\ntopic read {}",
            topics.every_device(Channel::Telemetry)
        );
    }
    let _ = writeln!(w, "\n# devices");
    for c in DEVICE_WRITES {
        let _ = writeln!(w, "pattern write {}", topics.device("%u", c));
    }
    for c in DEVICE_READS {
        let _ = writeln!(w, "pattern read {}", topics.device("%u", c));
    }
    // The fleet's keyring updates (retained, signed by a threshold of keys): read only.
    let _ = writeln!(w, "pattern read {}", topics.keyring());
    // The server's presence (retained): devices hold events and telemetry until it is online.
    let _ = writeln!(w, "pattern read {}", topics.server());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_acl_confines_devices_to_their_own_topics() {
        let t = Topics::default();
        let acl = mosquitto_acl(
            &t,
            &[SERVER_IDENTITY.into()],
            &[crate::bulk::BULK_IDENTITY.into()],
            &["grafana".into()],
        )
        .unwrap();
        assert!(acl.contains("user fleet-server@fleet\ntopic readwrite modelfleet/v1/#\n"));
        // The bulk connection writes chunk frames to any device and may do nothing else.
        assert!(acl.contains(
            "user fleet-server-bulk@fleet\ntopic write modelfleet/v1/devices/+/transfer/chunk\n\n"
        ));
        assert_eq!(acl.matches("topic write").count(), 1, "{acl}");
        assert!(acl.contains("user grafana\ntopic read modelfleet/v1/devices/+/telemetry\n"));
        for line in [
            "pattern write modelfleet/v1/devices/%u/status",
            "pattern write modelfleet/v1/devices/%u/events",
            "pattern write modelfleet/v1/devices/%u/telemetry",
            "pattern write modelfleet/v1/devices/%u/transfer/req",
            "pattern read modelfleet/v1/devices/%u/commands",
            "pattern read modelfleet/v1/devices/%u/transfer/chunk",
            "pattern read modelfleet/v1/keyring",
            "pattern read modelfleet/v1/server",
        ] {
            assert!(acl.lines().any(|l| l == line), "{line} missing:\n{acl}");
        }
        assert_eq!(
            acl.matches("pattern ").count(),
            8,
            "nothing else for devices"
        );
        assert!(mosquitto_acl(&t, &["a b".into()], &[], &[]).is_err());
        assert!(mosquitto_acl(&t, &[], &["b+".into()], &[]).is_err());
        assert!(mosquitto_acl(&t, &[], &[], &["x%".into()]).is_err());
        assert!(protocol::link::check_device_id(SERVER_IDENTITY).is_err());
        assert!(protocol::link::check_device_id(crate::bulk::BULK_IDENTITY).is_err());
    }
}
