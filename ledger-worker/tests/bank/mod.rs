//! A local test bank that speaks the webhook gateway's contract, and misbehaves on
//! purpose.
//!
//! Tests include it with `mod bank;`. [`BankServer::start`] binds 127.0.0.1:0 and serves
//! HTTP/1.1 (one request per connection, `Connection: close`) from a fixed number of
//! worker threads:
//! - `POST <url>` pays a payout once per idempotency key. A repeated key is a replay:
//!   never paid again, answered per [`Replay`].
//! - `GET <url>/<key>` answers what became of a key: 200 accepted, 200 rejected (with
//!   the reason) or 404 (never received).
//! - Every request must carry `Authorization: Bearer <token>` and a valid
//!   `Ledger-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256("<t>.<body>")>` no more than
//!   five minutes off; otherwise 401, counted, and nothing is done.
//!
//! It watches the client: two calls for one key in flight at once, a key reused for a
//! different payout, a withdrawal paid under two keys, or a malformed request are
//! recorded as [`Violation`]s, which a test asserts stay empty.
//!
//! Faults are drawn per request from a seeded RNG with configurable percentages
//! ([`Faults`]); destinations in [`BankConfig::refused_destinations`] are refused with
//! 422 every time. The server is a guard: dropping it (also while a test panics) stops
//! and joins its threads.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

/// The path payouts are POSTed to; lookups are `GET /payouts/<key>`.
const BASE_PATH: &str = "/payouts";
/// Longest request head (request line and headers) the bank reads.
const MAX_HEAD: u64 = 16 * 1024;
/// Longest request body the bank reads.
const MAX_BODY: usize = 256 * 1024;
/// Size of the body the `oversized` fault answers with (over the gateway's 16 KiB limit).
const OVERSIZED_BODY: usize = 64 * 1024;

/// Injected faults, in percent of requests (their sum must not exceed 100). One fault at
/// most is drawn per request, from the bank's seeded RNG, after authentication.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Close the connection without an answer and without acting (POST and GET). The
    /// client cannot tell this from a payment whose answer was lost: it must not treat
    /// it as a refusal, and must find out (lookup) before giving the money back.
    pub drop_before_pct: u32,
    /// Answer 503 without acting (POST and GET): an overloaded or failing bank. Neither
    /// paid nor refused.
    pub server_error_pct: u32,
    /// Pay, then close the connection without an answer (POST only): the worst case,
    /// money gone and no word of it. Only a lookup can tell.
    pub pay_then_drop_pct: u32,
    /// Answer 307 with a `Location` header and do nothing (POST and GET): a load
    /// balancer or a moved endpoint. A client following it could POST a payout to a
    /// place nobody vetted; a client reading it as success would settle unpaid money.
    pub redirect_pct: u32,
    /// Pay, then answer `200 OK` with the plain-text body `OK` (POST only): a 2xx that is
    /// not the contract's accepted body, as a proxy or a sloppy bank might send. It must
    /// not be read as paid (nor as refused).
    pub bare_success_pct: u32,
    /// Pay, then answer 200 with an accepted body padded past 64 KiB (POST only): the
    /// client must stop reading at its limit and call the answer unknown, not buffer
    /// without end.
    pub oversized_pct: u32,
    /// Sleep [`Faults::slow_delay`] before acting, then act and answer normally (POST and
    /// GET): a slow bank, for timeouts. The call stays in flight while the bank sleeps,
    /// even if the client gave up: a client that then calls again for the same key
    /// overlaps it (a [`Violation::Overlap`]), and a lookup made meanwhile truthfully
    /// answers 404 although the payment lands a moment later.
    pub slow_pct: u32,
    pub slow_delay: Duration,
}

impl Faults {
    pub fn none() -> Faults {
        Faults::default()
    }

    fn total(&self) -> u32 {
        self.drop_before_pct
            + self.server_error_pct
            + self.pay_then_drop_pct
            + self.redirect_pct
            + self.bare_success_pct
            + self.oversized_pct
            + self.slow_pct
    }

