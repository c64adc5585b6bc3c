//! The demo and the benchmark. Both start a private throwaway PostgreSQL (through
//! `ledger-testdb`) when they are not given a database, which is why they live in this
//! crate and not in the daemon's: `ledger-worker` never links the cluster launcher.
//! The binary also runs every `ledger-worker` command, through the same code, so the
//! bench's worker processes are this binary running `run`.

pub mod bench;
pub mod cmd;
pub mod database;
pub mod demo;
