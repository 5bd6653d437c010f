//! API security (issue 11): every route of the OpenAPI document walked with every role, the audit
//! log of every mutation, tokens hashed at rest, the rate limit on failed authentication, and
//! the security headers on every response.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{token_lines, wait_for, Api, FakeDevice, Fixture, ADMIN, OPERATOR, VIEWER};
use fleet_server::http::limit::AuthFailureLimit;
use protocol::keys::{KeyringUpdate, SecretKey, SignedKeyringUpdate};
use serde_json::{json, Value};

const WRONG: &str = "wrong-secret-0123456789";

/// One request; the status and the response headers (lowercase names). The body is not read,
/// so the endless `/api/v1/stream` answers too.
fn call(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, BTreeMap<String, String>) {
    let mut r = ureq::request(method, &format!("{base}{path}")).timeout(Duration::from_secs(30));
    if let Some(t) = token {
        r = r.set("Authorization", &format!("Bearer {t}"));
    }
    let resp = match if method == "GET" || method == "DELETE" {
        r.call()
    } else {
        r.set("Content-Type", "application/json").send_string("{}")
    } {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {path}: transport error {e}"),
    };
    let headers = resp
        .headers_names()
        .into_iter()
        .map(|n| {
            (
                n.to_ascii_lowercase(),
                resp.header(&n).unwrap_or("").to_string(),
            )
        })
        .collect();
    (resp.status(), headers)
}

fn rank(role: &str) -> u8 {
    match role {
        "public" => 0,
        "viewer" => 1,
        "operator" => 2,
        "admin" => 3,
        other => panic!("unknown x-min-role '{other}'"),
    }
}

/// Path parameters filled with values that exist (or harmlessly do not).
fn concrete(path: &str) -> String {
    path.replace("{file}", "app.js")
        .replace("{name}", "nobody")
        .replace("{action}", "pause")
        .replace("{id}", "no-such-id")
}

#[test]
fn every_documented_route_enforces_its_declared_role_for_every_caller() {
    let fx = Fixture::new();
    let mut config = fx.config("server");
    config.tokens = Some(token_lines());
    // The walk makes many refused requests from one address: no rate limit here.
    config.auth_failure_limit = AuthFailureLimit {
        max_failures: u32::MAX,
        window: Duration::from_secs(1),
    };
    let server = fx.start(config);
    let base = server.http_url();
    let (s, doc) = Api::new(&server, None).get("/api/v1/openapi.json");
    assert_eq!(s, 200);

    let callers: [(&str, Option<&str>, u8); 5] = [
        ("no token", None, 0),
        ("a wrong token", Some(WRONG), 0),
        ("viewer", Some(VIEWER), 1),
        ("operator", Some(OPERATOR), 2),
        ("admin", Some(ADMIN), 3),
    ];
    let mut walked = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let need = op["x-min-role"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path} declares no x-min-role"));
            let need = rank(need);
            let url = concrete(path);
            let m = method.to_ascii_uppercase();
            for (who, token, level) in callers {
                let (status, h) = call(&base, &m, &url, token);
                let what = format!("{m} {url} as {who} (route needs rank {need})");
                if need == 0 || (token != Some(WRONG) && level >= need) {
                    assert!(
                        ![401, 403, 429, 500].contains(&status),
                        "{what}: expected to be let through, got {status}"
                    );
                } else if level == 0 {
                    assert_eq!(status, 401, "{what}");
                    assert_eq!(
                        h.get("www-authenticate").map(String::as_str),
                        Some("Bearer")
                    );
                } else {
                    assert_eq!(status, 403, "{what}");
                }
                // Security headers on every response, allowed or refused.
                assert_eq!(h["x-content-type-options"], "nosniff", "{what}");
                assert_eq!(h["referrer-policy"], "no-referrer", "{what}");
                assert_eq!(h["x-frame-options"], "DENY", "{what}");
                assert!(
                    h["content-security-policy"].contains("frame-ancestors 'none'"),
                    "{what}"
                );
                if url.starts_with("/api/") {
                    assert_eq!(h["cache-control"], "no-store", "{what}");
                }
            }
            walked += 1;
        }
    }
    assert_eq!(walked, fleet_server::http::route_list().len());
    fx.stop(server);
}

/// The newest event sequence number.
fn last_seq(api: &Api) -> u64 {
    let (s, e) = api.get("/api/v1/events?limit=1");
    assert_eq!(s, 200, "{e}");
    e["events"][0]["seq"].as_u64().unwrap_or(0)
}

