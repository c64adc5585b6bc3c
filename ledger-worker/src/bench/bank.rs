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

/// Payouts are POSTed here; lookups are `GET /payouts/<key>`.
const BASE_PATH: &str = "/payouts";
/// Connections served at once (one thread each).
pub const MAX_CONNECTIONS: usize = 256;
/// Longest request head (request line and headers).
const MAX_HEAD: usize = 16 * 1024;
/// Longest request body.
const MAX_BODY: usize = 64 * 1024;
/// How often a connection thread waiting for bytes checks whether the bank is stopping.
const READ_SLICE: Duration = Duration::from_millis(200);
/// A keep-alive connection idle this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Signatures further than this from the bank's clock are refused.
const MAX_SIGNATURE_AGE_S: u64 = 300;

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

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    close: bool,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

enum Parsed {
    Incomplete,
    Bad(&'static str),
    Request(Request, usize),
}

/// Serves one connection until the client closes it, it idles out, it breaks the
/// protocol, or the bank stops.
fn serve(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    if stream.set_read_timeout(Some(READ_SLICE)).is_err() {
        return;
    }
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = [0_u8; 8192];
    let mut idle_since = Instant::now();
    loop {
        match parse(&buf) {
            Parsed::Request(request, used) => {
                buf.drain(..used);
                let (status, body) = handle(&request, shared);
                if respond(&mut stream, status, &body, request.close).is_err() || request.close {
                    return;
                }
                idle_since = Instant::now();
                continue;
            }
            Parsed::Bad(why) => {
                shared.bad_requests.fetch_add(1, Ordering::Relaxed);
                let _ = respond(&mut stream, 400, &json!({ "error": why }).to_string(), true);
                return;
            }
            Parsed::Incomplete => {}
        }
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(k) => {
                buf.extend_from_slice(&chunk[..k]);
                idle_since = Instant::now();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                if idle_since.elapsed() > IDLE_TIMEOUT {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

fn parse(buf: &[u8]) -> Parsed {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD { Parsed::Bad("request head too long") } else { Parsed::Incomplete };
    };
    if head_end > MAX_HEAD {
        return Parsed::Bad("request head too long");
    }
    let Ok(head) = std::str::from_utf8(&buf[..head_end]) else {
        return Parsed::Bad("request head is not UTF-8");
    };
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let (Some(method), Some(path), Some(version)) = (first.next(), first.next(), first.next()) else {
        return Parsed::Bad("bad request line");
    };
    let mut headers = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Parsed::Bad("bad header line");
        };
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let mut request = Request {
        method: method.to_string(),
        path: path.to_string(),
        headers,
        body: Vec::new(),
        close: version == "HTTP/1.0",
    };
    if let Some(connection) = request.header("connection") {
        let connection = connection.to_ascii_lowercase();
        request.close = connection.contains("close") || (request.close && !connection.contains("keep-alive"));
    }
    if request.header("transfer-encoding").is_some() {
        return Parsed::Bad("chunked bodies are not supported (send Content-Length)");
    }
    let length = match request.header("content-length").map(str::parse::<usize>) {
        None => 0,
        Some(Ok(n)) if n <= MAX_BODY => n,
        Some(_) => return Parsed::Bad("bad or too large Content-Length"),
    };
    let body_start = head_end + 4;
    if buf.len() < body_start + length {
        return Parsed::Incomplete;
    }
    request.body = buf[body_start..body_start + length].to_vec();
    Parsed::Request(request, body_start + length)
}

fn respond(stream: &mut TcpStream, status: u16, body: &str, close: bool) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        409 => "Conflict",
        _ => "Error",
    };
    let connection = if close { "Connection: close\r\n" } else { "" };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{connection}\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())
}

fn handle(request: &Request, shared: &Shared) -> (u16, String) {
    if !authentic(request, shared) {
        shared.auth_failures.fetch_add(1, Ordering::Relaxed);
        return (401, json!({ "error": "unauthorized" }).to_string());
    }
    if !shared.delay.is_zero() {
        thread::sleep(shared.delay);
    }
    let lookup_prefix = format!("{BASE_PATH}/");
    match request.method.as_str() {
        "POST" if request.path == BASE_PATH => pay(request, shared),
        "GET" if request.path.starts_with(&lookup_prefix) => {
            shared.lookups.fetch_add(1, Ordering::Relaxed);
            let Some(key) = percent_decode(&request.path[lookup_prefix.len()..]) else {
                shared.bad_requests.fetch_add(1, Ordering::Relaxed);
                return (400, json!({ "error": "bad key encoding" }).to_string());
            };
            match shared.paid().get(&key) {
                Some(p) => (200, json!({ "status": "accepted", "reference": p.reference }).to_string()),
                None => (404, json!({ "status": "not_found", "idempotency_key": key }).to_string()),
            }
        }
        _ => {
            shared.bad_requests.fetch_add(1, Ordering::Relaxed);
            (404, json!({ "error": "not found" }).to_string())
        }
    }
}

