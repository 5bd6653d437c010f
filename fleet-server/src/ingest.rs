//! What the server does with the messages devices publish: status → registry, events → event
//! log, telemetry → in-memory windows. Anything malformed is logged, counted and dropped.

use std::sync::atomic::Ordering::Relaxed;

use chrono::Utc;
use protocol::link::{self, Channel, DeviceEvent, DeviceStatus, LinkError};
use protocol::telemetry::{TelemetryRecord, TELEMETRY_SCHEMA};
use serde_json::json;

use crate::fleet::Fleet;
use crate::store::{Batch, DeviceRecord, Event};

/// Largest telemetry record accepted (sampled requests can carry sizeable tensors).
pub const MAX_TELEMETRY_MESSAGE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("payload names device '{payload}' but arrived on the topic of '{topic}'")]
    WrongDevice { topic: String, payload: String },
    #[error("telemetry of {0} bytes is over the {MAX_TELEMETRY_MESSAGE} byte limit")]
    TelemetryTooLarge(usize),
    #[error("malformed telemetry: {0}")]
    Telemetry(serde_json::Error),
    #[error("telemetry schema {0} is not supported (this build reads {TELEMETRY_SCHEMA})")]
    TelemetrySchema(u32),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
}

impl Fleet {
    /// Handles one message from `device` on `channel` (status, events or telemetry); never panics
    /// on bad input. Blocking (writes the store).
    pub fn ingest(&self, device: &str, channel: Channel, payload: &[u8]) {
        self.ingest_batch([(device, channel, payload)]);
    }

