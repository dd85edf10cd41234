//! A client for the built-in guest's TCP line service (port 7000), run inside a namespace.
//!
//! Protocol: one request line, one reply line, `\n`-terminated.
//!
//! | request | reply |
//! | --- | --- |
//! | `PING` | `PONG` |
//! | `INCR k` | the new value |
//! | `GET k` | the value (0 for a key never set) |
//! | `SET k v` | `OK` |
//! | `TIME` | guest nanoseconds |
//! | `STATS` | `k=v k=v …` |
//! | `VERIFY` | `OK pages=N writes=M` or `FAIL …` |
//!
//! Values are unsigned 64-bit integers; keys are tokens without spaces. A reply starting with
//! `ERR` is the guest refusing the request.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::error::{HarnessError, Result};
use crate::netns::Netns;

/// The per-request time limit unless set otherwise.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest single connection attempt in [`GuestClient::connect_retry`].
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause after an attempt that failed at once (refused, unreachable).
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// The guest's answer to `VERIFY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verify {
    /// Memory checks out.
    Ok {
        /// Pages verified.
        pages: u64,
        /// Writes the workload has made.
        writes: u64,
    },
    /// The guest found corruption; the rest of the line.
    Fail(String),
}

/// A connection to the guest service.
#[derive(Debug)]
pub struct GuestClient {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    addr: SocketAddr,
}

fn check_token(what: &str, token: &str) -> Result<()> {
    if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(HarnessError::InvalidArgument(format!(
            "{what} {token:?} must be non-empty without spaces or control characters"
        )));
    }
    Ok(())
}

impl GuestClient {
    /// Connects once, from inside `ns`, within `timeout`.
    pub fn connect(ns: &Netns, addr: SocketAddr, timeout: Duration) -> Result<Self> {
        let stream = ns
            .enter(|| TcpStream::connect_timeout(&addr, timeout))?
            .map_err(|e| HarnessError::io(format!("connecting to {addr} from {}", ns.name()), e))?;
        Self::from_stream(stream, addr)
    }

    /// A client on a stream already connected to the guest service (a connection made
    /// some other way, e.g. the first of many attempts to be answered).
    pub fn from_connected(stream: TcpStream) -> Result<Self> {
        let addr = stream
            .peer_addr()
            .map_err(|e| HarnessError::io("the peer of a connected stream", e))?;
        Self::from_stream(stream, addr)
    }

    fn from_stream(stream: TcpStream, addr: SocketAddr) -> Result<Self> {
        let io = |e| HarnessError::io(format!("setting up connection to {addr}"), e);
        stream.set_nodelay(true).map_err(io)?;
        let reader = BufReader::new(stream.try_clone().map_err(io)?);
        let mut client = Self {
            writer: stream,
            reader,
            addr,
        };
        client.set_request_timeout(DEFAULT_REQUEST_TIMEOUT)?;
        Ok(client)
    }

