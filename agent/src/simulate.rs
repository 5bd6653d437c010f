//! A simulated fleet: many real agents in one process, each with its own data directory, MQTT
//! session, transfers, installs, health watch and telemetry, serving synthetic traffic.
//!
//! Nothing is faked below the traffic: a simulated device is an [`Agent`] plus a [`Link`],
//! exactly what `fleet-agent run --broker` runs. Only the requests are made up: each device
//! sends `rps` requests per second to every model it serves, drawn in turn from the golden
//! inputs of the first version of that model it served — the same inputs whatever version runs
//! now, so a regressed version shows its regression in live traffic, and the health watch and
//! the server's canary gates judge real model outputs on the same world.
//!
//! Loaded models are shared: [`SimConfig::new`] gives every device one
//! [`ModelCache`](crate::model_cache::ModelCache), so devices that serve the same model bytes
//! (by the verified manifest's sha256, never by name or version) run one loaded engine instead
//! of a copy each, and a fleet of thousands fits in one process. Each device still verifies,
//! writes its own slot and runs the golden self-test on install, and keeps its own metrics,
//! health figures and trials. Set `agent.share_models = None` to load a copy per device.
//!
//! Inference threads and request bodies are shared too: every device submits to one
//! [`InferencePool`] of as many threads as the machine has cores (a device's own pool would be a
//! thread per device), and devices whose golden inputs are the same bytes (by the payload's
//! sha256) replay one shared set of request bodies instead of a JSON copy each.
//!
//! Labels: `--label site=berlin|munich` gives device `i` the `i mod 2`-th value, so one flag
//! spreads a fleet over sites.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::keys::{Keyring, PublicKey};

use crate::agent::{Agent, AgentConfig, AgentError};
use crate::link::{Link, LinkConfig, LinkError, LinkHandle, TlsFiles};
use crate::model_cache::ModelCache;
use crate::serving::{InferencePool, ServingModel};

/// Settings of a simulated fleet.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub devices: usize,
    pub broker_url: String,
    pub keyring: Keyring,
    /// Device data directories go under here (`{id}/`).
    pub data_root: PathBuf,
    /// Device ids are `{prefix}-{index:04}`.
    pub id_prefix: String,
    /// `(key, values)`: device `i` gets `values[i % values.len()]`.
    pub labels: Vec<(String, Vec<String>)>,
    /// Requests per second per device and model (0: no traffic).
    pub rps: f64,
    pub tls: Option<TlsFiles>,
    /// Agent settings every device starts from (the data dir is set per device). Its
    /// `share_models` cache, set by [`SimConfig::new`], is common to all devices.
    pub agent: AgentConfig,
    /// Link settings every device starts from (broker, id and labels are set per device).
    pub link: Option<LinkConfig>,
    /// The fleet server's public key (overrides the link template's): commands are obeyed only
    /// if it signed them.
    pub server_key: Option<PublicKey>,
    /// Request bodies by the sha256 of the golden payload they were made from, common to all
    /// devices.
    pub requests: RequestCache,
}

/// OIP request bodies made from a golden payload, by its sha256.
pub type RequestCache = Arc<Mutex<HashMap<String, Arc<Vec<Vec<u8>>>>>>;

impl SimConfig {
    pub fn new(
        devices: usize,
        broker_url: &str,
        keyring: Keyring,
        data_root: PathBuf,
    ) -> SimConfig {
        let mut agent = AgentConfig::new(&data_root);
        // One pool for the fleet: as many threads as cores, and room for a burst of every
        // device's requests before new ones are dropped.
        agent.queue_limit = (devices * 2).clamp(64, 65_536);
        agent.share_pool = Some(Arc::new(InferencePool::new(
            agent.workers,
            agent.queue_limit,
        )));
        agent.share_models = Some(Arc::new(ModelCache::new()));
        agent.share_wake = Some(Arc::default());
        SimConfig {
            devices,
            broker_url: broker_url.to_string(),
            keyring,
            data_root,
            id_prefix: "sim".into(),
            labels: Vec::new(),
            rps: 5.0,
            tls: None,
            agent,
            link: None,
            server_key: None,
            requests: RequestCache::default(),
        }
    }

    /// The id and labels of device `i`.
    pub fn device(&self, i: usize) -> (String, BTreeMap<String, String>) {
        let labels = self
            .labels
            .iter()
            .filter(|(_, values)| !values.is_empty())
            .map(|(k, values)| (k.clone(), values[i % values.len()].clone()))
            .collect();
        (format!("{}-{i:04}", self.id_prefix), labels)
    }
}

