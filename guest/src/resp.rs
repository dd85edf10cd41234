//! The Redis protocol (RESP2) on port 6379: request framing and reply encoding.
//!
//! Pure `core` code (no allocation): also compiled into host unit tests by
//! `twin-guest-image`, and checked against the real `redis-cli` and `redis-benchmark` by
//! the end-to-end tests.
//!
//! A request is an array of bulk strings (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`, what clients
//! send) or an inline command (`PING\r\n`, what a person types into a raw connection).
//! Requests may be pipelined: [`parse`] takes one from the front of the buffer and says how
//! many bytes it used, or that more must arrive first. Every length is checked before it is
//! trusted: a request longer than [`MAX_REQUEST`], with more than [`MAX_ARGS`] arguments or
//! a malformed header is an error, after which the connection is closed (the stream cannot
//! be resynchronised).

/// Most arguments of one request (command name included).
pub const MAX_ARGS: usize = 64;
/// Longest request, all of it (a bulk string counts its header and CRLF).
pub const MAX_REQUEST: usize = 64 << 10;

/// One request's arguments, borrowed from the receive buffer.
#[derive(Clone, Copy)]
pub struct Args<'a> {
    items: [&'a [u8]; MAX_ARGS],
    len: usize,
}

impl<'a> Args<'a> {
    fn new() -> Self {
        Args {
            items: [&[]; MAX_ARGS],
            len: 0,
        }
    }

    fn push(&mut self, a: &'a [u8]) -> Result<(), Error> {
        if self.len == MAX_ARGS {
            return Err(Error::TooManyArgs);
        }
        self.items[self.len] = a;
        self.len += 1;
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: usize) -> Option<&'a [u8]> {
        (i < self.len).then(|| self.items[i])
    }

    /// The arguments after the command name.
    pub fn rest(&self) -> &[&'a [u8]] {
        &self.items[1.min(self.len)..self.len]
    }

    /// Whether the command name is `name` (case-insensitive).
    pub fn is(&self, name: &[u8]) -> bool {
        self.get(0).is_some_and(|c| c.eq_ignore_ascii_case(name))
    }
}

/// Why a request cannot be read. After any of these the connection is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// A header line (`*N`, `$N`) that is not a non-negative decimal number.
    Header,
    /// A bulk string not followed by CRLF.
    Framing,
    /// More than [`MAX_ARGS`] arguments.
    TooManyArgs,
    /// More than [`MAX_REQUEST`] bytes.
    TooLong,
}

impl Error {
    pub fn message(self) -> &'static str {
        match self {
            Error::Header => "Protocol error: invalid multibulk or bulk length",
            Error::Framing => "Protocol error: expected '\\r\\n' after a bulk string",
            Error::TooManyArgs => "Protocol error: too many arguments",
            Error::TooLong => "Protocol error: request too long",
        }
    }
}

/// The line ending at the first `\n` of `buf` (its `\r` removed), and the bytes it used.
fn line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let nl = buf.iter().position(|&b| b == b'\n')?;
    let l = &buf[..nl];
    Some((l.strip_suffix(b"\r").unwrap_or(l), nl + 1))
}

fn number(s: &[u8]) -> Result<usize, Error> {
    if s.is_empty() || s.len() > 10 {
        return Err(Error::Header);
    }
    let mut n: usize = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return Err(Error::Header);
        }
        n = n * 10 + usize::from(b - b'0');
    }
    Ok(n)
}

/// The request at the front of `buf`: `Ok(None)` until it has all arrived, then its
/// arguments and the number of bytes it used. An empty inline line is skipped (`Some` with
/// no arguments).
pub fn parse(buf: &[u8]) -> Result<Option<(Args<'_>, usize)>, Error> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut args = Args::new();
    if first != b'*' {
        // Inline: words separated by spaces, up to the newline.
        let Some((l, used)) = line(buf) else {
            return if buf.len() > MAX_REQUEST {
                Err(Error::TooLong)
            } else {
                Ok(None)
            };
        };
        if used > MAX_REQUEST {
            return Err(Error::TooLong);
        }
        for w in l
            .split(|&b| b == b' ' || b == b'\t')
            .filter(|w| !w.is_empty())
        {
            args.push(w)?;
        }
        return Ok(Some((args, used)));
    }
    let Some((head, mut pos)) = line(buf) else {
        return if buf.len() > 16 {
            Err(Error::Header)
        } else {
            Ok(None)
        };
    };
    let n = number(&head[1..])?;
    if n > MAX_ARGS {
        return Err(Error::TooManyArgs);
    }
    for _ in 0..n {
        let rest = &buf[pos..];
        let Some((h, used)) = line(rest) else {
            return if rest.len() > 16 {
                Err(Error::Header)
            } else {
                Ok(None)
            };
        };
        if h.first() != Some(&b'$') {
            return Err(Error::Header);
        }
        let len = number(&h[1..])?;
        if pos + used + len + 2 > MAX_REQUEST {
            return Err(Error::TooLong);
        }
        let start = pos + used;
        if buf.len() < start + len + 2 {
            return Ok(None);
        }
        if &buf[start + len..start + len + 2] != b"\r\n" {
            return Err(Error::Framing);
        }
        args.push(&buf[start..start + len])?;
        pos = start + len + 2;
    }
    Ok(Some((args, pos)))
}

/// A reply being written into a fixed buffer; [`Writer::overflowed`] when it did not fit.
pub struct Writer<'b> {
    buf: &'b mut [u8],
    len: usize,
    overflow: bool,
}

impl<'b> Writer<'b> {
    pub fn new(buf: &'b mut [u8]) -> Self {
        Writer {
            buf,
            len: 0,
            overflow: false,
        }
    }

    fn put(&mut self, b: &[u8]) {
        if self.len + b.len() > self.buf.len() {
            self.overflow = true;
            return;
        }
        self.buf[self.len..self.len + b.len()].copy_from_slice(b);
        self.len += b.len();
    }

    fn decimal(&mut self, prefix: u8, n: i64) {
        let mut tmp = [0u8; 24];
        let mut i = tmp.len();
        let neg = n < 0;
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            tmp[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if neg {
            i -= 1;
            tmp[i] = b'-';
        }
        self.put(&[prefix]);
        self.put(&tmp[i..]);
        self.put(b"\r\n");
    }

    /// `+OK`.
    pub fn simple(&mut self, s: &[u8]) {
        self.put(b"+");
        self.put(s);
        self.put(b"\r\n");
    }

    /// `-ERR …`.
    pub fn error(&mut self, s: &[u8]) {
        self.put(b"-");
        self.put(s);
        self.put(b"\r\n");
    }

    /// `:n`.
    pub fn integer(&mut self, n: i64) {
        self.decimal(b':', n);
    }

    /// `$len` and the bytes.
    pub fn bulk(&mut self, b: &[u8]) {
        self.decimal(b'$', b.len() as i64);
        self.put(b);
        self.put(b"\r\n");
    }

    /// `$-1`: no such key.
    pub fn null(&mut self) {
        self.put(b"$-1\r\n");
    }

    /// `*n`: `n` elements follow.
    pub fn array(&mut self, n: usize) {
        self.decimal(b'*', n as i64);
    }

    pub fn overflowed(&self) -> bool {
        self.overflow
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}
