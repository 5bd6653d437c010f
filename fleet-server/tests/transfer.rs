//! A device played by a raw MQTT client joins, gets a stage command, fetches the bundle in
//! chunks and reassembles it; its events land once in the event log; Range downloads work.

mod common;

use common::{wait_for, Api, FakeDevice, Fixture};
use protocol::command_auth::{self, Refusal};
use protocol::link::{self, Action, Channel, ChunkRequest, Command, ModelSummary, LINK_SCHEMA};
use serde_json::json;

#[test]
fn staged_bundle_travels_in_chunks_and_events_are_logged_once() {
    let fx = Fixture::new();
    let server = fx.start(fx.config("server"));
    let token = server
        .admin_token()
        .expect("first start generates an admin token")
        .to_string();
    let api = Api::new(&server, Some(&token));

    let mut dev = FakeDevice::connect(server.broker_url(), "dev-1");
    let model = ModelSummary {
        name: "digits_mlp".into(),
        active: "1.0.0".into(),
        previous: None,
        state: "committed".into(),
        security_version: 1,
        bundle_sha256: "00".into(),
        compute: None,
    };
    dev.publish_status(&dev.status(&[("site", "lab")], Some(vec![model])));
    let other = FakeDevice::connect(server.broker_url(), "dev-2");
    other.publish_status(&other.status(&[("site", "field")], Some(vec![])));
    wait_for(20, "two devices registered", || {
        let (s, body) = api.get("/api/v1/devices");
        (s == 200 && body["total"] == 2).then_some(())
    });
    let (s, body) = api.get("/api/v1/devices?label=site:lab");
    assert_eq!(s, 200);
    assert_eq!(body["total"], 1);
    let d = &body["devices"][0];
    assert_eq!(d["id"], "dev-1");
    assert_eq!(d["online"], true);
    assert_eq!(d["labels"]["site"], "lab");
    assert_eq!(d["models"][0]["active"], "1.0.0");
    assert_eq!(d["target"], "x86_64-unknown-linux-gnu");
    assert!(d["last_seen"].is_string());

    // Upload: 201, then the same bytes again: 200 with the same id.
    let bundle_path = fx.bundle("digits_mlp", "2.0.0");
    let bytes = std::fs::read(&bundle_path).unwrap();
    let id = link::sha256_hex(&bytes);
    let (s, up) = api.post_bytes("/api/v1/bundles", &bytes);
    assert_eq!(s, 201, "{up}");
    assert_eq!(up["id"], id.as_str());
    assert_eq!(up["name"], "digits_mlp");
    assert_eq!(up["version"], "2.0.0");
    assert_eq!(up["size"], bytes.len() as u64);
    let (s, again) = api.post_bytes("/api/v1/bundles", &bytes);
    assert_eq!((s, &again["id"]), (200, &up["id"]));
    let (s, list) = api.get("/api/v1/bundles");
    assert_eq!((s, list["bundles"].as_array().unwrap().len()), (200, 1));

    // Stage to dev-1 only.
    let (s, staged) = api.post_json("/api/v1/devices/dev-1/stage", json!({"bundle_id": id}));
    assert_eq!(s, 202, "{staged}");
    let command_id = staged["command_id"].as_str().unwrap().to_string();
    let p = dev.recv(Channel::Commands, 20);
    // Signed by the server key, addressed to dev-1 only, valid for a while.
    let key = server.server_public_key();
    let now = chrono::Utc::now();
    let cmd: Command = command_auth::open(&p.payload, &key, "dev-1", now).unwrap();
    assert_eq!(
        command_auth::open(&p.payload, &key, "dev-2", now),
        Err(Refusal::WrongDevice("dev-1".into()))
    );
    assert!(cmd.expires > now + chrono::Duration::minutes(30));
    assert_eq!(cmd.command_id, command_id);
    let Action::Stage { bundle } = cmd.action else {
        panic!("not a stage command: {:?}", cmd.action)
    };
    assert_eq!(bundle.bundle_id, id);
    assert_eq!(bundle.size, bytes.len() as u64);
    assert_eq!(bundle.chunk_size, link::DEFAULT_CHUNK_SIZE);
    let http_url = bundle.http_url.clone().expect("content URL");
    assert!(http_url.ends_with(&format!("/api/v1/bundles/{id}/content")));
    assert!(other.rx.try_recv().is_err(), "dev-2 got nothing");

    // Fetch every chunk, 16 at a time (plus an oversize request the server caps), reassemble.
    // The frames come on the server's bulk connection (QoS 0) once it is up (rumqttd delivers
    // them at the subscription's QoS, 1, so only the metrics tell the connections apart).
    wait_for(20, "the bulk connection", || {
        (api.metric("fleet_mqtt_bulk_connected") == 1).then_some(())
    });
    let total = bundle.chunks();
    assert!(total > 1, "the test bundle spans several chunks");
    let mut chunks: Vec<Option<Vec<u8>>> = vec![None; total as usize];
    let mut first = 0;
    while first < total {
        let req = ChunkRequest {
            schema: LINK_SCHEMA,
            bundle_id: id.clone(),
            chunk_size: bundle.chunk_size,
            first,
            count: 16,
        };
        dev.publish(Channel::TransferRequest, link::encode(&req), false);
        for _ in first..(first + 16).min(total) {
            let p = dev.recv(Channel::TransferChunk, 20);
            let (h, b) = link::decode_chunk(&p.payload).unwrap();
            assert_eq!(h.error, None);
            assert_eq!(h.total, total);
            chunks[h.index as usize] = Some(b.to_vec());
        }
        first += 16;
    }
    let whole: Vec<u8> = chunks
        .into_iter()
        .flat_map(|c| c.expect("every chunk"))
        .collect();
    assert_eq!(link::sha256_hex(&whole), id);
    assert_eq!(whole, bytes);
    wait_for(20, "transfer progress", || {
        let (_, d) = api.get("/api/v1/devices/dev-1");
        (d["transfer"]["bundle_id"] == id.as_str()
            && d["transfer"]["chunks_served"] == total as u64)
            .then_some(())
    });

    // Unknown bundle and a range past the end: error frames.
    for (bundle_id, first) in [("f".repeat(64), 0), (id.clone(), total)] {
        let req = ChunkRequest {
            schema: LINK_SCHEMA,
            bundle_id,
            chunk_size: 65536,
            first,
            count: 1,
        };
        dev.publish(Channel::TransferRequest, link::encode(&req), false);
        let p = dev.recv(Channel::TransferChunk, 20);
        let (h, b) = link::decode_chunk(&p.payload).unwrap();
        assert!(h.error.is_some() && b.is_empty(), "{h:?}");
    }
    assert!(api.metric("fleet_chunk_errors_total") >= 2);
    assert_eq!(
        (
            api.metric("fleet_chunk_frames_sent_total{connection=\"bulk\"}"),
            api.metric("fleet_chunk_frames_sent_total{connection=\"main\"}")
        ),
        (total as u64 + 2, 0),
        "every frame, error frames too, on the bulk connection"
    );
    wait_for(20, "chunks counted", || {
        (api.metric("fleet_chunks_served_total") >= total as u64).then_some(())
    });

    // Device events, one delivered twice: stored once, newest first, filtered by device.
    dev.event(
        "transfer_completed",
        "digits_mlp",
        "2.0.0",
        Some(&command_id),
    );
    dev.event("installed", "digits_mlp", "2.0.0", Some(&command_id));
    let activated = dev.event("activated", "digits_mlp", "2.0.0", Some(&command_id));
    dev.publish(Channel::Events, link::encode(&activated), false);
    let events = wait_for(20, "device events", || {
        let (_, body) = api.get("/api/v1/events?device_id=dev-1&limit=50");
        let ev = body["events"].as_array().unwrap().clone();
        ev.iter().any(|e| e["kind"] == "activated").then_some(ev)
    });
    wait_for(20, "the duplicate to be counted", || {
        (api.metric("fleet_device_events_duplicate_total") >= 1).then_some(())
    });
    let (_, body) = api.get("/api/v1/events?device_id=dev-1&limit=50");
    let kinds: Vec<&str> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "activated").count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(kinds[0], "activated", "newest first: {kinds:?}");
    assert!(
        kinds.contains(&"command_sent") && kinds.contains(&"device_registered"),
        "{kinds:?}"
    );
    let act = &events[0];
    assert_eq!(act["model"], "digits_mlp");
    assert_eq!(act["version"], "2.0.0");
    assert_eq!(act["command_id"], command_id.as_str());
    assert!(
        act["time"].is_string() && act.get("rollout_id").is_some() && act["detail"]["test"] == true
    );
    let (_, audit) = api.get("/api/v1/events?kind=bundle_uploaded");
    assert_eq!(audit["events"].as_array().unwrap().len(), 1);
    assert_eq!(audit["events"][0]["actor"], "admin");

    // Revert command.
    let (s, r) = api.post_json(
        "/api/v1/devices/dev-1/revert",
        json!({"model": "digits_mlp", "version": "2.0.0"}),
    );
    assert_eq!(s, 202, "{r}");
    let payload = dev.recv(Channel::Commands, 20).payload;
    let revert: Command = command_auth::open(&payload, &key, "dev-1", chrono::Utc::now()).unwrap();
    assert!(matches!(revert.action, Action::Revert { ref model, .. } if model == "digits_mlp"));
    assert!(revert.seq > cmd.seq, "sequence numbers grow");

    // Range downloads of the content (no token needed).
    let anon = api.with_token(None);
    let path = format!("/api/v1/bundles/{id}/content");
    let (s, _, full) = anon.get_raw(&path, None);
    assert_eq!((s, full.len()), (200, bytes.len()));
    let (s, cr, part) = anon.get_raw(&path, Some("bytes=100-1123"));
    assert_eq!(s, 206);
    assert_eq!(
        cr.as_deref(),
        Some(format!("bytes 100-1123/{}", bytes.len()).as_str())
    );
    assert_eq!(part, &bytes[100..1124]);
    let (s, _, tail) = anon.get_raw(&path, Some("bytes=-10"));
    assert_eq!((s, tail.as_slice()), (206, &bytes[bytes.len() - 10..]));
    let (s, cr, _) = anon.get_raw(&path, Some(&format!("bytes={}-", bytes.len())));
    assert_eq!(s, 416);
    assert_eq!(
        cr.as_deref(),
        Some(format!("bytes */{}", bytes.len()).as_str())
    );
    assert_eq!(
        anon.get_raw(&format!("/api/v1/bundles/{}/content", "0".repeat(64)), None)
            .0,
        404
    );

    // Unknown device: 404 naming it.
    let (s, e) = api.post_json("/api/v1/devices/nope/stage", json!({"bundle_id": id}));
    assert_eq!(s, 404);
    assert!(e["error"].as_str().unwrap().contains("nope"));
    let (s, e) = api.post_json("/api/v1/devices/dev-1/stage", json!({"bundle_id": "ab"}));
    assert_eq!(s, 404);
    assert!(e["error"].as_str().unwrap().contains("bundle"));

    drop((dev, other));
    fx.stop(server);
}

