//! The lock guard: Diesel connection instrumentation that watches every statement and
//! records row locks taken at or below a transaction depth where they would not hold.

use std::sync::{Arc, Mutex};

use diesel::connection::{Instrumentation, InstrumentationEvent};
use diesel::pg::PgConnection;
use diesel::Connection;

/// A lock taken where it would be released immediately in production.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockViolation {
    pub depth: u32,
    pub sql: String,
}

#[derive(Default)]
struct State {
    violations: Vec<LockViolation>,
}

/// Shared between all connections of one test. `base_depth` is the transaction depth
/// that belongs to the harness (1 in rollback mode, 0 in committed mode): a lock taken
/// at or below it was not taken inside a transaction of the code under test.
#[derive(Clone)]
pub struct LockGuard {
    base_depth: u32,
    state: Arc<Mutex<State>>,
}

struct Watcher {
    base_depth: u32,
    depth: u32,
    state: Arc<Mutex<State>>,
}

/// Statements that take locks which only mean something inside a transaction.
fn takes_transaction_lock(sql: &str) -> bool {
    // Ignore Diesel's appended "-- binds: [...]" so a bound value cannot match.
    let sql = sql.split(" -- binds: ").next().unwrap_or(sql).to_ascii_uppercase();
    [
        " FOR UPDATE",
        " FOR NO KEY UPDATE",
        " FOR SHARE",
        " FOR KEY SHARE",
        "PG_ADVISORY_XACT_LOCK",
        "PG_TRY_ADVISORY_XACT_LOCK",
    ]
    .iter()
    .any(|needle| sql.contains(needle))
}

impl Instrumentation for Watcher {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        match event {
            InstrumentationEvent::BeginTransaction { depth, .. } => self.depth = depth.get(),
            InstrumentationEvent::CommitTransaction { depth, .. }
            | InstrumentationEvent::RollbackTransaction { depth, .. } => self.depth = depth.get() - 1,
            InstrumentationEvent::StartQuery { query, .. } if self.depth <= self.base_depth => {
                let sql = query.to_string();
                if takes_transaction_lock(&sql) {
                    let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                    state.violations.push(LockViolation { depth: self.depth, sql });
                }
            }
            _ => {}
        }
    }
}

impl LockGuard {
    pub fn new(base_depth: u32) -> LockGuard {
        LockGuard { base_depth, state: Arc::default() }
    }

    /// Starts watching `conn` (replacing any other instrumentation on it).
    pub fn install(&self, conn: &mut PgConnection) {
        let depth = ledger_core::tx::depth(conn);
        conn.set_instrumentation(Watcher { base_depth: self.base_depth, depth, state: self.state.clone() });
    }

    pub fn violations(&self) -> Vec<LockViolation> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).violations.clone()
    }

    /// Returns and forgets what was recorded (for tests that provoke a violation on
    /// purpose and do not want the harness to fail them for it).
    pub fn take_violations(&self) -> Vec<LockViolation> {
        std::mem::take(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()).violations)
    }
}

pub(crate) fn describe(violations: &[LockViolation]) -> String {
    let mut out = format!(
        "lock guard: {} lock(s) taken outside a transaction of the code under test; \
         in production (autocommit) each would be released as soon as its statement ended. \
         Take row locks through ledger_core::transaction / Tx:",
        violations.len()
    );
    for v in violations.iter().take(5) {
        out.push_str(&format!("\n  at depth {}: {}", v.depth, v.sql));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_clauses_are_recognised_but_bound_values_are_not() {
        assert!(takes_transaction_lock("SELECT * FROM accounts WHERE id = $1 FOR UPDATE -- binds: [1]"));
        assert!(takes_transaction_lock("select 1 from t for no key update"));
        assert!(takes_transaction_lock("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))"));
        assert!(!takes_transaction_lock("SELECT * FROM accounts WHERE owner = $1 -- binds: [\"x FOR UPDATE\"]"));
        assert!(!takes_transaction_lock("UPDATE accounts SET balance_minor = 1"));
    }
}