    fn draw(&self, rng: &mut fastrand::Rng) -> Fault {
        let roll = rng.u32(0..100);
        let table = [
            (self.drop_before_pct, Fault::DropBefore),
            (self.server_error_pct, Fault::ServerError),
            (self.pay_then_drop_pct, Fault::PayThenDrop),
            (self.redirect_pct, Fault::Redirect),
            (self.bare_success_pct, Fault::BareSuccess),
            (self.oversized_pct, Fault::Oversized),
            (self.slow_pct, Fault::Slow),
        ];
        let mut upto = 0;
        for (pct, fault) in table {
            upto += pct;
            if roll < upto {
                return fault;
            }
        }
        Fault::None
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    DropBefore,
    ServerError,
    PayThenDrop,
    Redirect,
    BareSuccess,
    Oversized,
    Slow,
}

/// How a POST for a key already paid (a replay) is answered. It is never paid again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replay {
    /// 200 `{"status":"accepted","reference":<the first reference>}`: a bank that honours
    /// idempotency keys the friendly way.
    Accepted,
    /// This status (e.g. 409, or 422 "duplicate"): legal, and nasty. A client that takes
    /// a 4xx to a replay as a refusal would give back money that was paid; it must look
    /// the key up first.
    Status(u16),
}

#[derive(Clone, Debug)]
pub struct BankConfig {
    pub token: String,
    pub secret: String,
    /// Seeds the fault RNG: the same seed and the same order of requests give the same
    /// faults.
    pub seed: u64,
    pub faults: Faults,
    pub replay: Replay,
    /// Destinations (IBANs) refused with 422, every time.
    pub refused_destinations: HashSet<String>,
    /// Worker threads: at most this many connections are served at once; the rest wait.
    pub workers: usize,
    /// Longest wait for a client's bytes; also bounds reading a whole request, so a stuck
    /// or slow client cannot hold a worker for longer.
    pub read_timeout: Duration,
    /// Signatures further than this from the bank's clock are refused (replay defence).
    pub max_signature_age: Duration,
}

impl Default for BankConfig {
    fn default() -> BankConfig {
        BankConfig {
            token: "bank-test-token".into(),
            secret: "bank-test-signing-secret".into(),
            seed: 1,
            faults: Faults::none(),
            replay: Replay::Accepted,
            refused_destinations: HashSet::new(),
            workers: 8,
            read_timeout: Duration::from_secs(5),
            max_signature_age: Duration::from_secs(300),
        }
    }
}

/// A payout the bank paid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payment {
    pub key: String,
    pub payout_id: i64,
    pub withdrawal_id: i64,
    pub amount: String,
    pub amount_minor: i64,
    pub currency: String,
    pub destination: String,
    pub reference: String,
}

/// Something the client did that it must never do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Two calls for one key were in flight at the same time.
    Overlap { key: String },
    /// A key already used was sent again with a different payout (amount, destination...).
    KeyReused { key: String },
    /// One withdrawal was paid under two keys: money left twice.
    PaidTwice { withdrawal_id: i64, first_key: String, second_key: String },
    /// A request the contract does not allow (missing field, header and body disagree...).
    Malformed { reason: String },
}