#[test]
fn without_the_bulk_connection_chunk_frames_take_the_main_one() {
    let fx = Fixture::new();
    let mut config = fx.config("server");
    config.bulk.enabled = false;
    let server = fx.start(config);
    let api = Api::new(&server, server.admin_token());
    let dev = FakeDevice::connect(server.broker_url(), "dev-m");
    dev.publish_status(&dev.status(&[], Some(vec![])));
    wait_for(20, "device registered", || {
        (api.get("/api/v1/devices/dev-m").0 == 200).then_some(())
    });
    let bytes = std::fs::read(fx.bundle("digits_mlp", "1.0.0")).unwrap();
    let (s, up) = api.post_bytes("/api/v1/bundles", &bytes);
    assert_eq!(s, 201, "{up}");
    let req = ChunkRequest {
        schema: LINK_SCHEMA,
        bundle_id: link::sha256_hex(&bytes),
        chunk_size: 4096,
        first: 0,
        count: 3,
    };
    dev.publish(Channel::TransferRequest, link::encode(&req), false);
    for index in 0..3 {
        let p = dev.recv(Channel::TransferChunk, 20);
        let (h, b) = link::decode_chunk(&p.payload).unwrap();
        assert_eq!(
            (h.index, b),
            (index, &bytes[index as usize * 4096..][..4096])
        );
    }
    assert_eq!(
        (
            api.metric("fleet_chunk_frames_sent_total{connection=\"main\"}"),
            api.metric("fleet_chunk_frames_sent_total{connection=\"bulk\"}"),
            api.metric("fleet_mqtt_bulk_connected"),
        ),
        (3, 0, 0)
    );
    drop(dev);
    fx.stop(server);
}

