//! The port-7000 line protocol: request parsing.
//!
//! Pure `core` code: also compiled into host unit tests by `twin-guest-image`.
//!
//! One `\n`-terminated request per line (a trailing `\r` is ignored), one reply line each:
//! `INCR k`, `GET k`, `SET k v`, `PING`, `TIME`, `STATS`, `VERIFY`. Command names are
//! case-insensitive; keys are case-sensitive byte strings of at most [`MAX_KEY`] bytes;
//! values are unsigned 64-bit integers.

/// Longest key accepted.
pub const MAX_KEY: usize = 128;
/// Longest request line accepted (without the newline).
pub const MAX_LINE: usize = 512;

/// A parsed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    Incr(&'a [u8]),
    Get(&'a [u8]),
    Set(&'a [u8], u64),
    Ping,
    Time,
    Stats,
    Verify,
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(n)
}

fn key<'a>(k: Option<&'a [u8]>, usage: &'static str) -> Result<&'a [u8], &'static str> {
    let k = k.ok_or(usage)?;
    if k.len() > MAX_KEY {
        return Err("key longer than 128 bytes");
    }
    Ok(k)
}

/// Parse one request line (without its `\n`). The error is the reason for an `ERR` reply.
pub fn parse(line: &[u8]) -> Result<Command<'_>, &'static str> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut words = line
        .split(|b| *b == b' ' || *b == b'\t')
        .filter(|w| !w.is_empty());
    let Some(cmd) = words.next() else {
        return Err("empty request");
    };
    let (a, b, extra) = (words.next(), words.next(), words.next().is_some());
    let no_args = |c: Command<'static>, usage: &'static str| {
        if a.is_some() {
            Err(usage)
        } else {
            Ok(c)
        }
    };
    let is = |name: &[u8]| cmd.eq_ignore_ascii_case(name);
    if is(b"INCR") {
        if b.is_some() {
            return Err("usage: INCR <key>");
        }
        Ok(Command::Incr(key(a, "usage: INCR <key>")?))
    } else if is(b"GET") {
        if b.is_some() {
            return Err("usage: GET <key>");
        }
        Ok(Command::Get(key(a, "usage: GET <key>")?))
    } else if is(b"SET") {
        let k = key(a, "usage: SET <key> <value>")?;
        if extra {
            return Err("usage: SET <key> <value>");
        }
        let v = b.ok_or("usage: SET <key> <value>")?;
        let v = parse_u64(v).ok_or("value must be an unsigned 64-bit integer")?;
        Ok(Command::Set(k, v))
    } else if is(b"PING") {
        no_args(Command::Ping, "usage: PING")
    } else if is(b"TIME") {
        no_args(Command::Time, "usage: TIME")
    } else if is(b"STATS") {
        no_args(Command::Stats, "usage: STATS")
    } else if is(b"VERIFY") {
        no_args(Command::Verify, "usage: VERIFY")
    } else {
        Err("unknown command (INCR, GET, SET, PING, TIME, STATS, VERIFY)")
    }
}
