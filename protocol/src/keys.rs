//! Signing keys, keyrings and signed keyring updates.
//!
//! Every bundle manifest is signed with ed25519. A key is named by its *key id*: the first 8 bytes
//! of the sha256 of the 32-byte public key, in hex (16 characters).
//!
//! File formats (text, one item per line, `#` starts a comment):
//! - secret key `NAME.key`: `ed25519-secret <64 hex chars>` (written with mode 0600);
//! - public keys / keyring `NAME.pub`: one `ed25519 <64 hex chars> [comment]` line per key.
//!
//! A keyring changes only through a [`KeyringUpdate`]: the new key list and threshold, a version
//! higher than the current one, signed by at least `threshold` keys of the *current* keyring
//! (TUF-style root rotation). Applying one is [`Keyring::apply_update`].

use std::collections::BTreeMap;
use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// First 8 bytes of sha256(public key), shown as 16 hex characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    pub fn of(key: &VerifyingKey) -> KeyId {
        let digest = Sha256::digest(key.as_bytes());
        KeyId(digest[..8].try_into().expect("sha256 is 32 bytes"))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::str::FromStr for KeyId {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<KeyId, KeyError> {
        let bytes = hex::decode(s).map_err(|_| KeyError::BadKeyId(s.to_string()))?;
        Ok(KeyId(
            bytes
                .try_into()
                .map_err(|_| KeyError::BadKeyId(s.to_string()))?,
        ))
    }
}

impl Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KeyId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<KeyId, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("line {line}: {reason}")]
    Parse { line: usize, reason: String },
    #[error("no key found")]
    Empty,
    #[error("'{0}' is not a key id (16 hex characters)")]
    BadKeyId(String),
    #[error("cannot generate a key: the system random source failed: {0}")]
    Random(String),
    #[error("keyring update: {0}")]
    Update(String),
}

/// A secret signing key with its id.
pub struct SecretKey {
    key: SigningKey,
}

impl SecretKey {
    /// A new key from the operating system's random source.
    pub fn generate() -> Result<SecretKey, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(SecretKey {
            key: SigningKey::from_bytes(&seed),
        })
    }

    pub fn id(&self) -> KeyId {
        KeyId::of(&self.key.verifying_key())
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.key.verifying_key())
    }

    pub fn sign(&self, message: &[u8]) -> SignatureEntry {
        SignatureEntry {
            key_id: self.id(),
            sig: hex::encode(self.key.sign(message).to_bytes()),
        }
    }

    /// The `.key` file text.
    pub fn to_file_text(&self) -> String {
        format!(
            "# modelfleet signing key {} — keep secret\ned25519-secret {}\n",
            self.id(),
            hex::encode(self.key.to_bytes())
        )
    }

    pub fn from_file_text(text: &str) -> Result<SecretKey, KeyError> {
        let mut found = None;
        for (line, words) in meaningful_lines(text) {
            match words.as_slice() {
                ["ed25519-secret", hexkey, ..] if found.is_none() => {
                    found = Some(SigningKey::from_bytes(&parse_hex32(hexkey, line)?));
                }
                ["ed25519-secret", ..] => {
                    return Err(KeyError::Parse {
                        line,
                        reason: "more than one secret key".into(),
                    })
                }
                [first, ..] => {
                    return Err(KeyError::Parse {
                        line,
                        reason: format!("expected 'ed25519-secret <hex>', found '{first}'"),
                    })
                }
                [] => {}
            }
        }
        found.map(|key| SecretKey { key }).ok_or(KeyError::Empty)
    }
}

/// A public verification key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(pub VerifyingKey);

impl PublicKey {
    pub fn id(&self) -> KeyId {
        KeyId::of(&self.0)
    }