fn pay(request: &Request, shared: &Shared) -> (u16, String) {
    shared.posts.fetch_add(1, Ordering::Relaxed);
    let bad = |why: &str| {
        shared.bad_requests.fetch_add(1, Ordering::Relaxed);
        (400, json!({ "error": why }).to_string())
    };
    let Some(key) = request.header("idempotency-key").filter(|k| !k.is_empty()) else {
        return bad("no Idempotency-Key header");
    };
    let Ok(body) = serde_json::from_slice::<Value>(&request.body) else {
        return bad("the body is not JSON");
    };
    let (Some(body_key), Some(withdrawal_id), Some(amount_minor)) = (
        body.get("idempotency_key").and_then(Value::as_str),
        body.get("withdrawal_id").and_then(Value::as_i64),
        body.get("amount_minor").and_then(Value::as_i64),
    ) else {
        return bad("the body lacks idempotency_key, withdrawal_id or amount_minor");
    };
    if body_key != key || amount_minor <= 0 {
        return bad("the body's idempotency_key differs from the header, or the amount is not positive");
    }
    let mut paid = shared.paid();
    let next = paid.len() + 1;
    match paid.get(key) {
        Some(p) if p.withdrawal_id != withdrawal_id || p.amount_minor != amount_minor => {
            drop(paid);
            shared.bad_requests.fetch_add(1, Ordering::Relaxed);
            (409, json!({ "error": "idempotency key reused for a different payout" }).to_string())
        }
        Some(p) => {
            shared.replays.fetch_add(1, Ordering::Relaxed);
            (200, json!({ "status": "accepted", "reference": p.reference }).to_string())
        }
        None => {
            let reference = format!("bench-bank-{next}");
            paid.insert(key.to_string(), Paid { reference: reference.clone(), withdrawal_id, amount_minor });
            (200, json!({ "status": "accepted", "reference": reference }).to_string())
        }
    }
}

