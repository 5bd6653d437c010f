//! The agent's keyring after rotations: accepted keyring updates are applied and the resulting
//! keyring persisted in `agent.redb`, so it survives restarts and supersedes the `--keyring`
//! file (version 0) from then on.
//!
//! Updates reach the agent as the fleet's retained [`KeyringChain`] (`{p}/keyring`); each step
//! must be signed by a threshold of the keys before it ([`protocol::keys::Keyring::apply_update`]),
//! so whoever delivers the chain (server, broker) cannot introduce a key.

use redb::{Database, ReadableTable, TableDefinition};
use serde_json::json;

use protocol::keyring_chain::KeyringChain;
use protocol::keys::{KeyError, Keyring, KeyringUpdate};

use crate::agent::{Agent, AgentError};
use crate::store::{Event, StoreError};

const KEYRING: TableDefinition<&str, &[u8]> = TableDefinition::new("keyring");

#[derive(Debug, thiserror::Error)]
pub enum KeyringStoreError {
    #[error("keyring update refused: {0}")]
    Refused(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// The persisted keyring, if a rotation was ever accepted.
pub fn load(db: &Database) -> Result<Option<Keyring>, StoreError> {
    let tx = db.begin_write()?;
    let stored: Option<Vec<u8>> = {
        let table = tx.open_table(KEYRING)?;
        let v = table.get("current")?;
        v.map(|v| v.value().to_vec())
    };
    tx.commit()?;
    let Some(bytes) = stored else {
        return Ok(None);
    };
    let corrupt = |reason: String| StoreError::Corrupt {
        key: "keyring".into(),
        reason,
    };
    let body: KeyringUpdate = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    Keyring::from_update_body(&body)
        .map(Some)
        .map_err(|e| corrupt(e.to_string()))
}

fn save(db: &Database, ring: &Keyring) -> Result<(), StoreError> {
    let tx = db.begin_write()?;
    {
        let bytes = serde_json::to_vec(&ring.to_update_body()).expect("keyring serialises");
        tx.open_table(KEYRING)?
            .insert("current", bytes.as_slice())?;
    }
    tx.commit()?;
    Ok(())
}

/// Applies the updates of `chain` newer than the agent's keyring. On success the new keyring is
/// persisted, then used for every later install, and a `keyring_updated` event recorded; returns
/// the new version, or None if nothing was newer. A chain that does not verify changes nothing.
pub fn apply_chain(agent: &Agent, chain: &KeyringChain) -> Result<Option<u64>, KeyringStoreError> {
    let current = agent.keyring();
    let next = chain.apply(&current)?;
    if next.version <= current.version {
        return Ok(None);
    }
    save(agent.store().database(), &next)?;
    agent.set_keyring(next.clone());
    let ids: Vec<String> = next.ids().map(|k| k.to_string()).collect();
    let retired: Vec<String> = current
        .ids()
        .filter(|k| next.get(k).is_none())
        .map(|k| k.to_string())
        .collect();
    agent.record(&[Event::new(
        "keyring_updated",
        None,
        None,
        json!({"from_version": current.version, "version": next.version,
               "threshold": next.threshold, "keys": ids, "retired": retired}),
    )])?;
    Ok(Some(next.version))
}
