//! The web dashboard in a real browser (issue 7): Debian's Chromium, headless, driven through
//! chromedriver with the `fantoccini` WebDriver client, against a real fleet server and a
//! simulated fleet of real agents on the embedded broker.
//!
//! The scenario is the demo's story in small: `digits_cnn` 1.0.0 on every device, a regressed
//! 2.0.0 caught by the canaries' health watch and rolled back, then a healthy 2.1.0 rolling out.
//! The test signs in, loads every page, checks that the figures shown are the API's, pauses and
//! resumes the running rollout with the page's buttons, checks that a viewer gets no buttons,
//! and saves a screenshot of each page under `<target dir>/dashboard-screenshots/`.
//!
//! It needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (or `MODELFLEET_CHROMIUM` /
//! `MODELFLEET_CHROMEDRIVER`); without them it prints a loud NOT RUN and passes, so
//! `cargo test --workspace` works anywhere. `.ci/run` installs both and sets
//! `MODELFLEET_REQUIRE_BROWSER=1`, which turns a missing browser into a failure.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent::simulate::SimFleet;
use common::{embedded_broker_exe, models_dir, World};
use fantoccini::{Client, ClientBuilder, Locator};
use fleet_server::BrokerConnection;
use modelfleet::harness::{wait_until, BrokerProcess};
use serde_json::{json, Map, Value};

const LONG: Duration = Duration::from_secs(180);
const DEVICES: usize = 8;
const MODEL: &str = "digits_cnn";

fn tool(var: &str, default: &str) -> Option<PathBuf> {
    let p = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default));
    p.exists().then_some(p)
}

