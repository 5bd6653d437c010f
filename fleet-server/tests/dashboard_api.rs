//! The routes behind the web dashboard: the fleet summary against the device list, the device
//! filters and pagination, a rollout's canary-vs-control series against the telemetry sent, the
//! live stream, bundle details, and the dashboard's files and security headers.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::time::Duration;

use chrono::Utc;
use common::{wait_for, Api, FakeDevice, Fixture};
use protocol::link::{self, Channel, DeviceStatus, ModelSummary, LINK_SCHEMA};
use rumqttc::QoS;
use serde_json::{json, Value};

fn model(name: &str, version: &str, state: &str) -> ModelSummary {
    ModelSummary {
        name: name.into(),
        active: version.into(),
        previous: None,
        state: state.into(),
        security_version: 1,
        bundle_sha256: String::new(),
        compute: None,
    }
}

/// Publishes (retained) the status of device `id` through `via`'s connection.
fn publish_status(
    via: &FakeDevice,
    id: &str,
    online: bool,
    target: &str,
    labels: &[(&str, &str)],
    models: Vec<ModelSummary>,
) {
    let status = DeviceStatus {
        schema: LINK_SCHEMA,
        device_id: id.into(),
        online,
        time: Utc::now(),
        agent_version: Some("0.1.0-test".into()),
        target: Some(target.into()),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        models: Some(models),
    };
    via.client
        .publish(
            via.topics.device(id, Channel::Status),
            QoS::AtLeastOnce,
            true,
            link::encode(&status),
        )
        .unwrap();
}

fn window(version: &str, requests: u64, errors: u64, classes: [u64; 2]) -> Value {
    json!({
        "type": "window", "schema": 1, "model": "digits_mlp", "version": version,
        "start": Utc::now() - chrono::Duration::seconds(1), "end": Utc::now(), "state": "trial",
        "requests": requests, "errors": errors, "non_finite": 0,
        "latency": {"log10_us": {"lo": 0.0, "hi": 7.0, "counts": [0, 0, 0, requests, 0, 0, 0]},
                    "mean_ms": 1.5, "p50_ms": 1.2, "p95_ms": 3.0, "p99_ms": 4.0},
        "classification": {"class_counts": classes, "confidence": {"lo": 0.0, "hi": 1.0, "counts": [0, requests]},
                           "mean_confidence": 0.8, "prediction_psi_baseline": 0.01},
        "input_psi": {"input": 0.02}, "samples_over_budget": 0, "outbox_dropped_total": 0
    })
}

/// 30 devices over two sites, two targets, three versions; a third of them offline.
fn thirty_devices(via: &FakeDevice) {
    for i in 0..30 {
        let site = if i % 3 == 0 { "berlin" } else { "paris" };
        let target = if i % 2 == 0 { "aarch64-pi4" } else { "x86_64" };
        let models = match i % 5 {
            0 => vec![],
            1 => vec![model("digits_mlp", "1.0.0", "trial")],
            2 => vec![model("digits_mlp", "0.9.0", "reverted")],
            _ => vec![
                model("digits_mlp", "0.9.0", "committed"),
                model("kws", "2.0.0", "committed"),
            ],
        };
        publish_status(
            via,
            &format!("dev-{i:02}"),
            i % 3 != 2,
            target,
            &[("site", site)],
            models,
        );
    }
}

