//! Just enough HTTP/1.1 for the bank: requests parsed out of a buffer (so a kept-alive
//! connection can carry several), bounded heads and bodies, and answers.

/// Longest request head (request line and headers).
pub(crate) const MAX_HEAD: usize = 16 * 1024;

/// Longest request body (a payout is well under 1 KiB).
pub(crate) const MAX_BODY: usize = 64 * 1024;

pub(crate) struct Request {
    pub(crate) method: String,
    pub(crate) path: String,
    /// Lower-case names, as received.
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
    /// The client asked to close the connection after the answer (or spoke HTTP/1.0).
    pub(crate) close: bool,
}

impl Request {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

pub(crate) enum Parsed {
    Incomplete,
    /// Not a request the bank understands; the reason is recorded as a violation.
    Bad(String),
    /// A request and how many bytes of the buffer it used.
    Request(Request, usize),
}

/// The first request in `buf`, if it is all there.
pub(crate) fn parse(buf: &[u8]) -> Parsed {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD { Parsed::Bad("request head too long".into()) } else { Parsed::Incomplete };
    };
    if head_end > MAX_HEAD {
        return Parsed::Bad("request head too long".into());
    }
    let Ok(head) = std::str::from_utf8(&buf[..head_end]) else {
        return Parsed::Bad("request head is not UTF-8".into());
    };
    let mut request = match parse_head(head) {
        Ok(request) => request,
        Err(why) => return Parsed::Bad(why),
    };
    if request.header("transfer-encoding").is_some() {
        return Parsed::Bad("only Content-Length bodies are supported".into());
    }
    let length = match request.header("content-length").map(|v| (v, v.parse::<usize>())) {
        None => 0,
        Some((_, Ok(n))) if n <= MAX_BODY => n,
        Some((_, Ok(n))) => return Parsed::Bad(format!("body of {n} bytes is too long")),
        Some((v, Err(_))) => return Parsed::Bad(format!("bad Content-Length {v:?}")),
    };
    let body_start = head_end + 4;
    if buf.len() < body_start + length {
        return Parsed::Incomplete;
    }
    request.body = buf[body_start..body_start + length].to_vec();
    Parsed::Request(request, body_start + length)
}

/// The request line and headers.
fn parse_head(head: &str) -> Result<Request, String> {
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or("");
    let mut parts = line.splitn(3, ' ');
    let (Some(method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("bad request line {line:?}"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("unsupported version {version:?}"));
    }
    let mut headers = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("bad header line {line:?}"));
        };
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let mut request =
        Request { method: method.to_string(), path: path.to_string(), headers, body: Vec::new(), close: false };
    // HTTP/1.0 closes unless asked to keep alive; HTTP/1.1 keeps alive unless asked to close.
    let connection = request.header("connection").unwrap_or("").to_ascii_lowercase();
    request.close = connection.contains("close") || (version == "HTTP/1.0" && !connection.contains("keep-alive"));
    Ok(request)
}

/// The bytes of one answer (`Content-Type: application/json` whatever the body, as the
/// faults that send something else mean to).
pub(crate) fn response(status: u16, headers: &[(&str, String)], body: &str, close: bool) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        reason_phrase(status),
        body.len()
    );
    if close {
        head.push_str("Connection: close\r\n");
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.as_bytes());
    bytes
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

/// A path segment's `%XX` escapes decoded; `None` if an escape is broken or the result
/// is not UTF-8.
pub(crate) fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3).filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}
