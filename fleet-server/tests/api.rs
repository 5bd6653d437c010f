//! Tokens and roles, restart persistence, telemetry ingest, the OpenAPI document, the CLI.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::{token_lines, wait_for, Api, FakeDevice, Fixture, ADMIN, OPERATOR, VIEWER};
use fleet_server::broker::EmbeddedBroker;
use fleet_server::{BrokerChoice, BrokerConnection};
use protocol::link::{self, Channel};
use serde_json::json;

#[test]
fn roles_guard_the_api_and_errors_say_what_is_wrong() {
    let fx = Fixture::new();
    let mut config = fx.config("server");
    config.tokens = Some(token_lines());
    let server = fx.start(config);
    assert!(
        server.admin_token().is_none(),
        "a token file means no generated token"
    );
    let anon = Api::new(&server, None);
    let viewer = anon.with_token(Some(VIEWER));
    let operator = anon.with_token(Some(OPERATOR));
    let admin = anon.with_token(Some(ADMIN));
    let bundle = std::fs::read(fx.bundle("digits_mlp", "1.0.0")).unwrap();

    let (s, e) = anon.get("/api/v1/devices");
    assert_eq!(s, 401);
    assert!(
        e["error"].as_str().unwrap().contains("Authorization"),
        "{e}"
    );
    let (s, e) = anon
        .with_token(Some("wrong-secret-000000000"))
        .get("/api/v1/devices");
    assert_eq!(s, 401);
    assert!(
        e["error"].as_str().unwrap().contains("unknown token"),
        "{e}"
    );
    assert_eq!(viewer.get("/api/v1/devices").0, 200);
    assert_eq!(viewer.get("/api/v1/events").0, 200);
    let (s, e) = viewer.post_bytes("/api/v1/bundles", &bundle);
    assert_eq!(s, 403);
    assert!(e["error"].as_str().unwrap().contains("operator"), "{e}");
    let (s, up) = operator.post_bytes("/api/v1/bundles", &bundle);
    assert_eq!(s, 201, "{up}");
    assert_eq!(operator.get("/api/v1/tokens").0, 403);
    assert_eq!(
        operator
            .post_json("/api/v1/tokens", json!({"name": "x", "role": "viewer"}))
            .0,
        403
    );

    // Admin manages tokens; a created token works at its role; a deleted one stops working.
    let (s, created) = admin.post_json("/api/v1/tokens", json!({"name": "dash", "role": "viewer"}));
    assert_eq!(s, 201, "{created}");
    let dash = anon.with_token(created["token"].as_str());
    assert_eq!(dash.get("/api/v1/bundles").0, 200);
    assert_eq!(dash.post_bytes("/api/v1/bundles", &bundle).0, 403);
    let (_, list) = admin.get("/api/v1/tokens");
    let names: Vec<&str> = list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ro", "ci", "root", "dash"]);
    assert!(
        !list.to_string().contains(VIEWER),
        "no secrets in the listing"
    );
    assert_eq!(admin.delete("/api/v1/tokens/dash").0, 204);
    assert_eq!(dash.get("/api/v1/bundles").0, 401);
    assert_eq!(admin.delete("/api/v1/tokens/dash").0, 404);
    assert_eq!(
        admin
            .post_json("/api/v1/tokens", json!({"name": "ro", "role": "admin"}))
            .0,
        409
    );
    assert_eq!(
        admin
            .post_json("/api/v1/tokens", json!({"name": "a b", "role": "viewer"}))
            .0,
        400
    );
    assert_eq!(
        admin
            .post_json("/api/v1/tokens", json!({"name": "x", "role": "boss"}))
            .0,
        400
    );

    // A bundle signed by a key the server does not trust: 400 naming the reason.
    let other = fleet_server_other_key_bundle(&fx);
    let (s, e) = operator.post_bytes("/api/v1/bundles", &other);
    assert_eq!(s, 400);
    assert!(e["error"].as_str().unwrap().contains("trusted"), "{e}");
    let mut flipped = bundle.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 1;
    assert_eq!(operator.post_bytes("/api/v1/bundles", &flipped).0, 400);

    // Unauthenticated routes.
    let (s, doc) = anon.get("/api/v1/openapi.json");
    assert_eq!(s, 200);
    assert!(doc["paths"]["/api/v1/devices"].is_object());
    assert_eq!(anon.get("/healthz").1["mqtt_connected"], true);
    assert!(anon.metric("fleet_http_unauthorized_total") >= 2);
    assert_eq!(anon.metric("fleet_bundles"), 1);
    let (s, e) = viewer.get("/api/v1/nowhere");
    assert_eq!(s, 404);
    assert!(e["error"].is_string());
    let (s, e) = viewer.get("/api/v1/devices?label=oops");
    assert_eq!(s, 400);
    assert!(e["error"].as_str().unwrap().contains("KEY:VALUE"));
    fx.stop(server);
}

