//! Keyring rotation through the fleet: the chain of accepted keyring updates.
//!
//! A keyring changes only by a [`SignedKeyringUpdate`] signed by a threshold of the keys it
//! replaces ([`Keyring::apply_update`]). The fleet server keeps every update it accepted, in
//! version order, and publishes them together as a [`KeyringChain`], retained on `{p}/keyring`
//! ([`crate::link::Topics::keyring`]). A device applies, in order, the updates newer than its
//! own keyring, each checked against the keyring before it, so a device that missed several
//! rotations catches up, and neither the broker nor the server can forge a step: they can only
//! withhold it. An older or replayed chain changes nothing (versions only grow).

use serde::{Deserialize, Serialize};

use crate::keys::{KeyError, Keyring, KeyringUpdate, SignedKeyringUpdate};
use crate::link::{HasSchema, LINK_SCHEMA};

/// The retained message on `{p}/keyring`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyringChain {
    pub schema: u32,
    /// Accepted updates, oldest first.
    pub updates: Vec<SignedKeyringUpdate>,
}

impl HasSchema for KeyringChain {
    fn schema(&self) -> u32 {
        self.schema
    }
}

impl KeyringChain {
    pub fn new(updates: Vec<SignedKeyringUpdate>) -> KeyringChain {
        KeyringChain {
            schema: LINK_SCHEMA,
            updates,
        }
    }

    /// `base` with every update newer than it applied in order (each checked against the
    /// keyring before it). Returns `base` unchanged when nothing is newer.
    pub fn apply(&self, base: &Keyring) -> Result<Keyring, KeyError> {
        let mut current = base.clone();
        for update in &self.updates {
            let body: KeyringUpdate = serde_json::from_slice(&update.body)
                .map_err(|e| KeyError::Update(format!("unreadable update body: {e}")))?;
            if body.version <= current.version {
                continue;
            }
            current = current.apply_update(update)?;
        }
        Ok(current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;

    fn body(version: u64, threshold: usize, keys: &[&SecretKey]) -> KeyringUpdate {
        KeyringUpdate {
            version,
            threshold,
            keys: keys.iter().map(|k| k.public().to_hex()).collect(),
        }
    }

    #[test]
    fn a_device_that_missed_rotations_catches_up_and_forgeries_break_the_chain() {
        let [a, b, c] = [(); 3].map(|_| SecretKey::generate().unwrap());
        let base = Keyring::new([a.public()]);
        let one = SignedKeyringUpdate::sign(&body(1, 2, &[&a, &b, &c]), &[&a]);
        let two = SignedKeyringUpdate::sign(&body(2, 2, &[&b, &c]), &[&b, &c]);
        let chain = KeyringChain::new(vec![one.clone(), two.clone()]);
        let ring = chain.apply(&base).unwrap();
        assert_eq!(ring.version, 2);
        assert_eq!(ring.ids().count(), 2);
        assert!(ring.get(&a.id()).is_none(), "a is retired");
        // Applying again, or an older chain, changes nothing.
        assert_eq!(chain.apply(&ring).unwrap(), ring);
        assert_eq!(
            KeyringChain::new(vec![one.clone()]).apply(&ring).unwrap(),
            ring
        );
        // Version 2 signed by b alone is under the threshold of version 1.
        let weak = SignedKeyringUpdate::sign(&body(2, 1, &[&b]), &[&b]);
        assert!(KeyringChain::new(vec![one, weak]).apply(&base).is_err());
        // A step signed by keys the device does not trust yet.
        assert!(KeyringChain::new(vec![two]).apply(&base).is_err());
        // The keyring round-trips through its stored form.
        assert_eq!(
            Keyring::from_update_body(&ring.to_update_body()).unwrap(),
            ring
        );
    }
}
