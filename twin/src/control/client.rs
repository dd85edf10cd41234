//! A blocking client of the control API: one HTTP/1.1 exchange per call over the Unix
//! socket (what the `twin` subcommands and the lab use; any HTTP client will do).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use twin_api::{ApiError, ErrorBody, ErrorCode, EventsQuery, Request, Response};

use super::ControlError;

/// How long a short request may take to be answered.
const ANSWER_WAIT: Duration = Duration::from_secs(60);
/// Longest answer head (status line and headers) a client takes.
const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size line.
const MAX_CHUNK_LINE: usize = 1024;

/// The method, path and body of a request.
pub fn route(req: &Request) -> (&'static str, String, Option<serde_json::Value>) {
    let body = |v: &dyn erased::Ser| Some(v.to_json());
    match req {
        Request::Status => ("GET", "/v1/status".into(), None),
        Request::Pause => ("PUT", "/v1/vm/pause".into(), None),
        Request::Resume => ("PUT", "/v1/vm/resume".into(), None),
        Request::Snapshot(s) => ("PUT", "/v1/vm/snapshot".into(), body(s)),
        Request::Protect(p) => ("PUT", "/v1/protect".into(), body(p)),
        Request::Failover => ("PUT", "/v1/failover".into(), None),
        Request::Events(q) => (
            "GET",
            format!(
                "/v1/events?since={}&epochs={}&follow={}",
                q.since, q.epochs, q.follow
            ),
            None,
        ),
    }
}

