//! The task that owns the MQTT session.
//!
//! It polls rumqttc's event loop without ever cancelling a poll in the middle (the pending poll
//! future owns the event loop and hands it back when it completes), so it can also wait for its
//! tick, agent changes and finished blocking jobs in the same `select!`. It is the only publisher,
//! which is what makes the packet id → item mapping of [`super::acks`] sound, and it publishes only
//! while connected. On a connection loss it handles the events rumqttc had already buffered, then
//! drops rumqttc's pending retransmissions and resets its own in-flight state: events,
//! telemetry and chunk requests are re-sent from durable state after the reconnect.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use protocol::link::{
    self, Action, BundleRef, Channel, ChunkRequest, Command, DeviceEvent, ModelSummary,
    ServerPresence, Topics, LINK_SCHEMA, MAX_CHUNK_SIZE,
};

use crate::agent::Agent;
use crate::keyring_store;
use crate::store::{Event as AgentEvent, EventContext};
use protocol::keyring_chain::KeyringChain;

use super::acks::{AckTracker, Sent};
use super::backoff::Backoff;
use super::command_check::{self, CheckError, Refusals};
use super::event_pump::EventPump;
use super::http_fetch::{self, HttpFetchError};
use super::metrics::LinkMetrics;
use super::status::device_status;
use super::telemetry_pump::TelemetryPump;
use super::transfer::{self, ChunkError, Transfer, TransferRecord, CHECKPOINT_CHUNKS};
use super::transfer_worker::{TransferWorker, WorkerReport, MAX_UNSYNCED_CHUNKS};
use super::{LinkConfig, LinkError, TransferMode};

/// Events published and not yet acknowledged, at most.
const EVENT_WINDOW: usize = 16;
/// A transfer's chunks written but not yet checkpointed are made durable after this long.
const CHECKPOINT_AFTER: Duration = Duration::from_secs(1);
/// How long a clean shutdown waits for the broker to take the goodbye status.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long after connecting the link waits for the server's presence before it publishes
/// events and telemetry anyway, when no presence message (online or offline) arrived at all: a
/// broker that does not keep retained messages, or one restarted without persistence while the
/// server stays away. An explicit offline presence is waited out however long it lasts.
const PRESENCE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest bundle a stage command may name.
const MAX_BUNDLE_SIZE: u64 = 1 << 34;

/// What a QoS 1 publish carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Item {
    Status,
    Event(u64),
    Telemetry(u64),
    ChunkRequest,
    Goodbye,
}

/// The device's topics.
struct DeviceTopics {
    status: String,
    commands: String,
    events: String,
    telemetry: String,
    request: String,
    chunk: String,
    /// The fleet's retained keyring chain (not per device).
    keyring: String,
    /// The fleet server's retained presence (not per device).
    server: String,
}

impl DeviceTopics {
    fn new(topics: &Topics, id: &str) -> DeviceTopics {
        DeviceTopics {
            status: topics.device(id, Channel::Status),
            commands: topics.device(id, Channel::Commands),
            events: topics.device(id, Channel::Events),
            telemetry: topics.device(id, Channel::Telemetry),
            request: topics.device(id, Channel::TransferRequest),
            chunk: topics.device(id, Channel::TransferChunk),
            keyring: topics.keyring(),
            server: topics.server(),
        }
    }
}

pub(super) struct Session {
    agent: Arc<Agent>,
    config: LinkConfig,
    topics: DeviceTopics,
    client: AsyncClient,
    eventloop: Option<EventLoop>,
    metrics: Arc<LinkMetrics>,
    shared_connected: Arc<AtomicBool>,
    connected: bool,
    /// The newest server presence of this connection said online: events and telemetry go out
    /// only then (`protocol::link::ServerPresence`).
    server_online: bool,
    /// When this connection was made, while no presence message has arrived on it.
    awaiting_presence_since: Option<Instant>,
    /// A clean shutdown is under way: only the goodbye is published.
    closing: bool,
    goodbye_acked: bool,
    tracker: AckTracker<Item>,
    events: EventPump,
    /// The newest event seq in the store.
    latest_event: u64,
    telemetry: TelemetryPump,
    /// MQTT transfers being fetched, by bundle id.
    fetching: BTreeMap<String, Transfer>,
    /// The disk-side thread of each transfer in `fetching` (checkpoints, progress events,
    /// running hash), by bundle id.
    disk: HashMap<String, TransferWorker>,
    /// Bundle ids a blocking thread owns (HTTP download, install), with their cancel flags.
    busy: HashMap<String, Arc<AtomicBool>>,
    reports: mpsc::UnboundedSender<WorkerReport>,
    /// The models of the last status the broker took (None: publish again).
    reported: Option<Vec<ModelSummary>>,
    refusals: Refusals,
}

