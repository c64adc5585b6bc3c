//! The ledger's worker daemon and command-line interface. `main.rs` only calls
//! [`cmd::main`]; everything else lives here so it can be tested and embedded.

pub mod cmd;
pub mod daemon;
pub mod gateway;
pub mod metrics;
pub mod progress;
pub mod webhook;