/// Events newer than `after`.
fn events_after(api: &Api, after: u64) -> Vec<Value> {
    let (_, e) = api.get("/api/v1/events?limit=1000");
    e["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["seq"].as_u64().unwrap() > after)
        .cloned()
        .collect()
}

#[test]
fn every_mutation_is_in_the_audit_log_with_the_token_name() {
    let fx = Fixture::new();
    let mut config = fx.config("server");
    config.tokens = Some(token_lines());
    let server = fx.start(config);
    let anon = Api::new(&server, None);
    let viewer = anon.with_token(Some(VIEWER));
    let operator = anon.with_token(Some(OPERATOR));
    let admin = anon.with_token(Some(ADMIN));
    let dev = FakeDevice::connect(server.broker_url(), "dev-1");
    dev.publish_status(&dev.status(&[("site", "a")], Some(vec![])));
    wait_for(20, "the device", || {
        (viewer.get("/api/v1/devices/dev-1").0 == 200).then_some(())
    });
    let bundle = std::fs::read(fx.bundle("digits_mlp", "1.0.0")).unwrap();

    // (method, route, caller, token name, request) for every mutating route.
    let mut done: Vec<(&str, &str)> = Vec::new();
    let mut check = |method: &'static str,
                     route: &'static str,
                     name: &str,
                     kind: &str,
                     act: &mut dyn FnMut() -> (u16, Value)| {
        let before = last_seq(&viewer);
        let (s, body) = act();
        assert!((200..300).contains(&s), "{method} {route}: {s} {body}");
        let new = events_after(&viewer, before);
        assert!(
            new.iter()
                .any(|e| e["actor"] == name && e["kind"].as_str().unwrap().starts_with(kind)),
            "{method} {route} left no '{kind}' event by '{name}': {new:#?}"
        );
        done.push((method, route));
        body
    };
    let up = check(
        "post",
        "/api/v1/bundles",
        "ci",
        "bundle_uploaded",
        &mut || operator.post_bytes("/api/v1/bundles", &bundle),
    );
    let id = up["id"].as_str().unwrap().to_string();
    check(
        "post",
        "/api/v1/devices/{id}/stage",
        "ci",
        "command_sent",
        &mut || operator.post_json("/api/v1/devices/dev-1/stage", json!({"bundle_id": id})),
    );
    check(
        "post",
        "/api/v1/devices/{id}/revert",
        "ci",
        "command_sent",
        &mut || {
            operator.post_json(
                "/api/v1/devices/dev-1/revert",
                json!({"model": "digits_mlp"}),
            )
        },
    );
    let r = check(
        "post",
        "/api/v1/rollouts",
        "ci",
        "rollout_created",
        &mut || {
            operator.post_json(
                "/api/v1/rollouts",
                json!({"bundle_id": id, "stages": [{"percent": 100, "bake_seconds": 600}]}),
            )
        },
    );
    let rid = r["id"].as_str().unwrap().to_string();
    check(
        "post",
        "/api/v1/rollouts/{id}/{action}",
        "ci",
        "rollout_",
        &mut || operator.post_json(&format!("/api/v1/rollouts/{rid}/abort"), json!({})),
    );
    // A keyring rotation: the current bundle-signing key signs an update that adds a second key.
    let (_, keyring) = viewer.get("/api/v1/keyring");
    let signer = SecretKey::from_file_text(&std::fs::read_to_string(&fx.key).unwrap()).unwrap();
    let added = SecretKey::generate().unwrap();
    let rotation = KeyringUpdate {
        version: keyring["version"].as_u64().unwrap() + 1,
        threshold: 1,
        keys: vec![signer.public().to_hex(), added.public().to_hex()],
    };
    let rotation = serde_json::to_value(SignedKeyringUpdate::sign(&rotation, &[&signer])).unwrap();
    check(
        "post",
        "/api/v1/keyring",
        "root",
        "keyring_updated",
        &mut || admin.post_json("/api/v1/keyring", rotation.clone()),
    );
    check(
        "post",
        "/api/v1/tokens",
        "root",
        "token_created",
        &mut || admin.post_json("/api/v1/tokens", json!({"name": "dash", "role": "viewer"})),
    );
    check(
        "delete",
        "/api/v1/tokens/{name}",
        "root",
        "token_deleted",
        &mut || admin.delete("/api/v1/tokens/dash"),
    );

    // Every route that is not a GET mutates: each must have been exercised above.
    for (method, path, _) in fleet_server::http::route_list() {
        if method != "get" {
            assert!(
                done.contains(&(method, path)),
                "{method} {path} mutates but this test does not check its audit event"
            );
        }
    }
    // A refused mutation leaves nothing.
    let before = last_seq(&viewer);
    assert_eq!(
        viewer
            .post_json("/api/v1/tokens", json!({"name": "x", "role": "admin"}))
            .0,
        403
    );
    assert!(events_after(&viewer, before).is_empty());
    drop(dev);
    fx.stop(server);
}

#[test]
fn tokens_are_stored_only_as_hashes() {
    let fx = Fixture::new();
    let server = fx.start(fx.config("server"));
    let first = server.admin_token().unwrap().to_string();
    let admin = Api::new(&server, Some(&first));
    let (s, created) = admin.post_json("/api/v1/tokens", json!({"name": "ci", "role": "operator"}));
    assert_eq!(s, 201);
    let second = created["token"].as_str().unwrap().to_string();
    let (_, list) = admin.get("/api/v1/tokens");
    assert!(!list.to_string().contains(&second));
    fx.stop(server);

    let db = std::fs::read(fx.path("server").join("server.redb")).unwrap();
    let contains = |needle: &[u8]| db.windows(needle.len()).any(|w| w == needle);
    for secret in [&first, &second] {
        assert!(!contains(secret.as_bytes()), "a secret is in the database");
        let hash = fleet_server::auth::hash_secret(secret);
        assert!(
            contains(hash.as_bytes()),
            "the secret's hash is what is kept"
        );
    }
    // And the hashes still authenticate after a restart.
    let server = fx.start(fx.config("server"));
    assert!(server.admin_token().is_none());
    assert_eq!(
        Api::new(&server, Some(&second)).get("/api/v1/devices").0,
        200
    );
    fx.stop(server);
}

#[test]
fn repeated_failed_authentication_from_one_address_is_answered_429() {
    let fx = Fixture::new();
    let mut config = fx.config("server");
    config.tokens = Some(token_lines());
    config.auth_failure_limit = AuthFailureLimit {
        max_failures: 5,
        window: Duration::from_secs(3),
    };
    let server = fx.start(config);
    let base = server.http_url();
    let anon = Api::new(&server, None);

    // A missing token is not a guess: never limited.
    for _ in 0..10 {
        assert_eq!(call(&base, "GET", "/api/v1/devices", None).0, 401);
    }
    for i in 0..5 {
        assert_eq!(
            call(&base, "GET", "/api/v1/devices", Some(WRONG)).0,
            401,
            "guess {i}"
        );
    }
    // Now the address is blocked, whatever token it presents, on every authenticated route.
    for token in [WRONG, VIEWER, ADMIN] {
        let (s, h) = call(&base, "GET", "/api/v1/devices", Some(token));
        assert_eq!(s, 429);
        let wait: u64 = h["retry-after"].parse().unwrap();
        assert!((1..=3).contains(&wait), "Retry-After {wait}");
    }
    assert_eq!(call(&base, "POST", "/api/v1/tokens", Some(ADMIN)).0, 429);
    // Public routes still answer.
    assert_eq!(call(&base, "GET", "/healthz", None).0, 200);
    assert!(anon.metric("fleet_http_auth_rate_limited_total") >= 4);
    // After the window the right token works again.
    std::thread::sleep(Duration::from_millis(3100));
    assert_eq!(call(&base, "GET", "/api/v1/devices", Some(VIEWER)).0, 200);
    fx.stop(server);
}

#[test]
fn a_message_naming_another_device_than_its_topic_is_dropped_and_counted() {
    use protocol::link::{self, Channel};
    use rumqttc::QoS;
    let fx = Fixture::new();
    let server = fx.start(fx.config("server"));
    let token = server.admin_token().unwrap().to_string();
    let api = Api::new(&server, Some(&token));
    let mallory = FakeDevice::connect(server.broker_url(), "mallory");
    // On another device's topic, naming itself; on its own topic, naming another device.
    let own = link::encode(&mallory.status(&[], Some(vec![])));
    mallory
        .client
        .publish(
            mallory.topics.device("victim", Channel::Status),
            QoS::AtLeastOnce,
            true,
            own,
        )
        .unwrap();
    let mut forged = mallory.status(&[], Some(vec![]));
    forged.device_id = "victim".into();
    mallory.publish_status(&forged);
    wait_for(20, "two mismatches counted", || {
        (api.metric("fleet_mqtt_device_mismatch_total") == 2).then_some(())
    });
    assert_eq!(api.get("/api/v1/devices").1["total"], 0);
    drop(mallory);
    fx.stop(server);
}

#[test]
fn the_cli_issues_device_certificates_and_writes_the_acl() {
    let dir = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_fleet-server");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(exe).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let ca = dir.path().join("ca");
    let dev = dir.path().join("dev");
    let ca_s = ca.to_str().unwrap();
    let dev_s = dev.to_str().unwrap();
    let said = run(&[
        "issue-device-cert",
        "--ca-dir",
        ca_s,
        "--device-id",
        "berlin-7",
        "--out",
        dev_s,
    ]);
    assert!(said.contains("berlin-7.pem"), "{said}");
    for f in ["berlin-7.pem", "berlin-7.key", "ca.pem"] {
        assert!(dev.join(f).is_file(), "{f}");
    }
    assert!(ca.join("ca.key").is_file());
    let bad = std::process::Command::new(exe)
        .args([
            "issue-device-cert",
            "--ca-dir",
            ca_s,
            "--device-id",
            "a/b",
            "--out",
            dev_s,
        ])
        .output()
        .unwrap();
    assert!(
        !bad.status.success(),
        "a device id that is not one is refused"
    );
    let acl = run(&["mosquitto-acl", "--telemetry-reader", "grafana"]);
    assert!(
        acl.contains("pattern write modelfleet/v1/devices/%u/status"),
        "{acl}"
    );
    assert!(acl.contains("user fleet-server@fleet"), "{acl}");
    assert!(acl.contains("user grafana"), "{acl}");
}
