//! Runs rollouts: creates and stores them, feeds the [`engine`](super::engine) an observation of
//! the fleet every tick, carries out its orders over MQTT and stores the result.
//!
//! One tick at a time (a mutex), so a rollout is never stepped twice at once. Each step is
//! committed *before* its orders go out, in one transaction: the rollout (which devices were
//! staged, with which command), the events of its decisions, the `command_sent` events and the
//! signed stage commands themselves ([`Store::put_rollout_with_commands`]). Then the commands are
//! handed to the outbox, a task of their own that publishes them in order. So a crash at any
//! point either loses the whole step (it is taken again, maybe differently, and nothing of it
//! reached a device) or keeps it whole; no device is ever staged by two different commands of
//! one rollout.
//!
//! The tick does not wait for the broker: publishing ten thousand QoS 1 commands takes the
//! broker's acknowledgements (two minutes on rumqttd with 10,000 connected clients, BENCHMARKS.md
//! "Fleet scale"), and a rollout created through the API answers once its first step is stored,
//! not once the broker has taken it.
//!
//! A stage command can still be lost after that commit: a crash before it is published, a
//! broker restart that drops queued messages. So while a rollout runs, a staged device whose
//! command no device event has answered yet (see [`EventFeed`]) gets the *same* signed command
//! again, at the first tick after a server start and then every `stage_resend_after`. A device
//! that had it already refuses the copy as a replay (same `seq`); one that had not obeys it.
//!
//! [`Store::put_rollout_with_commands`]: crate::store::Store::put_rollout_with_commands

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;

use protocol::link::BundleRef;

use super::cohort::Ranking;
use super::engine::{self, DeviceState, EventView, Observation, Order, Rollout, RolloutState};
use super::spec::RolloutSpec;
use crate::fleet::{Fleet, FleetError, SealedCommand};
use crate::store::{DeviceRecord, Event};

/// How long a running rollout waits for a staged device to answer its stage command before
/// publishing the command again (the default of `--stage-resend-after`).
pub const DEFAULT_STAGE_RESEND_AFTER: Duration = Duration::from_secs(30);

/// Events read from the log per batch when a rollout's event feed catches up.
const FEED_BATCH: usize = 10_000;

/// Rollouts kept decoded in memory (see [`Rollouts`]'s `stored`); beyond this the oldest read
/// is dropped and read again from the store when needed.
const STORED_ROLLOUTS: usize = 16;

/// A rollout's failure events, read from the event log incrementally: the first tick that sees
/// the rollout (after its creation or a server restart) scans the log back to the rollout's
/// `rollout_created` event; every later tick reads only the events stored since. So a tick costs
/// the events of one tick, not a rescan of the whole rollout's events (tens of thousands with
/// ten thousand devices), and no failure is missed however many events the fleet produces.
///
/// The feed also collects the stage commands of the rollout that devices have answered (any
/// device event naming the command): those are never re-sent.
struct EventFeed {
    /// The newest event sequence number read.
    after: u64,
    events: Vec<EventView>,
    answered: HashSet<String>,
}

impl EventFeed {
    fn read(&mut self, r: &Rollout, e: &Event) {
        if let Some(view) = failure_view(r, e) {
            self.events.push(view);
        }
        if let (Some(command), true) = (&e.command_id, e.actor.starts_with("device:")) {
            if e.rollout_id.as_deref() == Some(&r.id) {
                self.answered.insert(command.clone());
            }
        }
    }
}

/// What a person can do to a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intervention {
    Pause,
    Resume,
    Abort,
    Rollback,
}

impl std::str::FromStr for Intervention {
    type Err = FleetError;
    fn from_str(s: &str) -> Result<Intervention, FleetError> {
        Ok(match s {
            "pause" => Intervention::Pause,
            "resume" => Intervention::Resume,
            "abort" => Intervention::Abort,
            "rollback" => Intervention::Rollback,
            other => {
                return Err(FleetError::BadRequest(format!(
                    "unknown action '{other}': use pause, resume, abort or rollback"
                )))
            }
        })
    }
}