/// `target/` (or `$CARGO_TARGET_DIR`): the test binaries' grandparent.
fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_embedded-broker"))
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("dashboard-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// chromedriver on a free loopback port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start(exe: &Path) -> Driver {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(exe)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let url = format!("http://127.0.0.1:{port}");
        wait_until("chromedriver to listen", Duration::from_secs(30), || {
            ureq::get(&format!("{url}/status")).call().ok().map(|_| ())
        })
        .unwrap();
        Driver { child, url }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fleet server, the embedded broker and a simulated fleet, with the demo's rollouts done.
struct Rig {
    fleet: Option<SimFleet>,
    broker: BrokerProcess,
    world: World,
    failed: String,
    running: String,
    /// The healthy 2.1.0 bundle.
    good: String,
}

impl Rig {
    fn start() -> Rig {
        let mut world = World::new();
        world.golden_max = 1000;
        let broker = BrokerProcess::embedded(embedded_broker_exe()).unwrap();
        world.start_server(BrokerConnection::plain(&broker.url()));
        let fleet = world.start_sim_fleet(&broker.url(), DEVICES, 20.0, &["berlin", "paris"]);
        let mut rig = Rig {
            fleet: Some(fleet),
            broker,
            world,
            failed: String::new(),
            running: String::new(),
            good: String::new(),
        };
        let gates = json!({"min_requests_per_cohort": 100, "latency_floor_ms": 5.0});
        let v1 = rig.upload("1.0.0", None);
        let first = rig.create(json!({"bundle_id": v1, "stages": [{"percent": 100}]}));
        rig.wait_state(&first, &["succeeded"]);
        // v1 serves long enough for its live figures to be the reference of the next trial.
        wait_until("100 requests on every device", LONG, || {
            rig.fleet
                .as_ref()
                .unwrap()
                .devices
                .iter()
                .all(|d| {
                    d.agent
                        .registry
                        .get(MODEL)
                        .is_some_and(|m| m.health.recent().requests >= 100)
                })
                .then_some(())
        })
        .unwrap();
        // The regressed model: the canaries' health watch reverts it and the rollout rolls back.
        let bad = rig.upload("2.0.0", Some("regressed/digits_cnn_perturbed.onnx"));
        rig.failed = rig.create(json!({
            "bundle_id": bad, "gates": gates, "on_failure": "rollback",
            "stages": [{"percent": 25, "bake_seconds": 600}, {"percent": 100, "bake_seconds": 0}],
        }));
        let r = rig.wait_state(&rig.failed, &["rolled_back", "failed", "succeeded"]);
        assert_eq!(r["state"], "rolled_back", "{r:#}");
        // A healthy version, baking long enough to be paused and resumed from the page.
        rig.good = rig.upload("2.1.0", None);
        rig.running = rig.create(json!({
            "bundle_id": rig.good, "gates": gates,
            "stages": [{"percent": 50, "bake_seconds": 3600}, {"percent": 100, "bake_seconds": 0}],
        }));
        rig.wait_state(&rig.running, &["running"]);
        rig
    }

    fn upload(&self, version: &str, onnx: Option<&str>) -> String {
        let onnx = match onnx {
            Some(path) => models_dir().join(path),
            None => models_dir().join(MODEL).join(format!("{MODEL}.onnx")),
        };
        self.world
            .upload(&self.world.bundle_of(MODEL, &onnx, version))
    }

    fn create(&self, spec: Value) -> String {
        self.world
            .client()
            .create_rollout(&spec)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn wait_state(&self, id: &str, states: &[&str]) -> Value {
        self.world.wait_for_rollout(id, states, LONG)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(fleet) = self.fleet.take() {
            self.world.rt.block_on(fleet.shutdown());
        }
        self.world.stop_server();
        self.broker.kill();
    }
}

/// The browser side: a WebDriver session and where to save screenshots.
struct Browser {
    c: Client,
    base: String,
    shots: PathBuf,
}

impl Browser {
    async fn open(driver: &Driver, chromium: &Path, base: &str, profile: &Path) -> Browser {
        let mut caps = Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                         "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync",
                         "--disable-dev-shm-usage", "--window-size=1400,2000",
                         format!("--user-data-dir={}", profile.display())],
            }),
        );
        let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&driver.url)
            .await
            .expect("a chromium session");
        Browser {
            c,
            base: base.to_string(),
            shots: screenshot_dir(),
        }
    }

    async fn js(&self, script: &str) -> Value {
        self.c
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("{script}: {e}"))
    }

    /// Waits until `script` returns something other than null/false; returns it.
    async fn until(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.js(script).await;
            if !v.is_null() && v != Value::Bool(false) {
                return v;
            }
            if Instant::now() > deadline {
                self.shot(&format!("timeout-{}", what.replace(' ', "-")))
                    .await;
                let body = self.js("return document.body.innerText").await;
                panic!("timed out waiting for {what}; page text:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Goes to `#/route` and waits until the page has loaded its data.
    async fn page(&self, route: &str) {
        self.c
            .goto(&format!("{}/#/{route}", self.base))
            .await
            .unwrap();
        let want = route.split('?').next().unwrap();
        let want = if want.is_empty() { "fleet" } else { want };
        self.until(
            &format!("page {route}"),
            &format!(
                "const p = document.getElementById('page'); \
                 return p && p.dataset.loaded === {} ? true : null",
                json!(want)
            ),
        )
        .await;
    }

    /// Every `[data-figure]` on the page: name → text.
    async fn figures(&self) -> Map<String, Value> {
        let v = self
            .js(
                "return Object.fromEntries([...document.querySelectorAll('[data-figure]')]\
                 .map(e => [e.dataset.figure, e.textContent]))",
            )
            .await;
        v.as_object().cloned().unwrap_or_default()
    }

    async fn shot(&self, name: &str) {
        if let Ok(png) = self.c.screenshot().await {
            let _ = std::fs::write(self.shots.join(format!("{name}.png")), png);
        }
    }

    async fn sign_in(&self, token: &str) {
        self.c.goto(&format!("{}/", self.base)).await.unwrap();
        let field = self
            .c
            .wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css("#token"))
            .await
            .unwrap();
        self.until(
            "the sign-in form",
            "return document.getElementById('signin').hidden ? null : true",
        )
        .await;
        field.send_keys(token).await.unwrap();
        self.c
            .find(Locator::Css("#signin-form button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        self.until(
            "signed in",
            "return document.getElementById('signin').hidden ? true : null",
        )
        .await;
    }

    async fn sign_out(&self) {
        self.c
            .find(Locator::Css("#signout"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        self.until(
            "signed out",
            "return document.getElementById('signin').hidden ? null : true",
        )
        .await;
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Retries until the page's figures match `expected` (name → value) as fetched by `fetch`:
/// the fleet is live, so both sides are re-read until they agree.
async fn figures_match(
    b: &Browser,
    what: &str,
    mut fetch: impl FnMut() -> Vec<(String, String)>,
) -> Map<String, Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let expected = fetch();
        let shown = b.figures().await;
        let wrong: Vec<String> = expected
            .iter()
            .filter(|(k, v)| shown.get(k).map(text).as_deref() != Some(v.as_str()))
            .map(|(k, v)| format!("{k}: API {v}, page {:?}", shown.get(k)))
            .collect();
        if wrong.is_empty() {
            return shown;
        }
        if Instant::now() > deadline {
            panic!(
                "{what}: the page disagrees with the API:\n{}",
                wrong.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[test]
fn dashboard_pages_show_the_api_figures_and_pause_and_resume_a_rollout() {
    let (Some(chromium), Some(chromedriver)) = (
        tool("MODELFLEET_CHROMIUM", "/usr/bin/chromium"),
        tool("MODELFLEET_CHROMEDRIVER", "/usr/bin/chromedriver"),
    ) else {
        if std::env::var_os("MODELFLEET_REQUIRE_BROWSER").is_some() {
            panic!("MODELFLEET_REQUIRE_BROWSER is set but chromium or chromedriver is missing");
        }
        let bar = "!".repeat(78);
        eprintln!(
            "\n{bar}\n!! NOT RUN: tests/dashboard.rs needs /usr/bin/chromium and /usr/bin/chromedriver\n\
             !! (apt-get install chromium chromium-driver, or set MODELFLEET_CHROMIUM and\n\
             !! MODELFLEET_CHROMEDRIVER). The dashboard was NOT tested in a browser.\n{bar}\n"
        );
        return;
    };
    let started = Instant::now();
    let rig = Rig::start();
    eprintln!("fleet and rollouts ready after {:?}", started.elapsed());
    let w = &rig.world;
    let (_, viewer) = w.post_json(
        "/api/v1/tokens",
        json!({"name": "watcher", "role": "viewer"}),
    );
    let viewer = viewer["token"].as_str().unwrap().to_string();
    let driver = Driver::start(&chromedriver);
    let profile = w.path("chromium-profile");

    w.rt.block_on(async {
        let b = Browser::open(&driver, &chromium, &w.api, &profile).await;
        b.sign_in(&w.token).await;
        assert_eq!(
            b.js("return sessionStorage.getItem('modelfleet.token')").await,
            json!(w.token),
            "the token is kept in the tab's session storage"
        );
        assert!(
            !b.c.current_url().await.unwrap().as_str().contains(&w.token),
            "the token is never in the URL"
        );
        b.until(
            "the live stream",
            "return document.getElementById('live').textContent === 'live' ? true : null",
        )
        .await;

        // Fleet overview.
        b.page("fleet").await;
        let shown = figures_match(&b, "fleet", || {
            let s = w.get("/api/v1/fleet/summary");
            let d = &s["devices"];
            let mut f = vec![
                ("devices-total".into(), text(&d["total"])),
                ("devices-online".into(), text(&d["online"])),
                ("devices-offline".into(), text(&d["offline"])),
                ("devices-trial".into(), text(&d["trial"])),
                ("devices-reverted".into(), text(&d["reverted"])),
                ("rollouts-active".into(), text(&s["rollouts"]["active"])),
                ("bundles-total".into(), text(&s["bundles"])),
            ];
            for m in s["models"].as_array().unwrap() {
                for v in m["versions"].as_array().unwrap() {
                    f.push((
                        format!("model-{}-{}", text(&m["model"]), text(&v["version"])),
                        text(&v["devices"]),
                    ));
                }
            }
            for l in s["by_label"].as_array().unwrap() {
                f.push((
                    format!("label-{}={}", text(&l["key"]), text(&l["value"])),
                    text(&l["total"]),
                ));
            }
            f
        })
        .await;
        assert_eq!(shown["devices-total"], json!(DEVICES.to_string()));
        b.shot("fleet").await;

        // Rollouts list.
        b.page("rollouts").await;
        let list = w.get("/api/v1/rollouts");
        let rows = b
            .js("return [...document.querySelectorAll('#rollouts tr[data-rollout]')]\
                 .map(r => [r.dataset.rollout, r.querySelector('.badge').textContent])")
            .await;
        let api_rows: Vec<Value> = list["rollouts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| json!([r["id"], r["state"]]))
            .collect();
        assert_eq!(rows, json!(api_rows));
        assert_eq!(api_rows.len(), 3);
        assert!(
            b.js("return !!document.getElementById('create-rollout')").await == json!(true),
            "an operator gets the create form"
        );
        b.shot("rollouts").await;

        // The failed canary: state, evidence, the reverted devices, charts.
        b.page(&format!("rollouts/{}", rig.failed)).await;
        let r = w.get(&format!("/api/v1/rollouts/{}", rig.failed));
        let c = &r["cohorts"];
        figures_match(&b, "failed rollout", || {
            vec![
                ("rollout-state".into(), text(&r["state"])),
                ("cohort-selected".into(), text(&c["selected"])),
                ("cohort-canary".into(), text(&c["canary"]["devices"])),
                ("cohort-reverted".into(), text(&c["canary"]["reverted"])),
                ("cohort-control".into(), text(&c["control"]["devices"])),
            ]
        })
        .await;
        let actions = b
            .js("return [...document.querySelectorAll('#decisions tr[data-action]')]\
                 .map(r => r.dataset.action).reverse()")
            .await;
        let api_actions: Vec<Value> = r["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["action"].clone())
            .collect();
        assert_eq!(actions, json!(api_actions));
        let failed_gates = b
            .js("const row = document.querySelector('#decisions tr[data-action=fail]'); \
                 return row ? [...row.querySelectorAll('tr[data-gate]')].map(g => \
                 [g.dataset.gate, g.querySelector('.badge').textContent]) : null")
            .await;
        assert!(
            failed_gates
                .as_array()
                .is_some_and(|g| g.contains(&json!(["reverts", "fail"]))),
            "the fail decision shows its evidence: {failed_gates}"
        );
        let reverted_rows = b
            .js("return document.querySelectorAll('#reverts tbody tr td a').length")
            .await;
        assert!(
            reverted_rows.as_u64() >= Some(1),
            "reverted canaries listed: {reverted_rows}"
        );
        assert_eq!(
            b.js("return document.querySelectorAll('#charts figure.chart').length")
                .await,
            json!(5)
        );
        assert_eq!(
            b.js("return document.getElementById('action-pause').disabled")
                .await,
            json!(true),
            "a rolled-back rollout cannot be paused"
        );
        b.shot("rollout-failed").await;

        // Pause and resume the running rollout with the page's buttons.
        b.page(&format!("rollouts/{}", rig.running)).await;
        b.until(
            "charts with canary data",
            "return document.querySelectorAll('#charts path.line').length > 0 ? true : null",
        )
        .await;
        b.shot("rollout-running").await;
        // Telemetry keeps arriving: the page redraws from the stream, without a reload.
        let before = b
            .js("window.__sameDocument = true; \
                 return document.getElementById('page').dataset.updated || ''")
            .await;
        b.until(
            "a live update of the rollout page",
            &format!(
                "return window.__sameDocument === true && \
                 (document.getElementById('page').dataset.updated || '') !== {before} ? true : null"
            ),
        )
        .await;
        for (button, state) in [("pause", "paused"), ("resume", "running")] {
            b.until(
                &format!("{button} enabled"),
                &format!("return document.getElementById('action-{button}').disabled ? null : true"),
            )
            .await;
            b.c.find(Locator::Css(&format!("#action-{button}")))
                .await
                .unwrap()
                .click()
                .await
                .unwrap();
            b.until(
                &format!("state {state} shown"),
                &format!(
                    "const e = document.querySelector('[data-figure=rollout-state]'); \
                     return e && e.textContent === '{state}' ? true : null"
                ),
            )
            .await;
            let api_state = w.get(&format!("/api/v1/rollouts/{}", rig.running))["state"].clone();
            assert_eq!(api_state, json!(state));
            b.shot(&format!("rollout-{state}")).await;
        }
        let acts = w.get(&format!("/api/v1/rollouts/{}", rig.running))["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| text(&d["action"]))
            .collect::<Vec<_>>();
        assert!(
            acts.contains(&"pause".into()) && acts.contains(&"resume".into()),
            "{acts:?}"
        );

        // Devices: the list, a filter, counted by the server.
        b.page("devices").await;
        figures_match(&b, "devices", || {
            vec![(
                "devices-matching".into(),
                text(&w.get("/api/v1/devices?limit=1")["total"]),
            )]
        })
        .await;
        let ids = b
            .js("return [...document.querySelectorAll('#devices tr[data-device]')].map(r => r.dataset.device)")
            .await;
        assert_eq!(ids.as_array().map(Vec::len), Some(DEVICES));
        b.shot("devices").await;
        b.page("devices?label=site%3Aberlin").await;
        figures_match(&b, "devices in berlin", || {
            vec![(
                "devices-matching".into(),
                text(&w.get("/api/v1/devices?label=site:berlin&limit=1")["total"]),
            )]
        })
        .await;

        // A reverted canary's page: its models, the revert with its reason, telemetry.
        let failed = w.get(&format!("/api/v1/rollouts/{}", rig.failed));
        let canary = failed["devices"]
            .as_object()
            .unwrap()
            .iter()
            .find(|(_, p)| p["state"] == "reverted")
            .map(|(id, _)| id.clone())
            .expect("a reverted canary");
        b.page(&format!("devices/{canary}")).await;
        figures_match(&b, "device", || {
            let d = w.get(&format!("/api/v1/devices/{canary}"));
            d["models"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|m| {
                    [
                        (format!("active-{}", text(&m["name"])), text(&m["active"])),
                        // The page shows "–" where the API has no figure (null).
                        (
                            format!("compute-{}", text(&m["name"])),
                            m["compute"].as_str().unwrap_or("–").to_string(),
                        ),
                    ]
                })
                .chain([(
                    "device-online".into(),
                    if d["online"] == true { "online" } else { "offline" }.into(),
                )])
                .collect()
        })
        .await;
        let revert = b
            .js("const r = document.querySelector('#device-events tr[data-kind=reverted] strong'); \
                 return r ? r.textContent : null")
            .await;
        assert!(
            text(&revert).contains("2.0.0 → 1.0.0"),
            "the revert and its reason: {revert}"
        );
        assert!(
            b.js("return document.querySelectorAll('section[data-model] figure.chart').length")
                .await
                .as_u64()
                >= Some(4)
        );
        b.until(
            "sampled records",
            "return document.querySelectorAll('table.samples tbody tr td').length > 1 ? true : null",
        )
        .await;
        b.shot("device").await;

        // Bundles: name, version, security version, size, quantization as the API has them.
        b.page("bundles").await;
        let shown = b
            .js("return [...document.querySelectorAll('#bundles tr[data-bundle]')].map(r => \
                 [r.dataset.bundle, r.cells[1].textContent, r.cells[2].textContent, \
                  r.cells[3].dataset.size, r.cells[4].textContent])")
            .await;
        let api: Vec<Value> = w.get("/api/v1/bundles")["bundles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| {
                json!([x["id"], x["version"], text(&x["security_version"]),
                       text(&x["size"]), x["quantization"]])
            })
            .collect();
        assert_eq!(shown, json!(api));
        b.shot("bundles").await;

        // A rollout created with the form (after aborting the running one: one rollout per
        // model and device).
        let (s, r) = w.post_json(
            &format!("/api/v1/rollouts/{}/abort", rig.running),
            json!({}),
        );
        assert_eq!(s, 200, "{r}");
        b.page("rollouts").await;
        b.js(&format!(
            "document.getElementById('new-bundle').value = {}; \
             document.getElementById('new-labels').value = 'site=berlin'; \
             document.getElementById('new-stages').value = '100:0'; return true",
            json!(rig.good)
        ))
        .await;
        b.c.find(Locator::Css("#create-submit"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let id = b
            .until(
                "the new rollout's page",
                "const m = location.hash.match(/^#\\/rollouts\\/(r-[0-9a-f]+)$/); \
                 return m && document.getElementById('page').dataset.loaded === \
                 'rollouts/' + m[1] ? m[1] : null",
            )
            .await;
        let created = w.get(&format!("/api/v1/rollouts/{}", text(&id)));
        assert_eq!(created["version"], "2.1.0", "{created:#}");
        assert_eq!(created["spec"]["selector"]["labels"]["site"], "berlin");
        assert_eq!(created["spec"]["stages"], json!([{"percent": 100, "bake_seconds": 0}]));
        b.shot("rollout-created").await;

        // No request the page made carried the token in its URL.
        let leaked = b
            .js(&format!(
                "return performance.getEntriesByType('resource').map(e => e.name)\
                 .filter(n => n.includes({})).length",
                json!(w.token)
            ))
            .await;
        assert_eq!(leaked, json!(0), "the token appeared in a URL");
        // A viewer sees everything and can act on nothing.
        b.sign_out().await;
        assert_eq!(
            b.js("return sessionStorage.getItem('modelfleet.token')").await,
            Value::Null
        );
        b.sign_in(&viewer).await;
        b.page(&format!("rollouts/{}", rig.running)).await;
        assert_eq!(
            b.js("return document.querySelectorAll('#actions button').length")
                .await,
            json!(0),
            "no action buttons for a viewer"
        );
        b.page("rollouts").await;
        assert_eq!(
            b.js("return !!document.getElementById('create-rollout')").await,
            json!(false)
        );
        b.shot("viewer-rollouts").await;
        b.c.close().await.unwrap();
    });
    let (s, _) = modelfleet::api::ApiClient::new(&w.api, &viewer)
        .post_json(
            &format!("/api/v1/rollouts/{}/pause", rig.running),
            &json!({}),
        )
        .unwrap();
    assert_eq!(s, 403, "a viewer cannot pause");
    eprintln!(
        "dashboard test done in {:?}; screenshots in {}",
        started.elapsed(),
        screenshot_dir().display()
    );
}