mod erased {
    pub trait Ser {
        fn to_json(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_json(&self) -> serde_json::Value {
            serde_json::to_value(self).expect("requests serialize")
        }
    }
}

/// An answer's head and its body still to read.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Body,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request (`Connection: close`) and reads the answer's head, waiting at most
/// `wait` for it (`None`: as long as it takes).
pub fn exchange(
    path: &Path,
    method: &str,
    target: &str,
    body: Option<&serde_json::Value>,
    wait: Option<Duration>,
) -> Result<Answer, ControlError> {
    let io = |source| ControlError::Exchange {
        path: path.to_path_buf(),
        source,
    };
    let conn = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    conn.set_read_timeout(wait).map_err(io)?;
    conn.set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    let body = body.map(|b| serde_json::to_vec(b).expect("requests serialize"));
    let mut head =
        format!("{method} {target} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n");
    if let Some(b) = &body {
        head.push_str(&format!(
            "content-type: application/json\r\ncontent-length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    let mut msg = head.into_bytes();
    msg.extend_from_slice(body.as_deref().unwrap_or_default());
    (&conn).write_all(&msg).map_err(io)?;
    let bad = |what: String| ControlError::BadResponse {
        path: path.to_path_buf(),
        what,
    };
    let mut reader = BufReader::new(conn);
    let mut lines = Vec::new();
    let mut total = 0;
    loop {
        let mut line = String::new();
        let n = (&mut reader)
            .take((MAX_HEAD - total) as u64 + 1)
            .read_line(&mut line)
            .map_err(io)?;
        total += n;
        if n == 0 {
            return Err(bad(
                "the connection closed before the answer's head ended".into()
            ));
        }
        if total > MAX_HEAD {
            return Err(bad(format!("an answer head longer than {MAX_HEAD} bytes")));
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            break;
        }
        lines.push(line);
    }
    let status_line = lines.first().cloned().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| bad(format!("status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines[1..]
        .iter()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect();
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let framing = if get("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        Framing::Chunked(Chunk::Size)
    } else if let Some(n) = get("content-length") {
        Framing::Length(
            n.parse()
                .map_err(|_| bad(format!("content-length {n:?}")))?,
        )
    } else {
        Framing::Close
    };
    Ok(Answer {
        status,
        headers,
        body: Body {
            reader,
            framing,
            line: Vec::new(),
        },
    })
}

/// Where a chunked body is.
#[derive(Clone, Copy, Debug)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailer,
    Done,
}

#[derive(Clone, Copy, Debug)]
enum Framing {
    Length(u64),
    Chunked(Chunk),
    Close,
}

/// An answer's body: its bytes as the framing delimits them. A read that times out keeps
/// its place (a chunk header half read is kept), so a stream can be read with timeouts.
pub struct Body {
    reader: BufReader<UnixStream>,
    framing: Framing,
    /// A chunk-size or chunk-end line read so far.
    line: Vec<u8>,
}

impl Body {
    /// The socket, for read timeouts.
    pub fn socket(&self) -> &UnixStream {
        self.reader.get_ref()
    }

    /// The whole body as a string, at most `limit` bytes.
    pub fn text(mut self, limit: usize) -> std::io::Result<String> {
        let mut out = Vec::new();
        (&mut self).take(limit as u64).read_to_end(&mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Reads one CRLF-terminated line into `self.line` (resumable); true once complete.
    fn read_crlf_line(&mut self) -> std::io::Result<bool> {
        loop {
            let avail = self.reader.fill_buf()?;
            if avail.is_empty() {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            match avail.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.line.extend_from_slice(&avail[..i]);
                    self.reader.consume(i + 1);
                    if self.line.last() == Some(&b'\r') {
                        self.line.pop();
                    }
                    return Ok(true);
                }
                None => {
                    let n = avail.len();
                    self.line.extend_from_slice(avail);
                    self.reader.consume(n);
                }
            }
            if self.line.len() > MAX_CHUNK_LINE {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "a chunk header longer than 1 KiB",
                ));
            }
        }
    }
}

impl Read for Body {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.framing {
                Framing::Close => return self.reader.read(out),
                Framing::Length(0) => return Ok(0),
                Framing::Length(n) => {
                    let max = out.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                    let k = self.reader.read(&mut out[..max])?;
                    if k == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    self.framing = Framing::Length(n - k as u64);
                    return Ok(k);
                }
                Framing::Chunked(Chunk::Done) => return Ok(0),
                Framing::Chunked(Chunk::Data(n)) => {
                    let max = out.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                    let k = self.reader.read(&mut out[..max])?;
                    if k == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    let left = n - k as u64;
                    self.framing = Framing::Chunked(if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    });
                    return Ok(k);
                }
                Framing::Chunked(state) => {
                    match self.read_crlf_line() {
                        Ok(true) => {}
                        Ok(false) => unreachable!(),
                        // The server closed the stream without its last chunk: the end.
                        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                            self.framing = Framing::Chunked(Chunk::Done);
                            return Ok(0);
                        }
                        Err(e) => return Err(e),
                    }
                    let line = std::mem::take(&mut self.line);
                    self.framing = Framing::Chunked(match state {
                        Chunk::Size => {
                            let text = String::from_utf8_lossy(&line);
                            let hex = text.split(';').next().unwrap_or("").trim();
                            match u64::from_str_radix(hex, 16) {
                                Ok(0) => Chunk::Trailer,
                                Ok(n) => Chunk::Data(n),
                                Err(_) => {
                                    return Err(std::io::Error::new(
                                        std::io::ErrorKind::InvalidData,
                                        format!("chunk size {text:?}"),
                                    ))
                                }
                            }
                        }
                        Chunk::DataEnd => Chunk::Size,
                        Chunk::Trailer if line.is_empty() => Chunk::Done,
                        other => other,
                    });
                }
            }
        }
    }
}

/// The error of a non-2xx answer: its `{"error": {...}}`, or what it said.
fn api_error(status: u16, text: &str) -> ApiError {
    serde_json::from_str::<ErrorBody>(text)
        .map(|b| b.error)
        .unwrap_or_else(|_| {
            ApiError::new(
                match status {
                    400 => ErrorCode::BadRequest,
                    404 => ErrorCode::NotFound,
                    413 | 431 => ErrorCode::PayloadTooLarge,
                    503 => ErrorCode::Unavailable,
                    _ => ErrorCode::Failed,
                },
                format!("HTTP {status}: {}", text.trim()),
            )
        })
}