#[test]
fn the_fleet_summary_matches_the_device_list_and_filters_page_on_the_server() {
    let fx = Fixture::new();
    let server = fx.start(fx.config("server"));
    let api = Api::new(&server, server.admin_token());
    let via = FakeDevice::connect(server.broker_url(), "publisher");
    thirty_devices(&via);
    wait_for(20, "30 devices registered", || {
        (api.get("/api/v1/devices?limit=1000").1["total"] == 30).then_some(())
    });
    // Wait until the last statuses (offline ones included) are applied.
    wait_for(20, "offline devices", || {
        (api.get("/api/v1/devices?online=false").1["total"] == 10).then_some(())
    });

    let (s, summary) = api.get("/api/v1/fleet/summary");
    assert_eq!(s, 200, "{summary}");
    let (_, list) = api.get("/api/v1/devices?limit=1000");
    let devices = list["devices"].as_array().unwrap();
    let count = |f: &dyn Fn(&Value) -> bool| devices.iter().filter(|d| f(d)).count() as u64;
    let has_state = |d: &Value, s: &str| {
        d["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["state"] == s)
    };
    let d = &summary["devices"];
    assert_eq!(d["total"], 30);
    assert_eq!(d["online"], count(&|d| d["online"] == true));
    assert_eq!(d["offline"], count(&|d| d["online"] == false));
    assert_eq!(d["trial"], count(&|d| has_state(d, "trial")));
    assert_eq!(d["reverted"], count(&|d| has_state(d, "reverted")));
    assert_eq!(
        d["without_models"],
        count(&|d| d["models"].as_array().unwrap().is_empty())
    );
    assert_eq!(
        (d["online"].as_u64(), d["trial"].as_u64()),
        (Some(20), Some(6))
    );

    for t in summary["by_target"].as_array().unwrap() {
        let target = t["target"].as_str().unwrap();
        assert_eq!(t["total"], count(&|d| d["target"] == target), "{t}");
        assert_eq!(
            t["online"],
            count(&|d| d["target"] == target && d["online"] == true),
            "{t}"
        );
    }
    for l in summary["by_label"].as_array().unwrap() {
        let (k, v) = (l["key"].as_str().unwrap(), l["value"].as_str().unwrap());
        assert_eq!(l["total"], count(&|d| d["labels"][k] == v), "{l}");
        // The same figure through the device list's own filter.
        let (_, page) = api.get(&format!("/api/v1/devices?label={k}:{v}&limit=1"));
        assert_eq!(l["total"], page["total"], "{l}");
    }
    let mut versions = 0;
    for m in summary["models"].as_array().unwrap() {
        for v in m["versions"].as_array().unwrap() {
            versions += 1;
            let (name, ver) = (m["model"].as_str().unwrap(), v["version"].as_str().unwrap());
            let on = |d: &Value| {
                d["models"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x["name"] == name && x["active"] == ver)
            };
            assert_eq!(v["devices"], count(&on), "{name} {ver}");
            let (_, page) = api.get(&format!("/api/v1/devices?model={name}%40{ver}&limit=1"));
            assert_eq!(v["devices"], page["total"], "{name} {ver}");
        }
    }
    assert_eq!(versions, 3, "{summary:#}");

    // Search, state filter and pagination, counted on the server.
    let (_, page) = api.get("/api/v1/devices?q=DEV-1&limit=3&offset=3");
    assert_eq!(page["total"], 10, "dev-10 … dev-19");
    let ids: Vec<&str> = page["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["dev-13", "dev-14", "dev-15"]);
    let (_, page) = api.get("/api/v1/devices?state=reverted&online=true&limit=1000");
    assert_eq!(
        page["total"],
        count(&|d| has_state(d, "reverted") && d["online"] == true)
    );
    let (s, e) = api.get("/api/v1/devices?state=sleepy");
    assert_eq!(s, 400, "{e}");

    // Viewers may read it; no token may not.
    assert_eq!(api.with_token(None).get("/api/v1/fleet/summary").0, 401);
    let (s, who) = api.get("/api/v1/whoami");
    assert_eq!((s, who["role"].as_str()), (200, Some("admin")), "{who}");
    drop(via);
    fx.stop(server);
}

#[test]
fn a_rollout_series_sums_canary_and_control_telemetry_and_bundles_show_their_manifest() {
    let fx = Fixture::new();
    let mut config = fx.config("server");
    config.rollout_tick = Duration::from_millis(200);
    let server = fx.start(config);
    let api = Api::new(&server, server.admin_token());
    let devs: Vec<FakeDevice> = (0..4)
        .map(|i| FakeDevice::connect(server.broker_url(), &format!("d{i}")))
        .collect();
    for d in &devs {
        d.publish_status(&d.status(
            &[("site", "lab")],
            Some(vec![model("digits_mlp", "0.9.0", "committed")]),
        ));
    }
    wait_for(20, "4 devices online", || {
        (api.get("/api/v1/devices?online=true").1["total"] == 4).then_some(())
    });
    let bundle = std::fs::read(fx.bundle("digits_mlp", "1.0.0")).unwrap();
    let (s, b) = api.post_bytes("/api/v1/bundles", &bundle);
    assert_eq!(s, 201, "{b}");
    let (_, list) = api.get("/api/v1/bundles");
    let listed = &list["bundles"][0];
    assert_eq!(listed["quantization"], "none", "{listed}");
    assert_eq!(listed["task"]["kind"], "classification", "{listed}");
    assert_eq!(listed["size"], bundle.len());

    let (s, r) = api.post_json(
        "/api/v1/rollouts",
        json!({"bundle_id": b["id"], "stages": [{"percent": 50, "bake_seconds": 600}]}),
    );
    assert_eq!(s, 201, "{r}");
    let id = r["id"].as_str().unwrap().to_string();
    let canaries: Vec<String> = r["devices"].as_object().unwrap().keys().cloned().collect();
    assert_eq!(canaries.len(), 2, "{r:#}");
    // The page for polling a large rollout: no map of its devices, the same counts.
    let (s, full) = api.get(&format!("/api/v1/rollouts/{id}"));
    assert_eq!(s, 200, "{full}");
    let (s, light) = api.get(&format!("/api/v1/rollouts/{id}?devices=false"));
    assert_eq!(s, 200, "{light}");
    assert!(light.get("devices").is_none(), "{light:#}");
    assert_eq!(light["cohorts"], full["cohorts"]);
    assert_eq!(light["cohorts"]["canary"]["devices"], 2);
    let mut rest = full.clone();
    rest.as_object_mut().unwrap().remove("devices");
    assert_eq!(light, rest, "everything else as on the full page");
    let (s, bad) = api.get(&format!("/api/v1/rollouts/{id}?devices=some"));
    assert_eq!(s, 400, "{bad}");
    let (mut canary_req, mut canary_err, mut control_req, mut control_err) = (0, 0, 0, 0);
    for (i, d) in devs.iter().enumerate() {
        let canary = canaries.contains(&d.id);
        let (requests, errors) = (100 + i as u64 * 10, i as u64);
        let w = if canary {
            canary_req += requests;
            canary_err += errors;
            window("1.0.0", requests, errors, [requests, 0])
        } else {
            control_req += requests;
            control_err += errors;
            window(
                "0.9.0",
                requests,
                errors,
                [requests / 2, requests - requests / 2],
            )
        };
        d.publish(Channel::Telemetry, serde_json::to_vec(&w).unwrap(), false);
    }
    // One bucket of an hour: both cohorts' windows land in it.
    let series = wait_for(20, "telemetry in the series", || {
        let (s, v) = api.get(&format!("/api/v1/rollouts/{id}/series?bucket=3600"));
        assert_eq!(s, 200, "{v}");
        let sum = |cohort: &str, field: &str| -> u64 {
            v["points"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p[cohort][field].as_u64().unwrap())
                .sum()
        };
        (sum("canary", "requests") == canary_req && sum("control", "requests") == control_req)
            .then(|| (v.clone(), sum("canary", "errors"), sum("control", "errors")))
    });
    let (v, ce, ke) = series;
    assert_eq!((ce, ke), (canary_err, control_err));
    let busy: Vec<&Value> = v["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["canary"]["requests"].as_u64() > Some(0))
        .collect();
    assert!(!busy.is_empty());
    // Every canary predicted class 0, the control half and half: the PSI shows it.
    assert!(
        busy.iter()
            .any(|p| p["prediction_psi"].as_f64() > Some(1.0)),
        "{v:#}"
    );
    assert_eq!(v["points"].as_array().unwrap().len(), 1, "{v:#}");
    assert_eq!(v["version"], "1.0.0");
    // The default buckets split the same sums over time.
    let (_, fine) = api.get(&format!("/api/v1/rollouts/{id}/series"));
    let total = |cohort: &str| -> u64 {
        fine["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[cohort]["requests"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(
        (total("canary"), total("control")),
        (canary_req, control_req)
    );
    assert_eq!(v["decisions"][0]["action"], "start");
    assert!(v["bucket_seconds"].as_u64() >= Some(1));
    let (s, e) = api.get(&format!("/api/v1/rollouts/{id}/series?bucket=0"));
    assert_eq!(s, 400, "{e}");
    assert_eq!(api.get("/api/v1/rollouts/r-nope/series").0, 404);
    drop(devs);
    fx.stop(server);
}

#[test]
fn the_stream_sends_updates_and_the_dashboard_is_served_with_security_headers() {
    let fx = Fixture::new();
    let server = fx.start(fx.config("server"));
    let api = Api::new(&server, server.admin_token());

    // The page and its files need no token, and carry the security headers.
    let resp = ureq::get(&format!("{}/", api.base)).call().unwrap();
    let csp = resp.header("Content-Security-Policy").unwrap().to_string();
    for part in [
        "default-src 'none'",
        "script-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(part), "{csp}");
    }
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(resp.header("X-Content-Type-Options"), Some("nosniff"));
    assert_eq!(resp.header("Referrer-Policy"), Some("no-referrer"));
    assert!(resp.content_type().starts_with("text/html"));
    let html = resp.into_string().unwrap();
    assert!(html.contains("/ui/app.js"));
    for (file, ctype) in [
        ("app.js", "text/javascript"),
        ("api.js", "text/javascript"),
        ("charts.js", "text/javascript"),
        ("style.css", "text/css"),
    ] {
        let r = ureq::get(&format!("{}/ui/{file}", api.base))
            .call()
            .unwrap();
        assert_eq!(r.content_type(), ctype, "{file}");
        assert!(r.header("Content-Security-Policy").is_some(), "{file}");
    }
    assert_eq!(api.with_token(None).get_raw("/ui/nope.js", None).0, 404);
    assert_eq!(api.with_token(None).get("/api/v1/stream").0, 401);

    // The stream: hello at once, then an update naming a new event.
    let agent = ureq::AgentBuilder::new()
        .timeout_read(Duration::from_secs(20))
        .build();
    let resp = agent
        .get(&format!("{}/api/v1/stream", api.base))
        .set(
            "Authorization",
            &format!("Bearer {}", api.token.as_deref().unwrap()),
        )
        .call()
        .unwrap();
    assert_eq!(resp.content_type(), "text/event-stream");
    let mut lines = BufReader::new(resp.into_reader()).lines();
    let mut next_event = |name: &str| -> Value {
        loop {
            let line = lines.next().expect("stream open").unwrap();
            if line == format!("event: {name}") {
                let data = lines.next().unwrap().unwrap();
                return serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            }
        }
    };
    let hello = next_event("hello");
    assert!(hello["seq"].is_u64(), "{hello}");
    let (s, _) = api.post_json(
        "/api/v1/tokens",
        json!({"name": "watcher", "role": "viewer"}),
    );
    assert_eq!(s, 201);
    let update = next_event("update");
    assert!(
        update["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "token_created"),
        "{update}"
    );
    // A stream open in a tab does not hold up the shutdown.
    let t = std::time::Instant::now();
    fx.stop(server);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}