    /// One line of a `.pub` / keyring file.
    /// The key's 32 bytes in hex: the form keyring updates list keys in.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0.as_bytes())
    }

    pub fn to_line(&self) -> String {
        format!("ed25519 {} {}", self.to_hex(), self.id())
    }

    pub fn from_hex(hexkey: &str) -> Result<PublicKey, KeyError> {
        let bytes = parse_hex32(hexkey, 0)?;
        VerifyingKey::from_bytes(&bytes)
            .map(PublicKey)
            .map_err(|_| KeyError::Parse {
                line: 0,
                reason: "not a valid ed25519 public key".into(),
            })
    }

    /// Does `sig_hex` (lowercase hex, as written) verify `message` under this key?
    pub fn verify(&self, message: &[u8], sig_hex: &str) -> bool {
        if sig_hex.bytes().any(|b| b.is_ascii_uppercase()) {
            return false;
        }
        let Ok(bytes) = hex::decode(sig_hex) else {
            return false;
        };
        let Ok(bytes) = <[u8; 64]>::try_from(bytes) else {
            return false;
        };
        self.0
            .verify(message, &Signature::from_bytes(&bytes))
            .is_ok()
    }
}

/// One signature over a message: which key, and the 64-byte ed25519 signature in hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureEntry {
    pub key_id: KeyId,
    pub sig: String,
}

/// The set of keys a device or server trusts, and how many of them must sign a keyring update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyring {
    keys: BTreeMap<KeyId, PublicKey>,
    /// Version of the keyring; a file-loaded keyring is version 0.
    pub version: u64,
    /// Signatures of current keys needed to accept a keyring update.
    pub threshold: usize,
}

impl Keyring {
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> Keyring {
        Keyring {
            keys: keys.into_iter().map(|k| (k.id(), k)).collect(),
            version: 0,
            threshold: 1,
        }
    }

    /// Parses a keyring / `.pub` file: one `ed25519 <hex>` line per key.
    pub fn from_file_text(text: &str) -> Result<Keyring, KeyError> {
        let mut keys = Vec::new();
        for (line, words) in meaningful_lines(text) {
            match words.as_slice() {
                ["ed25519", hexkey, ..] => {
                    let key = PublicKey::from_hex(hexkey).map_err(|e| match e {
                        KeyError::Parse { reason, .. } => KeyError::Parse { line, reason },
                        other => other,
                    })?;
                    keys.push(key);
                }
                ["ed25519-secret", ..] => {
                    return Err(KeyError::Parse {
                        line,
                        reason: "this is a secret key file; pass the .pub file".into(),
                    })
                }
                [first, ..] => {
                    return Err(KeyError::Parse {
                        line,
                        reason: format!("expected 'ed25519 <hex public key>', found '{first}'"),
                    })
                }
                [] => {}
            }
        }
        if keys.is_empty() {
            return Err(KeyError::Empty);
        }
        Ok(Keyring::new(keys))
    }

    pub fn to_file_text(&self) -> String {
        self.keys.values().map(|k| k.to_line() + "\n").collect()
    }

    /// Adds the keys of `other` (several `--keyring` files make one keyring).
    pub fn extend(&mut self, other: Keyring) {
        self.keys.extend(other.keys);
    }

    pub fn get(&self, id: &KeyId) -> Option<&PublicKey> {
        self.keys.get(id)
    }

