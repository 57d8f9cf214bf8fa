//! HTTP/1.1 framing for the API socket: requests are parsed by `httparse`;
//! this module only collects the bytes (head, then a `Content-Length`
//! body, both bounded) and writes responses. One request per connection:
//! every response says `Connection: close`.

use std::io::{Read, Write};

/// Most bytes of a request line and headers.
pub const MAX_HEAD: usize = 8 * 1024;
/// Most bytes of a request body (the API's bodies are a few dozen).
pub const MAX_BODY: usize = 16 * 1024;
const MAX_HEADERS: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without its query string.
    pub path: String,
    pub body: Vec<u8>,
}

/// Why a request could not be read; each maps to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    #[error("request headers longer than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("request body longer than {MAX_BODY} bytes")]
    BodyTooLarge,
    #[error("chunked request bodies are not supported: send Content-Length")]
    Chunked,
    #[error("the client closed the connection mid-request")]
    Closed,
    #[error("reading the request: {0}")]
    Io(#[from] std::io::Error),
}

impl HttpError {
    /// The status to answer with; `None` when there is nobody to answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Malformed(_) => Some(400),
            HttpError::HeadTooLarge => Some(431),
            HttpError::BodyTooLarge => Some(413),
            HttpError::Chunked => Some(411),
            HttpError::Closed => None,
            HttpError::Io(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Some(408)
            }
            HttpError::Io(_) => None,
        }
    }
}

/// How far [`parse_request`] got with the bytes so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    Done(Request),
    /// The head is not complete yet.
    NeedHead,
    /// The head is, the body (as long as `Content-Length` says) is not.
    NeedBody,
}

/// Parses what a client sent so far; refuses what can be refused early
/// (heads over [`MAX_HEAD`], bodies announced over [`MAX_BODY`]) without
/// waiting for the rest. More bytes than the body are an error.
pub fn parse_request(buf: &[u8]) -> Result<Progress, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(head_len)) => head_len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err(HttpError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(Progress::NeedHead),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    if head_len > MAX_HEAD {
        return Err(HttpError::HeadTooLarge);
    }
    let content_length = body_length(request.headers)?;
    let body = &buf[head_len..];
    if body.len() > content_length {
        return Err(HttpError::Malformed(
            "more bytes than Content-Length (pipelining is not supported)".into(),
        ));
    }
    if body.len() < content_length {
        return Ok(Progress::NeedBody);
    }
    let target = request.path.unwrap_or_default();
    Ok(Progress::Done(Request {
        method: request.method.unwrap_or_default().to_string(),
        path: target.split('?').next().unwrap_or_default().to_string(),
        body: body.to_vec(),
    }))
}

/// Why a client that closed its end after `received` bytes (at `progress`)
/// gets no request.
pub fn closed_early(received: usize, progress: &Progress) -> HttpError {
    match progress {
        _ if received == 0 => HttpError::Closed,
        Progress::NeedBody => {
            HttpError::Malformed("connection closed before the end of the body".into())
        }
        _ => HttpError::Malformed("connection closed before the end of the headers".into()),
    }
}

/// Reads one request from a blocking `stream`, never more bytes than the
/// request announces.
pub fn read_request(stream: &mut impl Read) -> Result<Request, HttpError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let progress = parse_request(&buf)?;
        let want = match &progress {
            Progress::Done(request) => return Ok(request.clone()),
            Progress::NeedHead => chunk.len(),
            // Exactly the rest of the body (the head is complete).
            Progress::NeedBody => body_missing(&buf)?.min(chunk.len()),
        };
        let n = stream.read(&mut chunk[..want])?;
        if n == 0 {
            return Err(closed_early(buf.len(), &progress));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// How many body bytes a complete head in `buf` still waits for.
fn body_missing(buf: &[u8]) -> Result<usize, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(head_len)) => {
            let length = body_length(request.headers)?;
            Ok(length.saturating_sub(buf.len() - head_len))
        }
        _ => Err(HttpError::Malformed("incomplete head".into())),
    }
}

/// The body length the headers announce (0 without Content-Length).
fn body_length(headers: &[httparse::Header<'_>]) -> Result<usize, HttpError> {
    let mut length = None;
    for header in headers {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::Chunked);
        }
        if header.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(header.value)
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| HttpError::Malformed("bad Content-Length".into()))?;
            // Digits only, so a parse error can only be an overflow.
            let value: usize = value.parse().map_err(|_| HttpError::BodyTooLarge)?;
            if length.is_some_and(|l| l != value) {
                return Err(HttpError::Malformed("conflicting Content-Length".into()));
            }
            length = Some(value);
        }
    }
    let length = length.unwrap_or(0);
    if length > MAX_BODY {
        return Err(HttpError::BodyTooLarge);
    }
    Ok(length)
}