pub struct Rollouts {
    fleet: Arc<Fleet>,
    tick: tokio::sync::Mutex<()>,
    /// Rollouts as this process last stored or read them, so that neither a tick nor an API
    /// read decodes a row per device (ten thousand for a fleet-wide rollout) each time.
    /// Invariant: every rollout is written through [`Rollouts::put`], which replaces the entry
    /// after its commit and drops it if the commit failed, so an entry is the stored rollout.
    stored: std::sync::Mutex<StoredRollouts>,
    feeds: std::sync::Mutex<HashMap<String, EventFeed>>,
    /// The rank order of each stepping rollout's devices, kept between ticks.
    rankings: std::sync::Mutex<HashMap<String, Ranking>>,
    /// Each pending stage command this process has handed to the outbox: `None` while it waits
    /// there, then when it was published.
    published: std::sync::Mutex<HashMap<String, Option<Instant>>>,
    stage_resend_after: Duration,
    outbox: tokio::sync::mpsc::UnboundedSender<Vec<Outgoing>>,
    /// The outbox's receiving end, until [`Rollouts::spawn`] starts its publisher.
    outbox_rx: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Vec<Outgoing>>>>,
}

/// The rollouts kept in memory, with the order they were last stored or read in.
#[derive(Default)]
struct StoredRollouts {
    by_id: HashMap<String, (u64, Arc<Rollout>)>,
    clock: u64,
    /// Rollout writes so far: a rollout read from the store is kept only if none happened
    /// during the read (an API read races the ticks; it must not put back an older version).
    writes: u64,
}

impl StoredRollouts {
    fn get(&mut self, id: &str) -> Option<Arc<Rollout>> {
        self.clock += 1;
        let clock = self.clock;
        self.by_id.get_mut(id).map(|(used, r)| {
            *used = clock;
            r.clone()
        })
    }

    fn insert(&mut self, r: Arc<Rollout>) {
        self.clock += 1;
        if self.by_id.len() >= STORED_ROLLOUTS && !self.by_id.contains_key(&r.id) {
            let oldest = self
                .by_id
                .iter()
                .min_by_key(|(_, (used, _))| *used)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                self.by_id.remove(&oldest);
            }
        }
        self.by_id.insert(r.id.clone(), (self.clock, r));
    }
}

/// A command on its way to the broker.
struct Outgoing {
    rollout: String,
    command: SealedCommand,
    is_stage: bool,
    /// Published before (counted in `fleet_commands_resent_total`).
    resend: bool,
}

impl Rollouts {
    /// Rollouts of `fleet`; a staged device that has not answered its stage command gets it
    /// again every `stage_resend_after`.
    ///
    /// Commands go out once [`Rollouts::spawn`] runs.
    pub fn new(fleet: Arc<Fleet>, stage_resend_after: Duration) -> Rollouts {
        let (outbox, outbox_rx) = tokio::sync::mpsc::unbounded_channel();
        Rollouts {
            fleet,
            tick: tokio::sync::Mutex::new(()),
            stored: Default::default(),
            feeds: Default::default(),
            rankings: Default::default(),
            published: Default::default(),
            stage_resend_after,
            outbox,
            outbox_rx: std::sync::Mutex::new(Some(outbox_rx)),
        }
    }

    /// Checks and stores a new rollout (state `pending`; the next tick starts it).
    pub async fn create(&self, spec: RolloutSpec, actor: &str) -> Result<Arc<Rollout>, FleetError> {
        spec.validate().map_err(FleetError::BadRequest)?;
        let bundle = self.fleet.bundle(&spec.bundle_id)?;
        let _guard = self.tick.lock().await;
        let devices = self.fleet.store.device_records()?;
        for other in self.fleet.store.rollout_headers()? {
            if !other.state.is_active() || other.model() != bundle.name {
                continue;
            }
            let shared = devices.iter().find(|d| {
                spec.selector.matches(&d.labels) && other.spec.selector.matches(&d.labels)
            });
            if shared.is_some() || other.spec.selector == spec.selector {
                return Err(FleetError::Conflict(format!(
                    "rollout {} ({} {}, {:?}) already targets model '{}' on {}; \
                     pause and abort it, or wait until it ends",
                    other.id,
                    other.model(),
                    other.version(),
                    other.state,
                    bundle.name,
                    shared.map_or("the same devices".to_string(), |d| format!(
                        "device {}",
                        d.id
                    )),
                )));
            }
        }
        let id = new_rollout_id();
        let bundle_ref = BundleRef {
            bundle_id: bundle.id.clone(),
            name: bundle.name.clone(),
            version: bundle.version.clone(),
            size: bundle.size,
            chunk_size: self.fleet.chunk_size,
            http_url: None,
        };
        let rollout = Rollout::new(id, spec, bundle_ref, actor.to_string(), Utc::now());
        let event = rollout_event(
            &rollout,
            "rollout_created",
            actor,
            json!({"spec": rollout.spec}),
        );
        self.put(rollout, None, vec![event], &[], &[])
    }

