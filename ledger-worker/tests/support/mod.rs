//! Fault injectors for the shutdown tests: a TCP proxy to a Unix socket that can be
//! switched to a blackhole, and a payment API that can stop answering. Both run on
//! threads of their own that their guard stops (and joins) when dropped, also while a
//! failing test unwinds.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// How often a blocked proxy or bank thread looks at its flags.
const TICK: Duration = Duration::from_millis(20);

#[derive(Default)]
struct ProxyState {
    stop: AtomicBool,
    blackhole: AtomicBool,
    pumps: Mutex<Vec<JoinHandle<()>>>,
    /// Client connections accepted while blackholed: kept open, never answered.
    held: Mutex<Vec<TcpStream>>,
}

/// Forwards 127.0.0.1:<port> to a Unix socket (a PostgreSQL server's), until switched
/// to a blackhole: then every connection, open or new, stays open and nothing more is
/// forwarded either way, like a network that silently drops everything.
pub struct Proxy {
    port: u16,
    state: Arc<ProxyState>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    pub fn start(target: PathBuf) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(ProxyState::default());
        let acceptor = {
            let state = state.clone();
            thread::Builder::new().name("proxy-accept".into()).spawn(move || accept(listener, target, state)).unwrap()
        };
        Proxy { port, state, acceptor: Some(acceptor) }
    }

    /// A libpq URL for `dbname` through the proxy (TCP).
    pub fn url(&self, dbname: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{dbname}", self.port)
    }

    pub fn blackhole(&self) {
        self.state.blackhole.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    /// Stops forwarding and closes every connection (the server sees them end).
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        let pumps: Vec<JoinHandle<()>> = self.state.pumps.lock().unwrap_or_else(|e| e.into_inner()).drain(..).collect();
        for p in pumps {
            let _ = p.join();
        }
        self.state.held.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

fn accept(listener: TcpListener, target: PathBuf, state: Arc<ProxyState>) {
    while !state.stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((c, _)) => c,
            Err(_) => {
                thread::sleep(Duration::from_millis(2));
                continue;
            }
        };
        client.set_nonblocking(false).unwrap();
        if state.blackhole.load(Ordering::SeqCst) {
            state.held.lock().unwrap().push(client);
            continue;
        }
        let Ok(server) = UnixStream::connect(&target) else { continue };
        let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else { continue };
        let mut pumps = state.pumps.lock().unwrap();
        let s = state.clone();
        pumps.push(thread::spawn(move || pump(Tcp(client), Unix(server2), &s)));
        let s = state.clone();
        pumps.push(thread::spawn(move || pump(Unix(server), Tcp(client2), &s)));
    }
}

/// One end of a proxied connection.
trait End: Read + Write {
    fn set_timeouts(&self);
    fn shutdown_write(&self);
}

struct Tcp(TcpStream);
struct Unix(UnixStream);

impl Read for Tcp {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}
impl Write for Tcp {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}
impl End for Tcp {
    fn set_timeouts(&self) {
        let _ = self.0.set_read_timeout(Some(TICK));
        let _ = self.0.set_write_timeout(Some(Duration::from_secs(2)));
    }
    fn shutdown_write(&self) {
        let _ = self.0.shutdown(Shutdown::Write);
    }
}
impl Read for Unix {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}
impl Write for Unix {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}
impl End for Unix {
    fn set_timeouts(&self) {
        let _ = self.0.set_read_timeout(Some(TICK));
        let _ = self.0.set_write_timeout(Some(Duration::from_secs(2)));
    }
    fn shutdown_write(&self) {
        let _ = self.0.shutdown(Shutdown::Write);
    }
}

/// Copies `from` to `to` until EOF, an error, or the proxy stops; while blackholed it
/// neither reads nor writes (so the socket stays open and silent).
fn pump(mut from: impl End, mut to: impl End, state: &ProxyState) {
    from.set_timeouts();
    to.set_timeouts();
    let mut buf = vec![0_u8; 64 * 1024];
    while !state.stop.load(Ordering::SeqCst) {
        if state.blackhole.load(Ordering::SeqCst) {
            thread::sleep(TICK);
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            // Read just as the blackhole began: dropped, like the rest.
            Ok(_) if state.blackhole.load(Ordering::SeqCst) => {}
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(_) => break,
        }
    }
    to.shutdown_write();
}

