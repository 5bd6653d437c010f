pub mod manifest;
pub mod stats;