type Polled = (EventLoop, Result<Event, ConnectionError>);
/// The poll in progress (boxed: it owns the event loop).
type Polling = std::pin::Pin<Box<dyn std::future::Future<Output = Polled> + Send>>;

/// One poll of the event loop, after `delay`; the future owns the event loop and returns it.
async fn poll(mut eventloop: EventLoop, delay: Duration) -> Polled {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let result = eventloop.poll().await;
    (eventloop, result)
}

impl Session {
    pub(super) fn new(
        agent: Arc<Agent>,
        config: LinkConfig,
        topics: Topics,
        options: MqttOptions,
        shared_connected: Arc<AtomicBool>,
    ) -> Result<Session, LinkError> {
        // Room for every publish the windows allow plus status and subscriptions.
        let capacity = config.window as usize + config.telemetry_window + EVENT_WINDOW + 64;
        let (client, mut eventloop) = AsyncClient::new(options, capacity);
        // Chunk requests and acknowledgements are small writes the next chunk waits on: with
        // Nagle's algorithm they can sit in the kernel until the broker's delayed ACK.
        eventloop.network_options.set_tcp_nodelay(true);
        let events = EventPump::open(agent.store())?;
        let (reports, _) = mpsc::unbounded_channel();
        Ok(Session {
            metrics: agent.link_metrics.clone(),
            topics: DeviceTopics::new(&topics, &config.device_id),
            latest_event: *agent.subscribe_events().borrow(),
            agent,
            config,
            client,
            eventloop: Some(eventloop),
            shared_connected,
            connected: false,
            server_online: false,
            awaiting_presence_since: None,
            closing: false,
            goodbye_acked: false,
            tracker: AckTracker::default(),
            events,
            telemetry: TelemetryPump::default(),
            fetching: BTreeMap::new(),
            disk: HashMap::new(),
            busy: HashMap::new(),
            reports,
            reported: None,
            refusals: Refusals::default(),
        })
    }