/// Sends one request and waits for its answer: a JSON value, or the API's error. A
/// snapshot or a protection waits as long as it takes (the server says when the process is
/// busy or gone); the rest at most a minute.
pub fn request(path: &Path, req: &Request) -> Result<Response, ControlError> {
    let (method, target, body) = route(req);
    let wait = match req {
        Request::Snapshot(_) | Request::Protect(_) | Request::Failover => None,
        _ => Some(ANSWER_WAIT),
    };
    let answer = exchange(path, method, &target, body.as_ref(), wait)?;
    let status = answer.status;
    let text = answer
        .body
        .text(16 << 20)
        .map_err(|source| ControlError::Exchange {
            path: path.to_path_buf(),
            source,
        })?;
    if (200..300).contains(&status) {
        serde_json::from_str(&text)
            .map(Response::Ok)
            .map_err(|e| ControlError::BadResponse {
                path: path.to_path_buf(),
                what: format!("{e}: {text:?}"),
            })
    } else {
        Ok(Response::Error(api_error(status, &text)))
    }
}

/// A client's view of an event stream (see [`events`]).
pub struct EventStream {
    lines: BufReader<Body>,
    next_seq: u64,
    path: PathBuf,
}

impl EventStream {
    /// The sequence number the next event gets, as the server said when it answered.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The stream's lines, for a reader that wants its own timeouts
    /// ([`EventStream::socket`]).
    pub fn into_lines(self) -> BufReader<Body> {
        self.lines
    }

    pub fn socket(&self) -> &UnixStream {
        self.lines.get_ref().socket()
    }

    /// The next event; `None` when the server closed the stream.
    pub fn next_event(&mut self) -> Result<Option<twin_api::Event>, ControlError> {
        let mut line = String::new();
        let n = self
            .lines
            .read_line(&mut line)
            .map_err(|source| ControlError::Exchange {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Ok(None);
        }
        serde_json::from_str(&line)
            .map(Some)
            .map_err(|e| ControlError::BadResponse {
                path: self.path.clone(),
                what: format!("an event that does not parse ({e}): {line:?}"),
            })
    }
}

/// Asks for the events from `since` on (`GET /v1/events`), its answer's head within
/// `head_wait` (a stopped process answers nothing).
pub fn events_within(
    path: &Path,
    q: EventsQuery,
    head_wait: Duration,
) -> Result<EventStream, ControlError> {
    let (method, target, _) = route(&Request::Events(q));
    let answer = exchange(path, method, &target, None, Some(head_wait))?;
    if answer.status != 200 {
        let status = answer.status;
        let text = answer.body.text(64 << 10).unwrap_or_default();
        return Err(ControlError::Exchange {
            path: path.to_path_buf(),
            source: std::io::Error::other(api_error(status, &text)),
        });
    }
    let next_seq = answer
        .header(twin_api::http::NEXT_SEQ_HEADER)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| ControlError::BadResponse {
            path: path.to_path_buf(),
            what: format!("no {} header", twin_api::http::NEXT_SEQ_HEADER),
        })?;
    // Events may be far apart: no timeout between them unless the reader sets one.
    answer
        .body
        .socket()
        .set_read_timeout(None)
        .map_err(|source| ControlError::Exchange {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(EventStream {
        lines: BufReader::new(answer.body),
        next_seq,
        path: path.to_path_buf(),
    })
}

/// [`events_within`] with a 10 s head wait.
pub fn events(
    path: &Path,
    since: u64,
    epochs: bool,
    follow: bool,
) -> Result<EventStream, ControlError> {
    events_within(
        path,
        EventsQuery {
            since,
            epochs,
            follow,
        },
        Duration::from_secs(10),
    )
}