/// `Authorization: Bearer <token>` and a fresh, valid `Ledger-Signature` over the body.
fn authentic(request: &Request, shared: &Shared) -> bool {
    let token_ok = request
        .header("authorization")
        .and_then(|a| a.strip_prefix("Bearer "))
        .is_some_and(|t| constant_time_eq(t.as_bytes(), shared.token.as_bytes()));
    let Some(signature) = request.header(&crate::webhook::SIGNATURE_HEADER.to_ascii_lowercase()) else {
        return false;
    };
    let (mut t, mut v1) = (None, None);
    for part in signature.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => t = Some(value),
            Some(("v1", value)) => v1 = hex_decode(value),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let Ok(seconds) = t.parse::<u64>() else {
        return false;
    };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    if now.abs_diff(seconds) > MAX_SIGNATURE_AGE_S {
        return false;
    }
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(shared.secret.as_bytes()) else {
        return false;
    };
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(&request.body);
    // Both checked, so a wrong token costs the same as a wrong signature.
    mac.verify_slice(&v1).is_ok() && token_ok
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0_u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            out.push(u8::from_str_radix(text.get(i + 1..i + 3)?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `bytes` random bytes as hex, for the bench's credentials.
pub fn random_hex(bytes: usize) -> String {
    let mut raw = vec![0_u8; bytes];
    let from_os = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut raw));
    if from_os.is_err() {
        raw.iter_mut().for_each(|b| *b = fastrand::u8(..));
    }
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &str, t: u64, body: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.{body}").as_bytes());
        let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        format!("t={t},v1={hex}")
    }

    /// Sends one request on a kept-alive connection and reads one response.
    fn call(stream: &mut TcpStream, method: &str, path: &str, body: &str, token: &str, secret: &str) -> String {
        let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: bank\r\nAuthorization: Bearer {token}\r\nLedger-Signature: {}\r\n\
             Idempotency-Key: k1\r\nContent-Length: {}\r\n\r\n{body}",
            sign(secret, t, body),
            body.len()
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut got = Vec::new();
        let mut chunk = [0_u8; 4096];
        loop {
            let k = stream.read(&mut chunk).unwrap();
            assert!(k > 0, "the bank closed the connection");
            got.extend_from_slice(&chunk[..k]);
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let length: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or(0);
                if got.len() >= end + 4 + length {
                    return text;
                }
            }
        }
    }

    #[ledger_core::testing::test]
    fn pays_once_per_key_over_one_kept_alive_connection_and_refuses_bad_credentials() {
        let bank = Bank::start("tok", "sec", Duration::from_millis(1)).unwrap();
        let mut stream = TcpStream::connect(bank.addr).unwrap();
        let body = r#"{"idempotency_key":"k1","withdrawal_id":7,"amount_minor":100}"#;
        for _ in 0..2 {
            let paid = call(&mut stream, "POST", "/payouts", body, "tok", "sec");
            assert!(paid.starts_with("HTTP/1.1 200") && paid.contains(r#""reference":"bench-bank-1""#), "{paid}");
        }
        let found = call(&mut stream, "GET", "/payouts/k1", "", "tok", "sec");
        assert!(found.starts_with("HTTP/1.1 200") && found.contains("accepted"), "{found}");
        let missing = call(&mut stream, "GET", "/payouts/k%32", "", "tok", "sec");
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let wrong_secret = call(&mut stream, "GET", "/payouts/k1", "", "tok", "nope");
        assert!(wrong_secret.starts_with("HTTP/1.1 401"), "{wrong_secret}");
        let wrong_token = call(&mut stream, "POST", "/payouts", body, "nope", "sec");
        assert!(wrong_token.starts_with("HTTP/1.1 401"), "{wrong_token}");
        let other = r#"{"idempotency_key":"k1","withdrawal_id":8,"amount_minor":100}"#;
        let reused = call(&mut stream, "POST", "/payouts", other, "tok", "sec");
        assert!(reused.starts_with("HTTP/1.1 409"), "{reused}");
        let s = bank.stats();
        assert_eq!((s.posts, s.paid, s.replays, s.lookups, s.auth_failures, s.bad_requests), (3, 1, 1, 2, 2, 1));
        assert_eq!(s.connections, 1);
        drop(stream);
        drop(bank);
    }

    /// The worker's webhook gateway (the contract's client side) is paid by this bank:
    /// signed and authenticated, once per key, answered the same on a replay, found by a
    /// lookup, and over kept-alive connections.
    #[ledger_core::testing::test]
    fn the_webhook_gateway_is_paid_once_per_key() {
        use crate::webhook::{Credentials, Secret, WebhookConfig, WebhookGateway};
        use ledger_core::payouts::{LookupOutcome, PayoutGateway, PayoutRequest, SendOutcome};
        use ledger_core::{PayoutId, WithdrawalId};

        let bank = Bank::start("tok-bench-1", "sec-bench-1", Duration::ZERO).unwrap();
        let config =
            WebhookConfig { url: bank.url(), connect_timeout: Duration::from_secs(2), timeout: Duration::from_secs(5) };
        let credentials = Credentials { token: Secret::new("tok-bench-1"), secret: Secret::new("sec-bench-1") };
        let gateway = WebhookGateway::new(config.clone(), credentials).unwrap();
        let request = |i: i64| PayoutRequest {
            payout: PayoutId::new(i).unwrap(),
            withdrawal: WithdrawalId::new(i).unwrap(),
            amount_minor: 1_000 + i,
            amount: format!("{}.{:02}", (1_000 + i) / 100, (1_000 + i) % 100),
            currency: "EUR".into(),
            destination: "DE89370400440532013000".into(),
            idempotency_key: format!("payout-bench-w{i}"),
            attempt: 1,
            token: i,
            possibly_sent: false,
        };
        assert_eq!(gateway.lookup(&request(1)), LookupOutcome::NotFound);
        let first = gateway.send(&request(1));
        assert_eq!(first, SendOutcome::Accepted { reference: Some("bench-bank-1".into()) });
        assert_eq!(gateway.send(&request(1)), first, "a replay answers the same");
        assert!(matches!(gateway.lookup(&request(1)), LookupOutcome::Accepted { .. }));
        for i in 2..=50 {
            assert!(matches!(gateway.send(&request(i)), SendOutcome::Accepted { .. }));
        }
        let s = bank.stats();
        assert_eq!((s.posts, s.paid, s.replays, s.lookups, s.failures()), (51, 50, 1, 2, 0));
        assert_eq!(s.connections, 1, "one client, one kept-alive connection");

        let stranger = Credentials { token: Secret::new("tok-bench-1"), secret: Secret::new("wrong-secret") };
        let stranger = WebhookGateway::new(config, stranger).unwrap();
        assert!(matches!(stranger.send(&request(99)), SendOutcome::Unauthorized { .. }));
        assert_eq!((bank.stats().auth_failures, bank.stats().paid), (1, 50));
    }

    #[test]
    fn decodes_hex_and_percent() {
        assert_eq!(hex_decode("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(hex_decode("0"), None);
        assert_eq!(hex_decode("zz"), None);
        assert_eq!(percent_decode("a%20b%2Fc").as_deref(), Some("a b/c"));
        assert_eq!(percent_decode("a%2"), None);
        assert_eq!(random_hex(16).len(), 32);
    }
}