#[test]
fn a_last_will_marks_the_device_offline_and_keeps_its_models() {
    let fx = Fixture::new();
    let server = fx.start(fx.config("server"));
    let api = Api::new(&server, server.admin_token());
    let dev = FakeDevice::connect(server.broker_url(), "dev-9");
    let model = ModelSummary {
        name: "m".into(),
        active: "1.0.0".into(),
        previous: Some("0.9.0".into()),
        state: "trial".into(),
        security_version: 1,
        bundle_sha256: String::new(),
        compute: None,
    };
    dev.publish_status(&dev.status(&[("k", "v")], Some(vec![model])));
    wait_for(20, "device online", || {
        (api.get("/api/v1/devices/dev-9").1["online"] == true).then_some(())
    });
    // What the broker publishes when the connection drops.
    dev.publish(
        Channel::Status,
        link::encode(&protocol::link::DeviceStatus::last_will("dev-9")),
        true,
    );
    let d = wait_for(20, "device offline", || {
        let (_, d) = api.get("/api/v1/devices/dev-9");
        (d["online"] == false).then_some(d)
    });
    assert_eq!(d["models"][0]["active"], "1.0.0");
    assert_eq!(d["models"][0]["previous"], "0.9.0");
    assert_eq!(d["labels"]["k"], "v");
    let (_, offline) = api.get("/api/v1/devices?online=false");
    assert_eq!(offline["total"], 1);
    let (_, ev) = api.get("/api/v1/events?device_id=dev-9&kind=device_offline");
    assert_eq!(ev["events"].as_array().unwrap().len(), 1);
    drop(dev);
    fx.stop(server);
}

