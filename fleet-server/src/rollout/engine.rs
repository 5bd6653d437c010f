//! The rollout state machine, as a pure function of what the fleet looks like now.
//!
//! [`step`] takes a [`Rollout`] and an [`Observation`] (devices with their reported models, the
//! events and telemetry windows since the rollout began, the time) and returns the orders to
//! carry out (stage a device, revert a device), updating the rollout in place. It does no I/O:
//! the server's driver gathers observations from its registry and telemetry store, executes the
//! orders over MQTT, and persists the rollout after every step. That keeps every decision
//! reproducible from its inputs, and a restarted server continues from the stored rollout:
//! devices already staged are never staged again, and devices that already run the version are
//! counted as installed without a command.
//!
//! A stage goes: stage the canaries that are online (offline ones are staged when they return),
//! wait until every staged canary has installed or failed, bake for `bake_seconds`, then judge
//! canaries against the control cohort (selected devices still on their old version) over the
//! telemetry since the bake began. Local reverts and refused installs fail the stage at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use protocol::link::BundleRef;
use protocol::telemetry::WindowRecord;

use super::cohort::Ranking;
use super::gates::{judge, CohortFigures, Judgement, Verdict};
use super::spec::{OnFailure, RolloutSpec};
use crate::store::DeviceRecord;

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Pending,
    Running,
    /// Stopped by a person or by an inconclusive stage that timed out; `resume` continues.
    Paused,
    Succeeded,
    /// A gate failed and `on_failure` is `pause`: staging stopped, devices keep what they have.
    Failed,
    /// A gate failed (or a person asked): the devices that got the version are told to revert.
    RolledBack,
    /// Stopped by a person, nothing reverted.
    Aborted,
}

impl RolloutState {
    /// Still holding its devices: a second rollout of the same model may not take them.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            RolloutState::Pending | RolloutState::Running | RolloutState::Paused
        )
    }
}

/// One device's part in a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceProgress {
    /// The stage that took the device.
    pub stage: usize,
    pub state: DeviceState,
    pub since: DateTime<Utc>,
    /// Command that staged it (none if it already ran the version).
    pub command_id: Option<String>,
    pub reason: Option<String>,
    /// Last time a revert was ordered (a rollback repeats it until the device is off the version).
    pub revert_ordered_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Told to fetch and install; no answer yet.
    Staged,
    /// Runs the new version.
    Installed,
    /// Refused or failed to install it.
    Failed,
    /// Its own health watch reverted it.
    Reverted,
    /// Back on the old version after a rollback.
    RolledBack,
}

/// A decision and what it was based on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub time: DateTime<Utc>,
    pub stage: usize,
    /// `start`, `bake`, `promote`, `keep_baking`, `pause`, `resume`, `fail`, `rollback`,
    /// `abort`, `succeed`.
    pub action: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judgement: Option<Judgement>,
}

/// A rollout and everything that happened to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    pub spec: RolloutSpec,
    /// The bundle being rolled out (its model name and version are what devices report).
    pub bundle: BundleRef,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub state: RolloutState,
    pub stage: usize,
    pub stage_started_at: DateTime<Utc>,
    /// When every staged canary of the current stage had settled; judging uses telemetry from here.
    pub bake_started_at: Option<DateTime<Utc>>,
    /// Stored apart, a row per device (`store::Store::rollout`).
    #[serde(default)]
    pub devices: BTreeMap<String, DeviceProgress>,
    pub decisions: Vec<Decision>,
    /// The latest judgement of the current stage (figures for the API and the dashboard).
    pub last_judgement: Option<Judgement>,
}

/// A device event the rollout cares about (`rejected`, `reverted`, `transfer_failed`, …).
#[derive(Debug, Clone, PartialEq)]
pub struct EventView {
    pub device_id: String,
    pub time: DateTime<Utc>,
    pub kind: String,
    pub model: Option<String>,
    pub version: Option<String>,
    pub reason: String,
}

/// What the fleet looks like now.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    pub now: DateTime<Utc>,
    /// Every device as the registry knows it (shared with the store's copy, not copied), in
    /// the store's order, by id (in any other order a step sorts its own list of them first).
    pub devices: Vec<Arc<DeviceRecord>>,
    /// Failure events ([`FAILURE_KINDS`]) of the rollout's model since the rollout was created.
    pub events: Vec<EventView>,
    /// Telemetry windows of the rollout's model, by device, since the current bake began
    /// (shared with the server's telemetry store, not copied).
    pub windows: HashMap<String, Vec<Arc<WindowRecord>>>,
}

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Order {
    Stage { device_id: String },
    Revert { device_id: String },
}

/// How often a rollback repeats its revert order to a device still on the version.
const REVERT_REPEAT_SECONDS: i64 = 20;

impl Rollout {
    pub fn new(
        id: String,
        spec: RolloutSpec,
        bundle: BundleRef,
        created_by: String,
        now: DateTime<Utc>,
    ) -> Rollout {
        Rollout {
            id,
            spec,
            bundle,
            created_at: now,
            created_by,
            state: RolloutState::Pending,
            stage: 0,
            stage_started_at: now,
            bake_started_at: None,
            devices: BTreeMap::new(),
            decisions: Vec::new(),
            last_judgement: None,
        }
    }