/// Parses `key=v1|v2|…`.
pub fn parse_label(s: &str) -> Result<(String, Vec<String>), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label '{s}' is not KEY=VALUE (or KEY=V1|V2|…)"))?;
    if k.is_empty() || v.is_empty() {
        return Err(format!("label '{s}' has an empty key or value"));
    }
    Ok((k.to_string(), v.split('|').map(str::to_string).collect()))
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("device {id}: {source}")]
    Agent { id: String, source: AgentError },
    #[error("device {id}: {source}")]
    Link { id: String, source: LinkError },
}

/// One simulated device.
pub struct SimDevice {
    pub id: String,
    pub agent: Arc<Agent>,
    link: Option<LinkHandle>,
    traffic: Option<tokio::task::JoinHandle<()>>,
}

/// Devices judged and flushed by one health-watch thread.
const WATCH_GROUP: usize = 50;

/// A running simulated fleet. Dropping it stops every device without a goodbye.
pub struct SimFleet {
    pub devices: Vec<SimDevice>,
}

impl SimFleet {
    /// Opens and links every device (on the current tokio runtime) and starts its traffic.
    pub fn start(config: &SimConfig) -> Result<SimFleet, SimError> {
        let mut devices = Vec::with_capacity(config.devices);
        for i in 0..config.devices {
            let (id, labels) = config.device(i);
            let mut agent_config = config.agent.clone();
            agent_config.data_dir = config.data_root.join(&id);
            let agent = Agent::open(agent_config, config.keyring.clone()).map_err(|source| {
                SimError::Agent {
                    id: id.clone(),
                    source,
                }
            })?;
            let agent = Arc::new(agent);
            let mut link_config = config
                .link
                .clone()
                .unwrap_or_else(|| LinkConfig::new(&config.broker_url, &id));
            link_config.broker_url = config.broker_url.clone();
            link_config.device_id = id.clone();
            link_config.labels = labels;
            link_config.tls = config.tls.clone();
            if config.server_key.is_some() {
                link_config.server_key = config.server_key;
            }
            let link =
                Link::start(agent.clone(), link_config).map_err(|source| SimError::Link {
                    id: id.clone(),
                    source,
                })?;
            let traffic = (config.rps > 0.0).then(|| {
                let period = Duration::from_secs_f64(1.0 / config.rps);
                // Spread the devices' request times over one period.
                let offset = period.mul_f64(i as f64 / config.devices.max(1) as f64);
                tokio::spawn(traffic(
                    agent.clone(),
                    config.requests.clone(),
                    period,
                    offset,
                ))
            });
            devices.push(SimDevice {
                id,
                agent,
                link: Some(link),
                traffic,
            });
        }
        // One watch thread per group of devices: closing a telemetry window is a durable
        // commit, and one thread doing them for thousands of devices falls behind.
        let agents: Vec<Arc<Agent>> = devices.iter().map(|d| d.agent.clone()).collect();
        for group in agents.chunks(WATCH_GROUP) {
            crate::watch::spawn_shared(group);
        }
        Ok(SimFleet { devices })
    }

    /// Says goodbye on every device's link.
    pub async fn shutdown(mut self) {
        for d in &mut self.devices {
            if let Some(t) = d.traffic.take() {
                t.abort();
            }
        }
        for d in &mut self.devices {
            if let Some(link) = d.link.take() {
                link.shutdown().await;
            }
        }
    }

    /// Stops every device's traffic; the agents and their links keep running, so the last
    /// telemetry windows still go out.
    pub fn stop_traffic(&mut self) {
        for d in &mut self.devices {
            if let Some(t) = d.traffic.take() {
                t.abort();
            }
        }
    }

    /// How many devices are connected to the broker right now.
    pub fn connected(&self) -> usize {
        self.devices
            .iter()
            .filter(|d| d.link.as_ref().is_some_and(|l| l.is_connected()))
            .count()
    }
}

impl Drop for SimFleet {
    fn drop(&mut self) {
        for d in &mut self.devices {
            if let Some(t) = d.traffic.take() {
                t.abort();
            }
        }
    }
}