fn fleet_server_other_key_bundle(fx: &Fixture) -> Vec<u8> {
    let keys = bundler::keys::keygen_files(&fx.path("other-keys"), "other").unwrap();
    let src = common::models_dir().join("digits_mlp");
    let out = fx.path("other.mfb");
    let mut opts = bundler::BuildOptions::new(
        src.join("digits_mlp.onnx"),
        "digits_mlp",
        "9.0.0",
        1,
        &keys.secret,
        &out,
    );
    opts.golden_inputs = Some(src.join("test_input.npy"));
    opts.golden_max = 4;
    opts.latency_runs = 1;
    bundler::build(&opts).unwrap();
    std::fs::read(out).unwrap()
}

#[test]
fn state_survives_a_restart_on_the_same_data_dir() {
    let fx = Fixture::new();
    // A broker that outlives both server runs, as an external one would.
    let broker = EmbeddedBroker::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let config = || {
        let mut c = fx.config("server");
        c.broker = BrokerChoice::External(BrokerConnection::plain(broker.url()));
        c
    };
    let server = fx.start(config());
    let token = server.admin_token().unwrap().to_string();
    let api = Api::new(&server, Some(&token));
    let bytes = std::fs::read(fx.bundle("digits_mlp", "1.0.0")).unwrap();
    let (s, up) = api.post_bytes("/api/v1/bundles", &bytes);
    assert_eq!(s, 201);
    let dev = FakeDevice::connect(&broker.url(), "dev-p");
    dev.publish_status(&dev.status(&[("site", "a")], Some(vec![])));
    wait_for(20, "device registered", || {
        (api.get("/api/v1/devices").1["total"] == 1).then_some(())
    });
    fx.stop(server);

    // While the server is away the device reports an event: the persistent session keeps it.
    let mut dev = dev;
    dev.event("installed", "digits_mlp", "1.0.0", None);

    let server = fx.start(config());
    assert!(
        server.admin_token().is_none(),
        "the admin token is generated once"
    );
    let api = Api::new(&server, Some(&token));
    let (s, b) = api.get(&format!("/api/v1/bundles/{}", up["id"].as_str().unwrap()));
    assert_eq!((s, &b["version"]), (200, &json!("1.0.0")));
    let (_, devices) = api.get("/api/v1/devices");
    assert_eq!(devices["devices"][0]["labels"]["site"], "a");
    let (_, _, content) = api.get_raw(
        &format!("/api/v1/bundles/{}/content", up["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(content, bytes);
    wait_for(20, "the event published while the server was down", || {
        let (_, ev) = api.get("/api/v1/events?device_id=dev-p&kind=installed");
        (ev["events"].as_array().unwrap().len() == 1).then_some(())
    });
    let (_, ev) = api.get("/api/v1/events?kind=bundle_uploaded");
    assert_eq!(ev["events"].as_array().unwrap().len(), 1);
    drop(dev);
    fx.stop(server);
}

#[test]
fn telemetry_windows_are_kept_per_device_model_and_version() {
    let fx = Fixture::new();
    let server = fx.start(fx.config("server"));
    let api = Api::new(&server, server.admin_token());
    let dev = FakeDevice::connect(server.broker_url(), "dev-t");
    dev.publish_status(&dev.status(&[], Some(vec![])));
    wait_for(20, "device registered", || {
        (api.get("/api/v1/devices/dev-t").0 == 200).then_some(())
    });
    let window = json!({
        "type": "window", "schema": 1, "model": "digits_mlp", "version": "1.0.0",
        "start": "2026-01-01T00:00:00Z", "end": chrono::Utc::now(), "state": "trial",
        "requests": 40, "errors": 2, "non_finite": 0,
        "latency": {"log10_us": {"lo": 0.0, "hi": 7.0, "counts": [0, 0, 0, 40, 0, 0, 0, 0, 0]},
                    "mean_ms": 1.5, "p50_ms": 1.2, "p95_ms": 3.0, "p99_ms": 4.0},
        "classification": {"class_counts": [30, 10], "confidence": {"lo": 0.0, "hi": 1.0, "counts": [0, 0, 40, 0]},
                           "mean_confidence": 0.8, "prediction_psi_baseline": 0.01},
        "input_psi": {"input": 0.02}, "samples_over_budget": 0, "outbox_dropped_total": 0
    });
    dev.publish(
        Channel::Telemetry,
        serde_json::to_vec(&window).unwrap(),
        false,
    );
    let body = wait_for(20, "telemetry window", || {
        let (_, b) = api.get("/api/v1/devices/dev-t/telemetry?model=digits_mlp");
        (b["windows"].as_array().is_some_and(|w| w.len() == 1)).then_some(b)
    });
    assert_eq!(body["windows"][0]["requests"], 40);
    let stored = server
        .fleet()
        .telemetry
        .windows("dev-t", Some("digits_mlp"), None);
    assert_eq!(stored.len(), 1);
    assert_eq!((stored[0].requests, stored[0].errors), (40, 2));
    let classes = &stored[0].classification.as_ref().unwrap().class_counts;
    assert_eq!(classes, &vec![30, 10]);
    assert_eq!(
        api.metric("fleet_mqtt_messages_received_total{channel=\"telemetry\"}"),
        1
    );
    drop(dev);
    fx.stop(server);
}

#[test]
fn garbage_on_every_topic_is_counted_and_the_server_keeps_answering() {
    let fx = Fixture::new();
    let server = fx.start(fx.config("server"));
    let api = Api::new(&server, server.admin_token());
    let dev = FakeDevice::connect(server.broker_url(), "dev-g");
    let huge = vec![b'{'; 400 * 1024];
    let mut wrong_device = dev.status(&[], Some(vec![]));
    wrong_device.device_id = "someone-else".into();
    let mut future = dev.status(&[], None);
    future.schema = 99;
    let garbage: Vec<(Channel, Vec<u8>)> = vec![
        (Channel::Status, b"not json".to_vec()),
        (Channel::Status, link::encode(&wrong_device)),
        (Channel::Status, link::encode(&future)),
        (Channel::Status, huge.clone()),
        (Channel::Events, b"{\"schema\":1}".to_vec()),
        (Channel::Events, vec![0xff, 0xfe, 0x00]),
        (Channel::Telemetry, b"[1,2,3]".to_vec()),
        (Channel::Telemetry, vec![b' '; (1 << 20) + 100]),
        (Channel::TransferRequest, b"{\"bundle_id\": 5}".to_vec()),
        (Channel::TransferRequest, Vec::new()),
    ];
    let n = garbage.len() as u64;
    for (channel, payload) in garbage {
        dev.publish(channel, payload, false);
    }
    // A well-formed chunk request from a device the server has never seen: an error frame.
    let req = link::ChunkRequest {
        schema: 1,
        bundle_id: "a".repeat(64),
        chunk_size: 65536,
        first: 0,
        count: 4,
    };
    dev.publish(Channel::TransferRequest, link::encode(&req), false);
    let (h, _) = link::decode_chunk(&dev.recv(Channel::TransferChunk, 20).payload).unwrap();
    assert_eq!(h.error.as_deref(), Some("unknown device"));
    wait_for(20, "malformed messages counted", || {
        let total: u64 = ["status", "events", "telemetry", "transfer_req"]
            .iter()
            .map(|c| {
                api.metric(&format!(
                    "fleet_mqtt_messages_malformed_total{{channel=\"{c}\"}}"
                ))
            })
            .sum();
        (total == n).then_some(())
    });
    assert_eq!(
        api.metric("fleet_mqtt_messages_malformed_total{channel=\"status\"}"),
        4
    );
    // Still serving, and the garbage registered nothing.
    let (s, body) = api.get("/api/v1/devices");
    assert_eq!((s, &body["total"]), (200, &json!(0)));
    assert_eq!(api.get("/healthz").1["mqtt_connected"], true);
    // A good status after all that still registers.
    dev.publish_status(&dev.status(&[], Some(vec![])));
    wait_for(20, "device registered", || {
        (api.get("/api/v1/devices").1["total"] == 1).then_some(())
    });
    drop(dev);
    fx.stop(server);
}

/// Reads stdout lines of a child until `want` lines with the given prefixes were seen.
fn read_lines(child: &mut std::process::Child, prefixes: &[&str]) -> Vec<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut found = vec![String::new(); prefixes.len()];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while found.iter().any(String::is_empty) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx.recv_timeout(left).expect("expected lines on stdout");
        for (i, p) in prefixes.iter().enumerate() {
            if let Some(rest) = line.strip_prefix(p) {
                found[i] = rest.trim().to_string();
            }
        }
    }
    found
}

#[test]
fn the_cli_prints_its_addresses_and_token() {
    let fx = Fixture::new();
    let bin = env!("CARGO_BIN_EXE_fleet-server");
    let mut broker = Command::new(bin)
        .args(["broker", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let broker_url = read_lines(&mut broker, &["broker "]).remove(0);
    assert!(broker_url.starts_with("mqtt://127.0.0.1:"), "{broker_url}");

    let mut server = Command::new(bin)
        .args(["run", "--data-dir"])
        .arg(fx.path("cli-data"))
        .arg("--keyring")
        .arg(&fx.keyring_file)
        .args(["--listen", "127.0.0.1:0", "--broker", &broker_url])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = read_lines(&mut server, &["admin token: ", "broker ", "listening on "]);
    let (token, url, http) = (&lines[0], &lines[1], &lines[2]);
    assert_eq!(url, &broker_url);
    let api = Api {
        base: http.clone(),
        token: Some(token.clone()),
    };
    wait_for(20, "server connected to the broker", || {
        (api.get("/healthz").1["mqtt_connected"] == true).then_some(())
    });
    assert_eq!(api.get("/api/v1/devices").0, 200);
    server.kill().unwrap();
    server.wait().unwrap();
    broker.kill().unwrap();
    broker.wait().unwrap();
}