    pub(super) async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        let (reports, mut reports_rx) = mpsc::unbounded_channel();
        self.reports = reports;
        let mut changes = self.agent.subscribe_events();
        self.resume_stored_transfers();
        let seed = {
            // Devices of one process or one moment differ at least by the process's random key.
            use std::hash::{BuildHasher, Hash, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            self.config.device_id.hash(&mut h);
            chrono::Utc::now().timestamp_micros().hash(&mut h);
            h.finish()
        };
        let mut backoff = Backoff::new(self.config.backoff_min, self.config.backoff_max, seed);
        let eventloop = self
            .eventloop
            .take()
            .expect("the event loop is there at start");
        let mut polling: Polling = Box::pin(poll(eventloop, Duration::ZERO));
        let mut tick = tokio::time::interval(self.config.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                (mut eventloop, result) = &mut polling => {
                    let delay = match result {
                        Ok(event) => {
                            if matches!(event, Event::Incoming(Packet::ConnAck(_))) {
                                backoff.reset();
                            }
                            self.on_event(event);
                            Duration::ZERO
                        }
                        Err(e) => {
                            self.on_connection_lost(&mut eventloop, &e);
                            let delay = backoff.next_delay();
                            tracing::debug!(device = %self.config.device_id, "reconnecting in {delay:?}");
                            delay
                        }
                    };
                    polling = Box::pin(poll(eventloop, delay));
                }
                _ = tick.tick() => self.on_tick(),
                Ok(()) = changes.changed() => {
                    self.latest_event = *changes.borrow_and_update();
                    self.on_agent_change();
                }
                Some(report) = reports_rx.recv() => self.on_worker_report(report),
                _ = &mut stop => break,
            }
        }
        self.goodbye(polling).await;
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Incoming(Packet::ConnAck(ack)) => self.on_connected(ack.session_present),
            Event::Incoming(Packet::Publish(p)) => {
                if p.topic == self.topics.chunk {
                    self.on_chunk(p.payload);
                } else if p.topic == self.topics.commands {
                    self.on_command(&p.payload);
                } else if p.topic == self.topics.keyring {
                    self.on_keyring(&p.payload);
                } else if p.topic == self.topics.server {
                    self.on_server_presence(&p.payload);
                } else {
                    LinkMetrics::inc(&self.metrics.unexpected_messages_total);
                    tracing::debug!(topic = %p.topic, "message on a topic the agent does not read");
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(item) = self.tracker.acked(ack.pkid) {
                    self.on_acked(item);
                }
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if self.tracker.sent(pkid) == Sent::Untracked {
                    tracing::debug!(pkid, "a publish the link did not queue");
                }
            }
            _ => {}
        }
    }

    fn on_connected(&mut self, session_present: bool) {
        tracing::info!(device = %self.config.device_id, broker = %self.config.broker_url,
                       session_present, "connected");
        self.connected = true;
        self.set_server_online(false);
        self.awaiting_presence_since = Some(Instant::now());
        // Retained messages come with a new subscription; a broker that kept this session's
        // subscription (rumqttd) does not send them again for a repeated SUBSCRIBE, so the
        // presence topic is subscribed afresh.
        if let Err(e) = self.client.try_unsubscribe(self.topics.server.clone()) {
            tracing::warn!(
                "cannot renew the subscription to {}: {e}",
                self.topics.server
            );
        }
        self.shared_connected.store(true, Ordering::Relaxed);
        self.metrics.connected.store(1, Ordering::Relaxed);
        LinkMetrics::inc(&self.metrics.connects_total);
        for topic in [
            &self.topics.commands,
            &self.topics.chunk,
            &self.topics.keyring,
            &self.topics.server,
        ] {
            if let Err(e) = self.client.try_subscribe(topic.clone(), QoS::AtLeastOnce) {
                tracing::warn!("cannot subscribe to {topic}: {e}");
            }
        }
        self.reported = None;
        self.publish_status_if_changed();
        self.pump_events();
        self.pump_telemetry();
        let ids: Vec<String> = self.fetching.keys().cloned().collect();
        for id in ids {
            self.request_chunks(&id);
        }
    }

    fn on_connection_lost(&mut self, eventloop: &mut EventLoop, error: &ConnectionError) {
        if self.connected {
            tracing::warn!(device = %self.config.device_id, "connection lost: {error}");
        } else {
            tracing::debug!(device = %self.config.device_id, "cannot connect: {error}");
        }
        LinkMetrics::inc(&self.metrics.connection_errors_total);
        self.connected = false;
        self.set_server_online(false);
        self.awaiting_presence_since = None;
        self.shared_connected.store(false, Ordering::Relaxed);
        self.metrics.connected.store(0, Ordering::Relaxed);
        // What rumqttc read before the error (acks, chunks) still counts.
        while let Some(event) = eventloop.state.events.pop_front() {
            self.on_event(event);
        }
        // Drop rumqttc's retransmissions (and the collided publish, if any): the link re-sends
        // from its durable state, whether or not the broker kept the session.
        eventloop.pending.clear();
        eventloop.state.collision = None;
        self.tracker.reset();
        self.events.reset();
        if let Err(e) = self.telemetry.reset(&self.agent.outbox) {
            tracing::error!("telemetry outbox: {e}");
        }
        for t in self.fetching.values_mut() {
            t.forget_requests();
        }
        self.checkpoint_all(false);
    }

    fn on_tick(&mut self) {
        if let Some(since) = self.awaiting_presence_since {
            if self.connected && since.elapsed() >= PRESENCE_TIMEOUT {
                tracing::warn!(device = %self.config.device_id,
                    "no presence of the fleet server within {PRESENCE_TIMEOUT:?} of connecting \
                     (a broker without retained messages?): publishing events and telemetry anyway");
                self.awaiting_presence_since = None;
                self.set_server_online(true);
            }
        }
        self.pump_events();
        self.pump_telemetry();
        match self.telemetry.flush(&self.agent.outbox, true) {
            Ok(_) => {}
            Err(e) => tracing::error!("telemetry outbox: {e}"),
        }
        if let Err(e) = self.events.persist(self.agent.store()) {
            tracing::error!("event cursor: {e}");
        }
        let due: Vec<String> = self
            .fetching
            .iter()
            .filter(|(_, t)| t.unsynced() > 0 && t.since_checkpoint() >= CHECKPOINT_AFTER)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            self.checkpoint(&id, false);
        }
        let ids: Vec<String> = self.fetching.keys().cloned().collect();
        for id in ids {
            self.request_chunks(&id);
        }
    }

    fn on_agent_change(&mut self) {
        self.pump_events();
        self.publish_status_if_changed();
    }

    fn on_acked(&mut self, item: Item) {
        match item {
            Item::Event(seq) => {
                LinkMetrics::inc(&self.metrics.events_acked_total);
                self.events.acked(seq);
                self.pump_events();
            }
            Item::Telemetry(id) => {
                LinkMetrics::inc(&self.metrics.telemetry_acked_total);
                self.telemetry.acked(id);
                if let Err(e) = self.telemetry.flush(&self.agent.outbox, false) {
                    tracing::error!("telemetry outbox: {e}");
                }
                if self.telemetry.more
                    && self.telemetry.in_flight() <= self.config.telemetry_window / 2
                {
                    self.pump_telemetry();
                }
            }
            Item::Goodbye => self.goodbye_acked = true,
            Item::Status | Item::ChunkRequest => {}
        }
    }

    /// Queues a QoS 1 publish; false if not connected (or closing) or the client queue is full.
    fn publish(&mut self, topic: &str, payload: Vec<u8>, retain: bool, item: Item) -> bool {
        if !self.connected || (self.closing && item != Item::Goodbye) {
            return false;
        }
        match self
            .client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
        {
            Ok(()) => {
                self.tracker.queued(item);
                true
            }
            Err(e) => {
                LinkMetrics::inc(&self.metrics.publish_backpressure_total);
                tracing::debug!("publish deferred: {e}");
                false
            }
        }
    }

    fn publish_status_if_changed(&mut self) {
        if !self.connected {
            return;
        }
        let status = match device_status(&self.agent, &self.config, true) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot read the agent status: {e}");
                return;
            }
        };
        if self.reported.is_some() && self.reported == status.models {
            return;
        }
        let topic = self.topics.status.clone();
        if self.publish(&topic, link::encode(&status), true, Item::Status) {
            LinkMetrics::inc(&self.metrics.status_published_total);
            self.reported = status.models;
        }
    }

    fn pump_events(&mut self) {
        if !self.connected || !self.server_online || self.closing {
            return;
        }
        let room = self.events.room(EVENT_WINDOW);
        if room == 0 || self.events.after() >= self.latest_event {
            return;
        }
        let events = match self.agent.events(self.events.after(), room) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("cannot read events: {e}");
                return;
            }
        };
        let topic = self.topics.events.clone();
        for e in events {
            let seq = e.seq;
            let message = DeviceEvent {
                schema: LINK_SCHEMA,
                device_id: self.config.device_id.clone(),
                seq,
                time: e.time,
                kind: e.kind,
                model: e.model,
                version: e.version,
                rollout_id: e.rollout_id,
                command_id: e.command_id,
                detail: e.detail,
            };
            if !self.publish(&topic, link::encode(&message), false, Item::Event(seq)) {
                break;
            }
            LinkMetrics::inc(&self.metrics.events_published_total);
            self.events.published(seq);
        }
    }

    fn pump_telemetry(&mut self) {
        if !self.connected || !self.server_online || self.closing {
            return;
        }
        let records = match self
            .telemetry
            .due(&self.agent.outbox, self.config.telemetry_window)
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("telemetry outbox: {e}");
                return;
            }
        };
        let topic = self.topics.telemetry.clone();
        for r in records {
            if !self.publish(&topic, r.json, false, Item::Telemetry(r.id)) {
                break;
            }
            LinkMetrics::inc(&self.metrics.telemetry_published_total);
            self.telemetry.published(r.id);
        }
    }

    // ---- commands ----

    fn on_command(&mut self, payload: &[u8]) {
        LinkMetrics::inc(&self.metrics.commands_total);
        let checked = command_check::check(
            &self.agent,
            self.config.server_key.as_ref(),
            &self.config.device_id,
            payload,
        );
        let command: Command = match checked {
            Ok(c) => c,
            Err(CheckError::Refused(refusal)) => {
                self.refusals.refuse(&self.agent, &self.metrics, &refusal);
                return;
            }
            Err(CheckError::Store(e)) => {
                tracing::error!(device = %self.config.device_id, "command not obeyed: {e}");
                return;
            }
        };
        let context = EventContext {
            command_id: Some(command.command_id.clone()),
            rollout_id: command.rollout_id.clone(),
        };
        tracing::info!(device = %self.config.device_id, command = %command.command_id, "command: {:?}", command.action);
        match command.action {
            Action::Stage { bundle } => self.stage(bundle, context),
            Action::Revert { model, version } => self.revert(model, version, context),
            Action::CancelTransfer { bundle_id } => self.cancel(&bundle_id, context),
        }
    }

    /// The fleet's keyring chain (retained): rotations newer than the agent's keyring are
    /// checked step by step and persisted; anything else changes nothing.
    fn on_keyring(&mut self, payload: &[u8]) {
        let chain: KeyringChain = match link::decode(payload) {
            Ok(c) => c,
            Err(e) => {
                LinkMetrics::inc(&self.metrics.malformed_messages_total);
                tracing::warn!("keyring chain refused: {e}");
                return;
            }
        };
        match keyring_store::apply_chain(&self.agent, &chain) {
            Ok(Some(version)) => {
                LinkMetrics::inc(&self.metrics.keyring_updates_total);
                tracing::info!(version, "keyring rotated");
            }
            Ok(None) => {}
            Err(e) => {
                LinkMetrics::inc(&self.metrics.keyring_updates_refused_total);
                tracing::warn!("keyring chain refused: {e}");
                self.record(AgentEvent::new(
                    "keyring_update_refused",
                    None,
                    None,
                    json!({"reason": "does_not_verify", "error": e.to_string()}),
                ));
            }
        }
    }

    /// The server's retained presence: events and telemetry are held while it is offline (or
    /// not yet seen on this connection).
    fn on_server_presence(&mut self, payload: &[u8]) {
        let presence: ServerPresence = match link::decode(payload) {
            Ok(p) => p,
            Err(e) => {
                LinkMetrics::inc(&self.metrics.malformed_messages_total);
                tracing::warn!("server presence refused: {e}");
                return;
            }
        };
        tracing::info!(device = %self.config.device_id, online = presence.online, "server presence");
        self.awaiting_presence_since = None;
        self.set_server_online(presence.online);
        if presence.online {
            self.pump_events();
            self.pump_telemetry();
        }
    }

    fn set_server_online(&mut self, online: bool) {
        self.server_online = online;
        let awaiting = self.connected && !online;
        self.metrics
            .awaiting_server
            .store(u64::from(awaiting), Ordering::Relaxed);
    }

    fn record(&self, event: AgentEvent) {
        if let Err(e) = self.agent.record(&[event]) {
            tracing::error!("cannot record an event: {e}");
        }
    }

    fn stage(&mut self, mut bundle: BundleRef, context: EventContext) {
        if bundle.chunk_size == 0 {
            bundle.chunk_size = self.config.chunk_size;
        }
        let problem = if !transfer::valid_bundle_id(&bundle.bundle_id) {
            Some("bundle_id is not a lowercase sha256")
        } else if bundle.chunk_size > MAX_CHUNK_SIZE {
            Some("chunk_size is over the limit")
        } else if bundle.size == 0 || bundle.size > MAX_BUNDLE_SIZE {
            Some("size is out of range")
        } else {
            None
        };
        if let Some(problem) = problem {
            LinkMetrics::inc(&self.metrics.malformed_messages_total);
            tracing::warn!(bundle = %bundle.bundle_id, "stage refused: {problem}");
            self.record(
                AgentEvent::new("transfer_failed", Some(&bundle.name), Some(&bundle.version),
                    json!({"bundle_id": bundle.bundle_id, "reason": "invalid_command", "error": problem}))
                .with_context(&context),
            );
            return;
        }
        let id = bundle.bundle_id.clone();
        if let Ok(status) = self.agent.status() {
            let active = status.models.iter().find(|m| {
                m.name == bundle.name && (m.active == bundle.version || m.bundle_sha256 == id)
            });
            if let Some(m) = active {
                tracing::info!(model = %m.name, version = %m.active, "stage skipped: already active");
                self.record(
                    AgentEvent::new(
                        "already_active",
                        Some(&bundle.name),
                        Some(&bundle.version),
                        json!({"bundle_id": id, "reason": "this version is already active",
                               "active_bundle_sha256": m.bundle_sha256}),
                    )
                    .with_context(&context),
                );
                return;
            }
        }
        if self.fetching.contains_key(&id) || self.busy.contains_key(&id) {
            tracing::info!(bundle = %id, "stage: this bundle is already being fetched or installed");
            return;
        }
        match Transfer::create(
            &self.agent,
            bundle.clone(),
            context.clone(),
            self.config.transfer,
        ) {
            Ok(t) => {
                LinkMetrics::inc(&self.metrics.transfers_started_total);
                self.begin(t);
            }
            Err(e) => {
                LinkMetrics::inc(&self.metrics.transfers_failed_total);
                tracing::error!(bundle = %id, "cannot start the transfer: {e}");
                self.record(
                    AgentEvent::new(
                        "transfer_failed",
                        Some(&bundle.name),
                        Some(&bundle.version),
                        json!({"bundle_id": id, "reason": "disk_error", "error": e.to_string()}),
                    )
                    .with_context(&context),
                );
                transfer::discard(&self.agent, &id);
            }
        }
    }

    /// Transfers stored by an earlier run: resume (or, if complete, install).
    fn resume_stored_transfers(&mut self) {
        let records: Vec<(String, TransferRecord)> = match self.agent.store().transfers() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("cannot read stored transfers: {e}");
                return;
            }
        };
        let known: HashSet<String> = records.iter().map(|(id, _)| format!("{id}.part")).collect();
        if let Ok(dir) = std::fs::read_dir(self.agent.layout().transfers()) {
            for entry in dir.flatten() {
                if !known.contains(entry.file_name().to_string_lossy().as_ref()) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        for (id, mut record) in records {
            if !transfer::valid_bundle_id(&id) || id != record.bundle.bundle_id {
                transfer::discard(&self.agent, &id);
                continue;
            }
            record.transport = self.config.transfer;
            match Transfer::resume(&self.agent, record) {
                Ok(t) => {
                    tracing::info!(bundle = %id, have = t.received().count(), of = t.received().len(), "resuming transfer");
                    LinkMetrics::inc(&self.metrics.transfers_started_total);
                    self.record(t.started_event());
                    self.begin(t);
                }
                Err(e) => {
                    tracing::error!(bundle = %id, "cannot resume the transfer: {e}");
                    transfer::discard(&self.agent, &id);
                }
            }
        }
    }

    /// Fetches a transfer over MQTT (here, with its disk worker) or HTTP (blocking thread), or
    /// installs it if complete.
    fn begin(&mut self, t: Transfer) {
        if t.is_complete() || t.transport == TransferMode::Http {
            self.hand_off(t);
            return;
        }
        let id = t.id().to_string();
        let worker = t.file_handle().and_then(|file| {
            TransferWorker::start(
                self.agent.clone(),
                &t.bundle,
                t.path.clone(),
                file,
                t.received().count(),
                self.reports.clone(),
            )
        });
        match worker {
            Ok(worker) => {
                self.disk.insert(id.clone(), worker);
                self.fetching.insert(id.clone(), t);
                self.request_chunks(&id);
            }
            Err(e) => self.fail(t, "disk_error", &e.to_string()),
        }
    }

    fn on_worker_report(&mut self, report: WorkerReport) {
        match report {
            WorkerReport::DiskError {
                bundle_id,
                generation,
                error,
            } => {
                if !self.is_current_worker(&bundle_id, generation) {
                    return;
                }
                if let Some(t) = self.fetching.remove(&bundle_id) {
                    self.fail(t, "disk_error", &error);
                }
            }
            WorkerReport::Synced {
                bundle_id,
                generation,
            } => {
                if self.is_current_worker(&bundle_id, generation) {
                    self.request_chunks(&bundle_id);
                }
            }
            WorkerReport::Done { bundle_id } => {
                self.busy.remove(&bundle_id);
            }
        }
    }

    /// Whether `generation` is the worker of the transfer of `bundle_id` being fetched now (and
    /// not one stopped before a new transfer of the same bundle began).
    fn is_current_worker(&self, bundle_id: &str, generation: u64) -> bool {
        self.disk
            .get(bundle_id)
            .is_some_and(|worker| worker.generation() == generation)
    }

    /// Gives a transfer to a blocking thread: HTTP download if incomplete, then hash check and
    /// install.
    fn hand_off(&mut self, mut t: Transfer) {
        let id = t.id().to_string();
        let cancel = Arc::new(AtomicBool::new(false));
        self.busy.insert(id.clone(), cancel.clone());
        let agent = self.agent.clone();
        let done = self.reports.clone();
        tokio::task::spawn_blocking(move || {
            if !t.is_complete() {
                if let Err(e) = http_fetch::fetch(&agent, &mut t, &cancel) {
                    if !matches!(e, HttpFetchError::Cancelled) {
                        LinkMetrics::inc(&agent.link_metrics.transfers_failed_total);
                        tracing::warn!(bundle = %id, "bundle download failed: {e}");
                        let _ = agent.record(&[t.event(
                            "transfer_failed",
                            json!({"bundle_id": id, "reason": e.reason(), "error": e.to_string()}),
                        )]);
                    }
                    drop(t);
                    transfer::discard(&agent, &id);
                    let _ = done.send(WorkerReport::Done { bundle_id: id });
                    return;
                }
            }
            let (bundle, context, path, elapsed) = (
                t.bundle.clone(),
                t.context.clone(),
                t.path.clone(),
                t.elapsed(),
            );
            drop(t);
            transfer::finish(&agent, &bundle, &context, &path, elapsed, None);
            let _ = done.send(WorkerReport::Done { bundle_id: id });
        });
    }

    fn revert(&mut self, model: String, version: Option<String>, context: EventContext) {
        let agent = self.agent.clone();
        tokio::task::spawn_blocking(move || {
            let result = agent.revert_with(
                &model,
                "fleet_command",
                json!({"command_id": context.command_id, "rollout_id": context.rollout_id}),
                &context,
                version.as_deref(),
            );
            if let Err(e) = result {
                tracing::warn!(%model, "revert command not carried out: {e}");
                let _ = agent.record(&[AgentEvent::new(
                    "command_failed",
                    Some(&model),
                    version.as_deref(),
                    json!({"command": "revert", "error": e.to_string()}),
                )
                .with_context(&context)]);
            }
        });
    }

    fn cancel(&mut self, bundle_id: &str, context: EventContext) {
        if let Some(t) = self.fetching.remove(bundle_id) {
            let event = t.event(
                "transfer_cancelled",
                json!({"bundle_id": bundle_id,
                "chunks_received": t.received().count(), "chunks": t.received().len()}),
            );
            self.stop_worker(bundle_id);
            drop(t);
            transfer::discard(&self.agent, bundle_id);
            self.record(event.with_context(&context));
        } else if let Some(flag) = self.busy.get(bundle_id) {
            // An HTTP download stops at its next chunk; an install already running completes.
            flag.store(true, Ordering::Relaxed);
            self.record(
                AgentEvent::new(
                    "transfer_cancelled",
                    None,
                    None,
                    json!({"bundle_id": bundle_id}),
                )
                .with_context(&context),
            );
        } else {
            tracing::info!(bundle = %bundle_id, "cancel: no such transfer");
        }
    }

    // ---- chunks ----

    fn on_chunk(&mut self, frame: bytes::Bytes) {
        let (header, bytes) = match link::decode_chunk(&frame) {
            Ok(x) => x,
            Err(link::LinkError::ChunkHash {
                bundle_id, index, ..
            }) => {
                LinkMetrics::inc(&self.metrics.chunks_bad_hash_total);
                tracing::warn!(bundle = %bundle_id, index, "chunk with a bad hash: asking again");
                if let Some(t) = self.fetching.get_mut(&bundle_id) {
                    t.forget_request(index);
                    self.request_chunks(&bundle_id);
                }
                return;
            }
            Err(e) => {
                LinkMetrics::inc(&self.metrics.malformed_messages_total);
                tracing::warn!("chunk frame refused: {e}");
                return;
            }
        };
        let id = header.bundle_id.clone();
        if let Some(error) = &header.error {
            LinkMetrics::inc(&self.metrics.chunk_error_frames_total);
            match self.fetching.remove(&id) {
                Some(t) => {
                    tracing::warn!(bundle = %id, "the server cannot serve the bundle: {error}");
                    self.fail(t, "server_error", error);
                }
                None => tracing::debug!(bundle = %id, "error frame for no transfer: {error}"),
            }
            return;
        }
        let Some(t) = self.fetching.get_mut(&id) else {
            LinkMetrics::inc(&self.metrics.chunks_unknown_transfer_total);
            tracing::debug!(bundle = %id, index = header.index, "chunk for no transfer in progress");
            return;
        };
        if header.chunk_size != t.bundle.chunk_size || header.total != t.received().len() {
            LinkMetrics::inc(&self.metrics.chunks_unknown_transfer_total);
            tracing::warn!(bundle = %id, "chunk frame disagrees with the transfer's chunk size or count");
            return;
        }
        match t.write_chunk(header.index, bytes) {
            Ok(true) => {
                LinkMetrics::inc(&self.metrics.chunks_received_total);
                LinkMetrics::add(&self.metrics.chunk_bytes_total, bytes.len() as u64);
                if let Some(disk) = self.disk.get(&id) {
                    disk.chunk(header.index, frame.slice_ref(bytes));
                    if let Some(event) = t.progress_event() {
                        disk.progress(event);
                    }
                    if t.unsynced() >= CHECKPOINT_CHUNKS && !disk.sync_queued() {
                        if let Some(record) = t.take_checkpoint() {
                            disk.checkpoint(record, t.received().count());
                        }
                    }
                }
            }
            Ok(false) => LinkMetrics::inc(&self.metrics.chunks_duplicate_total),
            Err(ChunkError::Io(e)) => {
                let t = self.fetching.remove(&id).expect("present above");
                self.fail(t, "disk_error", &e.to_string());
                return;
            }
            Err(e) => {
                LinkMetrics::inc(&self.metrics.malformed_messages_total);
                tracing::warn!(bundle = %id, "chunk refused: {e}");
                return;
            }
        }
        if self.fetching.get(&id).is_some_and(|t| t.is_complete()) {
            let t = self.fetching.remove(&id).expect("present above");
            self.complete(t);
        } else {
            self.request_chunks(&id);
        }
    }

    /// Publishes requests for what a transfer's window has room for.
    fn request_chunks(&mut self, id: &str) {
        if !self.connected || self.closing {
            return;
        }
        let window = self.config.window.max(1);
        let Some(t) = self.fetching.get_mut(id) else {
            return;
        };
        // The disk is behind: wait for its next checkpoint (reported) before asking for more.
        if let Some(disk) = self.disk.get(id) {
            if t.received().count().saturating_sub(disk.synced()) > MAX_UNSYNCED_CHUNKS {
                return;
            }
        }
        let (ranges, timed_out) = t.plan_requests(
            Instant::now(),
            window,
            self.config.request_timeout,
            (window / 4).max(1),
        );
        let chunk_size = t.bundle.chunk_size;
        if timed_out > 0 {
            LinkMetrics::add(&self.metrics.chunk_request_timeouts_total, timed_out as u64);
            tracing::debug!(bundle = %id, timed_out, "chunks did not arrive in time: asking again");
        }
        let topic = self.topics.request.clone();
        for (first, count) in ranges {
            let request = ChunkRequest {
                schema: LINK_SCHEMA,
                bundle_id: id.to_string(),
                chunk_size,
                first,
                count,
            };
            if self.publish(&topic, link::encode(&request), false, Item::ChunkRequest) {
                LinkMetrics::inc(&self.metrics.chunk_requests_total);
                LinkMetrics::add(&self.metrics.chunks_requested_total, count as u64);
            } else if let Some(t) = self.fetching.get_mut(id) {
                for i in first..first + count {
                    t.forget_request(i);
                }
            }
        }
    }

    /// Queues a checkpoint of a transfer's chunks written since the last one on its disk
    /// worker, unless one is queued already (a failure comes back as
    /// [`WorkerReport::DiskError`]); `wait`: queue it in any case and return once done.
    fn checkpoint(&mut self, id: &str, wait: bool) {
        let (Some(t), Some(disk)) = (self.fetching.get_mut(id), self.disk.get(id)) else {
            return;
        };
        let covers = t.received().count();
        if wait {
            if let Some(record) = t.take_checkpoint() {
                disk.checkpoint_and_wait(record, covers);
            }
        } else if !disk.sync_queued() {
            if let Some(record) = t.take_checkpoint() {
                disk.checkpoint(record, covers);
            }
        }
    }

    fn checkpoint_all(&mut self, wait: bool) {
        let ids: Vec<String> = self.fetching.keys().cloned().collect();
        for id in ids {
            self.checkpoint(&id, wait);
        }
    }

    /// Every chunk is written: the disk worker makes them durable, then checks the hash and
    /// installs.
    fn complete(&mut self, mut t: Transfer) {
        let id = t.id().to_string();
        let Some(disk) = self.disk.remove(&id) else {
            // Not reached (every transfer in `fetching` has its worker); kept safe anyway.
            match t.checkpoint(&self.agent) {
                Ok(()) => self.hand_off(t),
                Err(e) => self.fail(t, "disk_error", &e.to_string()),
            }
            return;
        };
        tracing::info!(bundle = %id, seconds = t.elapsed().as_secs_f64(), "all chunks received");
        let covers = t.received().count();
        if let Some(record) = t.take_checkpoint() {
            disk.checkpoint(record, covers);
        }
        self.busy.insert(id, Arc::new(AtomicBool::new(false)));
        disk.finish(t.bundle.clone(), t.context.clone(), t.elapsed());
    }

    /// Stops a transfer's disk worker, if it has one (nothing it had queued is written after).
    fn stop_worker(&mut self, id: &str) {
        if let Some(disk) = self.disk.remove(id) {
            disk.stop();
        }
    }

    fn fail(&mut self, t: Transfer, reason: &str, error: &str) {
        LinkMetrics::inc(&self.metrics.transfers_failed_total);
        let id = t.id().to_string();
        let event = t.event(
            "transfer_failed",
            json!({"bundle_id": id, "reason": reason, "error": error}),
        );
        self.stop_worker(&id);
        drop(t);
        transfer::discard(&self.agent, &id);
        self.record(event);
    }

    // ---- shutdown ----

    /// The clean end: durable state first, then an offline status the broker acknowledged,
    /// then DISCONNECT (so the broker does not publish the last will).
    async fn goodbye(mut self, mut polling: Polling) {
        self.checkpoint_all(true);
        if let Err(e) = self.telemetry.flush(&self.agent.outbox, true) {
            tracing::error!("telemetry outbox: {e}");
        }
        let _ = self.events.persist(self.agent.store());
        if self.connected {
            self.closing = true;
            match device_status(&self.agent, &self.config, false) {
                Ok(status) => {
                    let topic = self.topics.status.clone();
                    self.publish(&topic, link::encode(&status), true, Item::Goodbye);
                }
                Err(e) => tracing::error!("cannot read the agent status: {e}"),
            }
            let deadline = tokio::time::Instant::now() + GOODBYE_TIMEOUT;
            let mut disconnecting = false;
            loop {
                let Ok((eventloop, result)) = tokio::time::timeout_at(deadline, &mut polling).await
                else {
                    break;
                };
                let Ok(event) = result else {
                    break;
                };
                if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
                    break;
                }
                self.on_event(event);
                if self.goodbye_acked && !disconnecting {
                    disconnecting = true;
                    let _ = self.client.try_disconnect();
                }
                polling = Box::pin(poll(eventloop, Duration::ZERO));
            }
            // Acks that arrived while closing.
            let _ = self.telemetry.flush(&self.agent.outbox, true);
            let _ = self.events.persist(self.agent.store());
        }
        self.shared_connected.store(false, Ordering::Relaxed);
        self.metrics.connected.store(0, Ordering::Relaxed);
        tracing::info!(device = %self.config.device_id, "link stopped");
    }
}