    pub fn model(&self) -> &str {
        &self.bundle.name
    }

    /// The rollout without its devices (the store keeps them apart, a row each).
    pub fn without_devices(&self) -> Rollout {
        // No `..`: a new field must be thought about here.
        let Rollout {
            id,
            spec,
            bundle,
            created_at,
            created_by,
            state,
            stage,
            stage_started_at,
            bake_started_at,
            devices: _,
            decisions,
            last_judgement,
        } = self;
        Rollout {
            id: id.clone(),
            spec: spec.clone(),
            bundle: bundle.clone(),
            created_at: *created_at,
            created_by: created_by.clone(),
            state: *state,
            stage: *stage,
            stage_started_at: *stage_started_at,
            bake_started_at: *bake_started_at,
            devices: BTreeMap::new(),
            decisions: decisions.clone(),
            last_judgement: last_judgement.clone(),
        }
    }

    pub fn version(&self) -> &str {
        &self.bundle.version
    }

    fn decide(
        &mut self,
        now: DateTime<Utc>,
        action: &str,
        reason: String,
        judgement: Option<Judgement>,
    ) {
        self.decisions.push(Decision {
            time: now,
            stage: self.stage,
            action: action.to_string(),
            reason,
            judgement,
        });
    }

    /// The devices this rollout selects, of `devices` (in their order).
    fn selected<'o>(&self, devices: &[&'o DeviceRecord]) -> Vec<&'o DeviceRecord> {
        devices
            .iter()
            .copied()
            .filter(|d| self.spec.selector.matches(&d.labels))
            .collect()
    }

    /// A person pauses (running) or resumes (paused, failed) the rollout.
    pub fn pause(&mut self, now: DateTime<Utc>, who: &str) -> Result<(), String> {
        if self.state != RolloutState::Running && self.state != RolloutState::Pending {
            return Err(format!("cannot pause a rollout that is {:?}", self.state).to_lowercase());
        }
        self.state = RolloutState::Paused;
        self.decide(now, "pause", format!("paused by {who}"), None);
        Ok(())
    }

    pub fn resume(&mut self, now: DateTime<Utc>, who: &str) -> Result<(), String> {
        if self.state != RolloutState::Paused && self.state != RolloutState::Failed {
            return Err(format!("cannot resume a rollout that is {:?}", self.state).to_lowercase());
        }
        self.state = RolloutState::Running;
        // A fresh bake: what happened while paused does not count against the canaries twice.
        self.bake_started_at = None;
        self.decide(now, "resume", format!("resumed by {who}"), None);
        Ok(())
    }

    pub fn abort(&mut self, now: DateTime<Utc>, who: &str) -> Result<(), String> {
        if !self.state.is_active() && self.state != RolloutState::Failed {
            return Err(format!("cannot abort a rollout that is {:?}", self.state).to_lowercase());
        }
        self.state = RolloutState::Aborted;
        self.decide(now, "abort", format!("aborted by {who}"), None);
        Ok(())
    }

    /// A person (or a failed gate) rolls back: every device that got the version reverts.
    pub fn rollback(&mut self, now: DateTime<Utc>, reason: String) -> Result<(), String> {
        if self.state == RolloutState::RolledBack {
            return Err("the rollout is already rolled back".into());
        }
        self.state = RolloutState::RolledBack;
        self.decide(now, "rollback", reason, None);
        Ok(())
    }
}

/// Advances the rollout given what the fleet looks like; returns what to do.
pub fn step(r: &mut Rollout, obs: &Observation) -> Vec<Order> {
    step_ranked(r, obs, &mut Ranking::default())
}

/// [`step`], with the rank order of the rollout's devices kept from its previous step (the
/// driver keeps one [`Ranking`] per rollout it steps): a step then costs no hashing of every
/// device when the fleet has not changed.
pub fn step_ranked(r: &mut Rollout, obs: &Observation, ranking: &mut Ranking) -> Vec<Order> {
    let now = obs.now;
    let devices = in_id_order(&obs.devices);
    track_devices(r, obs, &devices);
    match r.state {
        RolloutState::Pending => {
            r.state = RolloutState::Running;
            r.stage = 0;
            r.stage_started_at = now;
            r.decide(
                now,
                "start",
                match r.spec.stages.len() {
                    1 => "1 stage".to_string(),
                    n => format!("{n} stages"),
                },
                None,
            );
            run_stage(r, obs, &devices, ranking)
        }
        RolloutState::Running => run_stage(r, obs, &devices, ranking),
        RolloutState::RolledBack => revert_orders(r, obs, &devices),
        _ => Vec::new(),
    }
}

/// The observed devices in id order: the order in which a rollout keeps its own devices, so
/// that the two lists are walked side by side (see [`Finder`]) instead of one looked up in a
/// map built every step.
fn in_id_order(devices: &[Arc<DeviceRecord>]) -> Vec<&DeviceRecord> {
    let mut sorted: Vec<&DeviceRecord> = devices.iter().map(|d| &**d).collect();
    if !sorted.is_sorted_by(|a, b| a.id <= b.id) {
        sorted.sort_by(|a, b| a.id.cmp(&b.id));
    }
    sorted
}