#[derive(Default)]
struct BankState {
    stop: AtomicBool,
    /// Read requests and keep their connections open without ever answering.
    hang: AtomicBool,
    /// key -> amount, for payouts the bank paid.
    accepted: Mutex<HashMap<String, String>>,
    /// Keys of requests received while hanging (none of them paid).
    hung: Mutex<Vec<String>>,
}

/// A payment API on 127.0.0.1 that honours idempotency keys (a repeated key gets the
/// first answer, not a second payment) and can be told to stop answering. `POST` pays
/// (200 `{"status":"accepted","reference":..}`); `GET <url>/<key>` looks a key up (200
/// accepted, or 404 when it never paid it). Credentials are not checked.
pub struct Bank {
    pub url: String,
    state: Arc<BankState>,
    server: Option<JoinHandle<()>>,
}

impl Bank {
    pub fn start() -> Bank {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the bank");
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}/payouts", listener.local_addr().unwrap());
        let state = Arc::new(BankState::default());
        let server = {
            let state = state.clone();
            thread::Builder::new().name("bank".into()).spawn(move || serve(listener, &state)).unwrap()
        };
        Bank { url, state, server: Some(server) }
    }

    /// From now on: accept connections, read the request, never answer, do nothing.
    pub fn hang(&self, on: bool) {
        self.state.hang.store(on, Ordering::SeqCst);
    }

    pub fn hung_keys(&self) -> Vec<String> {
        self.state.hung.lock().unwrap().clone()
    }

    pub fn paid_keys(&self) -> HashSet<String> {
        self.state.accepted.lock().unwrap().keys().cloned().collect()
    }
}

impl Drop for Bank {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
    }
}

/// A request's line ("POST /payouts HTTP/1.1"), headers (lower-case names) and body.
type Request = (String, HashMap<String, String>, String);

fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).ok()?;
    let mut line = String::new();
    let mut headers = HashMap::new();
    loop {
        line.clear();
        reader.read_line(&mut line).ok()?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let len: usize = headers.get("content-length").map_or(Some(0), |l| l.parse().ok())?;
    let mut body = vec![0; len.min(64 * 1024)];
    reader.read_exact(&mut body).ok()?;
    Some((request_line.trim_end().to_string(), headers, String::from_utf8_lossy(&body).to_string()))
}

fn respond(stream: &mut TcpStream, status: &str, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn serve(listener: TcpListener, state: &BankState) {
    // Connections of hung requests: open until the bank stops.
    let mut held: Vec<TcpStream> = Vec::new();
    while !state.stop.load(Ordering::SeqCst) {
        let mut stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(_) => {
                thread::sleep(Duration::from_millis(2));
                continue;
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let Some((request_line, headers, body)) = read_request(&stream) else { continue };
        let lookup = request_line.starts_with("GET ");
        let key = if lookup {
            // GET /payouts/<key> HTTP/1.1
            let path = request_line.split_whitespace().nth(1).unwrap_or("");
            path.rsplit('/').next().unwrap_or("").to_string()
        } else {
            headers.get("idempotency-key").cloned().unwrap_or_default()
        };
        if state.hang.load(Ordering::SeqCst) {
            state.hung.lock().unwrap().push(key);
            held.push(stream);
            continue;
        }
        let mut accepted = state.accepted.lock().unwrap();
        let paid = accepted.contains_key(&key);
        if lookup && !paid {
            drop(accepted);
            respond(&mut stream, "404 Not Found", &format!(r#"{{"status":"not_found","idempotency_key":"{key}"}}"#));
            continue;
        }
        if !paid {
            let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            accepted.insert(key.clone(), json["amount"].as_str().unwrap_or("").to_string());
        }
        drop(accepted);
        respond(
            &mut stream,
            "200 OK",
            &format!(r#"{{"status":"accepted","reference":"ref-{key}","replayed":{paid}}}"#),
        );
    }
}