#[test]
fn staging_refuses_a_bundle_built_for_another_target_with_a_clear_event() {
    let fx = Fixture::new();
    let server = fx.start(fx.config("server"));
    let token = server.admin_token().unwrap().to_string();
    let api = Api::new(&server, Some(&token));
    // The fake device reports x86_64-unknown-linux-gnu.
    let dev = FakeDevice::connect(server.broker_url(), "dev-x86");
    dev.publish_status(&dev.status(&[], Some(vec![])));
    wait_for(20, "device registered", || {
        let (s, body) = api.get("/api/v1/devices/dev-x86");
        (s == 200 && body["target"] == "x86_64-unknown-linux-gnu").then_some(())
    });

    let build_for = |triple: &str, version: &str| {
        let path = fx.bundle_with("digits_mlp", version, |o| o.targets = vec![triple.into()]);
        std::fs::read(path).unwrap()
    };
    let (s, arm) = api.post_bytes(
        "/api/v1/bundles",
        &build_for("aarch64-unknown-linux-gnu", "1.0.0"),
    );
    assert_eq!(s, 201, "{arm}");
    let (s, body) = api.post_json(
        "/api/v1/devices/dev-x86/stage",
        json!({"bundle_id": arm["id"]}),
    );
    assert_eq!(s, 409, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("aarch64-unknown-linux-gnu") && error.contains("x86_64-unknown-linux-gnu"),
        "{error}"
    );
    let (_, events) = api.get("/api/v1/events?device_id=dev-x86");
    let refused: Vec<_> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "stage_refused")
        .collect();
    assert_eq!(refused.len(), 1, "{events:#}");
    assert_eq!(
        refused[0]["detail"]["device_target"],
        "x86_64-unknown-linux-gnu"
    );
    // Nothing was sent to the device.
    assert!(dev
        .rx
        .recv_timeout(std::time::Duration::from_millis(300))
        .is_err());

    // A bundle for the device's target (or for any target) is staged.
    let (_, x86) = api.post_bytes(
        "/api/v1/bundles",
        &build_for("x86_64-unknown-linux-gnu", "1.0.1"),
    );
    let (s, body) = api.post_json(
        "/api/v1/devices/dev-x86/stage",
        json!({"bundle_id": x86["id"]}),
    );
    assert!(s == 200 || s == 202, "{s} {body}");
}
