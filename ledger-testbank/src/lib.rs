//! `ledger-testbank`: the one local bank that speaks the webhook gateway's payout
//! contract. The bench runs it fast and well-behaved ([`BankConfig::fast`]); the
//! daemon's tests run it flaky ([`Faults`]), or make it stop answering
//! ([`Bank::set_hang`]). Never a dependency of the daemon itself.
//!
//! [`Bank::start`] binds 127.0.0.1:0 and serves HTTP/1.1:
//! - `POST /payouts` (JSON body, `Idempotency-Key` header) pays a payout once per key.
//!   A repeated key is a replay: never paid again, answered per [`Replay`].
//! - `GET /payouts/<key>` answers what became of a key: 200 accepted, 200 rejected (with
//!   the reason) or 404 (never received).
//! - Every request must carry `Authorization: Bearer <token>` and a valid
//!   `Ledger-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256("<t>.<body>")>` no more than
//!   five minutes off; otherwise 401, counted, and nothing is done.
//!
//! It watches the client: two calls for one key in flight at once, a key reused for a
//! different payout, a withdrawal paid under two keys, or a malformed request are
//! recorded as [`Violation`]s, which a test asserts stay empty; [`BankStats`] counts
//! every request off the contract, for the bench.
//!
//! Bounded: one thread per connection, at most [`BankConfig::max_connections`] at once
//! (the rest wait in the listen backlog), bounded request sizes and read times. [`Bank`]
//! is a guard: dropping it (also while a test panics) stops and joins every thread.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

mod auth;
mod book;
mod config;
mod http;
mod server;

pub use auth::random_hex;
pub use book::{Payment, Violation};
pub use config::{BankConfig, Faults, Replay};

use book::Books;

/// Payouts are POSTed here; lookups are `GET /payouts/<key>`.
const BASE_PATH: &str = "/payouts";

/// Connections of a hanging bank kept open at most; later ones are closed unanswered.
const MAX_HELD: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum BankError {
    #[error("bad test bank configuration: {0}")]
    BadConfig(String),
    #[error("starting the test bank: {0}")]
    Io(#[from] std::io::Error),
}

/// What the bank saw, for the bench's report and checks and the tests' assertions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BankStats {
    /// Requests read whole (any method, authenticated or not). Not in the bench's report.
    #[serde(skip)]
    pub requests: u64,
    /// POSTs to the payout path, after authentication.
    pub posts: u64,
    /// Distinct keys paid.
    pub paid: u64,
    /// POSTs for a key already paid (answered per [`Replay`], never paid again).
    pub replays: u64,
    pub lookups: u64,
    /// Requests refused with 401 (missing or wrong token, bad or stale signature).
    pub auth_failures: u64,
    /// Requests off the contract (unknown path or method, malformed, no key, a key
    /// reused for a different payout).
    pub bad_requests: u64,
    /// TCP connections accepted, and the most open at once.
    pub connections: u64,
    pub peak_connections: u64,
}

impl BankStats {
    /// Requests the bank refused because the client broke the contract.
    pub fn failures(&self) -> u64 {
        self.auth_failures + self.bad_requests
    }
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    posts: AtomicU64,
    replays: AtomicU64,
    lookups: AtomicU64,
    auth_failures: AtomicU64,
    bad_requests: AtomicU64,
    connections: AtomicU64,
}

struct Shared {
    config: BankConfig,
    url: String,
    faults: Mutex<Faults>,
    replay: Mutex<Replay>,
    rng: Mutex<fastrand::Rng>,
    books: Mutex<Books>,
    /// key -> calls for it being handled now.
    in_flight: Mutex<HashMap<String, usize>>,
    violations: Mutex<Vec<Violation>>,
    counters: Counters,
    /// Read requests and keep their connections open without ever answering.
    hang: AtomicBool,
    /// Keys of requests received while hanging (none of them acted on).
    hung: Mutex<Vec<String>>,
    /// Their connections: open until the bank stops.
    held: Mutex<Vec<TcpStream>>,
    /// Connections being served, against the cap, and for `wait_idle`.
    live: Mutex<usize>,
    live_changed: Condvar,
    peak: AtomicUsize,
    /// Clones of open connections, shut down on stop so no thread waits on a client.
    streams: Mutex<HashMap<u64, TcpStream>>,
    next_stream: AtomicU64,
    handles: Mutex<Vec<JoinHandle<()>>>,
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking handler must not take the whole bank (and the test's checks) with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Sleeps `delay`, in slices, so a stopping bank does not wait for it.
    fn sleep_unless_stopped(&self, delay: Duration) {
        let until = Instant::now() + delay;
        while !self.stopping() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            thread::sleep(left.min(Duration::from_millis(10)));
        }
    }
}

