//! # modelfleet-fleet-server: the control plane of a model fleet
//!
//! Devices run `fleet-agent`; each one keeps a model serving whatever happens to the network.
//! The fleet server is where an operator sees those devices and tells them what to run. It
//! knows three things — **devices** (from the status every agent publishes), **bundles**
//! (uploaded by build pipelines, verified against the server's keyring before they are kept)
//! and **events** (what devices report and what operators did) — and it does two things with
//! them: it sends **commands** (stage this bundle, revert that model) and it **serves the
//! bundle bytes** to a device that asks for them, in chunks over MQTT or by HTTP Range.
//!
//! Everything between server and agents travels over MQTT with the topics and messages of
//! [`protocol::link`]: a device's retained `status` (its last will marks it offline without
//! forgetting its models), its `events` (stored once per device sequence number, so QoS 1
//! redeliveries are harmless), its `telemetry` windows, and the `transfer/req` →
//! `transfer/chunk` exchange in which the device asks for ranges of chunks it lacks and the
//! server answers one verified frame per chunk. The server keeps one persistent MQTT session
//! (clean session off, a client id derived from its data directory) so what devices publish
//! while it restarts is delivered when it returns; it reconnects with jittered exponential
//! backoff and resubscribes on every connection. Chunk frames leave on a second, publish-only
//! connection at QoS 0 ([`bulk`]), so they do not queue in front of incoming chunk requests.
//!
//! The broker is either the **embedded** rumqttd ([`broker::EmbeddedBroker`], zero set-up,
//! in memory) or any **external** broker by URL (`mqtt://` or `mqtts://` with a CA file and an
//! optional client certificate). Several servers can share one broker and split the telemetry
//! between them with `--shared-subscription GROUP`: telemetry is then subscribed as
//! `$share/GROUP/{prefix}/devices/+/telemetry`, and the broker hands each record to one member
//! of the group (MQTT v5 shared subscriptions; Mosquitto also honours `$share` for v3.1.1
//! clients such as this one; rumqttd implements it too). Status, events and chunk requests stay
//! unshared: every server keeps the full registry and event log in its own data directory, and
//! every server holding the requested bundle answers a chunk request (duplicate frames are
//! harmless to an agent; upload a bundle to one server to avoid them).
//!
//! State that must survive lives in redb (`DATA_DIR/server.redb`, see [`store`]): devices,
//! bundle records, the event log (also the audit log: every mutation through the API or MQTT
//! is stored together with an event naming who did what, when), and API tokens (only their
//! hashes). Bundle bytes are files, `DATA_DIR/bundles/<sha256>.mfb`, written through a temp
//! file, an fsync and a rename. Telemetry is kept in memory only, per device, model and
//! version, bounded to the last 720 windows (two hours of 10 s windows) and 24 hours, and to
//! about 50,000 windows over the whole fleet (so 5 per device at 10,000 devices), plus the
//! last 20 sampled requests per device and model ([`telemetry::Retention`]); the rollout engine
//! sums a cohort's windows from it ([`rollout::gates::CohortFigures`]).
//!
//! The HTTP API lives under `/api/v1` and is described by the OpenAPI document it serves at
//! `/api/v1/openapi.json`. Callers present `Authorization: Bearer TOKEN`; a token's role is
//! `viewer` (read), `operator` (also upload and stage) or `admin` (also manage tokens). Tokens
//! come from `--tokens FILE` or, without one, from an admin token generated on the first start
//! and printed once. `/metrics` (Prometheus text), `/healthz`, the OpenAPI document and bundle
//! content (addressed by sha256, verified by every device) need no token.
//!
//! Nothing a device sends can stop the server: malformed JSON, unknown schemas, oversize
//! messages, requests for unknown bundles or from unknown devices are logged, counted in
//! `/metrics` and dropped (chunk requests get an error frame).
//!
//! ## A short tour
//!
//! ```no_run
//! # async fn tour() -> Result<(), Box<dyn std::error::Error>> {
//! use fleet_server::{load_keyring, Server, ServerConfig};
//!
//! // HTTP and an embedded broker on free loopback ports.
//! let keyring = load_keyring(std::path::Path::new("keys/fleet.pub"))?;
//! let server = Server::start(ServerConfig::new("/tmp/fleet", keyring)).await?;
//! println!("API {} broker {}", server.http_url(), server.broker_url());
//! let token = server.admin_token().expect("first start prints an admin token").to_string();
//!
//! // Agents connect to `server.broker_url()`; the API then lists them:
//! //   curl -H "Authorization: Bearer $TOKEN" $API/api/v1/devices
//! // upload a bundle:
//! //   curl -H "Authorization: Bearer $TOKEN" --data-binary @digits.mfb $API/api/v1/bundles
//! // and stage it to one device:
//! //   curl -H "Authorization: Bearer $TOKEN" -d '{"bundle_id":"…"}' $API/api/v1/devices/dev-1/stage
//! # let _ = token;
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! ## Map
//! - [`server`]: [`Server::start`], [`ServerConfig`], [`RunningServer`].
//! - [`server_key`]: the key every command is signed with (`protocol::command_auth`).
//! - [`keyring`]: the bundle-signing keyring and its threshold-signed rotations.
//! - [`fleet`]: the shared state and every operation on it (what HTTP and MQTT call).
//! - [`store`]: redb tables and records. [`bundles`]: bundle files and chunk frames.
//! - [`ingest`]: status, events and telemetry from devices. [`chunks`]: chunk serving.
//! - [`mqtt`]: connection options (TLS), the event loop, subscriptions, dispatch.
//!   [`bulk`]: the publish-only connection chunk frames take (QoS 0).
//! - [`broker`]: the embedded rumqttd broker.
//! - [`telemetry`]: in-memory windows and cohort figures. [`metrics`]: counters and exposition.
//! - [`auth`]: token files, roles, hashing. [`http`]: the axum router and handlers.
//! - [`isolation`]: the Mosquitto ACL that confines each device to its own topics.
//!   [`pki`]: the fleet CA and device certificates for mutual TLS.
//! - [`rollout`]: cohort canary rollouts (spec, cohorts, gates, the state machine and its driver).

pub mod auth;
pub mod broker;
pub mod bulk;
pub mod bundles;
pub mod chunks;
pub mod fleet;
pub mod http;
pub mod ingest;
pub mod isolation;
pub mod keyring;
pub mod metrics;
pub mod mqtt;
pub mod pki;
pub mod rollout;
pub mod server;
pub mod server_key;
pub mod store;
pub mod telemetry;

pub use bulk::BulkSettings;
pub use fleet::{DeviceQuery, DeviceView, Fleet, FleetError};
pub use mqtt::BrokerConnection;
pub use server::{load_keyring, BrokerChoice, RunningServer, Server, ServerConfig, ServerError};
