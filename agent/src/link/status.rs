//! The retained status message: who the device is and what it serves.

use chrono::Utc;

use protocol::link::{DeviceStatus, ModelSummary, LINK_SCHEMA};

use crate::agent::{Agent, AgentError, Status};

use super::LinkConfig;

/// The models of a status, as the link reports them (the fields of `fleet-agent status --json`).
pub fn summaries(status: &Status) -> Vec<ModelSummary> {
    status
        .models
        .iter()
        .map(|m| ModelSummary {
            name: m.name.clone(),
            active: m.active.clone(),
            previous: m.previous.clone(),
            state: serde_json::to_value(m.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            security_version: m.security_version,
            bundle_sha256: m.bundle_sha256.clone(),
            compute: m.compute.map(str::to_string),
        })
        .collect()
}

/// The device's full status (`online` true while connected; false in the goodbye on shutdown).
pub fn device_status(
    agent: &Agent,
    config: &LinkConfig,
    online: bool,
) -> Result<DeviceStatus, AgentError> {
    let status = agent.status()?;
    Ok(DeviceStatus {
        schema: LINK_SCHEMA,
        device_id: config.device_id.clone(),
        online,
        time: Utc::now(),
        agent_version: Some(status.agent_version.to_string()),
        target: Some(status.target.clone()),
        labels: config.labels.clone(),
        models: Some(summaries(&status)),
    })
}
