//! What the fuzz targets share: the trusted keys and the model schema the OIP targets decode
//! against. The fuzz key and clock are `protocol::testing`'s, which the seed corpus generator
//! (`bundler/tests/fuzz_seed.rs`) uses too.

use std::sync::OnceLock;

use protocol::keys::{Keyring, PublicKey, SecretKey};
use protocol::manifest::{DType, TensorSpec};

pub use protocol::testing::{fuzz_key, fuzz_now, FUZZ_DEVICE};

/// The fuzz key (parsed once).
pub fn secret_key() -> &'static SecretKey {
    static KEY: OnceLock<SecretKey> = OnceLock::new();
    KEY.get_or_init(fuzz_key)
}

/// A keyring holding only the fuzz key (version 0, threshold 1).
pub fn keyring() -> &'static Keyring {
    static KEYRING: OnceLock<Keyring> = OnceLock::new();
    KEYRING.get_or_init(|| Keyring::new([server_key()]))
}

/// The fuzz key's public half, as the agent's server key.
pub fn server_key() -> PublicKey {
    static KEY: OnceLock<PublicKey> = OnceLock::new();
    *KEY.get_or_init(|| secret_key().public())
}

/// The input and output schema the OIP targets decode requests for: one input of each
/// supported datatype, with free and fixed dimensions (the seeds,
/// `bundler/tests/fuzz_seed.rs`, are requests for it).
pub fn oip_schema() -> &'static (Vec<TensorSpec>, Vec<TensorSpec>) {
    static SCHEMA: OnceLock<(Vec<TensorSpec>, Vec<TensorSpec>)> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let spec = |name: &str, dtype, shape: &[Option<usize>]| TensorSpec {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            range: None,
        };
        (
            vec![
                spec("x", DType::F32, &[None, Some(4)]),
                spec("ids", DType::I64, &[None]),
                spec("mask", DType::I32, &[Some(2), None]),
                spec("image", DType::U8, &[Some(1), Some(2), Some(2)]),
            ],
            vec![
                spec("probabilities", DType::F32, &[None, Some(10)]),
                spec("embedding", DType::F32, &[None, Some(3)]),
            ],
        )
    })
}