    /// A rollout with its devices.
    pub fn get(&self, id: &str) -> Result<Arc<Rollout>, FleetError> {
        let writes = {
            let mut stored = self.stored.lock().expect("stored lock");
            if let Some(r) = stored.get(id) {
                return Ok(r);
            }
            stored.writes
        };
        let r = self
            .fleet
            .store
            .rollout(id)?
            .ok_or_else(|| FleetError::NotFound {
                what: "rollout",
                id: id.to_string(),
            })?;
        let r = Arc::new(r);
        let mut stored = self.stored.lock().expect("stored lock");
        if stored.writes == writes {
            stored.insert(r.clone());
        }
        Ok(r)
    }

    /// Stores `r` (see [`Store::put_rollout_with_commands`]) and keeps it as the stored rollout
    /// (moved, not copied: ten thousand device entries for a fleet-wide rollout).
    ///
    /// [`Store::put_rollout_with_commands`]: crate::store::Store::put_rollout_with_commands
    fn put(
        &self,
        r: Rollout,
        before: Option<&Rollout>,
        events: Vec<Event>,
        sent: &[(String, Vec<u8>)],
        settled: &[String],
    ) -> Result<Arc<Rollout>, FleetError> {
        let stored = self
            .fleet
            .store
            .put_rollout_with_commands(&r, before, events, sent, settled);
        let mut kept = self.stored.lock().expect("stored lock");
        kept.writes += 1;
        match stored {
            Ok(()) => {
                let r = Arc::new(r);
                kept.insert(r.clone());
                Ok(r)
            }
            Err(e) => {
                kept.by_id.remove(&r.id);
                Err(e.into())
            }
        }
    }

    /// Every rollout, newest first, without its devices, each with how many devices it has
    /// taken.
    pub fn list(&self) -> Result<Vec<(Rollout, usize)>, FleetError> {
        let mut all = Vec::new();
        for r in self.fleet.store.rollout_headers()? {
            let devices = self.fleet.store.rollout_device_count(&r.id)?;
            all.push((r, devices));
        }
        all.sort_by(|a, b| b.0.created_at.cmp(&a.0.created_at));
        Ok(all)
    }

    /// A person pauses, resumes, aborts or rolls back a rollout.
    pub async fn intervene(
        &self,
        id: &str,
        what: Intervention,
        actor: &str,
    ) -> Result<Arc<Rollout>, FleetError> {
        let _guard = self.tick.lock().await;
        let snapshot = self.get(id)?;
        let mut r = Rollout::clone(&snapshot);
        let now = Utc::now();
        let before = r.decisions.len();
        let result = match what {
            Intervention::Pause => r.pause(now, actor),
            Intervention::Resume => r.resume(now, actor),
            Intervention::Abort => r.abort(now, actor),
            Intervention::Rollback => r.rollback(now, format!("rolled back by {actor}")),
        };
        result.map_err(FleetError::Conflict)?;
        let events = decision_events(&r, before, actor);
        let settled = settled_commands(&snapshot, &r);
        let r = self.put(r, Some(&snapshot), events, &[], &settled)?;
        self.forget_published(&settled);
        Ok(r)
    }

