//! What one rollout tick costs the server's CPU, by fleet size, without a broker or devices:
//! the part of a tick that walks the rollout's devices (issue 10, BENCHMARKS.md "Fleet scale").
//!
//! ```text
//! cargo run --release -p modelfleet-fleet-server --example rollout_step_bench -- [--devices 1000,10000] [--ticks 50]
//! ```
//!
//! Each size is a fleet-wide rollout in the middle of its fan-out: half the devices installed,
//! `max_in_flight` (1,000) staged and waiting, the rest not yet staged. A tick here is what the
//! driver (`rollout/driver.rs`, `Rollouts::tick`) does in memory: clone the kept rollout,
//! [`engine::step_ranked`] it against an observation of every device (with the devices' rank
//! order kept from the tick before), compare it with the rollout before (to know whether to
//! store it), and keep the result. Nothing changes from tick to
//! tick, so every tick costs the same; the median of `--ticks` is printed, with the time per
//! device. Storing and publishing are not included.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use fleet_server::rollout::cohort::Ranking;
use fleet_server::rollout::engine::{self, DeviceProgress, DeviceState, Observation, Rollout};
use fleet_server::rollout::spec::RolloutSpec;
use fleet_server::store::DeviceRecord;
use protocol::link::{BundleRef, ModelSummary};

fn main() {
    let mut sizes = vec![1_000usize, 10_000];
    let mut ticks = 50usize;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--devices" => {
                sizes = value
                    .split(',')
                    .map(|v| v.parse().expect("--devices takes numbers: 1000,10000"))
                    .collect()
            }
            "--ticks" => ticks = value.parse().expect("--ticks takes a number"),
            other => panic!("unknown flag {other}: use --devices 1000,10000 --ticks 50"),
        }
        i += 2;
    }
    for n in sizes {
        let (rollout, obs) = mid_fanout(n);
        let kept = Arc::new(rollout);
        let mut times = Vec::with_capacity(ticks);
        let mut orders = 0;
        // Kept between ticks, as the driver keeps one per rollout.
        let mut ranking = Ranking::default();
        for _ in 0..ticks {
            let started = Instant::now();
            let mut r = Rollout::clone(&kept);
            orders += engine::step_ranked(&mut r, &obs, &mut ranking).len();
            let changed = r != *kept;
            std::hint::black_box((changed, Arc::new(r)));
            times.push(started.elapsed());
        }
        times.sort();
        let median = times[times.len() / 2];
        println!(
            "{n} devices: {:.2} ms per tick (median of {ticks}), {:.0} ns per device, {orders} orders",
            median.as_secs_f64() * 1e3,
            median.as_secs_f64() * 1e9 / n as f64,
        );
    }
}

/// A fleet-wide rollout of `n` devices halfway through its fan-out, and the fleet it sees.
fn mid_fanout(n: usize) -> (Rollout, Observation) {
    let now = Utc::now();
    let spec: RolloutSpec = serde_json::from_value(serde_json::json!({
        "bundle_id": "b2",
        "stages": [{"percent": 100, "bake_seconds": 600}],
    }))
    .expect("spec");
    let bundle = BundleRef {
        bundle_id: "b2".into(),
        name: "digits".into(),
        version: "2.0.0".into(),
        size: 100_000,
        chunk_size: 65_536,
        http_url: None,
    };
    let mut r = Rollout::new("r-bench".into(), spec, bundle, "bench".into(), now);
    // The first step starts it (pending → running) and stages `max_in_flight` devices.
    let summary = |active: &str| ModelSummary {
        name: "digits".into(),
        active: active.into(),
        previous: None,
        state: "committed".into(),
        security_version: 1,
        bundle_sha256: String::new(),
        compute: None,
    };
    let mut devices: Vec<Arc<DeviceRecord>> = (0..n)
        .map(|i| {
            Arc::new(DeviceRecord {
                id: format!("dev-{i:05}"),
                online: true,
                last_seen: now,
                first_seen: now,
                status_time: now,
                labels: BTreeMap::from([("site".to_string(), format!("site-{}", i % 40))]),
                target: Some("aarch64-unknown-linux-gnu".into()),
                agent_version: Some("0.1.0".into()),
                models: vec![summary("1.0.0")],
            })
        })
        .collect();
    // Half of them already run the version (installed), chosen by rank as the engine would.
    let ids: Vec<String> = devices.iter().map(|d| d.id.clone()).collect();
    let installed: std::collections::HashSet<String> =
        fleet_server::rollout::cohort::canaries(&r.id, &ids, 50)
            .into_iter()
            .map(str::to_string)
            .collect();
    for d in devices.iter_mut() {
        if installed.contains(&d.id) {
            Arc::make_mut(d).models = vec![summary("2.0.0")];
            r.devices.insert(
                d.id.clone(),
                DeviceProgress {
                    stage: 0,
                    state: DeviceState::Installed,
                    since: now,
                    command_id: Some(format!("c-{}", d.id)),
                    reason: None,
                    revert_ordered_at: None,
                },
            );
        }
    }
    let mut obs = Observation {
        now,
        devices,
        ..Observation::default()
    };
    // Pending → running, and `max_in_flight` more devices staged.
    let staged = engine::step(&mut r, &obs);
    assert!(!staged.is_empty(), "the first step stages devices");
    for (id, p) in r.devices.iter_mut() {
        if p.command_id.is_none() {
            p.command_id = Some(format!("c-{id}"));
        }
    }
    obs.now = now + chrono::Duration::seconds(1);
    (r, obs)
}
