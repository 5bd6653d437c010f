//! Cohort canary rollouts: stage a bundle to a growing share of the selected devices, judge each
//! stage on the devices' own model telemetry, and promote, keep baking, pause or roll back —
//! every decision stored with its evidence.
//!
//! - [`spec`]: the request an operator posts (selector, stages, gates, failure action).
//! - [`cohort`]: which devices are canaries at a stage (deterministic ranks).
//! - [`gates`]: canary vs control figures and the verdict of each gate.
//! - [`engine`]: the state machine, a pure function of the rollout and an observation of the
//!   fleet; the server's driver feeds it and carries out its orders.

pub mod cohort;
pub mod driver;
pub mod engine;
pub mod gates;
pub mod spec;