/// Finds items of a list sorted by id, for ids asked in ascending order: all the lookups of a
/// walk over another sorted list cost one walk over this one.
struct Finder<'l, T> {
    items: &'l [T],
    at: usize,
}

impl<'l, T> Finder<'l, T> {
    fn new(items: &'l [T]) -> Finder<'l, T> {
        Finder { items, at: 0 }
    }

    /// The index of the item whose id is `id`; `id` must not be below the previous one asked.
    fn find(&mut self, id: &str, id_of: impl Fn(&T) -> &str) -> Option<usize> {
        while self.at < self.items.len() && id_of(&self.items[self.at]) < id {
            self.at += 1;
        }
        (self.at < self.items.len() && id_of(&self.items[self.at]) == id).then_some(self.at)
    }
}

/// The device events that fail a staged device (the only events a rollout reads).
pub const FAILURE_KINDS: [&str; 4] = ["rejected", "transfer_failed", "load_failed", "reverted"];

/// Updates each staged device's state from its reported models and its events.
fn track_devices(r: &mut Rollout, obs: &Observation, devices: &[&DeviceRecord]) {
    let model = r.bundle.name.clone();
    let version = r.bundle.version.clone();
    let mut finder = Finder::new(devices);
    // Each device's events, oldest first (not a scan of every event per device).
    let mut events_of: HashMap<&str, Vec<&EventView>> = HashMap::new();
    for e in &obs.events {
        events_of.entry(e.device_id.as_str()).or_default().push(e);
    }
    let install_timeout = Duration::seconds(r.spec.install_timeout_seconds as i64);
    let rolling_back = r.state == RolloutState::RolledBack;
    for (id, p) in r.devices.iter_mut() {
        let on_version = finder
            .find(id, |d| &d.id)
            .and_then(|i| devices[i].model(&model))
            .map(|m| m.active == version);
        let events = events_of.get(id.as_str()).map_or(&[][..], |v| v.as_slice());
        let failure = events.iter().rev().copied().find(|e| {
            e.time >= p.since
                && e.version.as_deref() == Some(version.as_str())
                && FAILURE_KINDS.contains(&e.kind.as_str())
        });
        match p.state {
            DeviceState::Staged => {
                if on_version == Some(true) {
                    p.state = DeviceState::Installed;
                    p.since = obs.now;
                } else if let Some(e) = failure {
                    p.state = if e.kind == "reverted" {
                        DeviceState::Reverted
                    } else {
                        DeviceState::Failed
                    };
                    p.since = e.time;
                    p.reason = Some(format!("{}: {}", e.kind, e.reason));
                } else if obs.now - p.since >= install_timeout {
                    // Silence is a failure too: a stage must not wait forever on one device.
                    p.state = DeviceState::Failed;
                    p.reason = Some(format!(
                        "no install reported within {} s of staging",
                        r.spec.install_timeout_seconds
                    ));
                    p.since = obs.now;
                }
            }
            DeviceState::Installed => {
                if on_version == Some(false) {
                    p.state = if rolling_back {
                        DeviceState::RolledBack
                    } else {
                        DeviceState::Reverted
                    };
                    p.since = obs.now;
                    p.reason = failure
                        .filter(|e| e.kind == "reverted")
                        .map(|e| e.reason.clone())
                        .or_else(|| Some("no longer runs the version".into()));
                }
            }
            DeviceState::Reverted | DeviceState::Failed | DeviceState::RolledBack => {}
        }
    }
}

fn run_stage(
    r: &mut Rollout,
    obs: &Observation,
    devices: &[&DeviceRecord],
    ranking: &mut Ranking,
) -> Vec<Order> {
    let now = obs.now;
    let stage = r.spec.stages[r.stage];
    let model = r.bundle.name.clone();
    let version = r.bundle.version.clone();

    // Failure signals count at once, whatever the bake time.
    let reverts = r
        .devices
        .values()
        .filter(|p| p.state == DeviceState::Reverted)
        .count() as u64;
    let failures = r
        .devices
        .values()
        .filter(|p| p.state == DeviceState::Failed)
        .count() as u64;
    if reverts > r.spec.gates.max_reverts || failures > r.spec.gates.max_install_failures {
        let mut canary = CohortFigures {
            reverts,
            install_failures: failures,
            ..CohortFigures::default()
        };
        canary.devices = r.devices.len();
        let judgement = judge(&canary, None, &r.spec.gates);
        return fail(r, now, judgement, obs, devices);
    }

    // Stage this stage's canaries, at most `max_in_flight` unsettled at once.
    let selected = r.selected(devices);
    let ids: Vec<&str> = selected.iter().map(|d| d.id.as_str()).collect();
    ranking.update(&r.id, &ids);
    // Which of them the rollout has taken already (both in id order: one walk).
    let mut taken = vec![false; ids.len()];
    let mut finder = Finder::new(&ids);
    for id in r.devices.keys() {
        if let Some(i) = finder.find(id, |s| s) {
            taken[i] = true;
        }
    }
    let in_flight = r
        .devices
        .values()
        .filter(|p| p.state == DeviceState::Staged)
        .count();
    let mut room = (r.spec.max_in_flight as usize).saturating_sub(in_flight);
    // Online canaries left for a later tick for want of room: the stage is not settled.
    let mut waiting = 0;
    let mut orders = Vec::new();
    for &i in ranking.canaries(stage.percent) {
        let i = i as usize;
        if taken[i] {
            continue;
        }
        let (id, device) = (ids[i], selected[i]);
        let already = device.model(&model).is_some_and(|m| m.active == version);
        if already {
            r.devices.insert(
                id.to_string(),
                DeviceProgress {
                    stage: r.stage,
                    state: DeviceState::Installed,
                    since: now,
                    command_id: None,
                    reason: Some("already ran the version".into()),
                    revert_ordered_at: None,
                },
            );
        } else if device.online && room == 0 {
            waiting += 1;
        } else if device.online {
            room -= 1;
            r.devices.insert(
                id.to_string(),
                DeviceProgress {
                    stage: r.stage,
                    state: DeviceState::Staged,
                    since: now,
                    command_id: None,
                    reason: None,
                    revert_ordered_at: None,
                },
            );
            orders.push(Order::Stage {
                device_id: id.to_string(),
            });
        }
    }

    // Bake once every staged canary has settled.
    let settled = waiting == 0 && r.devices.values().all(|p| p.state != DeviceState::Staged);
    let installed = r
        .devices
        .values()
        .filter(|p| p.state == DeviceState::Installed)
        .count();
    if r.bake_started_at.is_none() {
        if settled && installed > 0 {
            r.bake_started_at = Some(now);
            r.decide(
                now,
                "bake",
                format!(
                    "{installed} canaries run {version}; baking {} s",
                    stage.bake_seconds
                ),
                None,
            );
        }
        return orders;
    }
    let bake_start = r.bake_started_at.expect("checked");
    let bake_end = bake_start + Duration::seconds(stage.bake_seconds as i64);
    if now < bake_end {
        return orders;
    }

    // Judge.
    let last_stage = r.stage + 1 == r.spec.stages.len();
    let canary = figures(
        r.devices
            .iter()
            .filter(|(_, p)| p.state == DeviceState::Installed)
            .map(|(id, _)| id.as_str()),
        |_| version.clone(),
        obs,
        bake_start,
        reverts,
        failures,
    );
    let control_ids: Vec<&DeviceRecord> = selected
        .iter()
        .copied()
        .filter(|d| !r.devices.contains_key(&d.id))
        .filter(|d| d.model(&model).is_some_and(|m| m.active != version))
        .collect();
    let control = (!control_ids.is_empty()).then(|| {
        let active: HashMap<&str, String> = control_ids
            .iter()
            .map(|d| {
                (
                    d.id.as_str(),
                    d.model(&model).expect("filtered").active.clone(),
                )
            })
            .collect();
        figures(
            control_ids.iter().map(|d| d.id.as_str()),
            |id| active[id].clone(),
            obs,
            bake_start,
            0,
            0,
        )
    });
    let judgement = judge(&canary, control.as_ref(), &r.spec.gates);
    r.last_judgement = Some(judgement.clone());
    match judgement.verdict {
        Verdict::Fail => fail(r, now, judgement, obs, devices),
        Verdict::Pass => {
            promote(r, now, judgement);
            orders
        }
        Verdict::Inconclusive if last_stage && control.is_none() => {
            // Everyone selected runs the version: nothing is left to compare with.
            promote(r, now, judgement);
            orders
        }
        Verdict::Inconclusive => {
            let timeout = bake_end + Duration::seconds(r.spec.inconclusive_timeout_seconds as i64);
            if now >= timeout {
                r.state = RolloutState::Paused;
                let reason = format!(
                    "inconclusive for {} s after the bake: {}",
                    r.spec.inconclusive_timeout_seconds,
                    inconclusive_note(&judgement)
                );
                r.decide(now, "pause", reason, Some(judgement));
            } else if r.decisions.last().map(|d| d.action.as_str()) != Some("keep_baking") {
                let reason = inconclusive_note(&judgement);
                r.decide(now, "keep_baking", reason, Some(judgement));
            }
            orders
        }
    }
}

fn inconclusive_note(j: &Judgement) -> String {
    j.gates
        .iter()
        .find(|g| g.verdict == Verdict::Inconclusive)
        .map(|g| g.note.clone())
        .unwrap_or_default()
}

fn promote(r: &mut Rollout, now: DateTime<Utc>, judgement: Judgement) {
    if r.stage + 1 == r.spec.stages.len() {
        r.state = RolloutState::Succeeded;
        r.decide(now, "succeed", "every stage passed".into(), Some(judgement));
    } else {
        let from = r.spec.stages[r.stage].percent;
        r.stage += 1;
        r.stage_started_at = now;
        r.bake_started_at = None;
        let to = r.spec.stages[r.stage].percent;
        r.decide(
            now,
            "promote",
            format!("stage passed: {from}% → {to}%"),
            Some(judgement),
        );
    }
}

fn fail(
    r: &mut Rollout,
    now: DateTime<Utc>,
    judgement: Judgement,
    obs: &Observation,
    devices: &[&DeviceRecord],
) -> Vec<Order> {
    let reason = judgement.summary();
    r.last_judgement = Some(judgement.clone());
    r.decide(now, "fail", reason.clone(), Some(judgement));
    match r.spec.on_failure {
        OnFailure::Pause => {
            r.state = RolloutState::Failed;
            Vec::new()
        }
        OnFailure::Rollback => {
            let _ = r.rollback(now, format!("on_failure = rollback: {reason}"));
            revert_orders(r, obs, devices)
        }
    }
}

/// Revert orders for every device of the rollout still running the version.
fn revert_orders(r: &mut Rollout, obs: &Observation, devices: &[&DeviceRecord]) -> Vec<Order> {
    let now = obs.now;
    let version = r.bundle.version.clone();
    let model = r.bundle.name.clone();
    let mut finder = Finder::new(devices);
    let mut orders = Vec::new();
    for (id, p) in r.devices.iter_mut() {
        // Staged devices may still finish installing: they are reverted when they report it.
        // Devices already off the version are done with this rollout, whatever they run later
        // (a later rollout of the same version must not be undone by this one).
        if p.state != DeviceState::Installed {
            continue;
        }
        let device = finder.find(id, |d| &d.id).map(|i| devices[i]);
        let summary = device.and_then(|d| d.model(&model));
        if !summary.is_some_and(|m| m.active == version) {
            p.state = DeviceState::RolledBack;
            p.since = now;
            continue;
        }
        if summary.is_some_and(|m| m.previous.is_none()) {
            // A first install has no earlier version to go back to; asking again cannot help.
            p.reason = Some("nothing to revert to: the model's first install".into());
            continue;
        }
        let online = device.is_some_and(|d| d.online);
        let due = p
            .revert_ordered_at
            .is_none_or(|t| now - t >= Duration::seconds(REVERT_REPEAT_SECONDS));
        if online && due {
            p.revert_ordered_at = Some(now);
            orders.push(Order::Revert {
                device_id: id.clone(),
            });
        }
    }
    orders
}

/// Sums the telemetry windows of `devices` (each at the version `version_of` gives) since `since`.
fn figures<'a>(
    devices: impl Iterator<Item = &'a str>,
    version_of: impl Fn(&str) -> String,
    obs: &Observation,
    since: DateTime<Utc>,
    reverts: u64,
    install_failures: u64,
) -> CohortFigures {
    let mut f = CohortFigures {
        reverts,
        install_failures,
        ..CohortFigures::default()
    };
    for id in devices {
        f.devices += 1;
        let version = version_of(id);
        for w in obs.windows.get(id).into_iter().flatten() {
            if w.version == version && w.start >= since {
                f.add_window(w);
            }
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::gates::Gates;
    use crate::rollout::spec::{Selector, Stage};
    use protocol::link::ModelSummary;
    use protocol::stats::Histogram;
    use protocol::telemetry::{ClassificationWindow, LatencyWindow};

    const V1: &str = "1.0.0";
    const V2: &str = "2.0.0";

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn spec(stages: &[(u32, u64)], on_failure: OnFailure) -> RolloutSpec {
        RolloutSpec {
            bundle_id: "b2".into(),
            selector: Selector::default(),
            stages: stages
                .iter()
                .map(|&(percent, bake_seconds)| Stage {
                    percent,
                    bake_seconds,
                })
                .collect(),
            gates: Gates {
                min_requests_per_cohort: 100,
                ..Gates::default()
            },
            on_failure,
            inconclusive_timeout_seconds: 60,
            install_timeout_seconds: 600,
            max_in_flight: crate::rollout::spec::DEFAULT_MAX_IN_FLIGHT,
        }
    }

    fn rollout(spec: RolloutSpec) -> Rollout {
        let bundle = BundleRef {
            bundle_id: "b2".into(),
            name: "digits".into(),
            version: V2.into(),
            size: 1000,
            chunk_size: 64,
            http_url: None,
        };
        Rollout::new("r-1".into(), spec, bundle, "test".into(), t(0))
    }

    /// A fake fleet: 20 devices on v1 until told otherwise.
    struct Fleet {
        obs: Observation,
        /// Devices that revert v2 on their own as soon as they get it.
        bad_v2: bool,
        traffic: bool,
        /// Revert orders carried out.
        reverts: usize,
    }

    impl Fleet {
        fn new(n: usize) -> Fleet {
            let devices = (0..n)
                .map(|i| {
                    Arc::new(DeviceRecord {
                        id: format!("d{i:02}"),
                        online: true,
                        last_seen: t(0),
                        first_seen: t(0),
                        status_time: t(0),
                        labels: BTreeMap::new(),
                        target: None,
                        agent_version: None,
                        models: vec![summary(V1)],
                    })
                })
                .collect();
            Fleet {
                obs: Observation {
                    now: t(0),
                    devices,
                    ..Observation::default()
                },
                bad_v2: false,
                traffic: true,
                reverts: 0,
            }
        }

        fn device(&mut self, id: &str) -> &mut DeviceRecord {
            Arc::make_mut(self.obs.devices.iter_mut().find(|d| d.id == id).unwrap())
        }

        /// Carries out orders, then lets `secs` seconds of traffic pass.
        fn apply(&mut self, orders: &[Order], secs: i64) {
            for o in orders {
                match o {
                    Order::Stage { device_id } => {
                        let now = self.obs.now;
                        let bad = self.bad_v2;
                        let d = self.device(device_id);
                        if bad {
                            d.models = vec![summary(V1)];
                            self.obs.events.push(EventView {
                                device_id: device_id.clone(),
                                time: now,
                                kind: "reverted".into(),
                                model: Some("digits".into()),
                                version: Some(V2.into()),
                                reason: "error rate over the policy".into(),
                            });
                        } else {
                            let mut m = summary(V2);
                            m.previous = Some(V1.into());
                            d.models = vec![m];
                        }
                    }
                    Order::Revert { device_id } => {
                        self.reverts += 1;
                        self.device(device_id).models = vec![summary(V1)]
                    }
                }
            }
            let start = self.obs.now;
            self.obs.now = start + Duration::seconds(secs);
            if self.traffic {
                for d in &self.obs.devices {
                    let w = window(&d.models[0].active, start, self.obs.now, 50);
                    self.obs
                        .windows
                        .entry(d.id.clone())
                        .or_default()
                        .push(Arc::new(w));
                }
            }
        }

        fn on(&self, version: &str) -> usize {
            self.obs
                .devices
                .iter()
                .filter(|d| d.models[0].active == version)
                .count()
        }
    }

    fn summary(version: &str) -> ModelSummary {
        ModelSummary {
            name: "digits".into(),
            active: version.into(),
            previous: None,
            state: "committed".into(),
            security_version: 1,
            bundle_sha256: String::new(),
            compute: None,
        }
    }

    fn window(
        version: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        requests: u64,
    ) -> WindowRecord {
        let mut latency = Histogram::new(0.0, 7.0, 70);
        let mut confidence = Histogram::new(0.0, 1.0, 10);
        for _ in 0..requests {
            latency.add(3.3);
            confidence.add(0.9);
        }
        WindowRecord {
            schema: 1,
            model: "digits".into(),
            version: version.into(),
            start,
            end,
            state: "committed".into(),
            requests,
            errors: 0,
            non_finite: 0,
            latency: LatencyWindow {
                log10_us: latency,
                mean_ms: None,
                p50_ms: None,
                p95_ms: None,
                p99_ms: None,
            },
            classification: Some(ClassificationWindow {
                class_counts: vec![requests / 2, requests - requests / 2],
                confidence,
                mean_confidence: Some(0.9),
                prediction_psi_baseline: None,
            }),
            regression: None,
            input_psi: BTreeMap::new(),
            feedback: None,
            samples_over_budget: 0,
            outbox_dropped_total: 0,
        }
    }

    /// Steps until the rollout leaves `Running` (or `limit` steps), 10 s apart.
    fn run(r: &mut Rollout, fleet: &mut Fleet, limit: usize) {
        for _ in 0..limit {
            let orders = step(r, &fleet.obs);
            fleet.apply(&orders, 10);
            if !matches!(r.state, RolloutState::Running | RolloutState::Pending) {
                // One more step lets a rollback converge.
                let orders = step(r, &fleet.obs);
                fleet.apply(&orders, 10);
                return;
            }
        }
    }

    #[test]
    fn a_healthy_version_is_promoted_through_every_stage() {
        let mut fleet = Fleet::new(20);
        let mut r = rollout(spec(&[(10, 20), (50, 20), (100, 0)], OnFailure::Rollback));
        run(&mut r, &mut fleet, 100);
        assert_eq!(r.state, RolloutState::Succeeded, "{:#?}", r.decisions);
        assert_eq!(fleet.on(V2), 20);
        let actions: Vec<&str> = r.decisions.iter().map(|d| d.action.as_str()).collect();
        assert_eq!(
            actions,
            ["start", "bake", "promote", "bake", "promote", "bake", "succeed"]
        );
        assert!(r
            .devices
            .values()
            .all(|p| p.state == DeviceState::Installed));
    }

    #[test]
    fn a_local_revert_fails_the_first_stage_and_rolls_back_only_its_devices() {
        let mut fleet = Fleet::new(20);
        fleet.bad_v2 = true;
        let mut r = rollout(spec(&[(10, 300), (50, 300), (100, 0)], OnFailure::Rollback));
        run(&mut r, &mut fleet, 100);
        assert_eq!(r.state, RolloutState::RolledBack, "{:#?}", r.decisions);
        assert_eq!(r.devices.len(), 2, "only the 10% stage was staged");
        assert_eq!(fleet.on(V2), 0);
        let fail = r.decisions.iter().find(|d| d.action == "fail").unwrap();
        assert!(fail.reason.starts_with("reverts"), "{}", fail.reason);
        assert!(fail.judgement.is_some());
    }

    #[test]
    fn a_regression_in_telemetry_rolls_back_what_was_installed() {
        let mut fleet = Fleet::new(20);
        let mut r = rollout(spec(&[(10, 20), (100, 0)], OnFailure::Rollback));
        // Stage and bake, then give the canaries errors.
        for _ in 0..3 {
            let orders = step(&mut r, &fleet.obs);
            fleet.apply(&orders, 10);
        }
        for (id, windows) in fleet.obs.windows.iter_mut() {
            if r.devices.contains_key(id) {
                for w in windows.iter_mut() {
                    let w = Arc::make_mut(w);
                    w.errors = w.requests / 3;
                }
            }
        }
        run(&mut r, &mut fleet, 20);
        assert_eq!(r.state, RolloutState::RolledBack, "{:#?}", r.decisions);
        let fail = r.decisions.iter().find(|d| d.action == "fail").unwrap();
        assert!(fail.reason.contains("error_rate"), "{}", fail.reason);
        assert_eq!(fleet.on(V2), 0, "rolled-back devices were told to revert");
    }

    #[test]
    fn no_traffic_keeps_baking_then_pauses_and_never_promotes() {
        let mut fleet = Fleet::new(20);
        fleet.traffic = false;
        let mut r = rollout(spec(&[(10, 20), (100, 0)], OnFailure::Rollback));
        run(&mut r, &mut fleet, 100);
        assert_eq!(r.state, RolloutState::Paused, "{:#?}", r.decisions);
        assert_eq!(r.stage, 0);
        let actions: Vec<&str> = r.decisions.iter().map(|d| d.action.as_str()).collect();
        assert_eq!(actions, ["start", "bake", "keep_baking", "pause"]);
        assert!(r
            .decisions
            .last()
            .unwrap()
            .reason
            .contains("too few requests"));
        assert_eq!(fleet.on(V2), 2);
        // A person resumes; with traffic it goes on.
        fleet.traffic = true;
        r.resume(fleet.obs.now, "ops").unwrap();
        run(&mut r, &mut fleet, 100);
        assert_eq!(r.state, RolloutState::Succeeded, "{:#?}", r.decisions);
    }

    #[test]
    fn a_restarted_server_continues_without_restaging() {
        let mut fleet = Fleet::new(20);
        let mut r = rollout(spec(&[(10, 20), (50, 20), (100, 0)], OnFailure::Rollback));
        let mut staged = 0;
        for _ in 0..5 {
            let orders = step(&mut r, &fleet.obs);
            staged += orders.len();
            fleet.apply(&orders, 10);
        }
        // The server stops: the rollout is stored as JSON and read back.
        let json = serde_json::to_string(&r).unwrap();
        let mut r: Rollout = serde_json::from_str(&json).unwrap();
        for _ in 0..100 {
            let orders = step(&mut r, &fleet.obs);
            staged += orders.len();
            fleet.apply(&orders, 10);
            if r.state != RolloutState::Running {
                break;
            }
        }
        assert_eq!(r.state, RolloutState::Succeeded);
        assert_eq!(staged, 20, "each device staged exactly once");
    }

    #[test]
    fn a_stage_stages_at_most_max_in_flight_devices_at_once_and_bakes_when_all_settled() {
        let mut fleet = Fleet::new(20);
        fleet.device("d07").models = vec![summary(V2)];
        let mut spec = spec(&[(100, 0)], OnFailure::Rollback);
        spec.max_in_flight = 3;
        let mut r = rollout(spec);
        let mut staged = 0;
        for step_no in 0..20 {
            let orders = step(&mut r, &fleet.obs);
            assert!(orders.len() <= 3, "step {step_no}: {orders:?}");
            let in_flight = r
                .devices
                .values()
                .filter(|p| p.state == DeviceState::Staged)
                .count();
            assert!(in_flight <= 3, "step {step_no}: {in_flight} staged at once");
            if staged < 19 {
                assert!(
                    r.bake_started_at.is_none(),
                    "step {step_no}: baking with {staged} of 19 staged"
                );
            }
            staged += orders.len();
            fleet.apply(&orders, 10);
            if r.state != RolloutState::Running {
                break;
            }
        }
        assert_eq!(r.state, RolloutState::Succeeded, "{:#?}", r.decisions);
        assert_eq!(staged, 19, "each device not yet on v2 staged exactly once");
        assert_eq!(fleet.on(V2), 20);
    }

    #[test]
    fn devices_in_any_order_and_a_kept_ranking_step_as_a_fresh_step_does() {
        let mut fleet = Fleet::new(40);
        fleet.device("d05").models = vec![summary(V2)];
        Arc::make_mut(&mut fleet.obs.devices[9]).online = false;
        let mut spec = spec(&[(10, 0), (50, 0), (100, 0)], OnFailure::Rollback);
        spec.max_in_flight = 4;
        let (mut fresh, mut kept) = (rollout(spec.clone()), rollout(spec));
        let mut ranking = Ranking::default();
        for step_no in 0..40 {
            let orders = step(&mut fresh, &fleet.obs);
            let mut shuffled = fleet.obs.clone();
            shuffled.devices.reverse();
            shuffled.devices.swap(3, 17);
            let same = step_ranked(&mut kept, &shuffled, &mut ranking);
            assert_eq!(orders, same, "step {step_no}");
            assert_eq!(fresh, kept, "step {step_no}");
            fleet.apply(&orders, 10);
            if fresh.state != RolloutState::Running {
                break;
            }
        }
        assert_eq!(
            fresh.state,
            RolloutState::Succeeded,
            "{:#?}",
            fresh.decisions
        );
        assert_eq!(fleet.on(V2), 39, "all but the offline device");
    }

    #[test]
    fn devices_already_on_the_version_are_not_staged_and_offline_ones_wait() {
        let mut fleet = Fleet::new(10);
        fleet.device("d00").models = vec![summary(V2)];
        for d in fleet.obs.devices.iter_mut().skip(5) {
            Arc::make_mut(d).online = false;
        }
        let mut r = rollout(spec(&[(100, 0)], OnFailure::Rollback));
        let orders = step(&mut r, &fleet.obs);
        assert!(!orders.contains(&Order::Stage {
            device_id: "d00".into()
        }));
        assert_eq!(orders.len(), 4, "online devices not yet on v2: {orders:?}");
        assert_eq!(r.devices["d00"].state, DeviceState::Installed);
        fleet.apply(&orders, 10);
        for d in fleet.obs.devices.iter_mut() {
            Arc::make_mut(d).online = true;
        }
        let orders = step(&mut r, &fleet.obs);
        assert_eq!(orders.len(), 5, "the devices that came back: {orders:?}");
    }

    #[test]
    fn a_rollback_converges_and_never_reverts_a_device_again() {
        let mut fleet = Fleet::new(20);
        let mut r = rollout(spec(&[(50, 20), (100, 0)], OnFailure::Rollback));
        for _ in 0..3 {
            let orders = step(&mut r, &fleet.obs);
            fleet.apply(&orders, 10);
        }
        assert_eq!(fleet.on(V2), 10);
        r.rollback(fleet.obs.now, "ops".into()).unwrap();
        for _ in 0..3 {
            let orders = step(&mut r, &fleet.obs);
            fleet.apply(&orders, 30);
        }
        assert_eq!(fleet.on(V2), 0);
        assert_eq!(fleet.reverts, 10, "one revert per canary");
        assert!(r
            .devices
            .values()
            .all(|p| p.state == DeviceState::RolledBack));
        // Later a fixed rollout brings 2.0.0 back: the old rollback leaves it alone.
        for d in fleet.obs.devices.iter_mut() {
            let d = Arc::make_mut(d);
            d.models[0].active = V2.into();
            d.models[0].previous = Some(V1.into());
        }
        for _ in 0..5 {
            assert_eq!(step(&mut r, &fleet.obs), vec![]);
            fleet.apply(&[], 30);
        }
    }

    #[test]
    fn a_first_install_is_not_asked_to_revert_to_nothing() {
        let mut fleet = Fleet::new(4);
        for d in fleet.obs.devices.iter_mut() {
            Arc::make_mut(d).models = vec![];
        }
        let mut r = rollout(spec(&[(100, 0)], OnFailure::Rollback));
        let orders = step(&mut r, &fleet.obs);
        assert_eq!(orders.len(), 4);
        for d in fleet.obs.devices.iter_mut() {
            Arc::make_mut(d).models = vec![summary(V2)]; // no previous version
        }
        step(&mut r, &fleet.obs);
        r.rollback(fleet.obs.now, "ops".into()).unwrap();
        assert_eq!(step(&mut r, &fleet.obs), vec![]);
        assert!(r.devices.values().all(|p| p
            .reason
            .as_deref()
            .is_some_and(|s| s.contains("nothing to revert to"))));
    }

    #[test]
    fn a_device_that_never_answers_fails_the_stage_after_the_install_timeout() {
        let mut fleet = Fleet::new(10);
        let mut s = spec(&[(20, 10), (100, 0)], OnFailure::Pause);
        s.install_timeout_seconds = 120;
        let mut r = rollout(s);
        let orders = step(&mut r, &fleet.obs);
        assert_eq!(orders.len(), 2);
        // Only the first canary answers.
        fleet.apply(&orders[..1], 60);
        step(&mut r, &fleet.obs);
        assert_eq!(r.state, RolloutState::Running, "{:#?}", r.decisions);
        fleet.apply(&[], 70);
        step(&mut r, &fleet.obs);
        assert_eq!(r.state, RolloutState::Failed, "{:#?}", r.decisions);
        let silent = r
            .devices
            .values()
            .find(|p| p.state == DeviceState::Failed)
            .unwrap();
        assert!(silent.reason.as_deref().unwrap().contains("within 120 s"));
    }
}