    pub fn ids(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.keys.keys().copied()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Distinct keys of this keyring whose signature over `message` verifies.
    /// Entries by unknown keys are skipped; an entry by a known key that does not verify is
    /// returned in the error list, because it means the message or the signature was altered.
    pub fn check_signatures(
        &self,
        message: &[u8],
        sigs: &[SignatureEntry],
    ) -> (Vec<KeyId>, Vec<KeyId>) {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for s in sigs {
            match self.keys.get(&s.key_id) {
                Some(k) if k.verify(message, &s.sig) => {
                    if !good.contains(&s.key_id) {
                        good.push(s.key_id)
                    }
                }
                Some(_) => bad.push(s.key_id),
                None => {}
            }
        }
        (good, bad)
    }

    /// Checks a signed keyring update against this keyring and returns the new keyring.
    pub fn apply_update(&self, update: &SignedKeyringUpdate) -> Result<Keyring, KeyError> {
        let body: KeyringUpdate = serde_json::from_slice(&update.body)
            .map_err(|e| KeyError::Update(format!("unreadable update body: {e}")))?;
        let (good, bad) = self.check_signatures(&update.body, &update.signatures);
        if !bad.is_empty() {
            return Err(KeyError::Update(format!(
                "signature by {} does not verify",
                join_ids(&bad)
            )));
        }
        if good.len() < self.threshold {
            return Err(KeyError::Update(format!(
                "signed by {} current key(s) ({}), the current keyring requires {}",
                good.len(),
                join_ids(&good),
                self.threshold
            )));
        }
        if body.version <= self.version {
            return Err(KeyError::Update(format!(
                "version {} is not newer than the current keyring version {}",
                body.version, self.version
            )));
        }
        Keyring::from_update_body(&body)
    }

    /// The keyring an update body describes (no signature checked: for a body stored after it
    /// was checked).
    pub fn from_update_body(body: &KeyringUpdate) -> Result<Keyring, KeyError> {
        let mut keys = Vec::new();
        for hexkey in &body.keys {
            keys.push(PublicKey::from_hex(hexkey)?);
        }
        if keys.is_empty() || body.threshold == 0 || body.threshold > keys.len() {
            return Err(KeyError::Update(format!(
                "threshold {} does not fit {} key(s)",
                body.threshold,
                keys.len()
            )));
        }
        let mut next = Keyring::new(keys);
        next.version = body.version;
        next.threshold = body.threshold;
        Ok(next)
    }

    /// This keyring as an update body (to store it).
    pub fn to_update_body(&self) -> KeyringUpdate {
        KeyringUpdate {
            version: self.version,
            threshold: self.threshold,
            keys: self
                .keys
                .values()
                .map(|k| hex::encode(k.0.as_bytes()))
                .collect(),
        }
    }
}

/// The body of a keyring update (signed as its exact JSON bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyringUpdate {
    pub version: u64,
    pub threshold: usize,
    /// Hex public keys of the new keyring.
    pub keys: Vec<String>,
}

/// A keyring update as distributed: exact body bytes plus signatures by current keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedKeyringUpdate {
    #[serde(with = "hex_bytes")]
    pub body: Vec<u8>,
    pub signatures: Vec<SignatureEntry>,
}

impl SignedKeyringUpdate {
    /// Serialises `update` and signs it with each of `signers`.
    pub fn sign(update: &KeyringUpdate, signers: &[&SecretKey]) -> SignedKeyringUpdate {
        let body = serde_json::to_vec(update).expect("update serialises");
        let signatures = signers.iter().map(|k| k.sign(&body)).collect();
        SignedKeyringUpdate { body, signatures }
    }
}

