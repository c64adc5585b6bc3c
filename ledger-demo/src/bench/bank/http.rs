//! Just enough HTTP/1.1 for the bench's bank: keep-alive, bounded heads and bodies,
//! reads sliced so the bank can stop.

use super::*;

/// Longest request head (request line and headers).
pub(super) const MAX_HEAD: usize = 16 * 1024;

/// Longest request body.
pub(super) const MAX_BODY: usize = 64 * 1024;

/// How often a connection thread waiting for bytes checks whether the bank is stopping.
pub(super) const READ_SLICE: Duration = Duration::from_millis(200);

/// A keep-alive connection idle this long is closed.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

pub(super) struct Request {
    pub(super) method: String,
    pub(super) path: String,
    pub(super) headers: Vec<(String, String)>,
    pub(super) body: Vec<u8>,
    pub(super) close: bool,
}

impl Request {
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

pub(super) enum Parsed {
    Incomplete,
    Bad(&'static str),
    Request(Request, usize),
}

/// Serves one connection until the client closes it, it idles out, it breaks the
/// protocol, or the bank stops.
pub(super) fn serve(mut stream: TcpStream, shared: &Shared) {
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

pub(super) fn parse(buf: &[u8]) -> Parsed {
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

pub(super) fn respond(stream: &mut TcpStream, status: u16, body: &str, close: bool) -> std::io::Result<()> {
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

pub(super) fn percent_decode(text: &str) -> Option<String> {
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