    /// Steps every rollout that is not finished and carries out its orders.
    pub async fn tick(&self) -> Result<(), FleetError> {
        let _guard = self.tick.lock().await;
        let mut stepping = Vec::new();
        for header in self.fleet.store.rollout_headers()? {
            if matches!(
                header.state,
                RolloutState::Pending | RolloutState::Running | RolloutState::RolledBack
            ) {
                stepping.push(self.get(&header.id)?);
            }
        }
        // Every device record is read only when a rollout needs the observation (a read of the
        // whole fleet, once a second, is wasted on a server with nothing to roll out).
        let mut devices = if stepping.is_empty() {
            Vec::new()
        } else {
            self.fleet.store.device_records()?
        };
        let mut stepped = Vec::new();
        for snapshot in stepping {
            stepped.push(snapshot.id.clone());
            let mut r = Rollout::clone(&snapshot);
            // The observation borrows the devices for the step and gives them back.
            let obs = self.observe(&r, std::mem::take(&mut devices))?;
            let before = r.decisions.len();
            let mut ranking = self.ranking(&r.id);
            let orders = engine::step_ranked(&mut r, &obs, &mut ranking);
            self.rankings
                .lock()
                .expect("rankings lock")
                .insert(r.id.clone(), ranking);
            devices = obs.devices;
            let actor = format!("rollout:{}", r.id);
            let sealed = self.seal_orders(&mut r, &orders, &actor);
            let settled = settled_commands(&snapshot, &r);
            let r = if r != *snapshot || !sealed.is_empty() {
                let mut events = decision_events(&r, before, &actor);
                let mut pending = Vec::new();
                for (command, event, is_stage) in &sealed {
                    events.push(event.clone());
                    if *is_stage {
                        pending.push((command.command_id.clone(), command.payload.clone()));
                    }
                }
                self.put(r, Some(&snapshot), events, &pending, &settled)?
            } else {
                snapshot
            };
            protocol::testing::crash_point("rollout_orders_recorded");
            self.forget_published(&settled);
            let outgoing = sealed
                .into_iter()
                .map(|(command, _, is_stage)| Outgoing {
                    rollout: r.id.clone(),
                    command,
                    is_stage,
                    resend: false,
                })
                .collect();
            self.send_to_outbox(outgoing);
            self.resend_unanswered(&r)?;
        }
        self.feeds
            .lock()
            .expect("feeds lock")
            .retain(|id, _| stepped.contains(id));
        self.rankings
            .lock()
            .expect("rankings lock")
            .retain(|id, _| stepped.contains(id));
        Ok(())
    }

