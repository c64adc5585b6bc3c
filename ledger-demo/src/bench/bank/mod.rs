//! The bench's bank: a small HTTP/1.1 server on 127.0.0.1 that honours the webhook
//! gateway's contract and answers in about a millisecond, so that `e2e webhook` measures
//! the worker (claim, sign, call, record) and not a slow bank.
//!
//! - `POST /payouts` (JSON body, `Idempotency-Key` header) pays once per key and answers
//!   200 `{"status":"accepted","reference":"..."}`; a replay of a paid key is not paid
//!   again and answers the same.
//! - `GET /payouts/<key>` answers 200 `{"status":"accepted","reference":"..."}` for a
//!   paid key, 404 otherwise.
//! - Every request must carry `Authorization: Bearer <token>` and
//!   `Ledger-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">` (at most
//!   five minutes off); otherwise 401, counted. Anything else off-contract (another path,
//!   a POST without a key, a key reused for a different payout, a malformed request) is
//!   counted too. The bench fails on any of them.
//!
//! Bounded: one thread per connection, at most [`MAX_CONNECTIONS`] at once (the rest
//! wait in the listen backlog), keep-alive so a pooled client reuses its connections,
//! bounded request sizes. [`Bank`] is a guard: dropping it stops and joins every thread.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

mod http;
mod payments;

pub use payments::random_hex;

// The rooms below share these through `use super::*`.
use {http::*, payments::*};

/// Payouts are POSTed here; lookups are `GET /payouts/<key>`.
const BASE_PATH: &str = "/payouts";

/// Connections served at once (one thread each).
pub const MAX_CONNECTIONS: usize = 256;

/// What the bank saw, for the report and the bench's checks.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct BankStats {
    /// POSTs answered (after authentication).
    pub posts: u64,
    /// Distinct keys paid.
    pub paid: u64,
    /// POSTs for a key already paid (answered the same, not paid again).
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

/// What was paid under one key, to answer replays and catch a key reused for another
/// payout.
struct Paid {
    reference: String,
    withdrawal_id: i64,
    amount_minor: i64,
}

struct Shared {
    token: String,
    secret: String,
    /// How long the bank "works" on each request before answering.
    delay: Duration,
    stop: AtomicBool,
    paid: Mutex<HashMap<String, Paid>>,
    posts: AtomicU64,
    replays: AtomicU64,
    lookups: AtomicU64,
    auth_failures: AtomicU64,
    bad_requests: AtomicU64,
    connections: AtomicU64,
    live: AtomicUsize,
    peak: AtomicUsize,
    handles: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn paid(&self) -> MutexGuard<'_, HashMap<String, Paid>> {
        self.paid.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handles(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.handles.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running bank; dropping it stops it.
pub struct Bank {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Bank {
    /// Binds 127.0.0.1:0 and serves until dropped.
    pub fn start(token: &str, secret: &str, delay: Duration) -> std::io::Result<Bank> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            token: token.to_string(),
            secret: secret.to_string(),
            delay,
            stop: AtomicBool::new(false),
            paid: Mutex::new(HashMap::new()),
            posts: AtomicU64::new(0),
            replays: AtomicU64::new(0),
            lookups: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            bad_requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            live: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            handles: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let shared = shared.clone();
            thread::Builder::new().name("bench-bank".into()).spawn(move || accept_loop(&listener, &shared))?
        };
        Ok(Bank { addr, shared, acceptor: Some(acceptor) })
    }

    /// The URL to give `--payout-webhook`.
    pub fn url(&self) -> String {
        format!("http://{}{BASE_PATH}", self.addr)
    }

    pub fn stats(&self) -> BankStats {
        let s = &self.shared;
        BankStats {
            posts: s.posts.load(Ordering::Relaxed),
            paid: s.paid().len() as u64,
            replays: s.replays.load(Ordering::Relaxed),
            lookups: s.lookups.load(Ordering::Relaxed),
            auth_failures: s.auth_failures.load(Ordering::Relaxed),
            bad_requests: s.bad_requests.load(Ordering::Relaxed),
            connections: s.connections.load(Ordering::Relaxed),
            peak_connections: s.peak.load(Ordering::Relaxed) as u64,
        }
    }
}

impl Drop for Bank {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor out of `accept`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        // Each connection thread notices within READ_SLICE (or a request's delay).
        let handles = std::mem::take(&mut *self.shared.handles());
        for h in handles {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut failures = 0_u32;
    loop {
        // At the cap, leave new connections in the backlog until one ends.
        while shared.live.load(Ordering::SeqCst) >= MAX_CONNECTIONS && !shared.stop.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(1));
        }
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(_) if shared.stop.load(Ordering::SeqCst) => return,
            Err(_) => {
                // E.g. out of file descriptors: back off rather than spin.
                failures += 1;
                thread::sleep(Duration::from_millis(failures.min(100) as u64));
                continue;
            }
        };
        failures = 0;
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let live = shared.live.fetch_add(1, Ordering::SeqCst) + 1;
        shared.peak.fetch_max(live, Ordering::SeqCst);
        shared.connections.fetch_add(1, Ordering::Relaxed);
        let for_thread = shared.clone();
        let spawned = thread::Builder::new().name("bench-bank-conn".into()).stack_size(256 * 1024).spawn(move || {
            serve(stream, &for_thread);
            for_thread.live.fetch_sub(1, Ordering::SeqCst);
        });
        match spawned {
            Ok(handle) => {
                let mut handles = shared.handles();
                if handles.len() >= 64 {
                    // Join the ones that ended, so the list stays as long as what runs.
                    let (done, running): (Vec<_>, Vec<_>) = handles.drain(..).partition(|h| h.is_finished());
                    *handles = running;
                    for h in done {
                        let _ = h.join();
                    }
                }
                handles.push(handle);
            }
            Err(_) => {
                shared.live.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

#[cfg(test)]
mod tests;