#[derive(Default)]
struct Books {
    paid: HashMap<String, Payment>,
    /// key -> reason, for payouts refused with 422.
    refused: HashMap<String, String>,
    /// withdrawal id -> the key it was paid under.
    paid_withdrawals: HashMap<i64, String>,
    next_reference: u64,
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
    requests: AtomicU64,
    auth_failures: AtomicU64,
    replays: AtomicU64,
    /// Connections being handled, for `wait_idle`.
    busy: Mutex<usize>,
    idle: Condvar,
    /// Open connections, shut down on stop so no worker waits on a client.
    streams: Mutex<HashMap<u64, TcpStream>>,
    next_stream: AtomicU64,
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking handler must not take the whole bank (and the test's checks) with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The running bank; stops and joins its threads when dropped.
pub struct BankServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
}

/// Starts a bank (see [`BankServer::start`]).
pub fn start(config: BankConfig) -> BankServer {
    BankServer::start(config)
}

impl BankServer {
    pub fn start(config: BankConfig) -> BankServer {
        assert!(config.faults.total() <= 100, "fault percentages add up to more than 100: {:?}", config.faults);
        assert!(config.workers > 0, "the bank needs at least one worker");
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the test bank");
        let addr = listener.local_addr().expect("the test bank's address");
        let shared = Arc::new(Shared {
            url: format!("http://{addr}{BASE_PATH}"),
            faults: Mutex::new(config.faults.clone()),
            replay: Mutex::new(config.replay),
            rng: Mutex::new(fastrand::Rng::with_seed(config.seed)),
            books: Mutex::default(),
            in_flight: Mutex::default(),
            violations: Mutex::default(),
            requests: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            replays: AtomicU64::new(0),
            busy: Mutex::new(0),
            idle: Condvar::new(),
            streams: Mutex::default(),
            next_stream: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            config,
        });
        let (tx, rx) = crossbeam_channel::bounded::<TcpStream>(shared.config.workers);
        let workers = (0..shared.config.workers)
            .map(|i| {
                let shared = shared.clone();
                let rx = rx.clone();
                thread::Builder::new()
                    .name(format!("bank-worker-{i}"))
                    .spawn(move || {
                        for stream in rx {
                            // A bug in a handler loses its connection, not the worker.
                            let served = panic::catch_unwind(AssertUnwindSafe(|| serve(&shared, stream)));
                            if served.is_err() {
                                eprintln!("test bank: a request handler panicked");
                            }
                        }
                    })
                    .expect("spawning a bank worker")
            })
            .collect();
        let for_acceptor = shared.clone();
        let acceptor = thread::Builder::new()
            .name("bank-acceptor".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if for_acceptor.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    // Counted busy from here, so wait_idle sees queued connections too.
                    *lock(&for_acceptor.busy) += 1;
                    if tx.send(stream).is_err() {
                        break;
                    }
                }
                // `tx` drops here: the workers finish what is queued and end.
            })
            .expect("spawning the bank's acceptor");
        BankServer { shared, addr, acceptor: Some(acceptor), workers }
    }

    /// The URL to POST payouts to (`http://127.0.0.1:<port>/payouts`).
    pub fn url(&self) -> &str {
        &self.shared.url
    }

    pub fn token(&self) -> &str {
        &self.shared.config.token
    }

    pub fn secret(&self) -> &str {
        &self.shared.config.secret
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
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

    /// Requests refused for a wrong or missing token or signature.
    pub fn auth_failures(&self) -> u64 {
        self.shared.auth_failures.load(Ordering::SeqCst)
    }

    /// Requests read whole (any method, authenticated or not).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// POSTs for a key already paid (answered per [`Replay`], never paid again).
    pub fn replays(&self) -> u64 {
        self.shared.replays.load(Ordering::SeqCst)
    }

    /// Changes the faults from the next request on (e.g. calm after a storm).
    pub fn set_faults(&self, faults: Faults) {
        assert!(faults.total() <= 100, "fault percentages add up to more than 100: {faults:?}");
        *lock(&self.shared.faults) = faults;
    }

    pub fn set_replay(&self, replay: Replay) {
        *lock(&self.shared.replay) = replay;
    }

    /// Waits until no connection is being handled (a slow fault may still be sleeping
    /// after its client gave up). False if still busy after `timeout`.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut busy = lock(&self.shared.busy);
        while *busy > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            busy = self.shared.idle.wait_timeout(busy, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }
}

impl Drop for BankServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for stream in lock(&self.shared.streams).values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        // Wakes the acceptor from accept(); it sees `stop` and ends.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// Marks a connection done (busy count, registry) however its handling ends.
struct ConnectionGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        lock(&self.shared.streams).remove(&self.id);
        let mut busy = lock(&self.shared.busy);
        *busy -= 1;
        if *busy == 0 {
            self.shared.idle.notify_all();
        }
    }
}