    /// Connects from inside `ns`, retrying until a connection answers `PING` with `PONG` or
    /// `timeout` passes. Before each attempt `alive()` is called; its error ends the wait at
    /// once (pass `|| vm.ensure_running()` so a VMM that died is reported, not waited for).
    pub fn connect_retry(
        ns: &Netns,
        addr: SocketAddr,
        timeout: Duration,
        mut alive: impl FnMut() -> Result<()>,
    ) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let mut last_error = String::from("no attempt made");
        let mut attempts = 0u32;
        loop {
            alive()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HarnessError::Timeout {
                    what: format!(
                        "the guest service at {addr} from {} ({attempts} attempts, last: {last_error})",
                        ns.name()
                    ),
                    after: timeout,
                });
            }
            attempts += 1;
            let started = Instant::now();
            match Self::connect(ns, addr, left.min(ATTEMPT_TIMEOUT)).and_then(|mut c| {
                c.set_request_timeout(left.min(ATTEMPT_TIMEOUT * 5))?;
                c.ping()?;
                c.set_request_timeout(DEFAULT_REQUEST_TIMEOUT)?;
                Ok(c)
            }) {
                Ok(c) => return Ok(c),
                Err(e) => last_error = e.to_string(),
            }
            // Failures that took their whole slice have waited already; quick ones pause.
            if started.elapsed() < RETRY_PAUSE {
                std::thread::sleep(
                    RETRY_PAUSE.min(deadline.saturating_duration_since(Instant::now())),
                );
            }
        }
    }

    /// The address connected to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the time limit for each request (send and reply).
    pub fn set_request_timeout(&mut self, timeout: Duration) -> Result<()> {
        let io = |e| HarnessError::io("setting socket timeouts", e);
        self.writer.set_read_timeout(Some(timeout)).map_err(io)?;
        self.writer.set_write_timeout(Some(timeout)).map_err(io)
    }

    /// Sends one request line and returns the reply line (without its terminator). An `ERR`
    /// reply is a [`HarnessError::Guest`]. After a timeout the connection is out of step;
    /// reconnect.
    pub fn request(&mut self, line: &str) -> Result<String> {
        if line.contains(['\n', '\r']) {
            return Err(HarnessError::InvalidArgument(format!(
                "request {line:?} must be a single line"
            )));
        }
        let addr = self.addr;
        let limit = self
            .writer
            .read_timeout()
            .ok()
            .flatten()
            .unwrap_or_default();
        let io = |what: &str, e: std::io::Error| {
            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                HarnessError::Timeout {
                    what: format!("the reply to `{line}` from {addr}"),
                    after: limit,
                }
            } else {
                HarnessError::io(format!("{what} `{line}` ({addr})"), e)
            }
        };
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .map_err(|e| io("sending", e))?;
        let mut reply = String::new();
        let n = self
            .reader
            .read_line(&mut reply)
            .map_err(|e| io("reading the reply to", e))?;
        if n == 0 || !reply.ends_with('\n') {
            return Err(HarnessError::io(
                format!("reading the reply to `{line}` ({})", self.addr),
                std::io::Error::new(ErrorKind::UnexpectedEof, "connection closed by the guest"),
            ));
        }
        let reply = reply.trim_end_matches(['\n', '\r']).to_string();
        if reply == "ERR" || reply.starts_with("ERR ") {
            return Err(HarnessError::Guest {
                request: line.to_string(),
                reply,
            });
        }
        Ok(reply)
    }

    fn request_u64(&mut self, line: &str) -> Result<u64> {
        let reply = self.request(line)?;
        reply.parse().map_err(|_| HarnessError::Protocol {
            request: line.to_string(),
            reply,
        })
    }

    fn request_exact(&mut self, line: &str, expected: &str) -> Result<()> {
        let reply = self.request(line)?;
        if reply == expected {
            Ok(())
        } else {
            Err(HarnessError::Protocol {
                request: line.to_string(),
                reply,
            })
        }
    }

    /// `PING` → `PONG`.
    pub fn ping(&mut self) -> Result<()> {
        self.request_exact("PING", "PONG")
    }

    /// `INCR key` → the new value.
    pub fn incr(&mut self, key: &str) -> Result<u64> {
        check_token("key", key)?;
        self.request_u64(&format!("INCR {key}"))
    }

    /// `GET key` → the value (0 for a key never set).
    pub fn get(&mut self, key: &str) -> Result<u64> {
        check_token("key", key)?;
        self.request_u64(&format!("GET {key}"))
    }

    /// `SET key value` → `OK`.
    pub fn set(&mut self, key: &str, value: u64) -> Result<()> {
        check_token("key", key)?;
        self.request_exact(&format!("SET {key} {value}"), "OK")
    }

    /// `TIME` → guest time in nanoseconds.
    pub fn time_ns(&mut self) -> Result<u64> {
        self.request_u64("TIME")
    }

    /// `STATS` → its `k=v` pairs.
    pub fn stats(&mut self) -> Result<BTreeMap<String, String>> {
        let reply = self.request("STATS")?;
        parse_stats(&reply).ok_or_else(|| HarnessError::Protocol {
            request: "STATS".into(),
            reply,
        })
    }

    /// `VERIFY` → [`Verify`].
    pub fn verify(&mut self) -> Result<Verify> {
        let reply = self.request("VERIFY")?;
        parse_verify(&reply).ok_or_else(|| HarnessError::Protocol {
            request: "VERIFY".into(),
            reply,
        })
    }
}

/// Parses `k=v k=v …` (an empty line is an empty map).
pub fn parse_stats(line: &str) -> Option<BTreeMap<String, String>> {
    line.split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (!k.is_empty()).then(|| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// Parses `OK pages=N writes=M` (other fields allowed) or `FAIL …`.
pub fn parse_verify(line: &str) -> Option<Verify> {
    if line == "FAIL" {
        return Some(Verify::Fail(String::new()));
    }
    if let Some(rest) = line.strip_prefix("FAIL ") {
        return Some(Verify::Fail(rest.to_string()));
    }
    let fields = parse_stats(line.strip_prefix("OK ")?)?;
    Some(Verify::Ok {
        pages: fields.get("pages")?.parse().ok()?,
        writes: fields.get("writes")?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_parse() {
        let m = parse_stats("epoch=3 dirty=12").expect("parse");
        assert_eq!(m.get("epoch").map(String::as_str), Some("3"));
        assert_eq!(m.get("dirty").map(String::as_str), Some("12"));
        assert_eq!(parse_stats(""), Some(BTreeMap::new()));
        assert_eq!(parse_stats("novalue"), None);
        assert_eq!(parse_stats("=3"), None);
    }

    #[test]
    fn verify_parse() {
        assert_eq!(
            parse_verify("OK pages=16384 writes=99"),
            Some(Verify::Ok {
                pages: 16384,
                writes: 99
            })
        );
        assert_eq!(
            parse_verify("OK writes=1 extra=x pages=2"),
            Some(Verify::Ok {
                pages: 2,
                writes: 1
            })
        );
        assert_eq!(
            parse_verify("FAIL page 7 checksum"),
            Some(Verify::Fail("page 7 checksum".into()))
        );
        assert_eq!(parse_verify("FAIL"), Some(Verify::Fail(String::new())));
        assert_eq!(parse_verify("OK pages=x writes=1"), None);
        assert_eq!(parse_verify("OK"), None);
        assert_eq!(parse_verify("MAYBE"), None);
    }

    #[test]
    fn tokens_are_checked() {
        assert!(check_token("key", "k1").is_ok());
        assert!(check_token("key", "").is_err());
        assert!(check_token("key", "a b").is_err());
        assert!(check_token("key", "a\nb").is_err());
    }
}