/// Requests drawn in turn from each served model's golden inputs, every `period`.
///
/// The inputs are the world's, not the model's: a device keeps drawing from the golden inputs of
/// the first version of a model it served, whatever version runs later (while the input
/// signature stays the same). So a new version is judged on the same traffic as the old one —
/// as on a real device, where a model update does not change what the camera sees.
async fn traffic(agent: Arc<Agent>, cache: RequestCache, period: Duration, offset: Duration) {
    tokio::time::sleep(offset).await;
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // model name → (input signature, requests)
    let mut inputs: HashMap<String, (String, Arc<Vec<Vec<u8>>>)> = HashMap::new();
    let mut turn = 0usize;
    loop {
        interval.tick().await;
        turn += 1;
        for model in agent.registry.all() {
            let signature = format!("{:?}", model.manifest.inputs);
            let requests = match inputs.get(&model.name) {
                Some((sig, r)) if *sig == signature && !r.is_empty() => r.clone(),
                _ => {
                    let r = shared_golden_requests(&cache, &agent, &model);
                    inputs.insert(model.name.clone(), (signature, r.clone()));
                    r
                }
            };
            if requests.is_empty() {
                continue;
            }
            let row = turn % requests.len();
            let m = model.clone();
            // A full queue is what a real device under load sees too: the request is dropped.
            let _ = agent
                .pool
                .submit(move || crate::http::serve_request(&m, &requests[row], None).is_ok());
        }
    }
}

/// The request bodies of `model`'s golden inputs, made once per distinct golden payload.
fn shared_golden_requests(
    cache: &RequestCache,
    agent: &Agent,
    model: &ServingModel,
) -> Arc<Vec<Vec<u8>>> {
    let key = model
        .manifest
        .payload(&model.manifest.golden.file)
        .map(|p| p.sha256.clone());
    if let Some(hit) = key
        .as_ref()
        .and_then(|k| cache.lock().ok()?.get(k).cloned())
    {
        return hit;
    }
    let made = Arc::new(golden_requests(agent, model).unwrap_or_default());
    if let (Some(k), Ok(mut c)) = (key, cache.lock()) {
        if !made.is_empty() {
            c.insert(k, made.clone());
        }
    }
    made
}

/// One OIP JSON request per golden input row of the model's active slot.
fn golden_requests(agent: &Agent, model: &ServingModel) -> Option<Vec<Vec<u8>>> {
    let g = &model.manifest.golden;
    if g.count == 0 {
        return None;
    }
    let slot = agent
        .config
        .data_dir
        .join("slots")
        .join(&model.name)
        .join(&model.slot.dir);
    let bytes = std::fs::read(slot.join(&g.file)).ok()?;
    let (inputs, _) = engine::tensor::golden_tensors(g, &bytes).ok()?;
    let rows = inputs.first()?.shape.first().copied()?;
    let mut requests = Vec::with_capacity(rows);
    for row in 0..rows {
        let mut tensors = Vec::new();
        for (spec, t) in model.manifest.inputs.iter().zip(&inputs) {
            let per: usize = t.shape[1..].iter().product();
            let mut shape = t.shape.clone();
            shape[0] = 1;
            let data = row_json(t, row, per)?;
            tensors.push(
                serde_json::json!({"name": spec.name, "datatype": spec.dtype,
                                            "shape": shape, "data": data}),
            );
        }
        requests.push(
            serde_json::json!({ "inputs": tensors })
                .to_string()
                .into_bytes(),
        );
    }
    Some(requests)
}

/// Row `row` (of `per` elements) of a batch tensor, as OIP JSON data.
fn row_json(t: &engine::Tensor, row: usize, per: usize) -> Option<serde_json::Value> {
    use engine::TensorData;
    let r = row * per..(row + 1) * per;
    Some(match &t.data {
        TensorData::F32(v) => serde_json::json!(v.get(r)?),
        TensorData::I32(v) => serde_json::json!(v.get(r)?),
        TensorData::I64(v) => serde_json::json!(v.get(r)?),
        TensorData::U8(v) => serde_json::json!(v.get(r)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_spread_round_robin() {
        let mut c = SimConfig::new(
            4,
            "mqtt://127.0.0.1:1",
            Keyring::new([]),
            PathBuf::from("/x"),
        );
        c.labels = vec![
            parse_label("site=berlin|munich").unwrap(),
            parse_label("hw=pi5").unwrap(),
        ];
        let (id, l) = c.device(3);
        assert_eq!(id, "sim-0003");
        assert_eq!(l["site"], "munich");
        assert_eq!(l["hw"], "pi5");
        assert_eq!(c.device(2).1["site"], "berlin");
        assert!(parse_label("site").is_err());
        assert!(parse_label("=x").is_err());
    }
}