/// Counts a call for `key` in flight; a second one at the same time is a violation.
struct InFlight<'a> {
    shared: &'a Shared,
    key: String,
}

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared, key: &str) -> InFlight<'a> {
        let mut in_flight = lock(&shared.in_flight);
        let n = in_flight.entry(key.to_string()).or_insert(0);
        if *n > 0 {
            lock(&shared.violations).push(Violation::Overlap { key: key.to_string() });
        }
        *n += 1;
        InFlight { shared, key: key.to_string() }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut in_flight = lock(&self.shared.in_flight);
        if let Some(n) = in_flight.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                in_flight.remove(&self.key);
            }
        }
    }
}

struct Request {
    method: String,
    path: String,
    headers: HashMap<String, String>,
    body: String,
}

/// What to do with the connection after handling a request.
enum Answer {
    Respond {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
    },
    /// Close without a word.
    Drop,
}

fn respond(status: u16, body: Value) -> Answer {
    Answer::Respond { status, headers: Vec::new(), body: body.to_string() }
}

fn serve(shared: &Shared, stream: TcpStream) {
    let id = shared.next_stream.fetch_add(1, Ordering::SeqCst);
    let _guard = ConnectionGuard { shared, id };
    // Registered before `stop` is checked: a stop either sees this stream (and shuts it
    // down) or is seen here.
    if let Ok(clone) = stream.try_clone() {
        lock(&shared.streams).insert(id, clone);
    }
    if shared.stop.load(Ordering::SeqCst) {
        return;
    }
    let timeout = shared.config.read_timeout;
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let mut stream = stream;
    // The call is in flight from the moment its key is known until just before the
    // answer (or the dropped connection) can reach the client: a client may call again
    // as soon as it has an answer, so holding it any longer would flag honest clients.
    let mut in_flight = None;
    let answer = match read_request(&stream, Instant::now() + timeout) {
        Ok(request) => {
            shared.requests.fetch_add(1, Ordering::SeqCst);
            handle(shared, &request, &mut in_flight)
        }
        Err(ReadError::Closed) => return,
        Err(ReadError::Bad(reason)) => malformed(shared, reason),
    };
    drop(in_flight);
    if let Answer::Respond { status, headers, body } = answer {
        let mut head = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
            reason_phrase(status),
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let _ = stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(body.as_bytes()));
        let _ = stream.flush();
    }
    let _ = stream.shutdown(Shutdown::Both);
}

enum ReadError {
    /// The client went away (or timed out) before a whole request.
    Closed,
    /// Not a request the bank understands.
    Bad(String),
}

