//! Deadlines for test bodies: a hang becomes a named failure, never a silent stall.
//!
//! `#[testing::test]` (the attribute in `ledger-test-macros`) runs the body through
//! [`run`]: the body gets a thread of its own, the test's thread waits for it at most
//! the deadline, and on expiry fails the test with its name and the last thing the
//! body said it was waiting for ([`waiting_for`]; the harness's and the tests' wait
//! helpers call it). The stuck thread is left behind: the rest of the run goes on, and
//! when the test process exits its child processes die with it (the tests start them
//! with a parent-death signal) and the throwaway cluster's watchdog removes the server.
//!
//! The default deadline is [`DEFAULT_DEADLINE_S`]; `LEDGER_TEST_DEADLINE_S` overrides
//! every deadline (for example to debug under a slow tool).

use std::cell::RefCell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Generous: the slowest test takes well under a minute on a loaded 2-core machine.
pub const DEFAULT_DEADLINE_S: u64 = 300;

#[derive(Default)]
struct Progress {
    /// What the body waits for now, and since when (None between waits).
    waiting: Option<(String, Instant)>,
    /// The last wait that ended, to say where a hang outside a named wait came after.
    last_done: Option<String>,
}

type Shared = Arc<Mutex<Progress>>;

thread_local! {
    static CURRENT: RefCell<Option<Shared>> = const { RefCell::new(None) };
}

/// Runs `body` (a test's body) on its own thread and waits for it at most `seconds`
/// (0: the default). Panics with the test's name and what it was waiting for when the
/// deadline passes; a panic in the body is passed on unchanged.
pub fn run<T: Send + 'static>(name: &'static str, seconds: u64, body: impl FnOnce() -> T + Send + 'static) -> T {
    let limit = Duration::from_secs(limit_seconds(seconds));
    let progress: Shared = Arc::default();
    let (done_tx, done_rx) = mpsc::channel();
    let for_body = progress.clone();
    // The same thread name as libtest's, so panics and logs still name the test.
    let thread_name = thread::current().name().unwrap_or(name).to_string();
    let handle = thread::Builder::new()
        .name(thread_name)
        .spawn(move || {
            CURRENT.with(|c| *c.borrow_mut() = Some(for_body));
            let result = catch_unwind(AssertUnwindSafe(body));
            let _ = done_tx.send(result);
        })
        .expect("spawning the test body's thread");
    let started = Instant::now();
    match done_rx.recv_timeout(limit) {
        Ok(Ok(value)) => {
            let _ = handle.join();
            value
        }
        Ok(Err(panic)) => {
            let _ = handle.join();
            resume_unwind(panic)
        }
        Err(RecvTimeoutError::Timeout) => {
            panic!(
                "test {name} passed its deadline of {limit:?} ({:?} elapsed) {}",
                started.elapsed(),
                describe(&progress)
            )
        }
        Err(RecvTimeoutError::Disconnected) => panic!("test {name}: its body's thread vanished without a result"),
    }
}

fn limit_seconds(asked: u64) -> u64 {
    let overridden = std::env::var("LEDGER_TEST_DEADLINE_S").ok().and_then(|s| s.parse::<u64>().ok());
    match (overridden, asked) {
        (Some(s), _) if s > 0 => s,
        (_, 0) => DEFAULT_DEADLINE_S,
        (_, s) => s,
    }
}

fn describe(progress: &Shared) -> String {
    let p = progress.lock().unwrap_or_else(|e| e.into_inner());
    match (&p.waiting, &p.last_done) {
        (Some((what, since)), _) => format!("while waiting for {what} (for {:?})", since.elapsed()),
        (None, Some(last)) => format!("outside a named wait; the last wait that ended was for {last}"),
        (None, None) => "before any named wait (in set-up or an unnamed blocking call)".to_string(),
    }
}

/// Says what the current test body is about to wait for, until the guard is dropped.
/// A deadline that passes meanwhile names it. Outside a `#[testing::test]` body (or on
/// a thread the body started) it does nothing.
#[must_use = "the wait is named only while the guard lives"]
pub fn waiting_for(what: impl Into<String>) -> WaitGuard {
    let shared = CURRENT.with(|c| c.borrow().clone());
    let previous = shared.as_ref().map(|s| {
        let mut p = s.lock().unwrap_or_else(|e| e.into_inner());
        p.waiting.replace((what.into(), Instant::now()))
    });
    WaitGuard { shared, previous: previous.flatten() }
}

/// Ends a named wait (see [`waiting_for`]); restores the enclosing one, if any.
pub struct WaitGuard {
    shared: Option<Shared>,
    previous: Option<(String, Instant)>,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        if let Some(s) = &self.shared {
            let mut p = s.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((what, _)) = std::mem::replace(&mut p.waiting, self.previous.take()) {
                p.last_done = Some(what);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_that_finishes_returns_its_value() {
        assert_eq!(run("t::ok", 5, || 41 + 1), 42);
    }

    #[test]
    fn a_hung_body_fails_by_name_with_what_it_waited_for() {
        let (_keep_open, blocked) = mpsc::channel::<()>();
        let failure = catch_unwind(|| {
            run("t::hung", 1, move || {
                let _wait = waiting_for("the bank to answer");
                let _ = blocked.recv(); // never answers while the sender lives
            })
        })
        .expect_err("the deadline must fail the test");
        let message = failure.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(message.contains("t::hung"), "{message}");
        assert!(message.contains("while waiting for the bank to answer"), "{message}");
    }

    #[test]
    fn a_panicking_body_panics_with_its_own_message() {
        let failure = catch_unwind(|| run("t::boom", 5, || panic!("boom 7"))).expect_err("the panic passes through");
        assert_eq!(failure.downcast_ref::<&str>().copied(), Some("boom 7"));
    }

    #[test]
    fn nested_waits_restore_the_outer_one() {
        let shared: Shared = Arc::default();
        CURRENT.with(|c| *c.borrow_mut() = Some(shared.clone()));
        {
            let _outer = waiting_for("outer");
            {
                let _inner = waiting_for("inner");
                assert_eq!(shared.lock().unwrap().waiting.as_ref().map(|w| w.0.clone()).as_deref(), Some("inner"));
            }
            assert_eq!(shared.lock().unwrap().waiting.as_ref().map(|w| w.0.clone()).as_deref(), Some("outer"));
        }
        let p = shared.lock().unwrap();
        assert!(p.waiting.is_none());
        assert_eq!(p.last_done.as_deref(), Some("outer"));
        drop(p);
        CURRENT.with(|c| *c.borrow_mut() = None);
    }
}
