//! The modelfleet device agent.
//!
//! One process per device. It installs signed model bundles into A/B slots, serves the active
//! models through the Open Inference Protocol v2 REST API, and keeps a device with a model it can
//! serve whatever happens: a rejected bundle leaves the serving model untouched, and a crash at
//! any point of an install leaves either the old or the new model, both fully verified.
//!
//! # A tour
//!
//! ```no_run
//! use std::sync::Arc;
//! use agent::{Agent, AgentConfig};
//! # fn main() -> anyhow::Result<()> {
//! let keyring = protocol::keys::Keyring::from_file_text(&std::fs::read_to_string("fleet.pub")?)?;
//! let agent = Arc::new(Agent::open(AgentConfig::new("/var/lib/modelfleet"), keyring)?);
//! let installed = agent.install(&std::fs::read("digits_cnn.mfb")?)?;
//! println!("serving {} {}", installed.model, installed.version);
//! // Serve OIP v2 on loopback: POST /v2/models/digits_cnn/infer
//! let router = agent::http::router(agent.clone(), None);
//! # let _ = router; Ok(()) }
//! ```
//!
//! # Map
//! - [`agent`]: the core — open a data directory, install, revert, status.
//! - [`backend`]: what runs a model (the [`backend::LoadedModel`] trait; tract ships).
//! - [`install`]: the install path's checks: verify, floor, target, load, golden self-test.
//! - [`slots`]: data-directory layout and crash-safe file operations.
//! - [`store`]: durable state in redb (slot records, security floors, events).
//! - [`serving`]: the registry of loaded models, the bounded inference pool, request metrics.
//! - [`health`]: live health figures per model version and the trial verdict.
//! - [`outbox`]: the durable, bounded telemetry outbox (peek / ack for the publisher).
//! - [`watch`]: the health watch thread — trials judged every tick, automatic revert or commit.
//! - [`oip`]: Open Inference Protocol v2 request/response codec (JSON and binary tensors).
//! - [`http`]: the local HTTP API (OIP, `/metrics`, `/admin/v1`).
//! - [`link`]: the MQTT link to the fleet — retained status and last will, commands, resumable
//!   chunked bundle transfer (or HTTP Range), events with a durable cursor, telemetry drained
//!   from the outbox on acknowledgement. Started with [`link::Link::start`]; without it the agent
//!   serves offline.
//! - [`model_cache`]: loaded models shared by the agents of one process when their bytes are
//!   identical (the simulated fleet).
//! - [`simulate`]: many real agents in one process with synthetic traffic (the demo's and the
//!   scale tests' fleet).
//! - [`config`]: `agent.toml`.
//! - [`keyring_store`]: keyring rotations received from the fleet, checked and persisted.
//!
//! What the agent must not know: how a bundle was built (only what its manifest says), and tract
//! itself — models are run through a [`backend::Backend`] (tract's lives in the `engine` crate),
//! so nothing outside [`backend`] names a runtime.

pub mod agent;
pub mod backend;
pub mod config;
pub mod health;
pub mod http;
pub mod install;
pub mod keyring_store;
pub mod link;
pub mod model_cache;
pub mod oip;
pub mod outbox;
pub mod serving;
pub mod simulate;
pub mod slots;
pub mod store;
pub mod watch;

pub use crate::agent::{Agent, AgentConfig, AgentError, Installed, Status};
