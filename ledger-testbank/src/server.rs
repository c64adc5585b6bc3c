//! The bank's threads: one acceptor, and one thread per connection up to the cap.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::book::{self, Answer};
use crate::http::{self, Parsed, Request};
use crate::{lock, Shared, MAX_HELD};

/// How often a connection thread waiting for bytes checks its deadlines and whether the
/// bank is stopping (a stop also shuts its socket down, which wakes it at once).
const READ_SLICE: Duration = Duration::from_millis(200);

/// Finished connection threads are joined once this many handles pile up, so the list
/// stays about as long as what runs.
const PRUNE_AT: usize = 64;

pub(crate) fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut failures = 0_u32;
    loop {
        if !wait_for_room(shared) {
            return;
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(_) if shared.stopping() => return,
            Err(_) => {
                // E.g. out of file descriptors: back off rather than spin.
                failures += 1;
                thread::sleep(Duration::from_millis(failures.min(100) as u64));
                continue;
            }
        };
        failures = 0;
        if shared.stopping() {
            return;
        }
        spawn_connection(stream, shared);
    }
}

/// At the cap, leaves new connections in the backlog until one ends. False once the
/// bank stops.
fn wait_for_room(shared: &Shared) -> bool {
    let mut live = lock(&shared.live);
    while *live >= shared.config.max_connections && !shared.stopping() {
        live = shared.live_changed.wait_timeout(live, READ_SLICE).unwrap_or_else(|e| e.into_inner()).0;
    }
    !shared.stopping()
}

fn spawn_connection(stream: TcpStream, shared: &Arc<Shared>) {
    let id = shared.next_stream.fetch_add(1, Ordering::SeqCst);
    // Registered here, on the acceptor: once the acceptor has ended, a stop sees every
    // connection there will ever be.
    if let Ok(clone) = stream.try_clone() {
        lock(&shared.streams).insert(id, clone);
    }
    let live = {
        let mut live = lock(&shared.live);
        *live += 1;
        *live
    };
    shared.peak.fetch_max(live, Ordering::SeqCst);
    shared.counters.connections.fetch_add(1, Ordering::SeqCst);
    let for_thread = shared.clone();
    let spawned = thread::Builder::new().name("test-bank-conn".into()).stack_size(256 * 1024).spawn(move || {
        let _done = ConnectionDone { shared: &for_thread, id };
        serve(stream, &for_thread);
    });
    match spawned {
        Ok(handle) => {
            let mut handles = lock(&shared.handles);
            if handles.len() >= PRUNE_AT {
                let (done, running): (Vec<_>, Vec<_>) = handles.drain(..).partition(|h| h.is_finished());
                *handles = running;
                for h in done {
                    let _ = h.join();
                }
            }
            handles.push(handle);
        }
        // The closure (and its guard) never ran: undo what it would have.
        Err(_) => drop(ConnectionDone { shared, id }),
    }
}

/// Marks a connection done (the live count, the registry) however its thread ends,
/// also by a panic in a handler.
struct ConnectionDone<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for ConnectionDone<'_> {
    fn drop(&mut self) {
        lock(&self.shared.streams).remove(&self.id);
        let mut live = lock(&self.shared.live);
        *live -= 1;
        self.shared.live_changed.notify_all();
    }
}

/// Serves one connection until the client closes it, it idles out, it breaks the
/// protocol, an answer closes it, or the bank stops.
fn serve(mut stream: TcpStream, shared: &Shared) {
    let timeout = shared.config.read_timeout;
    let _ = stream.set_nodelay(true);
    if stream.set_read_timeout(Some(READ_SLICE)).is_err() || stream.set_write_timeout(Some(timeout)).is_err() {
        return;
    }
    let mut reader = Reader { buf: Vec::with_capacity(4096), waiting_since: Instant::now(), limit: timeout };
    loop {
        let request = match reader.next_request(&mut stream, shared) {
            Ok(request) => request,
            Err(ReadError::Closed) => return,
            Err(ReadError::Bad(reason)) => {
                if let Answer::Respond { status, body, .. } = book::malformed(shared, reason) {
                    let _ = stream.write_all(&http::response(status, &[], &body, true));
                }
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
        };
        shared.counters.requests.fetch_add(1, Ordering::SeqCst);
        let close = request.close || !shared.config.keep_alive;
        let mut in_flight = None;
        let answer = book::handle(shared, &request, &mut in_flight);
        drop(in_flight);
        match answer {
            Answer::Respond { status, headers, body } => {
                let sent = stream.write_all(&http::response(status, &headers, &body, close));
                if sent.is_err() || close {
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                }
            }
            Answer::Drop => {
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
            Answer::Hold => return hold(stream, shared),
        }
        reader.answered(shared.config.idle_timeout);
    }
}

/// Keeps a hanging bank's connection open, unanswered, until the bank stops, without
/// holding a connection thread (or a place under the cap).
fn hold(stream: TcpStream, shared: &Shared) {
    let mut held = lock(&shared.held);
    if held.len() < MAX_HELD {
        held.push(stream);
    }
}

enum ReadError {
    /// The client went away, or was too slow, before a whole request; or the bank stops.
    Closed,
    /// Not a request the bank understands.
    Bad(String),
}

/// Bytes read from one connection, and how long the next request may take to arrive.
struct Reader {
    buf: Vec<u8>,
    waiting_since: Instant,
    limit: Duration,
}

impl Reader {
    fn next_request(&mut self, stream: &mut TcpStream, shared: &Shared) -> Result<Request, ReadError> {
        let mut chunk = [0_u8; 8192];
        loop {
            match http::parse(&self.buf) {
                Parsed::Request(request, used) => {
                    self.buf.drain(..used);
                    return Ok(request);
                }
                Parsed::Bad(why) => return Err(ReadError::Bad(why)),
                Parsed::Incomplete => {}
            }
            if shared.stopping() {
                return Err(ReadError::Closed);
            }
            match stream.read(&mut chunk) {
                Ok(0) => return Err(ReadError::Closed),
                Ok(k) => {
                    if self.buf.is_empty() {
                        // A new request has begun: it gets the whole read timeout.
                        (self.waiting_since, self.limit) = (Instant::now(), shared.config.read_timeout);
                    }
                    self.buf.extend_from_slice(&chunk[..k]);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                    if self.waiting_since.elapsed() > self.limit {
                        return Err(ReadError::Closed);
                    }
                }
                Err(_) => return Err(ReadError::Closed),
            }
        }
    }

    /// After an answer on a kept-alive connection: the next request may idle first.
    fn answered(&mut self, idle_timeout: Duration) {
        self.waiting_since = Instant::now();
        if self.buf.is_empty() {
            self.limit = idle_timeout;
        }
    }
}