mod hex_bytes {
    pub fn serialize<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

pub(crate) fn join_ids(ids: &[KeyId]) -> String {
    ids.iter()
        .map(|k| k.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn meaningful_lines(text: &str) -> impl Iterator<Item = (usize, Vec<&str>)> {
    text.lines().enumerate().map(|(i, l)| {
        let l = l.split('#').next().unwrap_or("");
        (i + 1, l.split_whitespace().collect())
    })
}

fn parse_hex32(s: &str, line: usize) -> Result<[u8; 32], KeyError> {
    let bytes = hex::decode(s).map_err(|_| KeyError::Parse {
        line,
        reason: "key is not hex".into(),
    })?;
    bytes.try_into().map_err(|_| KeyError::Parse {
        line,
        reason: "key is not 32 bytes".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip_and_id_is_sha256_prefix() {
        let k = SecretKey::generate().unwrap();
        let again = SecretKey::from_file_text(&k.to_file_text()).unwrap();
        assert_eq!(again.id(), k.id());
        let ring = Keyring::from_file_text(&k.public().to_line()).unwrap();
        assert_eq!(ring.ids().collect::<Vec<_>>(), vec![k.id()]);
        let digest = Sha256::digest(k.public().0.as_bytes());
        assert_eq!(k.id().to_string(), hex::encode(&digest[..8]));
    }

    #[test]
    fn keyring_file_holds_several_keys_and_refuses_secret_files() {
        let (a, b) = (
            SecretKey::generate().unwrap(),
            SecretKey::generate().unwrap(),
        );
        let text = format!(
            "# fleet keys\n{}\n\n{}\n",
            a.public().to_line(),
            b.public().to_line()
        );
        assert_eq!(Keyring::from_file_text(&text).unwrap().len(), 2);
        let err = Keyring::from_file_text(&a.to_file_text())
            .unwrap_err()
            .to_string();
        assert!(err.contains("secret key file"), "{err}");
        assert!(matches!(
            Keyring::from_file_text("# nothing\n"),
            Err(KeyError::Empty)
        ));
        let err = Keyring::from_file_text("ed25519 abcd\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1") && err.contains("32 bytes"), "{err}");
    }

    #[test]
    fn signatures_by_known_unknown_and_altered() {
        let (a, stranger) = (
            SecretKey::generate().unwrap(),
            SecretKey::generate().unwrap(),
        );
        let ring = Keyring::new([a.public()]);
        let msg = b"manifest";
        let (good, bad) = ring.check_signatures(msg, &[a.sign(msg), stranger.sign(msg)]);
        assert_eq!((good, bad), (vec![a.id()], vec![]));
        let (good, bad) = ring.check_signatures(b"manifesT", &[a.sign(msg)]);
        assert_eq!((good, bad), (vec![], vec![a.id()]));
    }

    fn update(version: u64, threshold: usize, keys: &[&SecretKey]) -> KeyringUpdate {
        KeyringUpdate {
            version,
            threshold,
            keys: keys.iter().map(|k| k.public().to_hex()).collect(),
        }
    }

    #[test]
    fn rotation_needs_threshold_of_current_keys() {
        let [a, b, c, d] = [(); 4].map(|_| SecretKey::generate().unwrap());
        let mut ring = Keyring::new([a.public(), b.public(), c.public()]);
        ring.threshold = 2;

        // One current signature is not enough for threshold 2.
        let one = SignedKeyringUpdate::sign(&update(1, 1, &[&b, &d]), &[&a]);
        let err = ring.apply_update(&one).unwrap_err().to_string();
        assert!(err.contains("requires 2"), "{err}");
        // The same key twice counts once.
        let twice = SignedKeyringUpdate::sign(&update(1, 1, &[&b, &d]), &[&a, &a]);
        assert!(ring.apply_update(&twice).is_err());
        // The new key cannot vouch for itself.
        let selfsigned = SignedKeyringUpdate::sign(&update(1, 1, &[&d]), &[&a, &d]);
        assert!(ring.apply_update(&selfsigned).is_err());

        let ok = SignedKeyringUpdate::sign(&update(1, 1, &[&b, &d]), &[&a, &c]);
        let next = ring.apply_update(&ok).unwrap();
        assert_eq!(next.version, 1);
        assert!(
            next.get(&d.id()).is_some() && next.get(&a.id()).is_none(),
            "a retired"
        );

        // Replaying the same update against the new keyring is refused (not newer).
        let err = next.apply_update(&SignedKeyringUpdate::sign(&update(1, 1, &[&d]), &[&d]));
        assert!(err.unwrap_err().to_string().contains("not newer"));
        // Tampered body: the signatures no longer verify.
        let mut tampered = ok.clone();
        tampered.body = serde_json::to_vec(&update(1, 1, &[&d])).unwrap();
        assert!(ring
            .apply_update(&tampered)
            .unwrap_err()
            .to_string()
            .contains("does not verify"));
        // Survives JSON transport.
        let json = serde_json::to_string(&ok).unwrap();
        let back: SignedKeyringUpdate = serde_json::from_str(&json).unwrap();
        assert_eq!(ring.apply_update(&back).unwrap(), next);
    }
}