/// A response to write: status, extra headers, content type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        let mut body = value.to_string().into_bytes();
        body.push(b'\n');
        Self {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body,
        }
    }

    /// `{"error": message}` with `status`.
    pub fn error(status: u16, message: impl std::fmt::Display) -> Self {
        Self::json(status, &serde_json::json!({ "error": message.to_string() }))
    }

    pub fn no_content() -> Self {
        Self {
            status: 204,
            content_type: "application/json",
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: &'static str, value: String) -> Self {
        self.headers.push((name, value));
        self
    }

    pub fn write_to(&self, stream: &mut impl Write) -> std::io::Result<()> {
        stream.write_all(&self.to_bytes())?;
        stream.flush()
    }

    /// The response as sent: status line, headers, body.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nServer: xskvm\r\nConnection: close\r\n",
            self.status,
            reason(self.status)
        );
        if self.status != 204 {
            out.push_str(&format!(
                "Content-Type: {}\r\nContent-Length: {}\r\n",
                self.content_type,
                self.body.len()
            ));
        }
        for (name, value) in &self.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if self.status != 204 {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8]) -> Result<Request, HttpError> {
        read_request(&mut &bytes[..])
    }

    /// A reader that hands out one byte per call, as a slow client would.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            match (self.0.split_first(), buf.first_mut()) {
                (Some((&b, rest)), Some(slot)) => {
                    *slot = b;
                    self.0 = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    #[test]
    fn reads_a_request_with_a_body_and_a_query() {
        let raw = b"PUT /api/v1/vm.net-link?x=1 HTTP/1.1\r\nHost: localhost\r\n\
                    Content-Length: 24\r\n\r\n{\"id\":\"net0\",\"up\":false}";
        let request = read(raw).unwrap();
        assert_eq!(request.method, "PUT");
        assert_eq!(request.path, "/api/v1/vm.net-link");
        assert_eq!(request.body, b"{\"id\":\"net0\",\"up\":false}");
        let request = read_request(&mut Trickle(raw)).unwrap();
        assert_eq!(request.body.len(), 24);
    }

    #[test]
    fn garbage_is_400() {
        for raw in [
            &b"\x00\x01\x02 / HTTP/1.1\r\n\r\n"[..],
            b"GET / HTTP/9.9\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"GET / HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort",
            b"GET / HTTP/1.1\r\nHost: x",
            b"PUT / HTTP/1.1\r\nContent-Length: 1\r\n\r\nab",
        ] {
            let error = read(raw).unwrap_err();
            assert_eq!(error.status(), Some(400), "{raw:?}: {error}");
        }
    }

    #[test]
    fn oversized_requests_are_refused_before_reading_them() {
        let body = format!("PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        // No body follows: the length alone is refused.
        assert_eq!(read(body.as_bytes()).unwrap_err().status(), Some(413));
        let huge = "PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n";
        assert_eq!(read(huge.as_bytes()).unwrap_err().status(), Some(413));
        let head = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(read(head.as_bytes()).unwrap_err().status(), Some(431));
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("H{i}: v\r\n"))
            .collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(read(many.as_bytes()).unwrap_err().status(), Some(431));
        let chunked = "PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(read(chunked.as_bytes()).unwrap_err().status(), Some(411));
    }

    #[test]
    fn parsing_tells_how_far_a_request_got() {
        let raw = b"PUT /x HTTP/1.1\r\nContent-Length: 2\r\n\r\nab";
        let head = raw.len() - 2;
        assert_eq!(parse_request(&raw[..5]).unwrap(), Progress::NeedHead);
        assert_eq!(parse_request(&raw[..head]).unwrap(), Progress::NeedBody);
        assert_eq!(parse_request(&raw[..head + 1]).unwrap(), Progress::NeedBody);
        assert!(matches!(parse_request(raw).unwrap(), Progress::Done(r) if r.body == b"ab"));
        assert!(closed_early(0, &Progress::NeedHead).status().is_none());
        assert_eq!(closed_early(5, &Progress::NeedHead).status(), Some(400));
        assert_eq!(closed_early(head, &Progress::NeedBody).status(), Some(400));
    }

    #[test]
    fn a_closed_connection_gets_no_answer() {
        assert!(read(b"").unwrap_err().status().is_none());
    }

    #[test]
    fn responses_carry_length_and_close() {
        let mut out = Vec::new();
        Response::error(404, "no such call")
            .write_to(&mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.contains("Content-Length: 25\r\n"), "{text}");
        assert!(
            text.ends_with("\r\n\r\n{\"error\":\"no such call\"}\n"),
            "{text}"
        );
        let mut out = Vec::new();
        Response::no_content().write_to(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 204 No Content\r\n"));
        assert!(!text.contains("Content-Length"));
    }
}