    /// Ticks every `period` and publishes what the ticks order, until the task is aborted.
    ///
    /// # Panics
    /// If called twice (there is one outbox).
    pub fn spawn(self: Arc<Self>, period: Duration) -> tokio::task::JoinHandle<()> {
        let outbox = self
            .outbox_rx
            .lock()
            .expect("outbox lock")
            .take()
            .expect("Rollouts::spawn is called once");
        tokio::spawn(async move {
            let ticks = async {
                let mut interval = tokio::time::interval(period);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    interval.tick().await;
                    if let Err(e) = self.tick().await {
                        tracing::warn!("rollout tick: {e}");
                    }
                }
            };
            tokio::join!(ticks, self.publish_outbox(outbox));
        })
    }

    /// Queues commands for the outbox; a stage command counts as handed over (not re-sent) from
    /// now on.
    fn send_to_outbox(&self, outgoing: Vec<Outgoing>) {
        if outgoing.is_empty() {
            return;
        }
        {
            let mut published = self.published.lock().expect("published lock");
            for o in outgoing.iter().filter(|o| o.is_stage) {
                published.insert(o.command.command_id.clone(), None);
            }
        }
        // The receiver lives as long as the task of `spawn`; without it (a server shutting
        // down) the commands stay recorded and go out as re-sends after the next start.
        let _ = self.outbox.send(outgoing);
    }

    /// The outbox: publishes each batch in order. When the broker cannot take a command, the
    /// rest of the batch and everything queued behind it is put back to the ticks: a stage
    /// command goes out again as a re-send (it is recorded), a revert is ordered again by the
    /// engine.
    async fn publish_outbox(&self, mut rx: tokio::sync::mpsc::UnboundedReceiver<Vec<Outgoing>>) {
        while let Some(batch) = rx.recv().await {
            let mut batch = batch.into_iter();
            let mut unsent = Vec::new();
            for o in batch.by_ref() {
                if self.publish(&o).await {
                    if o.resend {
                        self.fleet.metrics.commands_resent.fetch_add(1, Relaxed);
                    }
                } else {
                    unsent.push(o);
                    break;
                }
            }
            if !unsent.is_empty() {
                unsent.extend(batch);
                while let Ok(more) = rx.try_recv() {
                    unsent.extend(more);
                }
                let ids: Vec<String> = unsent.into_iter().map(|o| o.command.command_id).collect();
                self.forget_published(&ids);
            }
            protocol::testing::crash_point("rollout_orders_sent");
        }
    }

    /// Prepares and signs the orders of one step; a stage command's id goes into the device's
    /// progress. Returns each command, its `command_sent` event, and whether it is a stage.
    fn seal_orders(
        &self,
        r: &mut Rollout,
        orders: &[Order],
        actor: &str,
    ) -> Vec<(SealedCommand, Event, bool)> {
        let mut sealed = Vec::with_capacity(orders.len());
        for order in orders {
            let prepared = match order {
                Order::Stage { device_id } => {
                    self.fleet
                        .prepare_stage(device_id, &r.bundle.bundle_id, Some(&r.id), actor)
                }
                Order::Revert { device_id } => self.fleet.prepare_revert(
                    device_id,
                    r.model(),
                    Some(r.version()),
                    Some(&r.id),
                    actor,
                ),
            };
            match prepared {
                Ok(p) => {
                    let (command, event) = self.fleet.seal(p);
                    let is_stage = matches!(order, Order::Stage { .. });
                    if let Order::Stage { device_id } = order {
                        if let Some(p) = r.devices.get_mut(device_id) {
                            p.command_id = Some(command.command_id.clone());
                        }
                    }
                    sealed.push((command, event, is_stage));
                }
                Err(e) => Self::order_failed(r, order, &e),
            }
        }
        sealed
    }

    /// Publishes a command; false if it did not go out.
    async fn publish(&self, o: &Outgoing) -> bool {
        if let Err(e) = self.fleet.publish_command(&o.command).await {
            tracing::warn!(
                "rollout {}: command {} to {} not published: {e}",
                o.rollout,
                o.command.command_id,
                o.command.device_id
            );
            return false;
        }
        if o.is_stage {
            // Only if still pending: a command settled meanwhile is not waited on.
            if let Some(at) = self
                .published
                .lock()
                .expect("published lock")
                .get_mut(&o.command.command_id)
            {
                *at = Some(Instant::now());
            }
        }
        true
    }

    /// Publishes again, unchanged, the stage commands of `r` that no device event has answered
    /// and that this process has not published within `stage_resend_after` (all of them, the
    /// first tick after a start); not those still waiting in the outbox.
    fn resend_unanswered(&self, r: &Rollout) -> Result<(), FleetError> {
        if r.state != RolloutState::Running {
            return Ok(());
        }
        let due: Vec<(String, String)> = {
            let feeds = self.feeds.lock().expect("feeds lock");
            let published = self.published.lock().expect("published lock");
            let answered = feeds.get(&r.id).map(|f| &f.answered);
            r.devices
                .iter()
                .filter(|(_, p)| p.state == DeviceState::Staged)
                .filter_map(|(device, p)| Some((device, p.command_id.as_ref()?)))
                .filter(|(_, command)| !answered.is_some_and(|a| a.contains(*command)))
                .filter(|(_, command)| match published.get(*command) {
                    None => true,
                    Some(None) => false,
                    Some(Some(at)) => at.elapsed() >= self.stage_resend_after,
                })
                .map(|(device, command)| (device.clone(), command.clone()))
                .collect()
        };
        let mut outgoing = Vec::new();
        for (device_id, command_id) in due {
            // None: staged by a server version that did not keep its commands.
            let Some(payload) = self.fleet.store.pending_command(&command_id)? else {
                continue;
            };
            tracing::info!(
                "rollout {}: stage command {command_id} to {device_id} again (no answer yet)",
                r.id,
            );
            outgoing.push(Outgoing {
                rollout: r.id.clone(),
                command: SealedCommand {
                    command_id,
                    device_id,
                    payload,
                },
                is_stage: true,
                resend: true,
            });
        }
        self.send_to_outbox(outgoing);
        Ok(())
    }

    /// The ranking kept for rollout `id` (taken out while its step runs), or a new one.
    fn ranking(&self, id: &str) -> Ranking {
        self.rankings
            .lock()
            .expect("rankings lock")
            .remove(id)
            .unwrap_or_default()
    }

    fn forget_published(&self, commands: &[String]) {
        if commands.is_empty() {
            return;
        }
        let mut published = self.published.lock().expect("published lock");
        for c in commands {
            published.remove(c);
        }
    }

    /// The engine re-issues what matters: a revert is repeated; a stage that could not even be
    /// prepared (an unknown device, a bundle no longer trusted) leaves the device `staged` until
    /// `install_timeout_seconds` fails it.
    fn order_failed(r: &Rollout, order: &Order, e: &FleetError) {
        tracing::warn!("rollout {}: {order:?} failed: {e}", r.id);
    }

    fn observe(
        &self,
        r: &Rollout,
        devices: Vec<Arc<DeviceRecord>>,
    ) -> Result<Observation, FleetError> {
        let events = self.failure_events(r)?;
        let mut windows = HashMap::new();
        if let Some(since) = r.bake_started_at {
            for d in devices
                .iter()
                .filter(|d| r.spec.selector.matches(&d.labels))
            {
                let w = self
                    .fleet
                    .telemetry
                    .windows(&d.id, Some(r.model()), Some(since));
                if !w.is_empty() {
                    windows.insert(d.id.clone(), w);
                }
            }
        }
        Ok(Observation {
            now: Utc::now(),
            devices,
            events,
            windows,
        })
    }
}

