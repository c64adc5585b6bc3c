//! A fault injector for the shutdown tests: a TCP proxy to a Unix socket that can be
//! switched to a blackhole. It runs on threads of its own that its guard stops (and
//! joins) when dropped, also while a failing test unwinds. (The payment API that can
//! stop answering is `ledger_testbank::Bank::set_hang`.)
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// How often a blocked proxy thread looks at its flags.
const TICK: Duration = Duration::from_millis(20);

#[derive(Default)]
struct ProxyState {
    stop: AtomicBool,
    blackhole: AtomicBool,
    pumps: Mutex<Vec<JoinHandle<()>>>,
    /// Client connections accepted while blackholed: kept open, never answered.
    held: Mutex<Vec<TcpStream>>,
    /// The client ends of the connections being forwarded, for [`Proxy::cut`].
    clients: Mutex<Vec<TcpStream>>,
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

    /// Closes every connection forwarded so far, at once, as a failover or a reset
    /// would (whatever the server sends afterwards is lost); new connections are
    /// forwarded as before.
    #[allow(dead_code)] // the shutdown tests use the blackhole only
    pub fn cut(&self) {
        for client in self.state.clients.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = client.shutdown(Shutdown::Both);
        }
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
        let (Ok(client2), Ok(server2), Ok(client3)) = (client.try_clone(), server.try_clone(), client.try_clone())
        else {
            continue;
        };
        state.clients.lock().unwrap().push(client3);
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
