//! modelfleet: ship ML models to fleets of edge devices and keep them healthy there.
//!
//! This root package is the in-process harness that end-to-end tests (`tests/`) and examples
//! (`examples/demo.rs`) build on. The product lives in the workspace crates re-exported here:
//! [`protocol`] (the contract: bundle format, keys), [`engine`] (tract, shared by bundler and
//! agent), [`bundler`] (build pipelines) and [`agent`] (the device). See `ARCHITECTURE.md`.

pub use agent;
pub use bundler;
pub use engine;
pub use fleet_server;
pub use protocol;

pub mod api;
pub mod harness;