fn read_request(stream: &TcpStream, deadline: Instant) -> Result<Request, ReadError> {
    let mut reader = BufReader::new(stream.try_clone().map_err(|_| ReadError::Closed)?);
    let mut head_left = MAX_HEAD;
    // One line of the head, within what is left of its size limit.
    let mut next_line = |reader: &mut BufReader<TcpStream>| -> Result<String, ReadError> {
        if Instant::now() > deadline {
            return Err(ReadError::Closed);
        }
        let mut line = String::new();
        let n = reader.take(head_left).read_line(&mut line).map_err(|_| ReadError::Closed)?;
        if n == 0 {
            return Err(if head_left == 0 {
                ReadError::Bad("request head too long".into())
            } else {
                ReadError::Closed
            });
        }
        head_left -= n as u64;
        if !line.ends_with('\n') {
            return Err(ReadError::Bad("request head too long or cut short".into()));
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    };
    let line = next_line(&mut reader)?;
    let mut parts = line.splitn(3, ' ');
    let (Some(method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(ReadError::Bad(format!("bad request line {line:?}")));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(ReadError::Bad(format!("unsupported version {version:?}")));
    }
    let (method, path) = (method.to_string(), path.to_string());
    let mut headers = HashMap::new();
    loop {
        let line = next_line(&mut reader)?;
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(ReadError::Bad(format!("bad header line {line:?}")));
        };
        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    if headers.contains_key("transfer-encoding") {
        return Err(ReadError::Bad("only Content-Length bodies are supported".into()));
    }
    let length: usize = match headers.get("content-length") {
        Some(v) => v.parse().map_err(|_| ReadError::Bad(format!("bad Content-Length {v:?}")))?,
        None => 0,
    };
    if length > MAX_BODY {
        return Err(ReadError::Bad(format!("body of {length} bytes is too long")));
    }
    let mut body = vec![0u8; length];
    let mut filled = 0;
    while filled < length {
        if Instant::now() > deadline {
            return Err(ReadError::Closed);
        }
        match reader.read(&mut body[filled..]) {
            Ok(0) | Err(_) => return Err(ReadError::Closed),
            Ok(n) => filled += n,
        }
    }
    let body = String::from_utf8(body).map_err(|_| ReadError::Bad("body is not UTF-8".into()))?;
    Ok(Request { method, path, headers, body })
}

fn handle<'a>(shared: &'a Shared, request: &Request, in_flight: &mut Option<InFlight<'a>>) -> Answer {
    if let Err(why) = authenticate(&shared.config, request) {
        shared.auth_failures.fetch_add(1, Ordering::SeqCst);
        return respond(401, json!({ "error": why }));
    }
    let key = match (request.method.as_str(), request.path.as_str()) {
        ("POST", BASE_PATH) => match request.headers.get("idempotency-key") {
            Some(key) if !key.is_empty() => key.clone(),
            _ => return malformed(shared, "POST without an Idempotency-Key header".into()),
        },
        ("GET", path) if path.starts_with(BASE_PATH) && path[BASE_PATH.len()..].starts_with('/') => {
            let segment = &path[BASE_PATH.len() + 1..];
            if segment.is_empty() || segment.contains('/') {
                return respond(404, json!({ "error": "no such resource" }));
            }
            match percent_decode(segment) {
                Some(key) => key,
                None => return malformed(shared, format!("bad percent-encoding in {path:?}")),
            }
        }
        (_, BASE_PATH) => return respond(405, json!({ "error": "method not allowed" })),
        _ => return respond(404, json!({ "error": "no such resource" })),
    };
    *in_flight = Some(InFlight::enter(shared, &key));
    let fault = {
        let faults = lock(&shared.faults).clone();
        let mut rng = lock(&shared.rng);
        faults.draw(&mut rng)
    };
    match fault {
        Fault::DropBefore => return Answer::Drop,
        Fault::ServerError => return respond(503, json!({ "error": "temporarily unavailable" })),
        Fault::Redirect => {
            return Answer::Respond {
                status: 307,
                headers: vec![("Location", format!("{}/moved", shared.url))],
                body: String::new(),
            }
        }
        Fault::Slow => sleep_unless_stopped(shared, lock(&shared.faults).slow_delay),
        _ => {}
    }
    if request.method == "GET" {
        return lookup(shared, &key);
    }
    pay(shared, request, &key, fault)
}

fn malformed(shared: &Shared, reason: String) -> Answer {
    lock(&shared.violations).push(Violation::Malformed { reason: reason.clone() });
    respond(400, json!({ "error": reason }))
}

fn lookup(shared: &Shared, key: &str) -> Answer {
    let books = lock(&shared.books);
    if let Some(p) = books.paid.get(key) {
        return respond(200, json!({ "status": "accepted", "reference": p.reference }));
    }
    if let Some(reason) = books.refused.get(key) {
        return respond(200, json!({ "status": "rejected", "reason": reason }));
    }
    respond(404, json!({ "status": "not_found", "idempotency_key": key }))
}

fn pay(shared: &Shared, request: &Request, key: &str, fault: Fault) -> Answer {
    let payout = match parse_payout(&request.body, key) {
        Ok(p) => p,
        Err(reason) => return malformed(shared, reason),
    };
    let mut books = lock(&shared.books);
    if let Some(first) = books.paid.get(key) {
        if (Payment { reference: first.reference.clone(), ..payout.clone() }) != *first {
            lock(&shared.violations).push(Violation::KeyReused { key: key.to_string() });
            return respond(422, json!({ "error": "idempotency key reused for a different payout" }));
        }
        shared.replays.fetch_add(1, Ordering::SeqCst);
        return match *lock(&shared.replay) {
            Replay::Accepted => respond(200, json!({ "status": "accepted", "reference": first.reference })),
            Replay::Status(code) => respond(code, json!({ "error": "duplicate idempotency key" })),
        };
    }
    if let Some(reason) = books.refused.get(key) {
        return respond(422, json!({ "error": reason }));
    }
    if shared.config.refused_destinations.contains(&payout.destination) {
        let reason = format!("account {} is closed", payout.destination);
        books.refused.insert(key.to_string(), reason.clone());
        return respond(422, json!({ "error": reason }));
    }
    books.next_reference += 1;
    let reference = format!("bank-ref-{}", books.next_reference);
    if let Some(first_key) = books.paid_withdrawals.get(&payout.withdrawal_id) {
        lock(&shared.violations).push(Violation::PaidTwice {
            withdrawal_id: payout.withdrawal_id,
            first_key: first_key.clone(),
            second_key: key.to_string(),
        });
    } else {
        books.paid_withdrawals.insert(payout.withdrawal_id, key.to_string());
    }
    books.paid.insert(key.to_string(), Payment { reference: reference.clone(), ..payout });
    drop(books);
    match fault {
        Fault::PayThenDrop => Answer::Drop,
        Fault::BareSuccess => Answer::Respond { status: 200, headers: Vec::new(), body: "OK".into() },
        Fault::Oversized => {
            respond(200, json!({ "status": "accepted", "reference": reference, "padding": "x".repeat(OVERSIZED_BODY) }))
        }
        _ => respond(201, json!({ "status": "accepted", "reference": reference })),
    }
}

/// The payout in a POST body, checked against the contract.
fn parse_payout(body: &str, key: &str) -> Result<Payment, String> {
    let v: Value = serde_json::from_str(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let text =
        |name: &str| v.get(name).and_then(Value::as_str).map(str::to_string).ok_or(format!("no string {name:?}"));
    let int = |name: &str| v.get(name).and_then(Value::as_i64).ok_or(format!("no integer {name:?}"));
    let payment = Payment {
        key: text("idempotency_key")?,
        payout_id: int("payout_id")?,
        withdrawal_id: int("withdrawal_id")?,
        amount: text("amount")?,
        amount_minor: int("amount_minor")?,
        currency: text("currency")?,
        destination: text("destination")?,
        reference: String::new(),
    };
    if payment.key != key {
        return Err(format!("Idempotency-Key {key:?} and the body's {:?} differ", payment.key));
    }
    if payment.amount_minor <= 0 {
        return Err(format!("amount_minor {} is not positive", payment.amount_minor));
    }
    Ok(payment)
}

/// Checks the bearer token and the signature (over `"<t>.<body>"`, within the age limit).
fn authenticate(config: &BankConfig, request: &Request) -> Result<(), String> {
    let expected = format!("Bearer {}", config.token);
    if request.headers.get("authorization") != Some(&expected) {
        return Err("bad or missing bearer token".into());
    }
    let header = request.headers.get("ledger-signature").ok_or("no Ledger-Signature header")?;
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => t = value.parse::<u64>().ok(),
            Some(("v1", value)) => v1 = from_hex(value),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return Err("malformed Ledger-Signature".into());
    };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    if now.abs_diff(t) > config.max_signature_age.as_secs() {
        return Err("signature timestamp too old (or in the future)".into());
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(config.secret.as_bytes()).expect("HMAC takes any key");
    mac.update(format!("{t}.").as_bytes());
    mac.update(request.body.as_bytes());
    mac.verify_slice(&v1).map_err(|_| "bad signature".to_string())
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    s.as_bytes()
        .chunks(2)
        .map(|pair| match pair {
            [hi, lo] if hi.is_ascii_hexdigit() && lo.is_ascii_hexdigit() => {
                u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()
            }
            _ => None,
        })
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn sleep_unless_stopped(shared: &Shared, delay: Duration) {
    let until = Instant::now() + delay;
    while !shared.stop.load(Ordering::SeqCst) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        thread::sleep(left.min(Duration::from_millis(10)));
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        307 => "Temporary Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        422 => "Unprocessable Entity",
        503 => "Service Unavailable",
        _ => "Status",
    }
}