impl Rollouts {
    /// The failure events of `r`'s model since `r` was created (see [`EventFeed`]).
    fn failure_events(&self, r: &Rollout) -> Result<Vec<EventView>, FleetError> {
        let mut feeds = self.feeds.lock().expect("feeds lock");
        let feed = match feeds.entry(r.id.clone()) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let mut newest = None;
                let back = self.fleet.store.events_back_while(|e| {
                    newest.get_or_insert(e.seq);
                    !(e.kind == "rollout_created" && e.rollout_id.as_deref() == Some(&r.id))
                })?;
                let mut feed = EventFeed {
                    after: newest.unwrap_or(0),
                    events: Vec::new(),
                    answered: HashSet::new(),
                };
                for e in back.iter().rev() {
                    feed.read(r, e);
                }
                v.insert(feed)
            }
        };
        loop {
            let batch = self.fleet.store.events_after(feed.after, FEED_BATCH)?;
            let Some(last) = batch.last() else {
                break;
            };
            feed.after = last.seq;
            for e in &batch {
                feed.read(r, e);
            }
            if batch.len() < FEED_BATCH {
                break;
            }
        }
        Ok(feed.events.clone())
    }
}

/// What the engine sees of `e`, if it is a device's failure event for `r`'s model.
fn failure_view(r: &Rollout, e: &Event) -> Option<EventView> {
    let device_id = e.device_id.clone()?;
    if e.model.as_deref() != Some(r.model())
        || e.actor.starts_with("rollout:")
        || !engine::FAILURE_KINDS.contains(&e.kind.as_str())
    {
        return None;
    }
    let text = |key: &str| {
        e.detail
            .get(key)
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    // A `reverted` event names the version now active; the one left is `detail.from`.
    let version = if e.kind == "reverted" {
        text("from")
    } else {
        e.version.clone()
    };
    Some(EventView {
        device_id,
        time: e.time,
        reason: text("reason").unwrap_or_else(|| e.detail.to_string()),
        kind: e.kind.clone(),
        model: e.model.clone(),
        version,
    })
}

/// The pending stage commands of `before` that `after` no longer waits on: the device left
/// `staged` (installed, failed, timed out) or the rollout stopped running (a paused one keeps
/// them for its resume).
fn settled_commands(before: &Rollout, after: &Rollout) -> Vec<String> {
    let waiting = matches!(after.state, RolloutState::Running | RolloutState::Paused);
    before
        .devices
        .iter()
        .filter(|(_, p)| p.state == DeviceState::Staged)
        .filter_map(|(device, p)| {
            let command = p.command_id.as_ref()?;
            let still = waiting
                && after.devices.get(device).is_some_and(|q| {
                    q.state == DeviceState::Staged && q.command_id.as_ref() == Some(command)
                });
            (!still).then(|| command.clone())
        })
        .collect()
}

/// One event per decision taken since `before`.
fn decision_events(r: &Rollout, before: usize, actor: &str) -> Vec<Event> {
    r.decisions[before.min(r.decisions.len())..]
        .iter()
        .map(|d| {
            let mut detail = json!({"stage": d.stage, "reason": d.reason, "state": r.state});
            if let Some(j) = &d.judgement {
                detail["verdict"] = json!(j.verdict);
                detail["gates"] = json!(j.gates);
            }
            rollout_event(r, &format!("rollout_{}", d.action), actor, detail)
        })
        .collect()
}

fn rollout_event(r: &Rollout, kind: &str, actor: &str, detail: serde_json::Value) -> Event {
    let mut e = Event::new(kind, actor, detail).model(r.model(), Some(r.version()));
    e.rollout_id = Some(r.id.clone());
    e
}

fn new_rollout_id() -> String {
    let mut bytes = [0u8; 6];
    getrandom::getrandom(&mut bytes).expect("the OS has randomness");
    format!("r-{}", hex::encode(bytes))
}
