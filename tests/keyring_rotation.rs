//! Issue 11, keyring rotation through a whole (small) fleet on Mosquitto: a new bundle-signing
//! key is introduced by an update the current key signs, the old key is retired by an update a
//! threshold of the new keys signs (one signature is not enough), every device receives the
//! chain — also one that joins afterwards, and one that restarts — and from then on bundles
//! signed only by the retired key are refused by the server and by the devices, while bundles
//! signed by the new key install.

mod common;

use std::time::Duration;

use common::World;
use fleet_server::BrokerConnection;
use modelfleet::harness::{wait_until, BrokerProcess};
use protocol::keys::{KeyringUpdate, SecretKey, SignedKeyringUpdate};
use serde_json::json;

const LONG: Duration = Duration::from_secs(120);

fn update(
    version: u64,
    threshold: usize,
    keys: &[&SecretKey],
    signers: &[&SecretKey],
) -> serde_json::Value {
    let body = KeyringUpdate {
        version,
        threshold,
        keys: keys.iter().map(|k| k.public().to_hex()).collect(),
    };
    serde_json::to_value(SignedKeyringUpdate::sign(&body, signers)).unwrap()
}

fn wait_keyring_version(device: &common::Device, version: u64) {
    wait_until(
        &format!("{} to hold keyring version {version}", device.id),
        LONG,
        || (device.agent.keyring().version == version).then_some(()),
    )
    .unwrap();
}

#[test]
fn a_rotated_keyring_reaches_every_device_and_the_retired_key_is_refused() {
    let mut world = World::new();
    let broker = BrokerProcess::mosquitto(&world.path("mosquitto"), None, false).unwrap();
    let url = broker.url();
    world.start_server(BrokerConnection::plain(&url));
    let a = world.start_device("dev-a", &[], &url, None);
    let b = world.start_device("dev-b", &[], &url, None);
    wait_until("two devices online", LONG, || {
        (world.get("/api/v1/devices?online=true")["total"] == 2).then_some(())
    })
    .unwrap();

    // Before: the original key (k0) signs what the fleet runs.
    let v1 = world.upload(&world.bundle("digits_mlp", "1.0.0"));
    for d in ["dev-a", "dev-b"] {
        let (s, body) = world.post_json(
            &format!("/api/v1/devices/{d}/stage"),
            json!({"bundle_id": v1}),
        );
        assert_eq!(s, 202, "{body}");
    }
    for d in ["dev-a", "dev-b"] {
        world.wait_for_version(d, "digits_mlp", "1.0.0", LONG);
    }
    // Uploaded while k0 is trusted, staged after it is retired.
    let old_signed = world.upload(&world.bundle("digits_mlp", "1.5.0"));

    let k0 = bundler::load_secret_key(&world.key).unwrap();
    let new_keys = |name: &str| bundler::keygen_files(&world.path("newkeys"), name).unwrap();
    let (f1, f2) = (new_keys("k1"), new_keys("k2"));
    let k1 = bundler::load_secret_key(&f1.secret).unwrap();
    let k2 = bundler::load_secret_key(&f2.secret).unwrap();

    // Step 1: k0 (threshold 1 of the provisioned keyring) introduces k1 and k2, threshold 2.
    let (s, body) = world.post_json("/api/v1/keyring", update(1, 2, &[&k0, &k1, &k2], &[&k0]));
    assert_eq!((s, body["version"].as_u64()), (200, Some(1)), "{body}");
    // Step 2: retiring k0 needs two of the current keys; one is refused.
    let (s, body) = world.post_json("/api/v1/keyring", update(2, 2, &[&k1, &k2], &[&k1]));
    assert_eq!(s, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("requires 2"),
        "{body}"
    );
    let (s, body) = world.post_json("/api/v1/keyring", update(2, 2, &[&k1, &k2], &[&k1, &k2]));
    assert_eq!((s, body["version"].as_u64()), (200, Some(2)), "{body}");
    let mut expected = vec![k1.id().to_string(), k2.id().to_string()];
    expected.sort();
    assert_eq!(world.get("/api/v1/keyring")["keys"], json!(expected));
    // An old step replayed changes nothing.
    let (s, _) = world.post_json("/api/v1/keyring", update(1, 2, &[&k0, &k1, &k2], &[&k0]));
    assert_eq!(s, 400);

    // Every device gets the chain over the broker and checks it step by step.
    wait_keyring_version(&a, 2);
    wait_keyring_version(&b, 2);
    let kinds: Vec<String> = a
        .agent
        .events(0, 1000)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(kinds.contains(&"keyring_updated".to_string()), "{kinds:?}");

    // The retired key: refused by the server (upload and stage) and by the devices.
    let retired = std::fs::read(world.bundle("digits_mlp", "2.0.0")).unwrap();
    let (s, body) = world.post("/api/v1/bundles", &retired);
    assert_eq!(
        s, 400,
        "upload of a bundle signed by the retired key: {body}"
    );
    let (s, body) = world.post_json(
        "/api/v1/devices/dev-a/stage",
        json!({"bundle_id": old_signed}),
    );
    assert_eq!(
        s, 409,
        "stage of a bundle signed by the retired key: {body}"
    );
    for d in [&a, &b] {
        let err = d.agent.install(&retired).unwrap_err().to_string();
        assert!(err.contains("key"), "{}: {err}", d.id);
        assert_eq!(d.agent.status().unwrap().models[0].active, "1.0.0");
    }

    // The new key: installs through the fleet.
    let v3 = world.upload(&world.bundle_signed_by("digits_mlp", "3.0.0", &f1.secret));
    for d in ["dev-a", "dev-b"] {
        let (s, body) = world.post_json(
            &format!("/api/v1/devices/{d}/stage"),
            json!({"bundle_id": v3}),
        );
        assert_eq!(s, 202, "{body}");
    }
    for d in ["dev-a", "dev-b"] {
        world.wait_for_version(d, "digits_mlp", "3.0.0", LONG);
    }

    // A device that joins after the rotation catches up from the retained chain.
    let c = world.start_device("dev-c", &[], &url, None);
    wait_keyring_version(&c, 2);
    let (s, body) = world.post_json("/api/v1/devices/dev-c/stage", json!({"bundle_id": v3}));
    assert_eq!(s, 202, "{body}");
    world.wait_for_version("dev-c", "digits_mlp", "3.0.0", LONG);
    assert!(c.agent.install(&retired).is_err());

    // A restarted device keeps the rotated keyring (it is stored in agent.redb), before it
    // even reaches the broker.
    world.crash_device(a);
    let a = world.start_device("dev-a", &[], "mqtt://127.0.0.1:1", None);
    assert_eq!(a.agent.keyring().version, 2);
    assert!(a.agent.install(&retired).is_err());
    world.crash_device(a);
    world.crash_device(b);
    world.crash_device(c);
}