/// A running bank; dropping it stops it and joins its threads.
pub struct Bank {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

impl Bank {
    /// Binds 127.0.0.1:0 and serves until dropped.
    pub fn start(config: BankConfig) -> Result<Bank, BankError> {
        config.check()?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            url: format!("http://{addr}{BASE_PATH}"),
            faults: Mutex::new(config.faults.clone()),
            replay: Mutex::new(config.replay),
            rng: Mutex::new(fastrand::Rng::with_seed(config.seed)),
            books: Mutex::default(),
            in_flight: Mutex::default(),
            violations: Mutex::default(),
            counters: Counters::default(),
            hang: AtomicBool::new(false),
            hung: Mutex::default(),
            held: Mutex::default(),
            live: Mutex::new(0),
            live_changed: Condvar::new(),
            peak: AtomicUsize::new(0),
            streams: Mutex::default(),
            next_stream: AtomicU64::new(0),
            handles: Mutex::default(),
            stop: AtomicBool::new(false),
            config,
        });
        let acceptor = {
            let shared = shared.clone();
            thread::Builder::new().name("test-bank".into()).spawn(move || server::accept_loop(&listener, &shared))?
        };
        Ok(Bank { shared, addr, acceptor: Some(acceptor) })
    }

    /// The URL to POST payouts to (`http://127.0.0.1:<port>/payouts`), for
    /// `--payout-webhook`.
    pub fn url(&self) -> &str {
        &self.shared.url
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn token(&self) -> &str {
        &self.shared.config.token
    }

    pub fn secret(&self) -> &str {
        &self.shared.config.secret
    }

    pub fn stats(&self) -> BankStats {
        let c = &self.shared.counters;
        BankStats {
            requests: c.requests.load(Ordering::SeqCst),
            posts: c.posts.load(Ordering::SeqCst),
            paid: lock(&self.shared.books).paid.len() as u64,
            replays: c.replays.load(Ordering::SeqCst),
            lookups: c.lookups.load(Ordering::SeqCst),
            auth_failures: c.auth_failures.load(Ordering::SeqCst),
            bad_requests: c.bad_requests.load(Ordering::SeqCst),
            connections: c.connections.load(Ordering::SeqCst),
            peak_connections: self.shared.peak.load(Ordering::SeqCst) as u64,
        }
    }

    /// Requests read whole (any method, authenticated or not).
    pub fn requests(&self) -> u64 {
        self.stats().requests
    }

    /// Requests refused for a wrong or missing token or signature.
    pub fn auth_failures(&self) -> u64 {
        self.stats().auth_failures
    }

    /// POSTs for a key already paid (answered per [`Replay`], never paid again).
    pub fn replays(&self) -> u64 {
        self.stats().replays
    }

    /// What the bank paid, by idempotency key.
    pub fn paid(&self) -> HashMap<String, Payment> {
        lock(&self.shared.books).paid.clone()
    }

    /// Keys the bank refused (422), with the reason.
    pub fn refused(&self) -> HashMap<String, String> {
        lock(&self.shared.books).refused.clone()
    }

    pub fn violations(&self) -> Vec<Violation> {
        lock(&self.shared.violations).clone()
    }

    /// Keys of the requests read while hanging, in order (never acted on).
    pub fn hung_keys(&self) -> Vec<String> {
        lock(&self.shared.hung).clone()
    }

    /// Changes the faults from the next request on (e.g. calm after a storm).
    pub fn set_faults(&self, faults: Faults) -> Result<(), BankError> {
        faults.check()?;
        *lock(&self.shared.faults) = faults;
        Ok(())
    }

    pub fn set_replay(&self, replay: Replay) {
        *lock(&self.shared.replay) = replay;
    }

    /// While on: read each request, keep its connection open, never answer, do nothing.
    pub fn set_hang(&self, on: bool) {
        self.shared.hang.store(on, Ordering::SeqCst);
    }

    /// Waits until no connection is being served (a slow fault may still be sleeping
    /// after its client gave up; with keep-alive an idle open connection counts). False
    /// if still busy after `timeout`.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut live = lock(&self.shared.live);
        while *live > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            live = self.shared.live_changed.wait_timeout(live, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }
}

impl Drop for Bank {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes the acceptor from waiting for room, then from accept(); it sees `stop`.
        self.shared.live_changed.notify_all();
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        // The acceptor has ended, so no connection is registered after this.
        for stream in lock(&self.shared.streams).values() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        let handles = std::mem::take(&mut *lock(&self.shared.handles));
        for h in handles {
            let _ = h.join();
        }
        lock(&self.shared.held).clear();
    }
}

#[cfg(test)]
mod tests;