    /// Handles several messages in order, as [`Fleet::ingest`] does one, with one store commit
    /// for all of them: what the ingest thread does with the messages that queued up while it
    /// was busy. A commit is a disk sync: with one per message, a fan-out to 2,000 devices took
    /// twice as long and twice the server's CPU (BENCHMARKS.md, "Fleet scale", session 10). If
    /// the commit fails, the batch's status updates and events are lost together (counted in
    /// `fleet_store_errors_total`); telemetry is kept.
    pub fn ingest_batch<'a>(
        &self,
        messages: impl IntoIterator<Item = (&'a str, Channel, &'a [u8])>,
    ) {
        let mut stored = 0u64;
        let committed = self.store.batch(|batch| {
            for (device, channel, payload) in messages {
                self.metrics.received(channel);
                self.heard_from(device);
                let result = match channel {
                    Channel::Status => self.on_status(batch, device, payload),
                    Channel::Events => self.on_event(batch, device, payload),
                    Channel::Telemetry => self.on_telemetry(device, payload),
                    _ => Ok(()),
                };
                if result.is_ok() && matches!(channel, Channel::Status | Channel::Events) {
                    stored += 1;
                }
                self.count_result(device, channel, result);
            }
        });
        if let Err(e) = committed {
            self.metrics.store_errors.fetch_add(stored, Relaxed);
            tracing::error!(messages = stored, error = %e, "cannot store a batch of device messages");
        }
    }

    fn count_result(&self, device: &str, channel: Channel, result: Result<(), IngestError>) {
        match result {
            Ok(()) => {}
            Err(IngestError::Store(e)) => {
                self.metrics.store_errors.fetch_add(1, Relaxed);
                tracing::error!(device, channel = channel.suffix(), error = %e, "cannot store message");
            }
            Err(e) => {
                if matches!(e, IngestError::WrongDevice { .. }) {
                    // Another device's topic, or a forged payload: see `crate::isolation`.
                    self.metrics.device_mismatch.fetch_add(1, Relaxed);
                }
                self.metrics.malformed(channel);
                tracing::warn!(device, channel = channel.suffix(), error = %e, "dropped malformed message");
            }
        }
    }

    fn on_status(
        &self,
        batch: &mut Batch,
        device: &str,
        payload: &[u8],
    ) -> Result<(), IngestError> {
        let status: DeviceStatus = link::decode(payload)?;
        if status.device_id != device {
            return Err(IngestError::WrongDevice {
                topic: device.into(),
                payload: status.device_id,
            });
        }
        let now = Utc::now();
        let actor = format!("device:{device}");
        batch.update_device(device, |current| {
            let mut events = Vec::new();
            let record = match current {
                None => {
                    events.push(
                        Event::new(
                            "device_registered",
                            &actor,
                            json!({"online": status.online, "labels": status.labels,
                                   "target": status.target, "agent_version": status.agent_version}),
                        )
                        .device(device),
                    );
                    DeviceRecord {
                        id: device.to_string(),
                        online: status.online,
                        last_seen: now,
                        first_seen: now,
                        status_time: status.time,
                        labels: status.labels,
                        target: status.target,
                        agent_version: status.agent_version,
                        models: status.models.unwrap_or_default(),
                    }
                }
                Some(mut d) => {
                    if d.online != status.online {
                        let kind = if status.online {
                            "device_online"
                        } else {
                            "device_offline"
                        };
                        events.push(Event::new(kind, &actor, json!({})).device(device));
                    }
                    d.online = status.online;
                    d.last_seen = now;
                    d.status_time = status.time;
                    // A last will (no models) knows nothing else: keep what we knew.
                    if let Some(models) = status.models {
                        if d.labels != status.labels {
                            events.push(
                                Event::new(
                                    "device_labels_changed",
                                    &actor,
                                    json!({"from": d.labels, "to": status.labels}),
                                )
                                .device(device),
                            );
                            d.labels = status.labels;
                        }
                        d.models = models;
                        if status.target.is_some() {
                            d.target = status.target;
                        }
                        if status.agent_version.is_some() {
                            d.agent_version = status.agent_version;
                        }
                    }
                    d
                }
            };
            (Some(record), events)
        })?;
        Ok(())
    }

    fn on_event(&self, batch: &mut Batch, device: &str, payload: &[u8]) -> Result<(), IngestError> {
        let e: DeviceEvent = link::decode(payload)?;
        if e.device_id != device {
            return Err(IngestError::WrongDevice {
                topic: device.into(),
                payload: e.device_id,
            });
        }
        if e.kind.starts_with("transfer_") {
            self.note_transfer_event(device, &e.kind, &e.detail);
        }
        let event = Event {
            seq: 0,
            time: e.time,
            kind: e.kind,
            actor: format!("device:{device}"),
            device_id: Some(device.to_string()),
            model: e.model,
            version: e.version,
            rollout_id: e.rollout_id,
            command_id: e.command_id,
            device_seq: Some(e.seq),
            detail: e.detail,
        };
        if !batch.append_device_event(event)? {
            self.metrics.duplicate_events.fetch_add(1, Relaxed);
        }
        Ok(())
    }

    fn on_telemetry(&self, device: &str, payload: &[u8]) -> Result<(), IngestError> {
        let record = decode_telemetry(payload)?;
        if !self.telemetry.record(device, record) {
            self.metrics.duplicate_windows.fetch_add(1, Relaxed);
        }
        Ok(())
    }
}

/// Parses a telemetry message, refusing oversize input and unknown schemas.
pub fn decode_telemetry(payload: &[u8]) -> Result<TelemetryRecord, IngestError> {
    if payload.len() > MAX_TELEMETRY_MESSAGE {
        return Err(IngestError::TelemetryTooLarge(payload.len()));
    }
    let record: TelemetryRecord =
        serde_json::from_slice(payload).map_err(IngestError::Telemetry)?;
    let schema = match &record {
        TelemetryRecord::Window(w) => w.schema,
        TelemetryRecord::Sample(s) => s.schema,
    };
    if schema != TELEMETRY_SCHEMA {
        return Err(IngestError::TelemetrySchema(schema));
    }
    Ok(record)
}
